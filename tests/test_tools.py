"""Multi-turn tool use: the calculator never executes code, observations are masked and never
re-tokenized, and a sample cut inside a turn resumes exactly where it stopped."""

import numpy as np
import pytest

from rlpost.cli_config import load_config
from rlpost.envs.tools import CalculatorError, ToolEnv, calculate
from rlpost.records import SamplingParams, Status, Trajectory
from rlpost.rollout.engine import GenOutput


def test_calculator_evaluates_arithmetic_only():
    assert calculate("37*48") == 1776 and calculate("7//2+-3%5") == 5
    for bad in ("__import__('os').system('id')", "2**999999", "open('x')", "a+1", "9" * 40 + "*9" * 2):
        with pytest.raises(CalculatorError):
            calculate(bad)


@pytest.fixture
def worker(redis_url, monkeypatch):
    from rlpost.rollout.worker import RolloutWorker

    cfg = load_config(["env=tools", "model.max_seq_len=64"])
    cfg.model.vocab_size = ToolEnv(cfg.env).tokenizer.vocab_size
    return RolloutWorker(cfg, 0, redis_url, "tooltest")


def out(env, text, reason, eos=False):
    ids = env.tokenizer.encode(text) + ([env.tokenizer.eos_id] if eos else [])
    return GenOutput(ids, [-0.5] * len(ids), np.zeros((len(ids), 2, 2), dtype=np.int16), reason)


def test_tool_turn_appends_masked_observation_and_continues(worker):
    env = worker.env
    task = env.train_task(0, 0, 1, SamplingParams(1.0, 1.0, 40))
    a, b = env.tokenizer.decode(task.prompt_ids).rstrip("=").split("*")
    traj = Trajectory.start(task, 0)
    worker._absorb(traj, out(env, f"[{a}*{b}]", "stop"), 3, task)
    assert traj.status == Status.PENDING and traj.env_info["turns"] == 1
    obs = env.tokenizer.encode(f"{int(a) * int(b)};")
    call_len = len(f"[{a}*{b}]")
    assert traj.response_ids[call_len:].tolist() == obs  # appended as tokens, once
    assert traj.loss_mask.tolist() == [1] * call_len + [0] * len(obs)
    assert (traj.routed_experts[call_len:] == -1).all()
    # cut inside the answer turn (APRIL abort), then resumed: prefix is exactly the ids so far
    before = traj.response_ids.tolist()
    worker._absorb(traj, out(env, str(int(a) * int(b))[:1], "abort"), 3, task)
    assert traj.status == Status.PARTIAL and traj.response_ids.tolist()[:len(before)] == before
    worker._absorb(traj, out(env, str(int(a) * int(b))[1:], "stop", eos=True), 4, task)
    assert traj.status == Status.COMPLETE
    assert traj.versions.tolist()[-1] == 4 and traj.versions.tolist()[0] == 3
    worker.scorer.score_now([traj])
    assert traj.reward == 1.0 and traj.env_info["tool_calls"] == 1


def test_turn_limit_and_bad_calls(worker):
    env = worker.env
    task = env.train_task(1, 0, 1, SamplingParams(1.0, 1.0, 60))
    traj = Trajectory.start(task, 0)
    for _ in range(task.meta["max_turns"]):
        worker._absorb(traj, out(env, "[1//0]", "stop"), 0, task)
        assert traj.status == Status.PENDING
    assert env.tokenizer.decode(traj.response_ids).endswith("[1//0]?;")
    worker._absorb(traj, out(env, "[2*2]", "stop"), 0, task)
    assert traj.status == Status.COMPLETE and "limit" in traj.env_info["reason"]
    worker.scorer.score_now([traj])
    assert traj.reward == 0.0 and traj.env_info["reason"]


def test_sft_demonstration_masks_the_observation():
    env = ToolEnv(load_config(["env=tools"]).env)
    prompt, target, mask = env.sft_example(0, 0)
    text = env.tokenizer.decode(target)
    call_end = text.index("]") + 1
    obs_end = text.index(";") + 1
    assert mask == [1] * call_end + [0] * (obs_end - call_end) + [1] * (len(target) - obs_end)
