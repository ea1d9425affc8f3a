"""Config composition and validation: every error is one line that names the key and value."""

import os
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


MODEL_PRESETS = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(
    os.path.dirname(__file__), "..", "configs", "model")) if f.endswith(".yaml"))


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_every_model_preset_composes_validates_and_builds(preset):
    """Each configs/model/*.yaml is a valid config of its architecture, and the model builds and
    runs from it (a typo in a preset would otherwise surface only in a slow end-to-end run)."""
    import torch

    from rlpost.modeling import HF_ARCHITECTURES, Qwen3MoeForCausalLM

    cfg = load_config(["experiment=toy_moe_local", f"model={preset}"]).model
    assert cfg.type in HF_ARCHITECTURES and preset.startswith(cfg.type)
    cfg.vocab_size = 50
    out = Qwen3MoeForCausalLM(cfg)(torch.randint(0, 50, (1, 7)))
    assert out.logits.shape == (1, 7, 50) and out.routed_experts.shape == (1, 7, cfg.moe_layers, cfg.top_k)


@pytest.mark.parametrize("override, message", [
    ("trainer.lr=abc", "trainer.lr: Value 'abc' of type 'str' could not be converted to Float"),
    ("trainer.foo=1", "trainer.foo: Key 'foo' not in 'TrainerConfig'"),
    ("rollout.group_size=1.5", "rollout.group_size"),
    ("trainer.lr=-1", "trainer.lr=-1.0: must be > 0"),
    ("trainer.zero_stage=3", "trainer.zero_stage=3"),
    ("rollout.filter_max_batches=inf", "rollout.filter_max_batches=inf: must be a finite number >= 0"),
    ("rollout.filter_max_batches=-1", "rollout.filter_max_batches=-1.0: must be a finite number >= 0"),
    ("model.n_heads=3", "model.n_heads=3: must be a multiple of model.n_kv_heads=2"),
    ("model.head_dim=33", "model.head_dim=33: must be even"),
    ("model.top_k=5", "model.top_k=5: must be <= model.num_experts=4"),
    ("model.shared_experts=1", "model.shared_experts=1: only model.type=glm4_moe or deepseek_v3 has it"),
    ("mode=turbo", "mode='turbo': must be one of sync, async, april"),
    ("engine.name=tgi", "engine.name='tgi': must be one of native, vllm, sglang"),
    ("buffer.url=http://x", "buffer.url='http://x'"),
    ("experiment=nope", "Could not find 'experiment/nope'"),
    # GRPO with one sample per prompt trained on NaN advantages and exited 0
    ("rollout.group_size=1", "rollout.group_size=1: must be >= 2"),
    # 100 one-digit additions cannot hold 200 held-out prompts: the env spun forever
    ("env.max_digits=1", "env.num_eval=200: must be <= 50"),
    ("trainer.num_ranks=3", "rollout.batch_prompts=16: must be a multiple of trainer.num_ranks=3"),
    ("trainer.max_nonfinite_steps=0", "trainer.max_nonfinite_steps=0: must be >= 1"),
    ("trainer.is_level=tokens", "trainer.is_level='tokens': must be auto, token, geometric or sequence"),
    ("trainer.is_floor=1.5", "trainer.is_floor=1.5: must be in [0, 1) (0: off)"),
    ("trainer.max_tokens_per_micro_batch=10", "trainer.max_tokens_per_micro_batch=10: must be >= model.max_seq_len=64"),
    ("trainer.ratio_level=seq", "trainer.ratio_level='seq': must be token or sequence (GSPO)"),
    ("env.overlong_buffer=9", "env.overlong_buffer=9: must be <= rollout.max_new_tokens=8"),
    ("trainer.advantage=gae", "trainer.advantage='gae': must be grpo, rloo or reinforce_pp_baseline"),
    ("env.overlong_buffer=-1", "env.overlong_buffer=-1: must be >= 0 (0: off)"),
    ("env.overlong_penalty=nan", "env.overlong_penalty=nan: must be a finite number >= 0"),
    # a cap inside the clip range would cap ordinary negative-advantage tokens too
    ("trainer.clip_ratio_c=1.2", "trainer.clip_ratio_c=1.2: must be 0 (off) or a finite number above 1 + trainer.clip_eps_high=1.28"),
    ("trainer.clip_ratio_c=inf", "trainer.clip_ratio_c=inf: must be 0 (off)"),
])
def test_bad_config_raises_config_error_naming_it(override, message):
    with pytest.raises(ConfigError) as info:
        load_config([override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_rollout_correction_fields_need_a_correction_that_weighs_tokens():
    """is_floor / is_veto / is_level act on tis's and decoupled's old/behav weight: with a
    correction that has none they would do nothing silently, so they are refused by name."""
    for field, value in (("is_floor", "0.5"), ("is_veto", "0.0001"), ("is_level", "sequence")):
        with pytest.raises(ConfigError, match=rf"trainer.{field}=.*needs trainer.off_policy=tis or decoupled "
                                              rf"\(trainer.off_policy=mask_stale weighs no token"):
            load_config([f"trainer.{field}={value}", "trainer.off_policy=mask_stale"])
    cfg = load_config(["trainer.is_floor=0.5", "trainer.is_veto=0.0001", "trainer.is_level=geometric",
                       "trainer.off_policy=decoupled"])
    assert (cfg.trainer.is_floor, cfg.trainer.is_veto, cfg.trainer.is_level) == (0.5, 1e-4, "geometric")


def test_micro_batches_go_by_tokens_or_by_samples_not_both():
    with pytest.raises(ConfigError, match=r"trainer.max_tokens_per_micro_batch=64: micro-batches by tokens or by "
                                          r"samples, not both \(trainer.micro_batch_size=8\)"):
        load_config(["trainer.max_tokens_per_micro_batch=64", "trainer.micro_batch_size=8"])
    assert load_config(["trainer.max_tokens_per_micro_batch=64"]).trainer.max_tokens_per_micro_batch == 64


def test_micro_batches_must_fill_every_minibatch():
    """micro_batch_size sets DeepSpeed's micro-batches per optimiser step, and each PPO minibatch
    is one step: 1-sample micro-batches with 2 minibatches left half of them empty, a crash in
    the middle of the first RL step; refused at start-up instead."""
    with pytest.raises(ConfigError, match=r"trainer.micro_batch_size=1: with trainer.ppo_minibatches=2 a minibatch "
                                          r"has 8 samples per rank, fewer than the 16 micro-batches"):
        load_config(["trainer.micro_batch_size=1", "trainer.ppo_minibatches=2", "rollout.batch_prompts=4",
                     "rollout.group_size=4"])
    assert load_config(["trainer.micro_batch_size=2", "trainer.ppo_minibatches=2", "rollout.batch_prompts=4",
                        "rollout.group_size=4"]).trainer.ppo_minibatches == 2


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


def test_the_redis_password_is_masked_in_printed_and_logged_configs():
    from rlpost.cli_config import public, to_yaml

    cfg = load_config(["buffer=shared", "buffer.url=redis://rl:hunter2@redis.example:6379/0", "buffer.password=s3cret",
                       "env.name=my.env:Env", "+env.options.api_key=sk-live-1", "+env.options.AUTH_TOKEN=t0k",
                       "+env.options.level=3"])
    text = to_yaml(cfg)
    assert "s3cret" not in text and "hunter2" not in text
    assert "sk-live-1" not in text and "t0k" not in text and "level: 3" in text
    assert cfg.env.options["api_key"] == "sk-live-1"  # the env itself gets it
    assert "password: '***'" in text and "redis://rl:***@redis.example:6379/0" in text
    assert cfg.buffer.password == "s3cret"  # the run itself still has it
    assert public(cfg).buffer.password == "***"
    proc = subprocess.run([sys.executable, "-m", "rlpost.run", "buffer.password=s3cret", "--cfg"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "s3cret" not in proc.stdout and "***" in proc.stdout


def test_non_finite_training_is_logged_and_stops_the_run_after_n_steps_in_a_row(tmp_path):
    """A NaN loss was dropped from metrics.jsonl and the run went on to exit 0. Now it is logged
    ("nan") and trainer.max_nonfinite_steps in a row stop the run (main() exits 1)."""
    import json

    from rlpost.cli_config import load_config as load
    from rlpost.config import LoggerConfig
    from rlpost.metrics import MetricsLogger
    from rlpost.run import NonFiniteTraining, Run

    run = Run(load(["experiment=toy_moe_local", f"run_dir={tmp_path}/run", "trainer.max_nonfinite_steps=2"]))
    nan = {"train/loss": float("nan"), "train/grad_norm": 1.0}
    run._check_finite(dict(nan))
    run._check_finite({"train/loss": 0.5, "train/grad_norm": 1.0})  # a finite step resets the count
    first = dict(nan)
    run._check_finite(first)
    assert first["train/nonfinite"] == 1
    with pytest.raises(NonFiniteTraining, match=r"train/loss, train/grad_norm not finite for 2 steps in a row"):
        run._check_finite({"train/loss": float("nan"), "train/grad_norm": float("inf")})
    logger = MetricsLogger(LoggerConfig(progress=False), str(tmp_path), "x", 1, {})
    logger.log({"train/loss": float("nan"), "train/grad_norm": float("inf")}, step=1)
    logger.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["train/loss"] == "nan" and record["train/grad_norm"] == "inf"


@pytest.mark.parametrize("overrides, message", [
    (["trainer.num_ranks=2", "trainer.ep_size=3"], "trainer.ep_size=3: must divide trainer.num_ranks=2"),
    (["trainer.num_ranks=3", "trainer.ep_size=3", "rollout.batch_prompts=6"], "trainer.ep_size=3: must divide model.num_experts=4"),
])
def test_expert_parallel_sizes_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(overrides)


@pytest.mark.parametrize("overrides, message", [
    (["engine.tensor_parallel_size=2"], "engine.tensor_parallel_size=2: the native engine runs on one device"),
    (["engine=vllm", "engine.tensor_parallel_size=0"], "engine.tensor_parallel_size=0: must be >= 1"),
    (["engine=sglang", "engine.tensor_parallel_size=2"],
     "engine.num_gpus=1.0: must be 0 (CPU) or engine.tensor_parallel_size=2 (one GPU per tensor-parallel rank)"),
    (["engine=vllm", "engine.expert_parallel=true"], "engine.expert_parallel=True: needs engine.tensor_parallel_size > 1"),
    (["engine=vllm", "engine.tensor_parallel_size=8"], "engine.tensor_parallel_size=8: must divide model.n_heads=4"),
    (["engine=vllm", "engine.tensor_parallel_size=4", "model.d_ff=6"],
     "engine.tensor_parallel_size=4: must divide model.d_ff=6"),
    (["engine=vllm", "engine.tensor_parallel_size=2", "model=glm4_moe_tiny", "model.dense_d_ff=33"],
     "engine.tensor_parallel_size=2: must divide model.dense_d_ff=33"),
    (["engine=vllm", "engine.tensor_parallel_size=2", "engine.num_gpus=2", "trainer.num_gpus=1", "placement.colocate=true"],
     "placement.colocate=True: shares one GPU between a trainer rank and a rollout worker; an engine over "
     "engine.tensor_parallel_size=2 GPUs needs its own (colocate=false)"),
])
def test_tensor_parallel_engines_are_checked(overrides, message):
    """A model split over an engine's devices must split evenly, on an engine that can split it."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(overrides)
    cfg = load_config(["engine=sglang", "engine.tensor_parallel_size=2", "engine.num_gpus=2", "engine.expert_parallel=true"])
    assert cfg.engine.tensor_parallel_size == 2 and cfg.engine.expert_parallel
    assert load_config(["engine=vllm", "engine.tensor_parallel_size=4"]).model.n_kv_heads == 2  # kv heads replicated


def test_routing_replay_needs_an_engine_that_reports_its_routing():
    with pytest.raises(ConfigError, match=r"trainer.routing_replay=True: needs the engine's routing: set "
                                          r"engine.return_routed_experts=true \(engine=vllm\)"):
        load_config(["engine=vllm", "trainer.routing_replay=true"])
    assert load_config(["engine=sglang", "trainer.routing_replay=true"]).trainer.routing_replay  # on there
    assert load_config(["trainer.routing_replay=true"]).engine.name == "native"  # always reports it


@pytest.mark.parametrize("algorithm, expected", [
    ("grpo", {"trainer.ratio_level": "token", "trainer.loss_agg": "token_mean", "trainer.adv_std_norm": True,
              "rollout.filter_uniform_groups": False, "env.overlong_buffer": 0}),
    ("dapo", {"trainer.clip_eps_high": 0.28, "trainer.loss_agg": "token_mean", "rollout.filter_uniform_groups": True,
              "env.overlong_buffer": 10}),  # 20% of the 50-token budget set below
    ("gspo", {"trainer.ratio_level": "sequence", "trainer.clip_eps": 3e-4, "trainer.clip_eps_high": 4e-4,
              "trainer.loss_agg": "seq_mean"}),
    ("dr_grpo", {"trainer.adv_std_norm": False, "trainer.loss_agg": "seq_sum_norm", "trainer.advantage": "grpo"}),
    ("rloo", {"trainer.advantage": "rloo", "trainer.loss_agg": "token_mean"}),
    ("reinforce_pp", {"trainer.advantage": "reinforce_pp_baseline"}),
])
def test_algorithm_presets_set_their_recipe_over_the_experiment(algorithm, expected):
    import operator

    cfg = load_config(["experiment=toy_moe_local", f"algorithm={algorithm}", "rollout.max_new_tokens=50"])
    for key, value in expected.items():
        assert operator.attrgetter(key)(cfg) == value, key
    # the command line still wins over the preset
    assert load_config([f"algorithm={algorithm}", "trainer.loss_agg=seq_mean"]).trainer.loss_agg == "seq_mean"


def test_an_unknown_algorithm_is_one_line_listing_the_presets():
    with pytest.raises(ConfigError) as info:
        load_config(["algorithm=ppo2"])
    assert "Could not find 'algorithm/ppo2'" in str(info.value) and "dapo dr_grpo grpo gspo reinforce_pp rloo" in str(info.value)


def test_the_warmup_cache_key_ignores_reward_only_settings_and_not_the_rest():
    """algorithm=dapo (overlong shaping) starts from GRPO's cached warm-up; anything that changes
    the warm-up's data, model or steps gets its own."""
    from rlpost.run import warmup_key

    base = warmup_key(load_config(["experiment=toy_moe_local"]))
    for same in (["algorithm=dapo"], ["env.reward_timeout_s=9"], ["algorithm=gspo", "trainer.lr=1e-4"]):
        assert warmup_key(load_config(["experiment=toy_moe_local", *same])) == base, same
    for other in (["env.teacher_carry_error=0.5"], ["warmup.steps=10"], ["model.d_model=32"], ["seed=1"]):
        assert warmup_key(load_config(["experiment=toy_moe_local", *other])) != base, other


def test_the_warmup_cache_key_covers_the_code_that_makes_the_warm_up(tmp_path, monkeypatch):
    import rlpost.run as run_module

    files = run_module.warmup_code_files(load_config([]))
    names = {os.path.basename(f) for f in files}
    assert {"modeling.py", "actor.py", "arithmetic.py", "tools.py", "tokenizer.py"} <= names
    custom = run_module.warmup_code_files(load_config(["env.name=custom_env:ReverseEnv"]))
    assert custom[:-1] == files and custom[-1].endswith(os.path.join("tests", "custom_env.py"))
    source = tmp_path / "modeling.py"
    source.write_text("x = 1\n")
    monkeypatch.setattr(run_module, "warmup_code_files", lambda cfg: [str(source)])
    cfg = load_config(["experiment=toy_moe_local"])
    before = run_module.warmup_key(cfg)
    assert run_module.warmup_key(cfg) == before
    source.write_text("x = 2\n")  # an edited initialisation: not the cached warm-up's code
    assert run_module.warmup_key(cfg) != before
