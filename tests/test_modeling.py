"""The one model definition: Hugging Face names and config, the same function as transformers'
Qwen3-MoE, the trainer's DeepSpeed block and the engine's routing block interchangeable."""

import json

import pytest
import torch

from rlpost.config import ConfigError, ModelConfig
from rlpost.modeling import Qwen3MoeForCausalLM, load_pretrained, model_config_from_hf, save_pretrained


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 100, "max_seq_len": 64, "init_std": 0.2, **kw})


def test_checkpoint_is_a_hugging_face_qwen3_moe(tmp_path):
    cfg = tiny()
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg)
    save_pretrained(model.canonical_state_dict(), cfg, str(tmp_path))
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["model_type"] == "qwen3_moe" and meta["architectures"] == ["Qwen3MoeForCausalLM"]
    assert meta["hidden_size"] == 64 and meta["num_experts_per_tok"] == 2 and meta["norm_topk_prob"] is True
    state, loaded = load_pretrained(str(tmp_path))
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in state
    assert "model.layers.0.self_attn.q_norm.weight" in state and "lm_head.weight" in state
    assert loaded.d_model == cfg.d_model and loaded.head_dim == cfg.head_dim and loaded.path == str(tmp_path)
    again = Qwen3MoeForCausalLM(loaded)
    again.load_canonical_state_dict(state)
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_checkpoint_is_a_hugging_face_mixtral(tmp_path):
    """model.type=mixtral: Mixtral's config.json and parameter names, no q/k norms, and a
    Mixtral checkpoint loads back into the same function."""
    cfg = tiny(type="mixtral")
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg)
    save_pretrained(model.canonical_state_dict(), cfg, str(tmp_path))
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["model_type"] == "mixtral" and meta["architectures"] == ["MixtralForCausalLM"]
    assert meta["num_local_experts"] == 4 and meta["intermediate_size"] == cfg.d_ff and "norm_topk_prob" not in meta
    state, loaded = load_pretrained(str(tmp_path))
    assert loaded.type == "mixtral" and loaded.num_experts == 4 and loaded.d_ff == cfg.d_ff
    assert {"model.layers.1.block_sparse_moe.experts.3.w1.weight", "model.layers.1.block_sparse_moe.experts.3.w2.weight",
            "model.layers.1.block_sparse_moe.experts.3.w3.weight", "model.layers.0.block_sparse_moe.gate.weight"} <= set(state)
    assert not any(".mlp." in k or "q_norm" in k or "gate_proj" in k for k in state)
    again = Qwen3MoeForCausalLM(loaded)
    again.load_canonical_state_dict(state)
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="missing="):  # a Qwen3 checkpoint is not a Mixtral one
        again.load_canonical_state_dict(Qwen3MoeForCausalLM(tiny()).canonical_state_dict())
    meta["sliding_window"] = 4096
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"config.json sliding_window=4096 is not supported \(needs None\)"):
        model_config_from_hf(str(tmp_path))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_same_function_as_transformers(tmp_path, model_type):
    """transformers loads our checkpoint as is (its own Qwen3-MoE or Mixtral class) and
    computes the same logits (fp32)."""
    transformers = pytest.importorskip("transformers")
    cfg = tiny(type=model_type)
    torch.manual_seed(1)
    model = Qwen3MoeForCausalLM(cfg).eval()
    save_pretrained(model.canonical_state_dict(), cfg, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(hf).__name__ == {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}[model_type]
    ids = torch.randint(0, 100, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_logits_at_selects_positions_and_scattered_logprobs_match_the_full_head():
    """The LM head on the selected positions only (what the loss and a prefill need) gives the
    same logits, in row-major order, and the same per-token logprobs scattered back."""
    from rlpost.trainer.losses import scattered_logprobs, scored_positions, token_logprobs

    torch.manual_seed(3)
    model = Qwen3MoeForCausalLM(tiny()).eval()
    ids = torch.randint(0, 100, (3, 12))
    mask = torch.zeros(3, 11)
    mask[0, 4:9] = 1
    mask[2, 2:11] = 1
    with torch.no_grad():
        full = model(ids).logits
        sel = model(ids, logits_at=scored_positions(mask)).logits
    assert sel.shape == (14, 100)
    torch.testing.assert_close(sel, full[:, :-1][mask.bool()], atol=1e-6, rtol=0)
    scattered = scattered_logprobs(sel, ids[:, 1:], mask, temperature=0.7)
    expected = token_logprobs(full[:, :-1], ids[:, 1:], temperature=0.7) * mask
    torch.testing.assert_close(scattered, expected, atol=1e-6, rtol=0)
    assert scattered[1].abs().sum() == 0 and not scattered.isnan().any()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_trainer_block_has_the_engines_names_and_function(model_type):
    """The DeepSpeed-wrapped policy publishes exactly the routing model's (HF) names, and with
    the same weights both compute the same logits."""
    from rlpost.trainer.ds_engine import DistEnv, init_distributed
    from rlpost.trainer.policy import build_policy
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init_distributed(DistEnv(0, 1, "127.0.0.1", port))
    cfg = tiny(type=model_type)
    torch.manual_seed(2)
    trainer_model = build_policy(cfg).eval()
    engine_model = Qwen3MoeForCausalLM(cfg).eval()
    state = trainer_model.canonical_state_dict()
    assert set(state) == set(engine_model.canonical_state_dict())
    engine_model.load_canonical_state_dict(state)
    ids = torch.randint(0, 100, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(trainer_model(ids).logits, engine_model(ids).logits, atol=2e-5, rtol=0)


def test_model_path_refuses_other_architectures_naming_the_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ConfigError, match=r"model.path=.*model_type='llama' is not supported"):
        model_config_from_hf(str(tmp_path))
    with pytest.raises(ConfigError, match=r"model.path=.*no config.json"):
        model_config_from_hf(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "mlp_only_layers": [0]}))
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        model_config_from_hf(str(tmp_path))


def test_tied_embeddings_publish_without_lm_head_and_load_into_the_engine():
    from rlpost.config import EngineConfig
    from rlpost.rollout.native import NativeEngine

    cfg = tiny(tie_word_embeddings=True)
    torch.manual_seed(4)
    model = Qwen3MoeForCausalLM(cfg)
    state = model.canonical_state_dict()
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state
    engine = NativeEngine(cfg, EngineConfig(), eos_id=-1)
    engine.load_weights(state, version=3)
    assert engine.version == 3
    assert torch.equal(engine.model.lm_head.weight, state["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="weights v4 do not fit"):
        engine.load_weights({k: v for k, v in state.items() if "q_norm" not in k}, version=4)


def test_model_path_with_a_broken_config_json_is_a_one_line_config_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"model.path=.*config.json is not readable JSON"):
        model_config_from_hf(str(tmp_path))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a JSON object"):
        model_config_from_hf(str(tmp_path))


def test_model_path_sizes_are_checked_against_the_rest_of_the_config(tmp_path):
    """A checkpoint shorter than the configured completion budget is refused at start-up, naming
    the field, not at the first generation."""
    from rlpost.cli_config import load_config
    from rlpost.run import Run

    cfg = tiny(max_seq_len=16)
    save_pretrained(Qwen3MoeForCausalLM(cfg).canonical_state_dict(), cfg, str(tmp_path))
    run_cfg = load_config([f"model.path={tmp_path}", "rollout.max_new_tokens=20"])
    with pytest.raises(ConfigError, match=r"rollout.max_new_tokens=20: must be < model.max_seq_len=16"):
        Run(run_cfg)


def _init_single_rank():
    import socket

    from rlpost.trainer.ds_engine import DistEnv, init_distributed

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init_distributed(DistEnv(0, 1, "127.0.0.1", port))


@pytest.mark.parametrize("top_k", [1, 2])
def test_routing_replay_routes_through_the_given_experts_in_trainer_and_engine_blocks(top_k):
    """Rollout routing replay: the DeepSpeed block (the trainer's) and the routing block (the KL
    reference's) both send each token through the experts they are given, weighted by their own
    router's probabilities (so the router still gets a gradient); replaying the router's own
    choice is DeepSpeed's gate exactly; rows that are not k distinct valid experts keep the
    router's choice."""
    from rlpost.trainer.policy import build_policy

    _init_single_rank()
    cfg = tiny(top_k=top_k, num_experts=4)
    torch.manual_seed(3)
    trainer_model = build_policy(cfg).eval()
    engine_model = Qwen3MoeForCausalLM(cfg).eval()
    engine_model.load_canonical_state_dict(trainer_model.canonical_state_dict())
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        natural = trainer_model(ids)
        own = natural.routed_experts  # (B, T, n_layers, k): the router's own choice
        same = trainer_model(ids, replay_experts=own)
    torch.testing.assert_close(same.logits, natural.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(same.expert_counts, natural.expert_counts)

    # another routing: k distinct experts per token, none of them the router's first choice
    other = torch.stack([(own[..., 0] + 1 + j) % 4 for j in range(top_k)], dim=-1)
    other[1, 3:] = -1   # the engine did not report these: the router's own choice
    other[0, 2] = 7     # out of range: not a routing, not replayed
    if top_k == 2:
        other[0, 4] = other[0, 4, :, :1]  # one expert twice: not replayed
    valid = (other >= 0).all(-1) & (other < 4).all(-1) & ((other[..., :1] != other).sum(-1) == top_k - 1)
    replayed = trainer_model(ids, replay_experts=other)
    with torch.no_grad():
        reference = engine_model(ids, replay_experts=other)
    torch.testing.assert_close(replayed.logits, reference.logits, atol=2e-5, rtol=0)
    assert (replayed.logits[0, :2] - natural.logits[0, :2]).abs().max() > 1e-3  # routing really changed
    # the first layer sees the same hidden states, so its expert counts are those of the routing used
    used = torch.where(valid[..., None], other, own)[:, :, 0]
    assert not bool(valid[1, 3:].any() or valid[0, 2].any()) and bool(valid[0, :2].all())
    assert replayed.expert_counts[0].tolist() == torch.bincount(used.reshape(-1), minlength=4).tolist()
    torch.testing.assert_close(replayed.routed_experts[:, :, 0], own[:, :, 0])  # metric: router's own choice
    replayed.logits.logsumexp(-1).sum().backward()
    gate = next(p for n, p in trainer_model.named_parameters() if n.endswith("gate.wg.weight"))
    assert gate.grad is not None and gate.grad.abs().sum() > 0
