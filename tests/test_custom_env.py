"""env.name=package.module:Factory: the user's own environment, loaded on the driver and in every
rollout worker, checked against the Env protocol at start-up."""

import json
import os

import pytest

from rlpost.config import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))  # on sys.path under pytest, like tests/custom_env.py's module


def load(*overrides):
    from rlpost.cli_config import load_config
    from rlpost.envs import make_env

    cfg = load_config(list(overrides))
    return make_env(cfg.env, cfg.sandbox)


def test_a_custom_env_is_built_with_its_own_options_and_scored_through_the_guard():
    from rlpost.envs.base import score_group_with_timeout
    from rlpost.records import SamplingParams

    env = load("env.name=custom_env:ReverseEnv", "+env.options.length=5", "env.num_eval=4")
    task = env.train_task(3, 0, 2, SamplingParams())
    assert len(task.answer) == 5 and env.tokenizer.decode(task.prompt_ids).rstrip("=")[::-1] == task.answer
    assert len(env.eval_tasks("before", 0)) == 4
    right = env.tokenizer.encode(task.answer) + [env.tokenizer.eos_id]
    half = env.tokenizer.encode(task.answer[:2] + "00000"[:3])
    results = score_group_with_timeout(env, [task.answer] * 2, [right, half], timeout_s=5)
    assert results[0].reward == 1.0 and 0.4 <= results[1].reward < 1.0


@pytest.mark.parametrize("name, message", [
    ("custom_env:NoScore", "env.name='custom_env:NoScore': the env lacks eval_tasks, max_answer_len, score, "
                           "tokenizer.vocab_size, tokenizer.eos_id, tokenizer.encode, tokenizer.decode"),
    ("custom_env:raising", "env.name='custom_env:raising': building it failed (RuntimeError: dataset server unreachable)"),
    ("custom_env:Missing", "env.name='custom_env:Missing': cannot load it (AttributeError"),
    ("no_such_module_here:Env", "env.name='no_such_module_here:Env': cannot load it (ModuleNotFoundError"),
    ("custom_env:random", "env.name='custom_env:random': module is not callable"),
])
def test_a_broken_custom_env_is_one_line_naming_what_is_wrong(name, message):
    with pytest.raises(ConfigError) as info:
        load(f"env.name={name}")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_reward_range_of_a_custom_env_is_checked(monkeypatch):
    import custom_env

    monkeypatch.setattr(custom_env.ReverseEnv, "reward_range", (0.0, float("inf")))
    with pytest.raises(ConfigError, match=r"reward_range=\(0.0, inf\) must be \(low, high\), finite, low < high"):
        load("env.name=custom_env:ReverseEnv")


def test_an_env_without_demonstrations_runs_only_without_a_warm_up(tmp_path, monkeypatch):
    """sft_example is optional: an RL-only env (a real checkpoint needs no warm-up) starts with
    warmup.steps=0 and is refused, naming the key, with a warm-up."""
    import custom_env

    from rlpost.cli_config import load_config
    from rlpost.run import Run

    monkeypatch.delattr(custom_env.ReverseEnv, "sft_example")
    args = ["env.name=custom_env:ReverseEnv", "env.num_eval=4", f"run_dir={tmp_path}/r"]
    with pytest.raises(ConfigError, match=r"warmup.steps=1500: env 'custom_env:ReverseEnv' has no sft_example .*"
                                          r"set warmup.steps=0"):
        Run(load_config(["experiment=toy_moe_local", *args]))
    assert Run(load_config(["experiment=toy_moe_local", "warmup.steps=0", *args])).env.name == "reverse"


def test_the_loop_trains_on_a_custom_env_imported_in_every_worker(tmp_path):
    """The whole loop (driver, DeepSpeed rank, two rollout workers as Ray actors) on the user's
    env: the warm-up on its demonstrations, rewards from its score (partial credit shows)."""
    from test_e2e import read_metrics, run_cli

    run_dir = tmp_path / "run"
    pythonpath = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))
    run_cli(["experiment=toy_moe_local", "env.name=custom_env:ReverseEnv", "+env.options.length=2", "env.num_eval=8",
             f"run_dir={run_dir}", "warmup.steps=30", "trainer.steps=3", "rollout.batch_prompts=4",
             "rollout.num_workers=2", "logger.progress=false"], timeout=300, extra_env={"PYTHONPATH": pythonpath})
    steps = [r for r in read_metrics(str(run_dir / "metrics.jsonl")) if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    rewards = {a["reward"] for a in map(json.loads, (run_dir / "evals" / "after.jsonl").read_text().splitlines())}
    assert rewards <= {0.0, 0.5, 1.0}  # the env's partial credit, per character of 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and all(w["tasks"] > 0 for w in summary["workers"])
    assert "name: custom_env:ReverseEnv" in (run_dir / "config.yaml").read_text()
