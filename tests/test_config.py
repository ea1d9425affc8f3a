"""Config composition and validation: every error is one line that names the key and value."""

import subprocess
import sys

import pytest

from rlpost.cli_config import load_config
from rlpost.config import ConfigError, RlpostConfig


def test_experiment_composes_into_typed_dataclasses():
    cfg = load_config(["experiment=toy_moe_local", "trainer.lr=5e-4", "rollout.num_workers=2"])
    assert isinstance(cfg, RlpostConfig)
    assert cfg.name == "toy_moe_local" and cfg.trainer.lr == 5e-4 and cfg.rollout.num_workers == 2
    assert cfg.model.type == "qwen3_moe" and cfg.engine.name == "native"


@pytest.mark.parametrize("override, message", [
    ("trainer.lr=abc", "trainer.lr: Value 'abc' of type 'str' could not be converted to Float"),
    ("trainer.foo=1", "trainer.foo: Key 'foo' not in 'TrainerConfig'"),
    ("rollout.group_size=1.5", "rollout.group_size"),
    ("trainer.lr=-1", "trainer.lr=-1.0: must be > 0"),
    ("trainer.zero_stage=3", "trainer.zero_stage=3"),
    ("model.n_heads=3", "model.n_heads=3: must be a multiple of model.n_kv_heads=2"),
    ("model.head_dim=33", "model.head_dim=33: must be even"),
    ("model.top_k=3", "model.top_k=3"),
    ("mode=turbo", "mode='turbo': must be one of sync, async, april"),
    ("engine.name=tgi", "engine.name='tgi': must be one of native, vllm, sglang"),
    ("buffer.url=http://x", "buffer.url='http://x'"),
    ("experiment=nope", "Could not find 'experiment/nope'"),
])
def test_bad_config_raises_config_error_naming_it(override, message):
    with pytest.raises(ConfigError) as info:
        load_config([override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_prints_one_line_and_exits_2():
    proc = subprocess.run([sys.executable, "-m", "rlpost.run", "trainer.lr=abc"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "rlpost:" in line]
    assert errors == ["rlpost: config error: trainer.lr: Value 'abc' of type 'str' could not be converted to Float"]
    assert "Traceback" not in proc.stderr


def test_cfg_flag_prints_resolved_config():
    proc = subprocess.run([sys.executable, "-m", "rlpost.run", "--cfg", "experiment=toy_moe_local",
                           "trainer.lr=0.002"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "lr: 0.002" in proc.stdout and "name: toy_moe_local" in proc.stdout


@pytest.mark.skipif(__import__("rlpost.envs.sandbox", fromlist=["find_bwrap"]).find_bwrap() is None,
                    reason="the coding env refuses to start without a sandbox")
def test_a_model_too_short_for_the_eval_set_is_refused_at_start_up(tmp_path):
    """HumanEval prompts are long: the driver checks prompt + budget against model.max_seq_len
    before starting anything, instead of failing inside a worker at the first evaluation."""
    from rlpost.run import Run

    cfg = load_config(["experiment=toy_moe_humaneval", "model.max_seq_len=512", f"run_dir={tmp_path}/run"])
    with pytest.raises(ConfigError, match=r"model.max_seq_len=512: the eval set needs \d+"):
        Run(cfg)
    cfg = load_config(["experiment=toy_moe_humaneval", f"run_dir={tmp_path}/run2"])
    assert Run(cfg).cfg.model.vocab_size == 50257  # the GPT-2 tokenizer's


def test_two_runs_with_the_same_name_get_separate_redis_namespaces_and_a_resume_keeps_its_own(tmp_path):
    """Two run dirs with the same basename used to share ``rlpost:{name}:`` on a shared Redis:
    the second run followed the first one's version key and hung. The id is the name plus a
    random suffix, kept in the run dir, so a resume finds its own keys."""
    from rlpost.run import Run

    first = Run(load_config(["experiment=toy_moe_local", f"run_dir={tmp_path}/a/exp"]))
    second = Run(load_config(["experiment=toy_moe_local", f"run_dir={tmp_path}/b/exp"]))
    assert first.run_id != second.run_id
    assert first.run_id.startswith("exp-") and second.run_id.startswith("exp-")
    resumed = Run(load_config(["experiment=toy_moe_local", f"run_dir={tmp_path}/a/exp"]))
    assert resumed.run_id == first.run_id
    assert (tmp_path / "a" / "exp" / "run_id").read_text().strip() == first.run_id
