"""The rollout worker: pulls tasks from Redis, generates groups, scores them, writes them back.

It runs one long ``run()`` loop inside a Ray actor and is steered only through Redis, polled once
per chunk of tokens (one round trip): the ``version`` key (new weights: swap and continue the
unfinished samples from their exact tokens, so every token carries the version that produced it),
the APRIL ``round`` counter (the trainer has its batch: park every unfinished group as a partial
and move on) and ``stop``. A group is written to the trainer the moment its last member finishes,
not when the slowest sample of the batch does.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from rlpost.buffer import Delivery, RedisBuffer
from rlpost.config import RlpostConfig
from rlpost.envs.base import observe_bounded
from rlpost.records import GroupEntry, Status, Task, Trajectory
from rlpost.rollout.engine import GenOutput, GenRequest, make_engine
from rlpost.rollout.scoring import GroupScorer, OverlongPenalty
from rlpost.scheduler import too_stale
from rlpost.tokenizer import end_ids
from rlpost.weights import fetch_weights, load_published

UNFINISHED = (Status.PENDING, Status.PARTIAL)


@dataclass
class WorkerStats:
    tasks: int = 0
    samples: int = 0
    tokens: int = 0
    gen_s: float = 0.0
    idle_s: float = 0.0
    weight_swaps: int = 0
    weight_fetch_s: float = 0.0
    reward_errors: int = 0
    reward_s: float = 0.0  # scoring time, summed over groups (off the decode path)
    parked_groups: int = 0
    resumed_groups: int = 0
    stale_restarts: int = 0
    aborted_tokens: int = 0
    kv_reused: int = 0  # resumed samples continued from the engine's retained KV (engine.reuse_kv)
    backpressure_s: float = 0.0  # waiting because `complete` was full (buffer.max_complete)
    restarts: int = 0  # times this worker was restarted after dying (rollout.max_restarts)
    started_at: float = field(default_factory=time.time)


@dataclass
class WorkItem:
    delivery: Delivery
    task: Task
    group: list[Trajectory]
    shipped: bool = False
    scoring: bool = False  # complete, its rewards being computed off the decode path

    @property
    def done(self) -> bool:
        return all(t.status not in UNFINISHED for t in self.group)


def engine_device(num_gpus: float) -> str:
    """The rollout engine's device: the GPU Ray gave this worker when ``engine.num_gpus`` > 0 (Ray
    sets CUDA_VISIBLE_DEVICES to it, so it is ``cuda`` here, shared with a colocated trainer
    rank), else the CPU. (The native engine ran on the CPU even with a GPU assigned.)"""
    if num_gpus <= 0:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(f"engine.num_gpus={num_gpus}: this rollout worker sees no CUDA device "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return "cuda"


class RolloutWorker:
    def __init__(self, cfg: RlpostConfig, index: int, buffer_url: str, run: str,
                 buffer_auth: dict | None = None):
        from rlpost.envs import make_env

        torch.set_num_threads(cfg.rollout.threads)
        self.cfg = cfg
        self.name = f"worker-{index}"
        self.buffer = RedisBuffer.from_url(buffer_url, run, **(buffer_auth or {}))
        self.env = make_env(cfg.env, cfg.sandbox)
        self.engine = make_engine(cfg.model, cfg.engine, eos_id=self.env.tokenizer.eos_id,
                                  pad_id=self.env.tokenizer.pad_id, seed=cfg.seed * 1000 + index,
                                  device=engine_device(cfg.engine.num_gpus))
        # a checkpoint's other end-of-generation ids (generation_config.json), beside the eos
        self._end_ids = tuple(i for i in end_ids(self.env.tokenizer) if i != self.env.tokenizer.eos_id)
        self.stats = WorkerStats()
        self.stats.restarts = self._lives(index) - 1
        self._last_beat = 0.0
        self._depth_checked_at, self._depth_seen, self._started_since = 0.0, 0, 0
        self._backlog: list[Delivery] = []  # read, not yet startable (waits for newer weights)
        # APRIL fetches published weights in the background and loads them at the round cut
        self._fetcher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights")
        self._prefetch: tuple[int, concurrent.futures.Future] | None = None
        overlong = OverlongPenalty(cfg.env.overlong_buffer, cfg.env.overlong_penalty, cfg.rollout.max_new_tokens) \
            if cfg.env.overlong_buffer > 0 else None
        self.scorer: GroupScorer[WorkItem] = GroupScorer(self.env, cfg.env.reward_timeout_s, cfg.env.reward_workers,
                                                         overlong)

    def _lives(self, index: int) -> int:
        """This worker's life number (1 for the first), counted in Redis: a restarted actor says
        so in its heartbeats and the run's summary."""
        return self.buffer.count_life(f"worker-{index}")

    def where(self) -> dict:
        from rlpost.placement import where

        return {**where(), "worker": self.name}

    # ------------------------------------------------------------------ weights
    def maybe_update_weights(self) -> bool:
        """Fetch and load newer weights if published; True if the version changed."""
        wv = self.buffer.current_version()
        if wv is None or wv.version == self.engine.version:
            return False
        t0 = time.perf_counter()
        prefetched = self._take_prefetched(wv.version)
        if prefetched is not None:
            self.engine.load_weights(*prefetched)
        else:
            load_published(wv, self.engine.load_weights, self.buffer.current_version)
        self.stats.weight_swaps += 1
        self.stats.weight_fetch_s += time.perf_counter() - t0
        return True

    def _prefetch_weights(self, version: int) -> None:
        """Start fetching ``version`` (just published) on a background thread, so the swap at the
        next round cut only loads tensors instead of also waiting for the transfer."""
        if version == self.engine.version or (self._prefetch is not None and self._prefetch[0] >= version):
            return
        wv = self.buffer.current_version()
        if wv is not None and wv.transport != "shm":  # shm has no transfer to hide: the swap reads the slot
            self._prefetch = (wv.version, self._fetcher.submit(fetch_weights, wv))

    def _take_prefetched(self, version: int) -> tuple[dict, int] | None:
        """The prefetched (state, version) if it is at least ``version``; a failed or older fetch
        is dropped (the caller fetches synchronously)."""
        prefetch, self._prefetch = self._prefetch, None
        if prefetch is None or prefetch[0] < version:
            return None
        try:
            return prefetch[1].result()
        except Exception:  # noqa: BLE001 - e.g. the store moved on; fetch again in the foreground
            return None

    def _must_swap(self, published: int) -> bool:
        """APRIL defers swaps to the next round cut, but not past the staleness bound: the next
        step trains with the ``published`` weights and refuses tokens more than
        ``rollout.max_staleness`` versions older, so tokens made now could never be trained.
        Without this, a trainer waiting for trainable groups never cuts a round and the worker
        keeps regenerating stale ones (a livelock, seen with vLLM's steady admission)."""
        return too_stale(self.engine.version, published, self.cfg.rollout.max_staleness)

    def _wait_for_version(self, min_version: int, timeout_s: float = 600.0) -> None:
        """Block until the engine holds ``min_version`` (sync mode's on-policy rule); idle time."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        while self.engine.version < min_version:
            if not self.maybe_update_weights():
                if self.buffer.signal("stop") or time.monotonic() > deadline:
                    raise InterruptedError(f"{self.name}: weights v{min_version} never arrived")
                time.sleep(0.01)
        self.stats.idle_s += time.perf_counter() - t0

    # ------------------------------------------------------------------ work items
    def _item(self, delivery: Delivery) -> WorkItem:
        if isinstance(delivery.item, Task):
            task = delivery.item
            return WorkItem(delivery, task, [Trajectory.start(task, i) for i in range(task.group_size)])
        partial: GroupEntry = delivery.item  # type: ignore[assignment]
        self.stats.resumed_groups += 1
        for traj in partial.group:  # a resume is a park in the buffer and a pick-up from it
            if traj.status in UNFINISHED:
                traj.num_resumes += 1
        return WorkItem(delivery, partial.task, partial.group)

    def _pinned(self, item: WorkItem) -> bool:
        """A group resumed ``rollout.max_resumes`` times is not parked again: it runs to the end
        (restarting it instead would starve the longest samples of a long-tail workload)."""
        return any(t.num_resumes >= self.cfg.rollout.max_resumes for t in item.group)

    def _enforce_staleness(self, item: WorkItem) -> None:
        """Restart members whose oldest token is more than ``rollout.max_staleness`` versions
        behind the weights that would continue them: they could never be trained."""
        bound = self.cfg.rollout.max_staleness
        for k, traj in enumerate(item.group):
            if len(traj) > 0 and too_stale(int(traj.versions.min()), self.engine.version, bound):
                self.stats.stale_restarts += 1
                self.stats.aborted_tokens += len(traj)
                fresh = Trajectory.start(item.task, k)
                item.group[k] = fresh

    # ------------------------------------------------------------------ generation
    def generate_groups(self, tasks: list[Task]) -> list[list[Trajectory]]:
        """Generate whole groups for ``tasks`` outside the buffer (tests, offline use)."""
        items = [WorkItem(Delivery("", "", t), t, [Trajectory.start(t, i) for i in range(t.group_size)])
                 for t in tasks]
        self._generate(items, ship=False)
        for item in items:
            self.scorer.submit(item, item.group)
        self.scorer.collect(wait=True)
        return [item.group for item in items]

    def _abortable(self, item: WorkItem) -> bool:
        """APRIL cuts training groups at round boundaries; evaluation groups always run to the end."""
        return self.cfg.mode == "april" and item.task.purpose == "train" and not (item.shipped or item.scoring)

    def _admit_from_buffer(self, free_rows: int, items: list[WorkItem]) -> list[WorkItem]:
        """Continuous batching: read as many groups as fit the free rows (partials first). Tasks
        that need newer weights than the engine has (sync mode) wait in the backlog."""
        want = free_rows // self.cfg.rollout.group_size
        if want <= 0 or self._backlog or self._complete_full():
            return []
        admitted = []
        for delivery in self.buffer.read_tasks(self.name, want, block_ms=None):
            task = delivery.item if isinstance(delivery.item, Task) else delivery.item.task
            if task.min_version > self.engine.version:
                self._backlog.append(delivery)  # made into a work item (resume counted) when served
                continue
            item = self._item(delivery)
            self._enforce_staleness(item)
            items.append(item)
            admitted.append(item)
            self._started_since += 1
        return admitted

    def _generate(self, items: list[WorkItem], ship: bool = True, admit: bool = False) -> None:
        """Generate until every item is done, shipping each group once it is scored (scoring runs
        off the decode path: a group that completes is scored while generation goes on).

        With ``admit``, new groups from the buffer join the running batch whenever rows free up
        (so a long sample never idles the engine). In april mode a new round (the trainer has its
        batch) parks every unfinished training group as a partial; pinned groups and evaluations
        keep running."""
        self.maybe_update_weights()  # resumed partials continue under the newest weights
        self._wait_for_version(max((item.task.min_version for item in items), default=0))
        for item in items:
            self._enforce_staleness(item)
        rounds = {"seen": self.buffer.current_round()}
        # APRIL swaps weights at round boundaries (the cut already re-prefills everything);
        # the other modes swap at the next chunk boundary, as soon as weights are published.
        swap_at_rounds = self.cfg.mode == "april"
        t0 = time.perf_counter()
        try:
            while True:
                items[:] = [item for item in items if not item.shipped]
                pending = [(item, traj) for item in items for traj in item.group if traj.status in UNFINISHED]
                version = self.engine.version
                why: dict[str, str] = {}
                continued: list[tuple[WorkItem, Trajectory]] = []  # back after a tool observation

                def on_finished(i: int, out: GenOutput) -> None:
                    item, traj = pending[i]
                    self._absorb(traj, out, version, item.task)
                    if traj.status in UNFINISHED and out.finish_reason != "abort":
                        continued.append((item, traj))
                    if ship and item.done and not (item.shipped or item.scoring):
                        item.scoring = True
                        self.scorer.submit(item, item.group)

                def should_stop() -> bool:
                    self._ship(self.scorer.collect())
                    self._heartbeat_every(0.5)
                    new_version, round_now, stop = self.buffer.poll()
                    if stop:
                        why["reason"] = "stop"
                    elif round_now != rounds["seen"]:
                        rounds["seen"] = round_now
                        if any(self._abortable(it) and not self._pinned(it) for it in items):
                            why["reason"] = "round"
                    if not why and new_version != self.engine.version:
                        if swap_at_rounds and not self._must_swap(new_version):
                            self._prefetch_weights(new_version)
                        else:
                            why["reason"] = "weights"
                    return bool(why)

                def admit_requests(free_rows: int) -> list[GenRequest]:
                    """Samples continuing after a tool turn first, then new groups (with ``admit``)."""
                    new = continued[:free_rows]
                    del continued[:len(new)]
                    if admit and free_rows > len(new):
                        new += [(item, traj) for item in self._admit_from_buffer(free_rows - len(new), items)
                                for traj in item.group if traj.status in UNFINISHED]
                    pending.extend(new)
                    return [self._request(item, traj) for item, traj in new]

                if not pending and not (admit and admit_requests(self.cfg.engine.max_batch_size)):
                    self._ship(self.scorer.collect(wait=True))  # nothing left to generate meanwhile
                    return
                reqs = [self._request(item, traj) for item, traj in pending]
                self.engine.generate(reqs, should_stop, on_finished, admit_requests)
                self._ship(self.scorer.collect())
                reason = why.get("reason")
                if reason == "stop":
                    raise InterruptedError("stop signal while generating")
                if reason == "round":
                    keep, parked = [], []
                    for item in items:
                        if item.shipped or not ship:
                            continue
                        if self._abortable(item) and not self._pinned(item):
                            parked.append((item.delivery, GroupEntry(item.task, item.group)))
                        else:
                            keep.append(item)
                    self.buffer.park_partials(parked)
                    self.stats.parked_groups += len(parked)
                    items[:] = keep
                    self.maybe_update_weights()
                    if not keep:
                        self._ship(self.scorer.collect(wait=True))
                        return
                elif reason == "weights":
                    self.maybe_update_weights()
        finally:
            self.stats.gen_s += time.perf_counter() - t0

    def _request(self, item: WorkItem, traj: Trajectory) -> GenRequest:
        """Continue ``traj`` from its exact tokens with the rest of its budget. It stops at the
        task's tool-call ids and at every end id of the tokenizer (the engine adds its eos)."""
        stops = (*item.task.meta.get("stop_ids", ()), *self._end_ids)
        return GenRequest(prompt_ids=list(item.task.prompt_ids), prefix_ids=traj.response_ids.tolist(),
                          max_new_tokens=item.task.sampling.max_new_tokens - len(traj),
                          temperature=item.task.sampling.temperature, top_p=item.task.sampling.top_p,
                          stop_ids=tuple(dict.fromkeys(stops)), cache_key=traj.traj_id)

    def _absorb(self, traj: Trajectory, out: GenOutput, version: int, task: Task) -> None:
        if out.token_ids:
            traj.append(out.token_ids, out.logprobs, version, out.routed_experts)
        self.stats.tokens += len(out.token_ids)
        if out.finish_reason == "stop":
            traj.status = Status.COMPLETE
            if out.token_ids and out.token_ids[-1] in task.meta.get("stop_ids", ()):
                self._tool_turn(traj, task, version)
        elif out.finish_reason == "length":
            traj.status = Status.TRUNCATED
        else:
            traj.status = Status.PARTIAL
        if traj.status not in UNFINISHED:
            self.stats.samples += 1

    def _tool_turn(self, traj: Trajectory, task: Task, version: int) -> None:
        """The sample ended with a tool call: append the observation (loss mask 0, tokenized once)
        and let it continue, unless the turn limit or the token budget is used up. An env whose
        turns end at the end-of-turn token (chat-format tools) says first whether the turn made a
        call at all (``has_tool_call``); a turn without one is the final answer."""
        has_call = getattr(self.env, "has_tool_call", None)
        if has_call is not None:
            try:
                if not has_call(traj.response_ids.tolist()):
                    return
            except Exception as exc:  # an env bug ends the sample as it is, never the worker
                traj.env_info["reason"] = f"has_tool_call failed: {type(exc).__name__}: {exc}"
                return
        turns = int(traj.env_info.get("turns", 0))
        if turns >= int(task.meta.get("max_turns", 1)):
            traj.env_info["reason"] = f"tool-call limit of {turns} turns reached"
            return
        obs, why = observe_bounded(self.env, traj.response_ids.tolist(), self.cfg.env.reward_timeout_s)
        if obs is None:  # the sample ends at its tool call, scored as it is; the worker goes on
            traj.env_info["reason"] = f"observation failed: {why}"
            return
        if len(traj) + len(obs) >= task.sampling.max_new_tokens:
            traj.status = Status.TRUNCATED
            return
        shape = traj.routed_experts.shape[1:] if traj.routed_experts.size else None
        experts = np.full((len(obs), *shape), -1, dtype=np.int16) if shape else None
        traj.append(obs, np.zeros(len(obs)), version, experts, trainable=False)
        traj.env_info["turns"] = turns + 1
        traj.status = Status.PENDING  # generation continues after the observation

    def _ship(self, scored: list[WorkItem]) -> None:
        """Write scored groups to the buffer in one atomic script (several groups often finish
        scoring between two chunk boundaries)."""
        if not scored:
            return
        self.buffer.finish_tasks([(item.delivery, item.task, item.group) for item in scored])
        for item in scored:
            item.shipped, item.scoring = True, False
        self.stats.tasks += len(scored)

    # ------------------------------------------------------------------ main loop
    def run(self, max_tasks_per_batch: int = 0) -> dict:
        """Serve tasks until the ``stop`` signal. Returns the worker's counters."""
        batch = max_tasks_per_batch or max(1, self.cfg.engine.max_batch_size // self.cfg.rollout.group_size)
        self._backlog = self.buffer.read_own_pending(self.name)  # a previous life's unacked items
        while self.buffer.signal("stop") is None:
            self.maybe_update_weights()
            if not self._backlog and self._complete_full():
                t_wait = time.perf_counter()
                time.sleep(0.05)  # the trainer is behind: wait instead of growing `complete`
                self.stats.backpressure_s += time.perf_counter() - t_wait
                self._heartbeat_every(0.5)
                continue
            t_idle = time.perf_counter()
            deliveries = self._backlog or self.buffer.read_tasks(self.name, batch, block_ms=100)
            self._backlog = []
            if len(deliveries) < batch:
                deliveries += self.buffer.reclaim_work(self.name, self.cfg.buffer.reclaim_idle_ms,
                                                       count=batch - len(deliveries))
            self.stats.idle_s += time.perf_counter() - t_idle
            if deliveries:
                try:
                    self.serve(deliveries)
                except InterruptedError:
                    break  # unacked items stay pending for whoever resumes the run
            self._heartbeat()
        self._heartbeat()
        return vars(self.stats)

    def _complete_full(self) -> bool:
        """Backpressure (buffer.max_complete): is `complete` full? Asked at most every 50 ms, so
        admission at every chunk boundary does not add a Redis round trip each time."""
        bound = self.cfg.buffer.max_complete
        if not bound:
            return False
        now = time.monotonic()
        if now - self._depth_checked_at >= 0.05:
            self._depth_checked_at, self._depth_seen, self._started_since = now, self.buffer.complete_depth(), 0
        # what was in `complete` at the last look, plus every group this worker started since
        return self._depth_seen + self._started_since >= bound

    def _heartbeat_every(self, period_s: float) -> None:
        if time.time() - self._last_beat >= period_s:
            self._heartbeat()

    def serve(self, deliveries: list[Delivery]) -> None:
        """Generate ``deliveries`` and whatever joins them from the buffer while rows are free."""
        self._started_since += len(deliveries)
        self._generate([self._item(d) for d in deliveries], admit=True)

    def _heartbeat(self) -> None:
        self._last_beat = time.time()
        self.stats.kv_reused = int(self.engine.stats().get("kv_reused", 0))
        self.stats.reward_errors, self.stats.reward_s = self.scorer.errors, self.scorer.busy_s
        self.buffer.heartbeat(self.name, {**vars(self.stats), "version": self.engine.version,
                                          "pid": os.getpid(), "now": time.time()})

