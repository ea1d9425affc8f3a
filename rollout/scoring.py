"""Rewards scored off the decode path.

A finished group goes to a small thread pool and the engine keeps generating; the worker picks up
scored groups at its next chunk boundary and ships them. Scoring a coding group runs programs in
the sandbox for up to ``env.reward_timeout_s``: inline, that stalled every running sample of the
worker for as long (AReaL and slime score asynchronously for the same reason). The threads only
compute results; rewards are written into the trajectories on the worker's own thread, when it
collects them, so nothing else touches a trajectory concurrently.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass
from typing import Generic, TypeVar

from rlpost.envs.base import Env, RewardResult, score_group_with_timeout
from rlpost.records import Trajectory

Item = TypeVar("Item")


@dataclass(frozen=True)
class OverlongPenalty:
    """DAPO's soft overlong punishment (Yu et al., 2025, eq. 13): a response of ``length`` tokens
    within the last ``buffer`` tokens of the ``limit`` loses ``factor`` x the share of the buffer
    it used, so a policy learns to finish before the cut instead of being paid for text that was
    cut off. Without it the only signal against rambling is the verifier missing the answer."""

    buffer: int
    factor: float
    limit: int

    def __call__(self, length: int) -> float:
        start = self.limit - self.buffer
        if self.buffer <= 0 or length <= start:
            return 0.0
        return -self.factor * min(length - start, self.buffer) / self.buffer


RESERVED_INFO = ("env_reward", "overlong_penalty")


def apply_rewards(group: list[Trajectory], results: list[RewardResult], elapsed_s: float,
                  overlong: OverlongPenalty | None = None) -> int:
    """Write ``results`` into ``group``, plus ``overlong``'s penalty on training samples (the
    env's own verdict stays in ``env_info["env_reward"]``); returns how many were scoring errors
    (reward 0)."""
    errors = 0
    for traj, result in zip(group, results):
        traj.reward = float(result.reward)
        # the shaping's own keys are written here only: an env's info cannot supply them
        info = {k: v for k, v in result.info.items() if k not in RESERVED_INFO}
        traj.env_info = {**traj.env_info, **info}
        if overlong is not None and traj.purpose == "train":
            penalty = overlong(len(traj))
            traj.env_info.update(env_reward=traj.reward, overlong_penalty=penalty)
            traj.reward += penalty
        traj.timings["reward_s"] = elapsed_s
        traj.timings["finished_at"] = time.time()
        errors += "error" in result.info
    return errors


def _score(env: Env, group: list[Trajectory], timeout_s: float) -> tuple[list[RewardResult], float]:
    t0 = time.perf_counter()
    results = score_group_with_timeout(env, [t.answer for t in group], [t.response_ids.tolist() for t in group],
                                       timeout_s)
    return results, time.perf_counter() - t0


class GroupScorer(Generic[Item]):
    """Scores groups concurrently (``workers`` at a time); ``collect`` returns the items whose
    group has its rewards, in the order they were submitted."""

    def __init__(self, env: Env, timeout_s: float, workers: int, overlong: OverlongPenalty | None = None):
        self.env, self.timeout_s, self.overlong = env, timeout_s, overlong
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="score")
        self._running: list[tuple[Item, list[Trajectory], concurrent.futures.Future]] = []
        self.errors = 0
        self.busy_s = 0.0  # time spent scoring (summed over groups)

    def submit(self, item: Item, group: list[Trajectory]) -> None:
        # the group's token arrays are final: the thread reads them, nothing writes them meanwhile
        self._running.append((item, group, self._pool.submit(_score, self.env, group, self.timeout_s)))

    def score_now(self, group: list[Trajectory]) -> None:
        """Score ``group`` on the caller's thread (offline use and tests)."""
        self._apply(group, *_score(self.env, group, self.timeout_s))

    def collect(self, wait: bool = False) -> list[Item]:
        """Items scored so far (all of them with ``wait``), their rewards applied."""
        if wait:
            concurrent.futures.wait([f for _, _, f in self._running])
        done, still = [], []
        for entry in self._running:
            (done if entry[2].done() else still).append(entry)
        self._running = still
        for _, group, future in done:
            self._apply(group, *future.result())  # score_group_with_timeout never raises
        return [item for item, _, _ in done]

    def _apply(self, group: list[Trajectory], results: list[RewardResult], elapsed_s: float) -> None:
        self.errors += apply_rewards(group, results, elapsed_s, self.overlong)
        self.busy_s += elapsed_s
