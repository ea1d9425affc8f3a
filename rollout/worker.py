"""The rollout worker: pulls tasks from Redis, generates groups, scores them, writes them back.

It runs one long ``run()`` loop inside a Ray actor and is steered only through Redis: the
``version`` key (new weights to fetch) and the ``control`` hash (stop). Weights are swapped at a
chunk boundary; a generation cut by the swap continues from its exact tokens under the new
weights, and every token carries the version that produced it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from rlpost.envs.base import score_with_timeout
from rlpost.buffer import Delivery, RedisBuffer
from rlpost.config import RlpostConfig
from rlpost.records import Status, Task, Trajectory
from rlpost.weights import fetch_weights
from rlpost.rollout.engine import GenOutput, GenRequest
from rlpost.rollout.native import NativeEngine


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
    extra: dict = field(default_factory=dict)


class RolloutWorker:
    def __init__(self, cfg: RlpostConfig, index: int, buffer_url: str, run: str,
                 buffer_auth: dict | None = None):
        from rlpost.envs.arithmetic import make_env

        torch.set_num_threads(cfg.rollout.threads)
        self.cfg = cfg
        self.name = f"worker-{index}"
        self.buffer = RedisBuffer.from_url(buffer_url, run, **(buffer_auth or {}))
        self.env = make_env(cfg.env)
        self.engine = NativeEngine(cfg.model, cfg.engine, eos_id=self.env.tokenizer.eos_id,
                                   pad_id=self.env.tokenizer.pad_id, seed=cfg.seed * 1000 + index)
        self.stats = WorkerStats()

    # ------------------------------------------------------------------ weights
    def maybe_update_weights(self) -> bool:
        """Fetch and load newer weights if published; True if the version changed."""
        wv = self.buffer.current_version()
        if wv is None or wv.version == self.engine.version:
            return False
        t0 = time.perf_counter()
        self.engine.load_weights(fetch_weights(wv), wv.version)
        self.stats.weight_swaps += 1
        self.stats.weight_fetch_s += time.perf_counter() - t0
        return True

    def _weights_changed(self) -> bool:
        wv = self.buffer.current_version()
        return wv is not None and wv.version != self.engine.version

    def _wait_for_version(self, min_version: int, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.engine.version < min_version:
            if not self.maybe_update_weights():
                if self.buffer.signal("stop") or time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: weights v{min_version} never arrived")
                time.sleep(0.02)

    # ------------------------------------------------------------------ generation
    def generate_groups(self, tasks: list[Task]) -> list[list[Trajectory]]:
        """Generate every task's group; weight swaps between chunks are followed immediately."""
        self._wait_for_version(max(t.min_version for t in tasks))
        groups = [[Trajectory.start(t, i) for i in range(t.group_size)] for t in tasks]
        pending = [(t, traj) for t, g in zip(tasks, groups) for traj in g]
        should_stop = lambda: self._weights_changed() or self.buffer.signal("stop") is not None  # noqa: E731
        t0 = time.perf_counter()
        while pending:
            reqs = [GenRequest(prompt_ids=list(task.prompt_ids), prefix_ids=traj.response_ids.tolist(),
                               max_new_tokens=task.sampling.max_new_tokens - len(traj),
                               temperature=task.sampling.temperature, top_p=task.sampling.top_p)
                    for task, traj in pending]
            version = self.engine.version
            outs = self.engine.generate(reqs, should_stop)
            still = []
            for (task, traj), out in zip(pending, outs):
                self._absorb(traj, out, version)
                if out.finish_reason == "abort":
                    traj.num_resumes += 1
                    still.append((task, traj))
            pending = still
            if pending:
                if self.buffer.signal("stop") is not None:
                    raise InterruptedError("stop signal while generating")
                self.maybe_update_weights()
        gen_s = time.perf_counter() - t0
        for task, group in zip(tasks, groups):
            for traj in group:
                self._score(task, traj)
                traj.timings["gen_s"] = gen_s
        self.stats.gen_s += gen_s
        self.stats.samples += sum(len(g) for g in groups)
        return groups

    def _absorb(self, traj: Trajectory, out: GenOutput, version: int) -> None:
        traj.append(out.token_ids, out.logprobs, version, out.routed_experts)
        self.stats.tokens += len(out.token_ids)
        if out.finish_reason == "stop":
            traj.status = Status.COMPLETE
        elif out.finish_reason == "length":
            traj.status = Status.TRUNCATED
        else:
            traj.status = Status.PARTIAL

    def _score(self, task: Task, traj: Trajectory) -> None:
        result = score_with_timeout(self.env, task.answer, traj.response_ids.tolist(),
                                    self.cfg.env.reward_timeout_s)
        traj.reward = float(result.reward)
        traj.env_info = result.info
        if "error" in result.info:
            self.stats.reward_errors += 1

    # ------------------------------------------------------------------ main loop
    def run(self, max_tasks_per_batch: int = 0) -> dict:
        """Serve tasks until the ``stop`` signal. Returns the worker's counters."""
        batch = max_tasks_per_batch or max(1, self.cfg.engine.max_batch_size // self.cfg.rollout.group_size)
        while self.buffer.signal("stop") is None:
            self.maybe_update_weights()
            t_idle = time.perf_counter()
            deliveries = self.buffer.read_tasks(self.name, batch, block_ms=100)
            deliveries += self.buffer.reclaim("tasks", "workers", self.name, self.cfg.buffer.reclaim_idle_ms,
                                              count=batch)
            self.stats.idle_s += time.perf_counter() - t_idle
            if not deliveries:
                self._heartbeat()
                continue
            try:
                self.serve(deliveries)
            except InterruptedError:
                break  # unacked tasks stay pending for whoever resumes the run
            self._heartbeat()
        return vars(self.stats)

    def serve(self, deliveries: list[Delivery]) -> None:
        tasks = [d.item for d in deliveries]
        groups = self.generate_groups(tasks)
        for d, group in zip(deliveries, groups):
            self.buffer.finish_task(d, group)
        self.stats.tasks += len(tasks)

    def _heartbeat(self) -> None:
        self.buffer.heartbeat(self.name, {"version": self.engine.version, "pid": os.getpid(),
                                          "tasks": self.stats.tasks, "tokens": self.stats.tokens})
