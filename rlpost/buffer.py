"""The Redis buffer between rollout workers and the trainer.

Layout, one key prefix per run (``rlpost:{run}:``):

* ``tasks``     stream, consumer group ``workers``: new prompts to answer.
* ``partials``  stream, consumer group ``workers``: unfinished groups to resume (read first).
* ``complete``  stream, consumer group ``trainer``: finished trajectories for training.
* ``eval:{tag}`` plain streams of evaluation trajectories, read by the driver.
* ``dead``      stream of records that could not be decoded, kept with the reason (never dropped).
* ``version``   the current :class:`WeightVersion` (msgpack).
* ``control``   hash of run-wide signals (``stop``, ``abort_round``).
* ``workers``   hash of worker heartbeats (msgpack).
* ``trained``   set of trajectory ids already used by an optimiser step (idempotency).
* ``filtered``  count of groups the trainer dropped (the driver submits prompts in their place).
* ``once:{token}`` one-time token of a submission or a counter increment (expires after an hour;
  not checkpointed).

Consumer groups with explicit acknowledgements give at-least-once delivery: an item read but not
acked stays in the group's pending list and is reclaimed by XAUTOCLAIM when its consumer dies.
Trajectory ids are deterministic (task id + index), and the trainer checks ``trained`` before
using one, so at-least-once delivery never trains a sample twice.

Every write that moves an item on (finish, park, requeue, train, drop) is one Lua script gated on
XACK of the item it consumes: the move happens only if that entry was still pending. A client
retries a command whose reply it lost (a Redis killed after committing it); the second run, and the
finish of a worker that hung while its task was reclaimed and finished elsewhere, acks nothing and
adds nothing. Submissions and the life and round counters carry a one-time token for the same
reason.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable

import msgpack
import redis

from rlpost.records import (
    GroupEntry,
    RecordError,
    Task,
    Trajectory,
    WeightVersion,
    pack_entry,
    pack_task,
    unpack_complete,
    unpack_entry,
    unpack_task,
)

class BufferDataError(ValueError):
    """A control key of the run (version, round, heartbeats) holds something we did not write."""


WORKER_GROUP = "workers"
TRAINER_GROUP = "trainer"
# the streams read through a consumer group, and their group
GROUP_STREAMS = (("tasks", WORKER_GROUP), ("partials", WORKER_GROUP), ("complete", TRAINER_GROUP))

# KEYS: (source stream, destination stream) per item; ARGV: the source's consumer group, then
# (entry id, payload) per item. An item moves only if its XACK acks it; its entry is deleted either way.
_MOVE = """
local moved = 0
for i = 1, #KEYS / 2 do
  local id = ARGV[2 * i]
  if redis.call('XACK', KEYS[2 * i - 1], ARGV[1], id) == 1 then
    redis.call('XADD', KEYS[2 * i], '*', 'data', ARGV[2 * i + 1])
    moved = moved + 1
  end
  redis.call('XDEL', KEYS[2 * i - 1], id)
end
return moved
"""

# KEYS: complete, trained set, filtered counter; ARGV: group, 1 if dropped (not trained), the number
# of entry ids n, the n ids, then the groups' trajectory ids. The ids are recorded as done even if
# an entry was acked before (a retry); the drop counter counts only the entries this call acked.
_CONSUME = """
local n = tonumber(ARGV[3])
local acked = 0
for i = 4, 3 + n do
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  redis.call('XDEL', KEYS[1], ARGV[i])
end
for i = 4 + n, #ARGV do
  redis.call('SADD', KEYS[2], ARGV[i])
end
if ARGV[2] == '1' and acked > 0 then
  redis.call('INCRBY', KEYS[3], acked)
end
return acked
"""

# KEYS: the entry's stream, dead letters; ARGV: the stream's group ('' for the eval streams, read
# without one), entry id, stream name, reason, payload. Recorded only by the call that deletes the
# entry, so a retry after a lost reply (or a second reader of a reclaimed entry) adds no copy.
_DEAD_LETTER = """
local existed = redis.call('XDEL', KEYS[1], ARGV[2])
if ARGV[1] ~= '' then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
end
if existed == 1 then
  redis.call('XADD', KEYS[2], '*', 'stream', ARGV[3], 'entry_id', ARGV[2], 'reason', ARGV[4], 'data', ARGV[5])
end
return existed
"""

# KEYS: tasks, the submission's token key; ARGV: token lifetime (s), then the tasks' payloads.
_SUBMIT = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
for i = 2, #ARGV do
  redis.call('XADD', KEYS[1], '*', 'data', ARGV[i])
end
return #ARGV - 1
"""
# KEYS: hash, the call's token key; ARGV: field, token lifetime (s). HINCRBY once per token: a
# retried call returns the count without counting again.
_INCREMENT = """
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then
  return redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
end
return tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
"""
# a retry comes within RECONNECT_RETRIES' ~30 s; an hour leaves room and keeps few tokens around
ONCE_TOKEN_TTL_S = 3600
ONCE_TOKENS = "once:"  # key prefix of the tokens, under the run's prefix


@dataclass
class Delivery:
    """An item read from a consumer group: ack it with its stream and entry id when done."""

    stream: str
    entry_id: str
    item: Task | GroupEntry


# A Redis that restarts (the driver restarts its private server, with AOF, within a second; a
# shared one fails over) is waited for instead of failing every actor: commands are retried on
# connection errors with exponential back-off, about 30 s in all, then the error is raised.
RECONNECT_RETRIES = 16


def connect(url: str, password: str | None = None, username: str | None = None,
            ssl_ca_certs: str | None = None) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``unix://``); ACL and TLS pass through;
    bounded reconnection (see RECONNECT_RETRIES)."""
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError
    from redis.retry import Retry

    kwargs: dict = {"retry": Retry(ExponentialBackoff(cap=2.0, base=0.05), RECONNECT_RETRIES),
                    "retry_on_error": [ConnectionError, TimeoutError, BusyLoadingError, FileNotFoundError]}
    if password:
        kwargs["password"] = password
    if username:
        kwargs["username"] = username
    if ssl_ca_certs and url.startswith("rediss://"):
        kwargs["ssl_ca_certs"] = ssl_ca_certs
    return redis.Redis.from_url(url, **kwargs)


class RedisBuffer:
    """Typed access to one run's streams. Cheap to construct; each actor makes its own."""

    def __init__(self, client: redis.Redis, run: str):
        if not run or ":" in run or "{" in run:
            raise ValueError(f"buffer run name {run!r} must be non-empty and contain no ':' or '{{'")
        self.client = client
        self.run = run
        self.prefix = f"rlpost:{run}:"
        # the trainer's model vocabulary: complete groups with a token id outside it are dead-lettered
        self.vocab_size: int | None = None
        self._move = client.register_script(_MOVE)
        self._consume_script = client.register_script(_CONSUME)
        self._submit = client.register_script(_SUBMIT)
        self._increment = client.register_script(_INCREMENT)
        self._dead_letter_script = client.register_script(_DEAD_LETTER)

    @classmethod
    def from_url(cls, url: str, run: str, **auth) -> "RedisBuffer":
        return cls(connect(url, **auth), run)

    def key(self, name: str) -> str:
        return self.prefix + name

    # ----------------------------------------------------------------- set-up
    def ensure_groups(self) -> None:
        """Create the streams and consumer groups if missing (idempotent)."""
        for stream, group in GROUP_STREAMS:
            try:
                self.client.xgroup_create(self.key(stream), group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def reset(self) -> None:
        """Delete every key of this run (tests and fresh runs)."""
        keys = list(self.client.scan_iter(match=self.prefix + "*", count=1000))
        if keys:
            self.client.delete(*keys)

    # ----------------------------------------------------------------- tasks
    def put_tasks(self, tasks: Iterable[Task]) -> int:
        """Submit tasks, all or none, once: a retried submission finds its token taken."""
        payloads = [pack_task(task) for task in tasks]
        if payloads:
            self._submit(keys=[self.key("tasks"), self._once_token()], args=[ONCE_TOKEN_TTL_S, *payloads])
        return len(payloads)

    def read_tasks(self, consumer: str, count: int, block_ms: int | None = None) -> list[Delivery]:
        """Up to ``count`` tasks for ``consumer``: partials to resume first, then new tasks."""
        out: list[Delivery] = []
        for stream in ("partials", "tasks"):
            want = count - len(out)
            if want <= 0:
                break
            # Block only on the last stream, and only if nothing was found yet.
            block = block_ms if (stream == "tasks" and not out) else None
            resp = self.client.xreadgroup(WORKER_GROUP, consumer, {self.key(stream): ">"},
                                          count=want, block=block)
            out.extend(self._decode(resp, unpack_task if stream == "tasks" else unpack_entry))
        return out

    def read_own_pending(self, consumer: str, count: int = 1000) -> list[Delivery]:
        """Items this consumer name read but never acked (a previous life of this worker, or a
        run resumed from a checkpoint): served again before anything new."""
        return self._read_own(WORKER_GROUP, consumer, (("partials", unpack_entry), ("tasks", unpack_task)), count)

    def _read_own(self, group: str, consumer: str, streams, count: int) -> list[Delivery]:
        """Entries of ``streams`` ((name, decoder) pairs) delivered to ``consumer`` and not acked."""
        out: list[Delivery] = []
        for stream, decoder in streams:
            resp = self.client.xreadgroup(group, consumer, {self.key(stream): "0"}, count=count)
            out.extend(self._decode(resp, decoder))
        return out

    def reclaim(self, stream: str, group: str, consumer: str, min_idle_ms: int,
                count: int = 100) -> list[Delivery]:
        """Take over items another consumer read but never acked (it crashed or hung)."""
        resp = self.client.xautoclaim(self.key(stream), group, consumer, min_idle_time=min_idle_ms,
                                      start_id="0-0", count=count)
        entries = resp[1]
        decoder = {"tasks": unpack_task, "complete": self._unpack_complete}.get(stream, unpack_entry)
        return self._decode([[self.key(stream).encode(), entries]], decoder)

    def reclaim_work(self, consumer: str, min_idle_ms: int, count: int) -> list[Delivery]:
        """A worker's take-over of idle unacked work, partials first as in read_tasks: items of a
        worker that died for good, or read by a request whose reply was lost (the client's retry
        read the next entries; the first stay pending under its name until reclaimed here)."""
        out = self.reclaim("partials", WORKER_GROUP, consumer, min_idle_ms, count=count)
        if len(out) < count:
            out += self.reclaim("tasks", WORKER_GROUP, consumer, min_idle_ms, count=count - len(out))
        return out

    def park_partials(self, parked: list[tuple[Delivery, GroupEntry]]) -> None:
        """Put unfinished groups back for resumption and ack what they came from, atomically (a
        round cut parks every in-flight group at once)."""
        self._move_items(WORKER_GROUP, [(d, self.key("partials"), pack_entry(partial)) for d, partial in parked])

    def finish_tasks(self, finished: list[tuple[Delivery, Task, list[Trajectory]]]) -> None:
        """Write each task's group of trajectories and ack the task, atomically, so a crash can
        neither lose the samples nor leave a task acked without them; a task no longer pending
        (finished already) adds nothing."""
        moves = []
        for delivery, task, group in finished:
            purpose = group[0].purpose
            stream = "complete" if purpose == "train" else f"eval:{purpose.removeprefix('eval:')}"
            moves.append((delivery, self.key(stream), pack_entry(GroupEntry(task, group))))
        self._move_items(WORKER_GROUP, moves)

    def _move_items(self, group: str, moves: list[tuple[Delivery, str, bytes]]) -> int:
        """Ack each delivery and add its payload to its destination stream, in one script; only
        deliveries still pending move. Returns how many moved."""
        if not moves:
            return 0
        keys, args = [], [group]
        for delivery, destination, payload in moves:
            keys += [delivery.stream, destination]
            args += [delivery.entry_id, payload]
        return int(self._move(keys=keys, args=args))

    def finish_task(self, delivery: Delivery, task: Task, group: list[Trajectory]) -> None:
        self.finish_tasks([(delivery, task, group)])

    # ----------------------------------------------------------------- complete
    def read_complete(self, consumer: str, count: int, block_ms: int | None = None) -> list[Delivery]:
        resp = self.client.xreadgroup(TRAINER_GROUP, consumer, {self.key("complete"): ">"},
                                      count=count, block=block_ms)
        return self._decode(resp, self._unpack_complete)

    def complete_depth(self) -> int:
        """Groups waiting in ``complete`` (backpressure: workers compare it to buffer.max_complete)."""
        return int(self.client.xlen(self.key("complete")))

    def read_own_complete(self, consumer: str, count: int = 1000) -> list[Delivery]:
        """Groups this trainer consumer read but never acked (a rank that died mid-step): its
        next life trains them first instead of waiting for them to go idle."""
        return self._read_own(TRAINER_GROUP, consumer, (("complete", self._unpack_complete),), count)

    def _unpack_complete(self, data: bytes):
        return unpack_complete(data, self.vocab_size)

    def requeue(self, deliveries: list[Delivery]) -> None:
        """Send complete groups back as fresh tasks (too stale to train) and ack them, atomically."""
        self._move_items(TRAINER_GROUP, [(d, self.key("tasks"), pack_task(d.item.task)) for d in deliveries])

    def ack_trained(self, deliveries: list[Delivery]) -> None:
        """Record the groups' trajectories as trained and ack them, atomically."""
        self._consume(deliveries, filtered=False)

    def ack_filtered(self, deliveries: list[Delivery]) -> None:
        """Consume groups the trainer drops (``rollout.filter_uniform_groups``), atomically: their
        trajectories count as done (a redelivery is skipped like a trained one), and the
        ``filtered`` counter tells the driver how many prompts to submit in their place."""
        self._consume(deliveries, filtered=True)

    def discard_copies(self, deliveries: list[Delivery]) -> None:
        """Ack away second copies of groups the trainer already holds, recording nothing: the
        copy it keeps is marked trained when it is trained."""
        self._consume(deliveries, filtered=False, record=False)

    def _consume(self, deliveries: list[Delivery], filtered: bool, record: bool = True) -> None:
        if not deliveries:
            return
        ids = [d.entry_id for d in deliveries]
        traj_ids = [t.traj_id for d in deliveries for t in d.item.group] if record else []
        self._consume_script(keys=[self.key("complete"), self.key("trained"), self.key("filtered")],
                             args=[TRAINER_GROUP, int(filtered), len(ids), *ids, *traj_ids])

    def filtered_groups(self) -> int:
        """Groups dropped by the trainer's filter since the run began."""
        return self._int_field("filtered", None, self.client.get(self.key("filtered")))

    def already_trained(self, traj_ids: list[str]) -> list[bool]:
        if not traj_ids:
            return []
        return [bool(x) for x in self.client.smismember(self.key("trained"), traj_ids)]

    def read_eval(self, tag: str, expected: int, timeout_s: float,
                  while_waiting: Callable[[], None] | None = None) -> list[Trajectory]:
        """Block until ``expected`` eval groups for ``tag`` arrived (or time out); their samples.
        ``while_waiting`` runs between polls (the driver checks its workers are alive there)."""
        stream = self.key(f"eval:{tag}")
        deadline = time.monotonic() + timeout_s
        while True:
            n = self.client.xlen(stream)
            if n >= expected:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"eval '{tag}': {n}/{expected} tasks answered after {timeout_s}s")
            if while_waiting is not None:
                while_waiting()
            time.sleep(0.05)
        entries = self.client.xrange(stream)
        return [t for d in self._decode([(stream, entries)], unpack_entry) for t in d.item.group]

    # ----------------------------------------------------------------- weights & control
    def publish_version(self, version: WeightVersion) -> None:
        self.client.set(self.key("version"), msgpack.packb(vars(version)))

    def current_version(self) -> WeightVersion | None:
        raw = self.client.get(self.key("version"))
        return self._weight_version(raw) if raw else None

    def _weight_version(self, raw: bytes) -> WeightVersion:
        """The ``version`` key, checked: junk there (another program writing our keys) is a
        BufferDataError naming the key, not a TypeError in a worker's poll loop."""
        try:
            body = msgpack.unpackb(raw)
            wv = WeightVersion(**body)
            ok = (type(wv.version) is int and wv.version >= 0 and isinstance(wv.transport, str)
                  and isinstance(wv.location, str) and type(wv.num_bytes) is int)
        except Exception:  # noqa: BLE001 - msgpack and the constructor raise several types
            ok = False
        if not ok:
            raise BufferDataError(f"{self.key('version')} holds {raw[:60]!r}: not a weight version record")
        return wv

    def _int_field(self, key: str, field: str | None, raw: bytes | None) -> int:
        """An integer we wrote to ``key`` (a hash's ``field``, or a plain key with None); junk there
        is a BufferDataError naming it."""
        try:
            return int(raw or 0)
        except ValueError:
            where = self.key(key) + (f" field {field!r}" if field else "")
            raise BufferDataError(f"{where} holds {raw[:60]!r}: not an integer") from None

    def set_signal(self, name: str, value: str = "1") -> None:
        self.client.hset(self.key("control"), name, value)

    def clear_signal(self, name: str) -> None:
        self.client.hdel(self.key("control"), name)

    def signal(self, name: str) -> str | None:
        raw = self.client.hget(self.key("control"), name)
        return raw.decode() if raw is not None else None

    def poll(self) -> tuple[int, int, bool]:
        """(weight version, round, stop) in one round trip: what a worker checks every chunk."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.key("version"))
        pipe.hmget(self.key("control"), ["round", "stop"])
        raw_version, (raw_round, raw_stop) = pipe.execute()
        version = self._weight_version(raw_version).version if raw_version else -1
        return version, self._int_field("control", "round", raw_round), raw_stop is not None

    def advance_round(self) -> int:
        """APRIL: the trainer has its batch; workers stop the round's unfinished generations."""
        return self._increment_once("control", "round")

    def count_life(self, worker: str) -> int:
        """``worker``'s life number (1 for the first): a restarted actor says so in its heartbeats."""
        return self._increment_once("lives", worker)

    def _increment_once(self, hash_name: str, field: str) -> int:
        """HINCRBY by 1, once even if the reply is lost and the client retries (one token a call)."""
        return int(self._increment(keys=[self.key(hash_name), self._once_token()], args=[field, ONCE_TOKEN_TTL_S]))

    def _once_token(self) -> str:
        """A fresh one-time token key for one call (a retry of that call carries the same one)."""
        return self.key(f"{ONCE_TOKENS}{uuid.uuid4().hex}")

    def current_round(self) -> int:
        return self._int_field("control", "round", self.client.hget(self.key("control"), "round"))

    def heartbeat(self, worker: str, info: dict) -> None:
        self.client.hset(self.key("workers"), worker, msgpack.packb({**info, "t": time.time()}))

    def workers(self) -> dict[str, dict]:
        """Heartbeats by worker; an entry that is not a heartbeat is a BufferDataError naming it."""
        out = {}
        for name, raw in self.client.hgetall(self.key("workers")).items():
            try:
                beat = msgpack.unpackb(raw)
                ok = isinstance(beat, dict) and isinstance(beat.get("t"), (int, float))
            except Exception:  # noqa: BLE001
                ok = False
            if not ok:
                raise BufferDataError(f"{self.key('workers')} field {name[:60]!r} holds {raw[:60]!r}: not a heartbeat")
            out[name.decode(errors="replace")] = beat
        return out

    def depth(self) -> dict[str, int]:
        """Queue depths for metrics: unread + pending per stream."""
        out = {}
        for stream, group in GROUP_STREAMS:
            out[stream] = int(self.client.xlen(self.key(stream)))
            try:
                out[f"{stream}_pending"] = int(self.client.xpending(self.key(stream), group)["pending"])
            except redis.ResponseError:
                out[f"{stream}_pending"] = 0
        return out

    # ----------------------------------------------------------------- checkpoints
    def snapshot(self) -> dict[bytes, bytes]:
        """Every key of the run (streams with their consumer groups and pending lists, the trained
        set, the version, control) as Redis DUMP payloads, taken in one MULTI so it is consistent."""
        tokens = self.key(ONCE_TOKENS).encode()
        keys = sorted(k for k in self.client.scan_iter(match=self.prefix + "*", count=1000) if not k.startswith(tokens))
        pipe = self.client.pipeline(transaction=True)
        for key in keys:
            pipe.dump(key)
        return {k: v for k, v in zip(keys, pipe.execute()) if v is not None}

    def restore(self, snapshot: dict[bytes, bytes]) -> None:
        """Replace the run's keys with a snapshot (RESTORE, Redis's own format: nothing unpickled).

        The weight-version pointer is not restored: it names weights the snapshotting process held
        (its Ray object store, its publish), which a resumed run no longer has. Workers of the
        resumed run wait for the trainer to republish the checkpoint's weights instead of fetching
        a version nobody holds."""
        self.reset()
        version_key = self.key("version").encode()
        pipe = self.client.pipeline(transaction=True)
        for key, payload in snapshot.items():
            if key != version_key:
                pipe.restore(key, 0, payload, replace=True)
        pipe.execute()

    # ----------------------------------------------------------------- helpers
    def _decode(self, resp, decoder) -> list[Delivery]:
        out: list[Delivery] = []
        for stream, entries in resp or []:
            stream = stream.decode() if isinstance(stream, bytes) else stream
            for entry_id, fields in entries:
                entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                if fields is None:  # entry deleted while pending
                    self.client.xack(stream, self._group_of(stream), entry_id)
                    continue
                try:
                    item = decoder(fields[b"data"])
                except Exception as exc:  # noqa: BLE001 - any undecodable or invalid entry, never a crash
                    reason = str(exc) if isinstance(exc, RecordError) else f"{type(exc).__name__}: {exc}"
                    self._dead_letter(stream, entry_id, fields, reason)
                    continue
                out.append(Delivery(stream=stream, entry_id=entry_id, item=item))
        return out

    def _group_of(self, stream: str) -> str:
        return TRAINER_GROUP if stream.endswith(":complete") else WORKER_GROUP

    def _dead_letter(self, stream: str, entry_id: str, fields: dict, reason: str) -> None:
        """Move an undecodable entry aside with its reason; it is kept, not lost, not retried, and
        recorded once (one script, gated on deleting the entry)."""
        group = "" if ":eval:" in stream else self._group_of(stream)  # eval streams: XRANGE, no group
        self._dead_letter_script(keys=[stream, self.key("dead")],
                                 args=[group, entry_id, stream, reason[:1000], fields.get(b"data", b"")])
