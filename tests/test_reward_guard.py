"""Reward calls are bounded and never crash the worker (envs/base.py)."""

import math
import os
import time

import pytest

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
    assert time.monotonic() - t0 < 0.3 * 2 + 2.0 + 1.0  # the group's budget: per sample, + slack
    assert [r.reward for r in results] == [0.0, 0.0]
    assert all("timed out" in r.info["reason"] for r in results)


class ForgedRewardEnv:
    """Returns whatever reward the answer names: what a forged verdict or a buggy env produces."""

    reward_range = (0.0, 1.0)

    def score(self, answer: str, response_ids: list[int]) -> RewardResult:
        return RewardResult({"nan": math.nan, "str": "1"}.get(answer, None) or float(answer), {})


def test_an_invalid_reward_is_that_samples_zero_and_the_group_keeps_the_rest():
    """100, -1000, 2e39 (inf in float32: NaN advantages for everyone), NaN, a string: each is
    reward 0 with its reason; the valid members of the same group keep their rewards."""
    answers = ["1.0", "100", "-1000", "2e39", "nan", "str", "0.5"]
    results = score_group_with_timeout(ForgedRewardEnv(), answers, [[1]] * len(answers), timeout_s=1.0)
    assert [r.reward for r in results] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]
    for r in results[1:6]:
        assert r.info["reason"].startswith("invalid reward"), r.info


@pytest.mark.skipif(os.geteuid() != 0 or __import__("shutil").which("bwrap") is None, reason="needs bwrap and root")
def test_one_timeout_per_sample_seven_infinite_loops_do_not_zero_the_correct_answer():
    """Eight programs on four slots, seven of them loop until their wall clock: two waves of
    wall_s, more than one sample's budget. The correct one keeps its reward."""
    from rlpost.config import EnvConfig, SandboxConfig
    from rlpost.envs.coding import CodingEnv

    env = CodingEnv(EnvConfig(name="coding", tokenizer="gpt2", reward_timeout_s=2.0),
                    SandboxConfig(backend="bwrap", slots=4, wall_s=2.0, cpu_s=2))
    try:
        task = env.train_task(0, 0, 8, __import__("rlpost.records", fromlist=["x"]).SamplingParams())
        spec = __import__("json").loads(task.answer)
        tests = " ".join(spec["tests"])
        # the toy task's reference, recovered from its asserts: f(x) == value for the hidden xs
        pairs = [(int(a), int(b)) for a, b in __import__("re").findall(r"f\((\d+)\) == (-?\d+)", tests)]
        table = dict(pairs)
        correct = f"def f(x):\n    return {table!r}[x]\n"
        loop = "def f(x):\n    while True:\n        pass\n"
        tok = env.tokenizer
        responses = [tok.encode(loop) + [tok.eos_id]] * 7 + [tok.encode(correct) + [tok.eos_id]]
        t0 = time.monotonic()
        results = score_group_with_timeout(env, [task.answer] * 8, responses, timeout_s=2.0)
        assert [r.reward for r in results] == [0.0] * 7 + [1.0], [r.info for r in results]
        assert time.monotonic() - t0 < 8 * 2.0
        assert all("timeout" in r.info["reason"] for r in results[:7])
    finally:
        env.pool.close()


def test_overlong_penalty_is_linear_over_the_buffer_and_only_for_training_samples():
    """DAPO's soft overlong punishment: 0 up to limit - buffer, then linear to -factor at the
    limit; written into training samples only, the env's own verdict kept beside it."""
    import numpy as np

    from rlpost.records import SamplingParams, Task, Trajectory
    from rlpost.rollout.scoring import OverlongPenalty, apply_rewards

    shape = OverlongPenalty(buffer=4, factor=0.5, limit=10)
    assert [shape(n) for n in (0, 6, 7, 9, 10, 12)] == pytest.approx([0, 0, -0.125, -0.375, -0.5, -0.5])
    assert OverlongPenalty(buffer=0, factor=1.0, limit=10)(10) == 0.0

    def sample(n: int, purpose: str) -> Trajectory:
        t = Trajectory.start(Task(f"{purpose}{n}", [1], "x", 2, SamplingParams(), purpose=purpose), 0)
        t.append(np.full(n, 3), np.zeros(n), version=0)
        return t

    group = [sample(9, "train"), sample(5, "train"), sample(10, "eval")]
    apply_rewards(group, [RewardResult(1.0, {}), RewardResult(1.0, {}), RewardResult(1.0, {})], 0.0, shape)
    assert [t.reward for t in group] == pytest.approx([0.625, 1.0, 1.0])
    assert group[0].env_info == {"env_reward": 1.0, "overlong_penalty": -0.375}
    assert group[1].env_info["overlong_penalty"] == 0.0 and "overlong_penalty" not in group[2].env_info
    # an env's info cannot supply the verdict reward/accuracy is computed from, shaping on or off
    forged = [sample(3, "train")]
    apply_rewards(forged, [RewardResult(0.0, {"env_reward": 1.0, "overlong_penalty": 5.0, "text": "x"})], 0.0)
    assert forged[0].env_info == {"text": "x"} and forged[0].reward == 0.0
