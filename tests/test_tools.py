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


def test_a_teacher_that_skips_the_tool_demonstrates_bare_answers_and_rl_sees_tool_use():
    """env.teacher_skips_tool: that fraction of demonstrations answer without the calculator (all
    of it trained on), the rest call it; the trainer reports how often samples used a tool."""
    from rlpost.trainer.actor import tool_use_metrics

    env = ToolEnv(load_config(["experiment=toy_moe_tools", "env.teacher_skips_tool=0.7"]).env)
    bare = 0
    for i in range(400):
        prompt, target, mask = env.sft_example(i, 0)
        text = env.tokenizer.decode(target)
        a, b = map(int, env.tokenizer.decode(prompt).rstrip("=").split("*"))
        if not text.startswith("["):
            bare += 1
            assert text == str(a * b) and mask == [1] * len(target) and target[-1] == env.tokenizer.eos_id
        else:
            assert text.startswith(f"[{a}*{b}]{a * b};")
    assert 0.6 < bare / 400 < 0.8
    assert env.sft_example(7, 0) == env.sft_example(7, 0)  # the same demonstrations every run
    with pytest.raises(ValueError, match=r"env.teacher_skips_tool=0.5: is for env.name=tools"):
        load_config(["env.teacher_skips_tool=0.5"])

    def traj(info):
        return Trajectory(traj_id="t", task_id="x", group_id="g", prompt_ids=[1], response_ids=[], logprobs=[],
                          versions=[], loss_mask=[], env_info=info)

    scored = [env.score(str(12 * 34), env.tokenizer.encode(text) + [env.tokenizer.eos_id])
              for text in ("[12*34]408;408", "408", "[12*34]408;[1+1]2;408", "407")]
    got = tool_use_metrics([traj(r.info) for r in scored] + [traj({"tool_calls": True}), traj({})])
    assert got == {"env/tool_calls_mean": 0.75, "env/tool_use_frac": 0.5}
    assert tool_use_metrics([traj({})]) == {}


@pytest.mark.parametrize("observe, reason", [
    (lambda ids: 1 / 0, "observation failed: ZeroDivisionError: division by zero"),
    (lambda ids: "42;", "observation failed: observe returned '42;', not a list of token ids below"),
    (lambda ids: [3, 10**6], "observation failed: observe returned [3, 1000000], not a list of token ids below"),
    (lambda ids: __import__("time").sleep(3) or [3], "observation failed: observation timed out after 0.5s"),
])
def test_a_failing_observation_ends_the_sample_not_the_worker(worker, monkeypatch, observe, reason):
    """A multi-turn env whose observe raises, returns something that is not token ids of its
    tokenizer, or hangs: the sample ends at its tool call with the reason, nothing is appended,
    and the worker carries on (a user's env is no more trusted to behave than a reward)."""
    env = worker.env
    monkeypatch.setattr(env, "observe", observe)
    monkeypatch.setattr(worker.cfg.env, "reward_timeout_s", 0.5)
    task = env.train_task(2, 0, 1, SamplingParams(1.0, 1.0, 40))
    traj = Trajectory.start(task, 0)
    worker._absorb(traj, out(env, "[2*3]", "stop"), 0, task)
    assert traj.status == Status.COMPLETE and traj.env_info["reason"].startswith(reason)
    assert env.tokenizer.decode(traj.response_ids) == "[2*3]" and "turns" not in traj.env_info
