"""The interface every reward source implements, and the timeout guard around it."""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field
from typing import Any, Protocol

from rlpost.records import Task


@dataclass
class RewardResult:
    reward: float
    info: dict[str, Any] = field(default_factory=dict)


class Env(Protocol):
    name: str

    def make_train_task(self, index: int) -> Task: ...

    def eval_tasks(self) -> list[Task]: ...

    def score(self, task_answer: str, response_ids: list[int]) -> RewardResult: ...


_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="reward")


def score_with_timeout(env: Env, answer: str, response_ids: list[int], timeout_s: float) -> RewardResult:
    """Run ``env.score`` bounded by ``timeout_s``; an error or a timeout is reward 0 with a reason,
    never an exception that would crash the rollout worker."""
    future = _pool.submit(env.score, answer, response_ids)
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        future.cancel()
        reason = f"reward timed out after {timeout_s}s"
    except Exception as exc:  # any env bug must not kill the worker
        reason = f"{type(exc).__name__}: {exc}"
    return RewardResult(0.0, {"error": reason, "reason": reason})


def score_group_with_timeout(env: Env, answers: list[str], responses: list[list[int]],
                             timeout_s: float) -> list[RewardResult]:
    """Score a group: with ``env.score_many`` in one bounded call (sandboxed envs run the group's
    programs concurrently), else sample by sample. Errors and timeouts are reward 0 with a reason."""
    many = getattr(env, "score_many", None)
    if many is None:
        return [score_with_timeout(env, a, r, timeout_s) for a, r in zip(answers, responses)]
    future = _pool.submit(many, answers, responses)
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        future.cancel()
        reason = f"reward timed out after {timeout_s}s"
    except Exception as exc:  # any env bug must not kill the worker
        reason = f"{type(exc).__name__}: {exc}"
    return [RewardResult(0.0, {"error": reason, "reason": reason}) for _ in answers]
