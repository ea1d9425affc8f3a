"""The Redis buffer against a real redis-server."""

import json
import pickle

import pytest

from rlpost.buffer import TRAINER_GROUP, WORKER_GROUP
from rlpost.records import (GroupEntry, SamplingParams, Status, Task, Trajectory, WeightVersion, unpack_entry,
                            unpack_task)


def make_task(i: int, group_size: int = 2) -> Task:
    return Task(task_id=f"t{i}", prompt_ids=[1, 3 + i], answer=str(i), group_size=group_size,
                sampling=SamplingParams())


def finished_group(task: Task) -> list[Trajectory]:
    group = []
    for k in range(task.group_size):
        traj = Trajectory.start(task, k)
        traj.append([5, 2], [-0.1, -0.2], version=0)
        traj.status = Status.COMPLETE
        traj.reward = float(k)
        group.append(traj)
    return group


def test_task_to_trainer_round_trip(buffer):
    buffer.put_tasks([make_task(i) for i in range(3)])
    got = buffer.read_tasks("w0", count=10, block_ms=100)
    assert [d.item.task_id for d in got] == ["t0", "t1", "t2"]
    for d in got:
        buffer.finish_task(d, d.item, finished_group(d.item))
    # finishing acks and deletes the task entries
    assert buffer.client.xpending(buffer.key("tasks"), WORKER_GROUP)["pending"] == 0
    groups = buffer.read_complete("trainer-0", count=10, block_ms=100)
    assert [[t.traj_id for t in d.item.group] for d in groups] == [["t0/0", "t0/1"], ["t1/0", "t1/1"], ["t2/0", "t2/1"]]
    assert groups[1].item.group[1].reward == 1.0 and groups[1].item.task.task_id == "t1"
    buffer.ack_trained(groups)
    assert buffer.already_trained(["t0/0", "t2/1", "t9/0"]) == [True, True, False]
    assert buffer.client.xpending(buffer.key("complete"), TRAINER_GROUP)["pending"] == 0


def test_unacked_task_is_reclaimed_by_another_worker(buffer):
    buffer.put_tasks([make_task(0), make_task(1)])
    crashed = buffer.read_tasks("w-crashed", count=2, block_ms=100)
    assert len(crashed) == 2
    # nothing new for a second worker, and nothing reclaimable while the first may still be alive
    assert buffer.read_tasks("w-alive", count=2) == []
    assert buffer.reclaim("tasks", WORKER_GROUP, "w-alive", min_idle_ms=60_000) == []
    reclaimed = buffer.reclaim("tasks", WORKER_GROUP, "w-alive", min_idle_ms=0)
    assert sorted(d.item.task_id for d in reclaimed) == ["t0", "t1"]
    pending = buffer.client.xpending_range(buffer.key("tasks"), WORKER_GROUP, "-", "+", 10)
    assert {p["consumer"].decode() for p in pending} == {"w-alive"}


def test_unacked_complete_group_is_reclaimed_and_not_trained_twice(buffer):
    task = make_task(0)
    buffer.put_tasks([task])
    d = buffer.read_tasks("w0", 1, block_ms=100)[0]
    buffer.finish_task(d, task, finished_group(task))
    first = buffer.read_complete("trainer-0", 1, block_ms=100)
    assert len(first) == 1
    again = buffer.reclaim("complete", TRAINER_GROUP, "trainer-1", min_idle_ms=0)
    assert [t.traj_id for t in again[0].item.group] == ["t0/0", "t0/1"]
    buffer.ack_trained(again)
    assert all(buffer.already_trained(["t0/0", "t0/1"]))


def test_a_redelivered_task_yields_the_same_trajectory_ids():
    task = make_task(4, group_size=3)
    assert [t.traj_id for t in finished_group(task)] == [t.traj_id for t in finished_group(task)]


def test_undecodable_entry_goes_to_dead_letters_not_unpickled(buffer):
    evil = pickle.dumps({"x": 1})
    buffer.client.xadd(buffer.key("tasks"), {"data": evil})
    buffer.put_tasks([make_task(1)])
    got = buffer.read_tasks("w0", count=5, block_ms=100)
    assert [d.item.task_id for d in got] == ["t1"]
    dead = buffer.client.xrange(buffer.key("dead"))
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"data"] == evil and b"malformed task" in fields[b"reason"]
    assert buffer.client.xpending(buffer.key("tasks"), WORKER_GROUP)["pending"] == 1  # only t1


def test_poisoned_complete_groups_are_dead_lettered_and_valid_ones_still_train(buffer):
    """A NaN or infinite reward (NaN advantages for the whole group) or a ragged group (GRPO
    cannot normalise it) in ``complete`` goes to dead letters with its reason, read or reclaimed;
    it never reaches the trainer, and the valid group beside it does."""
    from rlpost.records import GroupEntry, pack_entry

    good, nan, ragged, inf = make_task(0), make_task(1), make_task(2, group_size=3), make_task(3)
    bad_nan = finished_group(nan)
    bad_nan[1].reward = float("nan")
    bad_inf = finished_group(inf)
    bad_inf[0].reward = float("inf")
    for task, group in ((nan, bad_nan), (good, finished_group(good)), (ragged, finished_group(ragged)[:2]),
                        (inf, bad_inf)):
        buffer.client.xadd(buffer.key("complete"), {"data": pack_entry(GroupEntry(task, group))})
    got = buffer.read_complete("trainer-0", count=2, block_ms=100)
    got += buffer.reclaim("complete", TRAINER_GROUP, "trainer-1", min_idle_ms=0)
    got += buffer.read_complete("trainer-0", count=10, block_ms=100)
    assert {d.item.task.task_id for d in got} == {"t0"}  # (t0 itself reclaimed once more: pending)
    reasons = [f[b"reason"].decode() for _, f in buffer.client.xrange(buffer.key("dead"))]
    assert len(reasons) == 3
    assert "t1/1: reward=nan is not a finite number" in reasons[0]
    assert "group t2: 2 samples, task.group_size=3" in reasons[1]
    assert "t3/0: reward=inf" in reasons[2]
    assert buffer.client.xpending(buffer.key("complete"), TRAINER_GROUP)["pending"] == 1  # only t0


def test_version_and_signals(buffer):
    assert buffer.current_version() is None
    buffer.publish_version(WeightVersion(version=3, transport="file", location="/x", num_bytes=10))
    wv = buffer.current_version()
    assert (wv.version, wv.transport, wv.location, wv.num_bytes) == (3, "file", "/x", 10)
    assert buffer.signal("stop") is None
    buffer.set_signal("stop")
    assert buffer.signal("stop") == "1"
    buffer.clear_signal("stop")
    assert buffer.signal("stop") is None


def test_depth_counts_unread_and_pending(buffer):
    buffer.put_tasks([make_task(i) for i in range(4)])
    buffer.read_tasks("w0", count=1)
    depth = buffer.depth()
    assert depth["tasks"] == 4 and depth["tasks_pending"] == 1 and depth["complete"] == 0


def test_restore_brings_back_queues_but_not_the_weight_pointer(buffer):
    """A resumed run's workers must not fetch the weights the killed process had published."""
    buffer.put_tasks([make_task(i) for i in range(3)])
    buffer.read_tasks("w0", count=1)  # one pending: must come back pending for whoever resumes
    buffer.publish_version(WeightVersion(version=2, transport="ray", location="gone", num_bytes=1))
    snapshot = buffer.snapshot()
    buffer.put_tasks([make_task(9)])  # after the checkpoint: lost with the process
    buffer.restore(snapshot)
    assert buffer.current_version() is None
    assert buffer.depth()["tasks"] == 3 and buffer.depth()["tasks_pending"] == 1
    reclaimed = buffer.read_tasks("w1", count=10, block_ms=100)
    assert [d.item.task_id for d in reclaimed][-2:] == ["t1", "t2"]


def test_a_round_cut_parks_all_groups_in_one_transaction(buffer):
    from rlpost.records import GroupEntry

    buffer.put_tasks([make_task(i) for i in range(3)])
    got = buffer.read_tasks("w0", count=3)
    parked = []
    for d in got[:2]:
        group = [Trajectory.start(d.item, k) for k in range(d.item.group_size)]
        group[0].append([7], [-0.5], version=3)
        group[0].status = Status.PARTIAL
        parked.append((d, GroupEntry(d.item, group)))
    buffer.park_partials(parked)
    depth = buffer.depth()
    assert depth["tasks"] == 1 and depth["tasks_pending"] == 1 and depth["partials"] == 2
    resumed = buffer.read_tasks("w1", count=10)
    assert [d.item.task.task_id for d in resumed] == ["t0", "t1"]  # partials first, in order
    assert resumed[0].item.group[0].response_ids.tolist() == [7]
    assert resumed[0].item.group[0].versions.tolist() == [3]


def _poisoned_group(task, field, value):
    """A finished group whose first trajectory's ``field`` was replaced in its msgpack body."""
    import msgpack

    from rlpost.records import pack_group, pack_task, pack_trajectory

    group = finished_group(task)
    body = msgpack.unpackb(pack_trajectory(group[0]), raw=False)
    if field in ("dtype", "shape", "data"):
        body["response_ids"][field] = value
    else:
        body[field] = value
    first = msgpack.packb(body, use_bin_type=True)
    rest = msgpack.unpackb(pack_group(group[1:]), raw=False)
    return msgpack.packb({"task": pack_task(task), "group": msgpack.packb([first, *rest], use_bin_type=True)},
                         use_bin_type=True)


POISON = {
    "wrong-length array": ("data", b"\x00" * 3),
    "dtype 123": ("dtype", 123),
    "dtype object": ("dtype", "|O"),
    "shape 'ab'": ("shape", "ab"),
    "0-d array": ("shape", []),
    "reward a string": ("reward", "1.0"),
    "status a list": ("status", [1]),
}


def test_poisoned_entries_in_every_stream_are_dead_lettered_and_the_run_goes_on(buffer):
    """Valid msgpack with wrong contents used to raise ValueError/TypeError/IndexError outside
    the dead-letter path and crash the trainer (and any consumer that reclaimed the entry)."""
    import msgpack

    from rlpost.records import GroupEntry, pack_entry, pack_task

    good = make_task(0)
    for i, (field, value) in enumerate(POISON.values()):
        buffer.client.xadd(buffer.key("complete"), {"data": _poisoned_group(make_task(10 + i), field, value)})
    buffer.client.xadd(buffer.key("complete"), {"data": pack_entry(GroupEntry(good, finished_group(good)))})
    got = buffer.read_complete("trainer-0", count=20, block_ms=100)
    assert [d.item.task.task_id for d in got] == ["t0"]
    # tasks: wrong types and ranges
    bad_tasks = []
    for key, value in {"group_size": -1, "prompt_ids": ["a"], "answer": 5, "min_version": "x"}.items():
        body = msgpack.unpackb(pack_task(make_task(1)), raw=False)
        body[key] = value
        bad_tasks.append(msgpack.packb(body, use_bin_type=True))
    body = msgpack.unpackb(pack_task(make_task(1)), raw=False)
    body["sampling"]["max_new_tokens"] = "many"
    bad_tasks.append(msgpack.packb(body, use_bin_type=True))
    for raw in bad_tasks:
        buffer.client.xadd(buffer.key("tasks"), {"data": raw})
    buffer.put_tasks([make_task(2)])
    assert [d.item.task_id for d in buffer.read_tasks("w0", count=20, block_ms=100)] == ["t2"]
    # a reclaiming consumer meets nothing poisoned either (it was moved aside, not left pending)
    assert buffer.reclaim("complete", TRAINER_GROUP, "trainer-1", min_idle_ms=0)[0].item.task.task_id == "t0"
    # eval streams
    buffer.client.xadd(buffer.key("eval:x"), {"data": _poisoned_group(make_task(30), "shape", "ab")})
    buffer.client.xadd(buffer.key("eval:x"), {"data": pack_entry(GroupEntry(make_task(31), finished_group(make_task(31))))})
    assert [t.task_id for t in buffer.read_eval("x", expected=2, timeout_s=1)] == ["t31", "t31"]
    dead = [f[b"reason"].decode() for _, f in buffer.client.xrange(buffer.key("dead"))]
    assert len(dead) == len(POISON) + len(bad_tasks) + 1
    assert any("group_size=-1" in r for r in dead) and any("max_new_tokens='many'" in r for r in dead)
    assert any("unsupported dtype 123" in r for r in dead) and any("shape 'ab'" in r for r in dead)


def test_junk_in_control_keys_is_a_clear_error_naming_the_key(buffer):
    import pytest

    from rlpost.buffer import BufferDataError

    buffer.client.set(buffer.key("version"), b"not msgpack \xc1")
    with pytest.raises(BufferDataError, match=r"rlpost:.*:version holds .*not a weight version record"):
        buffer.poll()
    buffer.client.delete(buffer.key("version"))
    buffer.client.hset(buffer.key("control"), "round", "seven")
    with pytest.raises(BufferDataError, match=r":control field 'round' holds b'seven': not an integer"):
        buffer.poll()
    buffer.client.hdel(buffer.key("control"), "round")
    buffer.client.hset(buffer.key("workers"), "w9", b"\x01\x02")
    with pytest.raises(BufferDataError, match=r":workers field b'w9' holds .*not a heartbeat"):
        buffer.workers()
    buffer.client.set(buffer.key("filtered"), "zz")  # was a bare ValueError in the driver's refill
    with pytest.raises(BufferDataError, match=r":filtered holds b'zz': not an integer"):
        buffer.filtered_groups()
    # python -m rlpost.status names each of them instead of stopping at the first
    from rlpost.status import format_report, report

    buffer.client.set(buffer.key("version"), b"junk")
    buffer.client.hset(buffer.key("control"), "round", "seven")
    r = report(buffer)
    assert len(r["errors"]) == 4 and r["filtered_groups"] is None and r["workers"] == {}
    assert "error: " in format_report(r) and r["streams"]["tasks"]["entries"] == 0


def test_groups_with_token_ids_the_model_cannot_embed_are_dead_lettered(buffer):
    """A token id at or past the trainer's vocabulary (or a negative, float or missing prompt)
    would fail the trainer's forward pass, and again after every restart: such a group goes to
    dead letters with its reason, read or reclaimed, and the valid one beside it trains."""
    import numpy as np

    from rlpost.records import GroupEntry, pack_entry

    buffer.vocab_size = 32
    good, big, neg, flt, empty = (make_task(i) for i in range(5))
    bad_big = finished_group(big)
    bad_big[1].response_ids = np.array([5, 32], dtype="<i4")[:len(bad_big[1])]
    bad_neg = finished_group(neg)
    bad_neg[0].prompt_ids = np.array([1, -3], dtype="<i4")
    bad_flt = finished_group(flt)
    bad_flt[0].prompt_ids = np.array([1.0, 2.5], dtype="<f4")
    bad_empty = finished_group(empty)
    bad_empty[1].prompt_ids = np.zeros(0, dtype="<i4")
    for task, group in ((big, bad_big), (good, finished_group(good)), (neg, bad_neg), (flt, bad_flt),
                        (empty, bad_empty)):
        buffer.client.xadd(buffer.key("complete"), {"data": pack_entry(GroupEntry(task, group))})
    got = buffer.read_complete("trainer-0", count=2, block_ms=100)
    got += buffer.reclaim("complete", TRAINER_GROUP, "trainer-1", min_idle_ms=0)
    got += buffer.read_complete("trainer-0", count=10, block_ms=100)
    assert {d.item.task.task_id for d in got} == {"t0"}
    reasons = [f[b"reason"].decode() for _, f in buffer.client.xrange(buffer.key("dead"))]
    assert len(reasons) == 4
    assert "t1/1: token id 32 is outside the model's vocabulary of 32" in reasons[0]
    assert "t2/0: field 'prompt_ids' must hold non-negative integer token ids" in reasons[1]
    assert "t3/0: field 'prompt_ids' must hold non-negative integer token ids (dtype float" in reasons[2]
    assert "t4/1: field 'prompt_ids' is empty" in reasons[3]


def _complete_groups(buffer, rewards_per_group: list[list[float]]) -> None:
    """Groups through the worker's path into ``complete``, with the given rewards."""
    tasks = [make_task(i, group_size=len(r)) for i, r in enumerate(rewards_per_group)]
    buffer.put_tasks(tasks)
    for d, rewards in zip(buffer.read_tasks("w0", count=len(tasks), block_ms=100), rewards_per_group):
        group = finished_group(d.item)
        for traj, reward in zip(group, rewards):
            traj.reward = reward
        buffer.finish_task(d, d.item, group)


def _collector(buffer, cfg, run_dir, version: int = 0):
    """The trainer rank's group collection, without its DeepSpeed engine (what it reads is Redis)."""
    from types import SimpleNamespace

    from rlpost.trainer.actor import TrainerRank

    rank = SimpleNamespace(buffer=buffer, cfg=cfg, version=version, consumer="trainer-0", rank=0, _own_pending_read=False,
                           run_dir=str(run_dir))
    rank._log_ids = lambda *args: TrainerRank._log_ids(rank, *args)
    return lambda want: TrainerRank._collect_groups(rank, want, timeout_s=5, step=1)


def test_uniform_reward_groups_are_dropped_up_to_the_budget_and_counted_for_the_driver(buffer, small_cfg, tmp_path):
    """rollout.filter_uniform_groups (DAPO's dynamic sampling): a group whose rewards are all equal
    teaches nothing under GRPO; the trainer consumes it without training, marks its samples done
    and counts it, so the driver submits a prompt in its place."""
    import copy

    cfg = copy.deepcopy(small_cfg)
    cfg.rollout.filter_uniform_groups, cfg.rollout.filter_max_batches = True, 1.0
    _complete_groups(buffer, [[1, 1], [0, 1], [0, 0], [1, 0], [0.5, 0.5], [0, 1], [1, 1]])
    c = _collector(buffer, cfg, tmp_path)(2)
    got, dropped = c.groups, c.dropped
    assert [d.item.task.task_id for d in got] == ["t1", "t3"] and c.stale_restarted == 0
    assert [d.item.task.task_id for d in dropped] == ["t0", "t2"]  # the budget: 1 x want = 2
    assert buffer.filtered_groups() == 2
    # logged as they are dropped (a rank that dies before its step ends leaves the record)
    logged = [i for line in open(tmp_path / "trained_ids.rank0.jsonl") for i in json.loads(line)["filtered"]]
    assert logged == ["t0/0", "t0/1", "t2/0", "t2/1"]
    assert buffer.already_trained(["t0/0", "t0/1", "t2/1", "t1/0"]) == [True, True, True, False]
    assert buffer.client.xpending(buffer.key("complete"), TRAINER_GROUP)["pending"] == 2  # the kept, until trained
    assert buffer.client.xlen(buffer.key("complete")) == 5  # the dropped are gone, three not read yet
    buffer.ack_trained(got)
    # the next step has its own budget; with it spent, a uniform group is trained as it is
    cfg.rollout.filter_max_batches = 0.5
    c = _collector(buffer, cfg, tmp_path)(2)
    got, dropped = c.groups, c.dropped
    assert [d.item.task.task_id for d in dropped] == ["t4"] and [d.item.task.task_id for d in got] == ["t5", "t6"]
    assert buffer.filtered_groups() == 3
    cfg.rollout.filter_uniform_groups = False  # off: nothing is dropped
    _complete_groups(buffer, [[1, 1]])
    c = _collector(buffer, cfg, tmp_path)(1)
    assert len(c.groups) == 1 and c.dropped == [] and buffer.filtered_groups() == 3


@pytest.fixture
def flaky(redis_url, buffer):
    """The test's buffer behind a proxy that can lose a reply (tests/lost_reply.py), and the
    proxy; the buffer's own client (``buffer``) sees the server directly."""
    from lost_reply import LostReplyProxy

    from rlpost.buffer import RedisBuffer, connect

    proxy = LostReplyProxy(redis_url.removeprefix("unix://"))
    yield RedisBuffer(connect(proxy.url), buffer.run), proxy
    proxy.close()


WRITES = (b"EXEC", b"EVALSHA", b"XADD", b"HINCRBY")


def test_a_write_whose_reply_is_lost_is_applied_once(buffer, flaky):
    """Redis ran a write but died before replying (a SIGKILL after an appendfsync=always commit):
    the client's retry sends the write again. Every write that moves items (submit, finish, park,
    requeue, drop) or counts (worker lives, APRIL rounds) must come out as if it ran once: no
    group twice in ``complete``, no task twice, no drop, restart or round counted twice. (Found by CI: after a Redis kill, a retried finish put 4 groups in
    ``complete`` twice and the trainer trained them twice in one step.)"""
    via, proxy = flaky
    proxy.lose_reply_to(*WRITES)
    via.put_tasks([make_task(i) for i in range(3)])
    assert proxy.dropped == 1
    assert buffer.client.xlen(buffer.key("tasks")) == 3

    got = via.read_tasks("w0", count=3, block_ms=100)
    proxy.lose_reply_to(*WRITES)
    via.finish_tasks([(d, d.item, finished_group(d.item)) for d in got[:2]])
    assert proxy.dropped == 2
    assert [unpack_entry(f[b"data"]).task.task_id for _, f in buffer.client.xrange(buffer.key("complete"))] == ["t0", "t1"]
    assert buffer.client.xpending(buffer.key("tasks"), WORKER_GROUP)["pending"] == 1

    proxy.lose_reply_to(*WRITES)
    partial = finished_group(got[2].item)
    via.park_partials([(got[2], GroupEntry(got[2].item, partial))])
    assert proxy.dropped == 3
    assert buffer.client.xlen(buffer.key("partials")) == 1 and buffer.client.xlen(buffer.key("tasks")) == 0

    groups = via.read_complete("trainer-0", count=2, block_ms=100)
    proxy.lose_reply_to(*WRITES)
    via.requeue(groups[:1])
    assert proxy.dropped == 4
    assert [unpack_task(f[b"data"]).task_id for _, f in buffer.client.xrange(buffer.key("tasks"))] == ["t0"]
    proxy.lose_reply_to(*WRITES)
    via.ack_filtered(groups[1:])
    assert proxy.dropped == 5
    assert buffer.filtered_groups() == 1 and buffer.client.xlen(buffer.key("complete")) == 0
    assert buffer.already_trained(["t1/0", "t1/1"]) == [True, True]
    # the counters: a worker's life number (the summary's restarts) and the APRIL round
    for count in (via.count_life, lambda _: via.advance_round()):
        assert count("worker-0") == 1
        proxy.lose_reply_to(*WRITES)
        assert count("worker-0") == 2
    assert proxy.dropped == 7
    assert buffer.current_round() == 2 and buffer.client.hget(buffer.key("lives"), "worker-0") == b"2"


def test_a_dead_letter_whose_reply_is_lost_is_recorded_once(buffer, flaky):
    """Moving an undecodable entry aside is one write too: its retry after a lost reply must not
    record the entry twice (it did, as a MULTI, before it became a script gated on the delete)."""
    via, proxy = flaky
    buffer.client.xadd(buffer.key("tasks"), {"data": pickle.dumps({"x": 1})})
    buffer.put_tasks([make_task(1)])
    proxy.lose_reply_to(b"EVALSHA", b"EXEC")
    got = via.read_tasks("w0", count=5, block_ms=100)
    assert proxy.dropped == 1 and [d.item.task_id for d in got] == ["t1"]
    dead = buffer.client.xrange(buffer.key("dead"))
    assert len(dead) == 1 and b"malformed task" in dead[0][1][b"reason"]
    assert buffer.client.xlen(buffer.key("tasks")) == 1  # t1 only: the junk entry is gone
    assert buffer.client.xpending(buffer.key("tasks"), WORKER_GROUP)["pending"] == 1


def test_a_late_finish_of_a_reclaimed_task_adds_nothing(buffer):
    """A worker that hung past reclaim_idle_ms finishes a task another worker already reclaimed
    and finished: only the first finish reaches ``complete``."""
    buffer.put_tasks([make_task(0)])
    slow = buffer.read_tasks("w-slow", count=1, block_ms=100)[0]
    fast = buffer.reclaim("tasks", WORKER_GROUP, "w-fast", min_idle_ms=0)[0]
    buffer.finish_task(fast, fast.item, finished_group(fast.item))
    buffer.finish_task(slow, slow.item, finished_group(slow.item))
    assert buffer.client.xlen(buffer.key("complete")) == 1


def test_a_group_in_complete_twice_is_trained_once(buffer, small_cfg, tmp_path):
    """The trainer's own guard, whatever Redis delivers: a second copy of a group read in the same
    step (written twice by an older client, or restored from a file) is acked away, not trained,
    and not marked trained before the kept copy is."""
    _complete_groups(buffer, [[0, 1], [1, 0]])
    first, second = buffer.client.xrange(buffer.key("complete"))
    buffer.client.xadd(buffer.key("complete"), {"data": first[1][b"data"]})  # t0 again
    _complete_groups(buffer, [[0, 1], [1, 0], [0, 1]])  # t0, t1 (copies again) and t2
    c = _collector(buffer, small_cfg, tmp_path)(3)
    assert [d.item.task.task_id for d in c.groups] == ["t0", "t1", "t2"] and c.redelivered == 3
    assert buffer.already_trained(["t0/0", "t1/0", "t2/0"]) == [False, False, False]
    assert buffer.client.xpending(buffer.key("complete"), TRAINER_GROUP)["pending"] == 3


def test_items_read_by_a_request_whose_reply_was_lost_are_reclaimed(buffer, flaky):
    """A read that Redis ran but whose reply was lost leaves its entries pending under the reader's
    name while the retry reads the next ones: the worker's and the trainer's reclaims bring them
    back (partials too: a parked group must not wait for a worker restart that never comes)."""
    via, proxy = flaky
    buffer.put_tasks([make_task(i) for i in range(4)])
    d = buffer.read_tasks("w-old", count=2, block_ms=100)
    buffer.park_partials([(x, GroupEntry(x.item, finished_group(x.item))) for x in d])
    proxy.lose_reply_to(b"XREADGROUP")
    got = via.read_tasks("w0", count=1, block_ms=100)
    assert proxy.dropped == 1 and len(got) == 1  # the retry read the next entry
    back = via.reclaim_work("w0", min_idle_ms=0, count=10)  # idle 0: also takes the one just read
    assert {x.item.task.task_id for x in back} == {"t0", "t1"} and {x.stream for x in back} == {buffer.key("partials")}

    via.finish_tasks([(x, x.item.task, x.item.group) for x in got + back])  # t1 twice: once in complete
    assert buffer.client.xlen(buffer.key("complete")) == 2
    proxy.lose_reply_to(b"XREADGROUP")
    first = via.read_complete("trainer-0", count=1, block_ms=100)
    assert proxy.dropped == 2 and len(first) == 1
    again = via.reclaim("complete", TRAINER_GROUP, "trainer-0", min_idle_ms=0)
    assert {x.item.task.task_id for x in again} == {"t0", "t1"}  # the one whose reply was lost too


def test_a_stale_group_requeued_and_regenerated_within_one_step_is_trained(buffer, small_cfg, tmp_path):
    """A group too stale to train goes back as a task; its regeneration (same trajectory ids)
    may come back while the step is still collecting: it is trained, not taken for a copy.
    (The first copy guard held requeued ids too and discarded every regenerated group: the
    worker-kill e2e run lost prompts and hung.)"""
    import copy

    cfg = copy.deepcopy(small_cfg)
    cfg.mode, cfg.rollout.max_staleness = "april", 1
    _complete_groups(buffer, [[0, 1]])
    rank_version = 3  # the group's tokens are version 0: too stale
    collect = _collector(buffer, cfg, tmp_path, version=rank_version)
    regenerated = {}

    def regenerate():  # a worker answering the requeued task while the trainer waits
        d = buffer.read_tasks("w1", count=1, block_ms=2000)[0]
        group = finished_group(d.item)
        for t in group:
            t.versions[:] = rank_version
        buffer.finish_task(d, d.item, group)
        regenerated["id"] = d.item.task_id

    import threading

    worker = threading.Thread(target=regenerate)
    worker.start()
    c = collect(1)
    worker.join()
    assert c.stale_restarted == 1 and regenerated["id"] == "t0" and c.redelivered == 0
    assert [d.item.task.task_id for d in c.groups] == ["t0"] and set(c.groups[0].item.group[0].versions) == {rank_version}


def test_the_status_report_says_where_every_item_is(buffer, capsys):
    """python -m rlpost.status: entries, unread, read-and-not-acked by consumer, dead letters with
    their reasons, trained and dropped counts, weight version, round and heartbeats."""
    from rlpost.status import main, report

    buffer.put_tasks([make_task(i) for i in range(5)])
    got = buffer.read_tasks("w0", count=3, block_ms=100)
    buffer.park_partials([(got[0], GroupEntry(got[0].item, finished_group(got[0].item)))])
    buffer.finish_tasks([(d, d.item, finished_group(d.item)) for d in got[1:]])
    trained = buffer.read_complete("trainer-0", count=1, block_ms=100)
    buffer.ack_trained(trained)
    buffer.read_complete("trainer-0", count=1, block_ms=100)  # read, not acked
    buffer.client.xadd(buffer.key("complete"), {"data": b"junk"})
    buffer.read_complete("trainer-0", count=5, block_ms=100)  # the junk is dead-lettered
    buffer.publish_version(WeightVersion(version=3, transport="file", location="x", num_bytes=1))
    buffer.heartbeat("worker-0", {"version": 3, "tasks": 2, "samples": 4, "restarts": 0})
    r = report(buffer)
    assert r["streams"]["tasks"] == {"entries": 2, "unread": 2, "pending": 0, "consumers": {}}
    assert r["streams"]["partials"]["entries"] == 1 and r["streams"]["partials"]["unread"] == 1
    complete = r["streams"]["complete"]
    assert complete["entries"] == 1 and complete["pending"] == 1 and list(complete["consumers"]) == ["trainer-0"]
    assert r["dead"]["entries"] == 1 and r["dead"]["by_stream"] == {"complete": 1}
    assert r["trained_samples"] == 2 and r["weight_version"] == 3 and r["workers"]["worker-0"]["tasks"] == 2
    url = buffer.client.connection_pool.connection_kwargs["path"]
    assert main(["--url", f"unix://{url}", "--run", buffer.run]) == 0
    out = capsys.readouterr().out
    assert "2 samples trained" in out and "trainer-0 1 (idle" in out and "worker-0: last beat" in out
    assert main(["--url", f"unix://{url}"]) == 2 and "--url needs --run" in capsys.readouterr().err


def test_the_status_of_a_run_directory_is_read_live_or_says_what_is_missing(buffer, tmp_path, capsys):
    from rlpost.status import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert main([str(run_dir)]) == 2 and "no run_id file" in capsys.readouterr().err
    (run_dir / "run_id").write_text(buffer.run)
    url = "unix://" + buffer.client.connection_pool.connection_kwargs["path"]
    (run_dir / "placement.json").write_text(json.dumps({"buffer": url}))
    buffer.put_tasks([make_task(0)])
    assert main([str(run_dir), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["source"] == "live" and r["streams"]["tasks"]["unread"] == 1
    (run_dir / "placement.json").write_text(json.dumps({"buffer": f"unix://{tmp_path}/gone.sock"}))
    assert main([str(run_dir)]) == 2 and "no append-only file" in capsys.readouterr().err
    (run_dir / "placement.json").write_text(json.dumps({"buffer": "http://x"}))
    assert main([str(run_dir)]) == 2 and "placement.json: buffer='http://x'" in capsys.readouterr().err
    (run_dir / "run_id").write_text("a:b")
    assert main([str(run_dir)]) == 2 and "not a run id" in capsys.readouterr().err
