"""Reward calls are bounded and never crash the worker (envs/base.py)."""

import time

from rlpost.envs.base import RewardResult, score_group_with_timeout


class FlakyEnv:
    """Scores 1 for "ok", raises for "boom", hangs for "hang"."""

    def score(self, answer: str, response_ids: list[int]) -> RewardResult:
        if answer == "boom":
            raise RuntimeError("scorer bug")
        if answer == "hang":
            time.sleep(5)
        return RewardResult(1.0, {"len": len(response_ids)})


def test_one_failing_sample_scores_zero_with_a_reason_and_the_others_keep_theirs():
    results = score_group_with_timeout(FlakyEnv(), ["ok", "boom", "ok"], [[1], [2], [3, 4]], timeout_s=2.0)
    assert [r.reward for r in results] == [1.0, 0.0, 1.0]
    assert results[1].info["reason"] == "RuntimeError: scorer bug"
    assert results[2].info == {"len": 2}


def test_a_hanging_scorer_is_cut_at_the_timeout():
    t0 = time.monotonic()
    results = score_group_with_timeout(FlakyEnv(), ["ok", "hang"], [[1], [2]], timeout_s=0.3)
    assert time.monotonic() - t0 < 2.0
    assert [r.reward for r in results] == [0.0, 0.0]
    assert all("timed out" in r.info["reason"] for r in results)
