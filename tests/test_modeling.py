"""The one model definition: Hugging Face names and config, the same function as transformers'
Qwen3-MoE, the trainer's DeepSpeed block and the engine's routing block interchangeable."""

import json
import re

import pytest
import torch

from glm_toy import DEEPSEEK, GLM, MINIMAX, OSS, YARN, randomise_glm_extras
from rlpost.config import ConfigError, ModelConfig
from rlpost.modeling import Qwen3MoeForCausalLM, load_pretrained, model_config_from_hf, save_pretrained


def tiny(**kw) -> ModelConfig:
    kw = {**{"glm4_moe": GLM, "deepseek_v3": DEEPSEEK, "gpt_oss": OSS, "minimax_m2": MINIMAX}.get(kw.get("type"), {}),
          **kw}
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
    assert_reloads_the_same_function(model, state, loaded)


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
    assert_reloads_the_same_function(model, state, loaded)
    with pytest.raises(ValueError, match="missing="):  # a Qwen3 checkpoint is not a Mixtral one
        Qwen3MoeForCausalLM(loaded).load_canonical_state_dict(Qwen3MoeForCausalLM(tiny()).canonical_state_dict())
    meta["sliding_window"] = 4096
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"config.json sliding_window=4096 is not supported \(needs None\)"):
        model_config_from_hf(str(tmp_path))


def saved(cfg: ModelConfig, folder) -> tuple[Qwen3MoeForCausalLM, dict]:
    """A random model of ``cfg`` (random biases too) saved as a checkpoint in ``folder``, and its config.json."""
    cfg.validate()
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg)
    randomise_glm_extras(model)
    save_pretrained(model.canonical_state_dict(), cfg, str(folder))
    return model, json.loads((folder / "config.json").read_text())


def assert_reloads_the_same_function(model: Qwen3MoeForCausalLM, state: dict, loaded: ModelConfig) -> None:
    """A model of the ``loaded`` config with the ``state`` read back computes ``model``'s logits exactly."""
    again = Qwen3MoeForCausalLM(loaded)
    again.load_canonical_state_dict(state)
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_checkpoint_is_a_hugging_face_glm4_moe(tmp_path):
    """model.type=glm4_moe: GLM-4.5's config.json keys and parameter names (dense first layer,
    shared expert, router correction bias, q/k/v biases), loaded back into the same function; a
    GLM checkpoint's multi-token-prediction layer is dropped on load (not part of the policy)."""
    cfg = tiny(type="glm4_moe")
    model, meta = saved(cfg, tmp_path)
    assert meta["model_type"] == "glm4_moe" and meta["architectures"] == ["Glm4MoeForCausalLM"]
    assert {k: meta[k] for k in ("n_routed_experts", "num_experts_per_tok", "first_k_dense_replace", "intermediate_size",
                                 "moe_intermediate_size", "n_shared_experts", "n_group", "topk_group",
                                 "routed_scaling_factor", "norm_topk_prob", "attention_bias", "use_qk_norm",
                                 "partial_rotary_factor", "num_nextn_predict_layers")} == {
        "n_routed_experts": 8, "num_experts_per_tok": 4, "first_k_dense_replace": 1, "intermediate_size": 96,
        "moe_intermediate_size": 32, "n_shared_experts": 1, "n_group": 2, "topk_group": 1,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "attention_bias": True, "use_qk_norm": True,
        "partial_rotary_factor": 0.5, "num_nextn_predict_layers": 0}
    state, loaded = load_pretrained(str(tmp_path))
    assert {"model.layers.0.mlp.gate_proj.weight", "model.layers.0.self_attn.q_proj.bias",
            "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.2.mlp.experts.7.down_proj.weight",
            "model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.1.self_attn.k_norm.weight"} <= set(state)
    assert not any(k.startswith("model.layers.0.mlp.") and ("experts" in k or "gate." in k) for k in state)
    assert state["model.layers.1.mlp.shared_experts.up_proj.weight"].shape == (32, 64)
    assert not any("o_proj.bias" in k for k in state)
    assert {k: getattr(loaded, k) for k in GLM} == GLM and loaded.type == "glm4_moe"
    assert_reloads_the_same_function(model, state, loaded)
    # a real GLM checkpoint: its MTP layer (model.layers.<n_layers>.*) and rope_parameters
    from safetensors.torch import save_file
    save_file({"model.layers.3.eh_proj.weight": torch.zeros(64, 128),
               "model.layers.3.mlp.experts.0.up_proj.weight": torch.zeros(32, 64)}, str(tmp_path / "mtp.safetensors"))
    meta.update(num_nextn_predict_layers=1, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    del meta["rope_theta"], meta["partial_rotary_factor"], meta["use_qk_norm"]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    state, loaded = load_pretrained(str(tmp_path))
    assert not any(k.startswith("model.layers.3.") for k in state)
    # absent keys take transformers' Glm4MoeConfig defaults (half-width rotary, no q/k norm)
    assert loaded.rope_theta == 1e6 and loaded.partial_rotary == 0.5 and loaded.qk_norm is False


def test_checkpoint_is_a_hugging_face_deepseek_v3(tmp_path):
    """model.type=deepseek_v3: DeepSeek-V3's config.json keys and parameter names (latent
    attention's projections and norms, GLM's router and experts), loaded back into the same
    function; a full q_proj is config.json's q_lora_rank null; DeepSeek-V3's and Moonlight's own
    config.json read as they are (YaRN in the older rope_scaling form, the FP8 quantization
    config accepted: dequantized on load), other quantizations refused by name."""
    cfg = tiny(type="deepseek_v3", **YARN)
    model, meta = saved(cfg, tmp_path)
    assert meta["model_type"] == "deepseek_v3" and meta["architectures"] == ["DeepseekV3ForCausalLM"]
    assert {k: meta[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                                 "num_key_value_heads", "n_routed_experts", "topk_method", "scoring_func",
                                 "rope_interleave")} == {
        "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 24,
        "num_key_value_heads": 4, "n_routed_experts": 8, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
        "rope_interleave": True}
    assert meta["rope_scaling"] == {"rope_type": "yarn", "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.8, "mscale_all_dim": 1.0}
    assert "head_dim" not in meta
    state, loaded = load_pretrained(str(tmp_path))
    attn = "model.layers.1.self_attn."
    assert {f"{attn}q_a_proj.weight", f"{attn}q_a_layernorm.weight", f"{attn}q_b_proj.weight",
            f"{attn}kv_a_proj_with_mqa.weight", f"{attn}kv_a_layernorm.weight", f"{attn}kv_b_proj.weight",
            f"{attn}o_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.0.mlp.gate_proj.weight"} <= set(state)
    assert state[f"{attn}kv_a_proj_with_mqa.weight"].shape == (32 + 8, 64)
    assert state[f"{attn}kv_b_proj.weight"].shape == (4 * (16 + 24), 32)
    assert state[f"{attn}o_proj.weight"].shape == (64, 4 * 24)
    assert {k: getattr(loaded, k) for k in {**DEEPSEEK, **YARN}} == {**DEEPSEEK, **YARN} and loaded.type == "deepseek_v3"
    assert_reloads_the_same_function(model, state, loaded)
    full_q = tiny(type="deepseek_v3", q_lora_rank=0)
    save_pretrained(Qwen3MoeForCausalLM(full_q).canonical_state_dict(), full_q, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["q_lora_rank"] is None
    state, loaded = load_pretrained(str(tmp_path), base=cfg)  # null q_lora_rank: not the base's 48
    assert loaded.q_lora_rank == 0 and f"{attn}q_proj.weight" in state and loaded.rope_type == "default"

    # DeepSeek-V3's own config.json (the weights' FP8 quantization aside), with its MTP layer
    real = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
            "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432,
            "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1,
            "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
            "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
            "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
            "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                                     "type": "yarn"},
            "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
            "topk_group": 4, "topk_method": "noaux_tc", "v_head_dim": 128, "vocab_size": 129280}
    (tmp_path / "config.json").write_text(json.dumps(real))
    big = model_config_from_hf(str(tmp_path))
    big.validate()
    assert (big.n_layers, big.moe_layers, big.num_experts, big.top_k, big.n_group, big.topk_group, big.dense_d_ff,
            big.q_lora_rank, big.kv_lora_rank, big.rotary_dim, big.v_head_dim, big.max_seq_len) == (
        61, 58, 256, 8, 8, 4, 18432, 1536, 512, 64, 128, 163840)
    assert (big.rope_type, big.rope_factor, big.rope_original_max_len, big.rope_mscale_all_dim) == ("yarn", 40.0, 4096, 1.0)
    # Moonlight-16B-A3B: a deepseek_v3 with a full q_proj, no YaRN, one group
    (tmp_path / "config.json").write_text(json.dumps({**real, "q_lora_rank": None, "rope_scaling": None, "n_group": 1,
                                                      "topk_group": 1, "n_routed_experts": 64, "num_experts_per_tok": 6}))
    moon = model_config_from_hf(str(tmp_path))
    moon.validate()
    (tmp_path / "config.json").write_text(json.dumps({**real, "hidden_size": 7040}))  # 55 per head: unused here
    model_config_from_hf(str(tmp_path)).validate()
    assert (moon.q_lora_rank, moon.rope_type, moon.num_experts, moon.top_k) == (0, "default", 64, 6)
    (tmp_path / "config.json").write_text(json.dumps({**real, "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}))
    model_config_from_hf(str(tmp_path)).validate()  # DeepSeek-V3's FP8: dequantized on load (next test)
    for quant in ({"quant_method": "compressed-tensors"}, {"quant_method": "fp8", "weight_block_size": [128]},
                  {"quant_method": "fp8", "fmt": "e5m2"}):
        (tmp_path / "config.json").write_text(json.dumps({**real, "quantization_config": quant}))
        with pytest.raises(ConfigError, match=r"config.json quantization_config=.*: not supported \(fp8 e4m3 with "
                                              r"weight_scale_inv, and gpt_oss's mxfp4 experts, are dequantized on load"):
            model_config_from_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**real, "rope_interleave": False}))
    with pytest.raises(ConfigError, match=r"config.json rope_interleave=False is not supported \(needs True\)"):
        model_config_from_hf(str(tmp_path))


def test_checkpoint_is_a_hugging_face_gpt_oss(tmp_path):
    """model.type=gpt_oss: GPT-OSS's config.json keys (layer types, swiglu_limit, untruncated
    YaRN) and tensors as gpt-oss stores them (each layer's experts fused, gate and up columns
    interleaved; router, sinks, biases), loaded back into one module per expert with the same
    function; gpt-oss-20b's own config.json read as it is, other quantizations, layer types or
    SwiGLU limits refused."""
    from safetensors.torch import load_file

    cfg = tiny(type="gpt_oss")
    model, meta = saved(cfg, tmp_path)
    assert meta["model_type"] == "gpt_oss" and meta["architectures"] == ["GptOssForCausalLM"]
    assert {k: meta[k] for k in ("sliding_window", "layer_types", "swiglu_limit", "attention_bias", "num_local_experts",
                                 "intermediate_size", "head_dim", "rms_norm_eps")} == {
        "sliding_window": 5, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "swiglu_limit": 7.0, "attention_bias": True, "num_local_experts": 8, "intermediate_size": 32, "head_dim": 16,
        "rms_norm_eps": 1e-5}
    assert meta["rope_scaling"] == {"rope_type": "yarn", "type": "yarn", "factor": 32.0, "truncate": False,
                                    "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0}
    disk = load_file(str(tmp_path / "model.safetensors"))
    mlp, attn = "model.layers.1.mlp.", "model.layers.1.self_attn."
    assert {k: tuple(disk[k].shape) for k in disk if k.startswith((mlp, attn))} == {
        f"{mlp}router.weight": (8, 64), f"{mlp}router.bias": (8,), f"{mlp}experts.gate_up_proj": (8, 64, 64),
        f"{mlp}experts.gate_up_proj_bias": (8, 64), f"{mlp}experts.down_proj": (8, 32, 64),
        f"{mlp}experts.down_proj_bias": (8, 64), f"{attn}sinks": (4,),
        **{f"{attn}{p}_proj.{kind}": shape for p, w, b in [("q", (64, 64), (64,)), ("k", (32, 64), (32,)),
                                                          ("v", (32, 64), (32,)), ("o", (64, 64), (64,))]
           for kind, shape in (("weight", w), ("bias", b))}}
    expert = model.model.layers[1].mlp.experts[3]  # gate, up, gate, up, ... columns (HF's [..., ::2], [..., 1::2])
    torch.testing.assert_close(disk[f"{mlp}experts.gate_up_proj"][3, :, 0::2], expert.gate_proj.weight.t(), atol=0, rtol=0)
    torch.testing.assert_close(disk[f"{mlp}experts.gate_up_proj_bias"][3, 1::2], expert.up_proj.bias, atol=0, rtol=0)
    state, loaded = load_pretrained(str(tmp_path))
    assert set(state) == set(model.canonical_state_dict()) and f"{mlp}experts.3.down_proj.bias" in state
    assert {k: getattr(loaded, k) for k in OSS} == OSS and loaded.type == "gpt_oss"
    assert_reloads_the_same_function(model, state, loaded)

    # gpt-oss-20b's config.json (its MXFP4 experts are read by the next test)
    real = {"architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
            "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
            "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
            "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
            "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
            "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
            "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                                    "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                                    "truncate": False},
            "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
            "tie_word_embeddings": False, "use_cache": True, "vocab_size": 201088}
    (tmp_path / "config.json").write_text(json.dumps(real))
    big = model_config_from_hf(str(tmp_path), base=tiny(type="glm4_moe"))
    big.validate()
    assert (big.n_layers, big.num_experts, big.top_k, big.d_ff, big.head_dim, big.n_kv_heads, big.sliding_window,
            big.rope_factor, big.rope_truncate, big.rope_theta, big.shared_experts) == (
        24, 32, 4, 2880, 64, 8, 128, 32.0, False, 150000.0, 0)
    for change, error in [({"quantization_config": {"quant_method": "awq", "bits": 4}}, "awq.*: not supported"),
                          ({"layer_types": ["full_attention", "sliding_attention"] * 12},
                           "layer_types=.* is not supported \\(needs sliding_attention on even layers"),
                          ({"swiglu_limit": 10.0}, r"swiglu_limit=10.0 is not supported \(needs 7.0\)"),
                          ({"attention_bias": False}, r"attention_bias=False is not supported \(needs True\)")]:
        (tmp_path / "config.json").write_text(json.dumps({**real, **change}))
        with pytest.raises(ConfigError, match=error):
            model_config_from_hf(str(tmp_path))


# MiniMax-M2's config.json as published (MiniMaxAI/MiniMax-M2; M2.1 and M2.5 share it), its
# auto_map left out
MINIMAX_M2_CONFIG = {
    "architectures": ["MiniMaxM2ForCausalLM"], "attention_dropout": 0.0, "attn_type_list": [1] * 62, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 3072, "intermediate_size": 1536, "max_position_embeddings": 196608,
    "model_type": "minimax_m2", "mtp_transformer_layers": 1, "num_attention_heads": 48, "num_experts_per_tok": 8,
    "num_hidden_layers": 62, "num_key_value_heads": 8, "num_local_experts": 256, "num_mtp_modules": 3,
    "output_router_logits": False, "qk_norm_type": "per_layer",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8",
                            "weight_block_size": [128, 128],
                            "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]},
    "rms_norm_eps": 1e-06, "rope_theta": 5000000, "rotary_dim": 64, "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.0, "scoring_func": "sigmoid", "shared_intermediate_size": 0, "sliding_window": None,
    "tie_word_embeddings": False, "use_cache": True, "use_mtp": True, "use_qk_norm": True, "use_routing_bias": True,
    "vocab_size": 200064}


def test_checkpoint_is_a_hugging_face_minimax_m2(tmp_path):
    """model.type=minimax_m2: MiniMax-M2's config.json keys (rotary_dim, sigmoid scoring with a
    routing bias, q/k norms per layer, no MTP modules) and names (Mixtral's sparse block and
    expert names, the correction bias beside the gate, q/k norms as wide as the projections),
    loaded back into the same function; a checkpoint's MTP modules (layers after the last) are
    dropped on load; MiniMax-M2's own config.json read as it is (its FP8 quantization included),
    what its architecture fixes refused by name when a config.json says otherwise."""
    from safetensors.torch import load_file, save_file

    cfg = tiny(type="minimax_m2")
    model, meta = saved(cfg, tmp_path)
    assert meta["model_type"] == "minimax_m2" and meta["architectures"] == ["MiniMaxM2ForCausalLM"]
    assert {k: meta[k] for k in ("rotary_dim", "partial_rotary_factor", "scoring_func", "use_routing_bias",
                                 "use_qk_norm", "qk_norm_type", "num_local_experts", "intermediate_size",
                                 "num_mtp_modules", "shared_intermediate_size", "attn_type_list")} == {
        "rotary_dim": 16, "partial_rotary_factor": 0.5, "scoring_func": "sigmoid", "use_routing_bias": True,
        "use_qk_norm": True, "qk_norm_type": "per_layer", "num_local_experts": 8, "intermediate_size": 32,
        "num_mtp_modules": 0, "shared_intermediate_size": 0, "attn_type_list": [1, 1, 1]}
    disk = load_file(str(tmp_path / "model.safetensors"))
    moe, attn = "model.layers.1.block_sparse_moe.", "model.layers.1.self_attn."
    assert {k: tuple(disk[k].shape) for k in disk if k.startswith((moe + "gate", moe + "e_score", attn))
            or k.startswith(moe + "experts.3.")} == {
        f"{moe}gate.weight": (8, 64), f"{moe}e_score_correction_bias": (8,), f"{moe}experts.3.w1.weight": (32, 64),
        f"{moe}experts.3.w3.weight": (32, 64), f"{moe}experts.3.w2.weight": (64, 32),
        f"{attn}q_proj.weight": (128, 64), f"{attn}k_proj.weight": (64, 64), f"{attn}v_proj.weight": (64, 64),
        f"{attn}o_proj.weight": (64, 128), f"{attn}q_norm.weight": (128,), f"{attn}k_norm.weight": (64,)}
    assert disk[f"{moe}e_score_correction_bias"].dtype == torch.float32
    state, loaded = load_pretrained(str(tmp_path))
    assert set(state) == set(disk) == set(model.canonical_state_dict())
    assert {k: getattr(loaded, k) for k in MINIMAX} == MINIMAX and loaded.type == "minimax_m2"
    assert_reloads_the_same_function(model, state, loaded)
    # a published checkpoint: MTP modules as layers after the last, rotary_dim without a factor
    save_file({"model.layers.3.self_attn.q_proj.weight": torch.zeros(128, 64),
               "model.layers.5.block_sparse_moe.gate.weight": torch.zeros(8, 64)}, str(tmp_path / "mtp.safetensors"))
    meta.update(num_mtp_modules=3, use_mtp=True)
    del meta["partial_rotary_factor"]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    state, loaded = load_pretrained(str(tmp_path))
    assert not any(k.startswith(("model.layers.3.", "model.layers.5.")) for k in state)
    assert loaded.partial_rotary == 0.5 and loaded.rotary_dim == 16

    # MiniMax-M2's own config.json (block FP8: its weights dequantize on load as DeepSeek's do)
    (tmp_path / "config.json").write_text(json.dumps(MINIMAX_M2_CONFIG))
    big = model_config_from_hf(str(tmp_path), base=tiny(type="glm4_moe"))
    big.validate()
    assert (big.n_layers, big.d_model, big.num_experts, big.top_k, big.d_ff, big.head_dim, big.n_heads, big.n_kv_heads,
            big.rotary_dim, big.rope_theta, big.max_seq_len, big.shared_experts, big.n_group, big.routed_scaling) == (
        62, 3072, 256, 8, 1536, 128, 48, 8, 64, 5e6, 196608, 0, 1, 1.0)
    for change, error in [({"use_qk_norm": False}, r"use_qk_norm=False is not supported \(needs True\)"),
                          ({"qk_norm_type": "per_head"}, r"qk_norm_type='per_head' is not supported"),
                          ({"scoring_func": "softmax"}, r"scoring_func='softmax' is not supported \(needs 'sigmoid'\)"),
                          ({"use_routing_bias": False}, r"use_routing_bias=False is not supported"),
                          ({"shared_intermediate_size": 1024}, r"shared_intermediate_size=1024 is not supported"),
                          ({"attn_type_list": [0, 1] * 31}, r"attn_type_list=.* is not supported \(needs 1"),
                          ({"rotary_dim": 48, "partial_rotary_factor": 0.5},
                           r"rotary_dim=48 and partial_rotary_factor=0.5 disagree"),
                          ({"rotary_dim": "64"}, r"rotary_dim='64' is not an integer"),
                          ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, r"not supported")]:
        (tmp_path / "config.json").write_text(json.dumps({**MINIMAX_M2_CONFIG, **change}))
        with pytest.raises(ConfigError, match=error):
            model_config_from_hf(str(tmp_path))


def test_gpt_oss_mxfp4_experts_are_dequantized_on_load_as_transformers_does(tmp_path):
    """A gpt-oss checkpoint as OpenAI publishes it (quantization_config mxfp4: each layer's
    experts as uint8 e2m1 blocks + E8M0 scales, the rest bf16) loads as bf16 weights equal to
    transformers' own dequantization (``convert_moe_packed_tensors``), exactly; the loaded model
    runs, saves as a plain bf16/fp32 checkpoint; a missing scales tensor is a config error."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from rlpost.modeling import hf_layout, split_layout

    cfg = tiny(type="gpt_oss")
    model, meta = saved(cfg, tmp_path)
    disk = load_file(str(tmp_path / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    packed, reference = {}, {}
    for name in [k for k in disk if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, cols, rows = disk.pop(name).shape  # (E, in, out): stored as (E, out, in / 32, 16)
        blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=gen, dtype=torch.uint8)
        scales = torch.randint(122, 130, (experts, rows, cols // 32), generator=gen, dtype=torch.uint8)
        packed |= {name + "_blocks": blocks, name + "_scales": scales}
        reference[name] = convert_moe_packed_tensors(blocks, scales)
    save_file({**disk, **packed}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**meta, "quantization_config": {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                            "model.embed_tokens", "lm_head"]}}))
    state, loaded = load_pretrained(str(tmp_path))
    expected = split_layout({**disk, **reference}, loaded)
    assert set(state) == set(expected) == set(model.canonical_state_dict())
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, atol=0, rtol=0)
    assert state["model.layers.0.mlp.experts.3.gate_proj.weight"].dtype == torch.bfloat16
    assert state["model.layers.0.mlp.experts.3.gate_proj.weight"].abs().max() > 1  # values, not codes
    again = Qwen3MoeForCausalLM(loaded)
    again.load_canonical_state_dict(state)
    assert torch.isfinite(again(torch.randint(0, 100, (1, 9))).logits).all()
    assert "quantization_config" not in json.dumps(hf_config_of(again, loaded, tmp_path / "out"))
    assert set(hf_layout(state, loaded)) == set(disk) | set(reference)
    nan_scales = {k: v.clone().fill_(255) if k.endswith("down_proj_scales") else v for k, v in packed.items()}
    save_file({**disk, **nan_scales}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"down_proj_blocks: expert 0: scales give non-finite values \(largest scale byte 255\)"):
        load_pretrained(str(tmp_path))
    save_file({**disk, **{k: v for k, v in packed.items() if not k.endswith("down_proj_scales")}},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp.experts.down_proj_blocks: no _scales tensor for it"):
        load_pretrained(str(tmp_path))


def test_block_fp8_checkpoints_are_dequantized_on_load(tmp_path):
    """DeepSeek-V3's (and Qwen3-FP8's, GLM-4.5-FP8's) block-wise FP8: float8_e4m3fn weights with
    one fp32 weight_scale_inv per block, the last tiles cut at the edge (the tiny DeepSeek's
    40-row kv_a_proj_with_mqa in 16-row blocks: 3 row tiles); loaded as bf16 weight x scale,
    tile by tile, equal to transformers' own FP8 dequantization where its tiles divide the
    matrix; static-activation input scales dropped; a missing scale is a config error."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    cfg = tiny(type="deepseek_v3")
    _, meta = saved(cfg, tmp_path)
    disk = load_file(str(tmp_path / "model.safetensors"))
    quantized, expected = {}, {}
    for name, w in disk.items():
        if w.dim() != 2 or name.endswith(("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight")):
            continue
        rows, cols = w.shape
        grid = (-(-rows // 16), -(-cols // 16))
        scale = torch.empty(grid)
        q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
        want = torch.empty(rows, cols)
        for i in range(grid[0]):
            for j in range(grid[1]):
                tile = w[16 * i:16 * i + 16, 16 * j:16 * j + 16]
                scale[i, j] = tile.abs().max() / 448
                q[16 * i:16 * i + 16, 16 * j:16 * j + 16] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
                want[16 * i:16 * i + 16, 16 * j:16 * j + 16] = q[16 * i:16 * i + 16, 16 * j:16 * j + 16].float() * scale[i, j]
        quantized |= {name: q, name.removesuffix("weight") + "weight_scale_inv": scale,
                      name.removesuffix("weight") + "input_scale": torch.ones(())}
        expected[name] = want.to(torch.bfloat16)
        if rows % 16 == 0 and cols % 16 == 0:
            torch.testing.assert_close(expected[name], Fp8Dequantize(None)._dequantize_one(q, scale, torch.bfloat16),
                                       atol=0, rtol=0)
    assert disk["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].shape[0] == 40
    save_file({**disk, **quantized}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**meta, "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "static", "weight_block_size": [16, 16]}}))
    state, loaded = load_pretrained(str(tmp_path))
    assert set(state) == set(disk) and len(expected) > 10
    for name, want in expected.items():
        torch.testing.assert_close(state[name], want, atol=0, rtol=0)
    torch.testing.assert_close(state["model.embed_tokens.weight"], disk["model.embed_tokens.weight"], atol=0, rtol=0)
    again = Qwen3MoeForCausalLM(loaded)
    again.load_canonical_state_dict(state)  # the names are the policy's: it runs on them
    assert torch.isfinite(again(torch.randint(0, 100, (1, 9))).logits).all()
    bad = dict(quantized)
    bad["model.layers.2.mlp.experts.1.up_proj.weight_scale_inv"] = torch.full((2, 4), float("nan"))
    save_file({**disk, **bad}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"model.layers.2.mlp.experts.1.up_proj.weight: weight_scale_inv has non-finite"):
        load_pretrained(str(tmp_path))
    del quantized["model.layers.2.mlp.experts.1.up_proj.weight_scale_inv"]
    save_file({**disk, **quantized}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"model.layers.2.mlp.experts.1.up_proj.weight: no .weight_scale_inv tensor"):
        load_pretrained(str(tmp_path))


def hf_config_of(model: Qwen3MoeForCausalLM, cfg: ModelConfig, folder) -> dict:
    """The config.json ``model`` saves as (the trainer's final/)."""
    save_pretrained(model.canonical_state_dict(), cfg, str(folder))
    return json.loads((folder / "config.json").read_text())


def test_model_fields_of_another_architecture_are_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"model.shared_experts=1: only model.type=glm4_moe or deepseek_v3 has it \(qwen3_moe needs 0\)"):
        tiny(shared_experts=1).validate()
    with pytest.raises(ConfigError, match=r"model.top_k=0: must be >= 1"):
        tiny(top_k=0).validate()
    with pytest.raises(ConfigError, match=r"model.n_group=3: must divide model.num_experts=8"):
        tiny(type="glm4_moe", n_group=3).validate()
    with pytest.raises(ConfigError, match=r"model.top_k=8: must be <= the experts in model.topk_group=1 groups"):
        tiny(type="glm4_moe", top_k=8).validate()
    with pytest.raises(ConfigError, match=r"model.first_dense_layers=3: must be in \[0, model.n_layers=3\)"):
        tiny(type="glm4_moe", first_dense_layers=3).validate()
    with pytest.raises(ConfigError, match=r"model.partial_rotary=0.3: must be in \(0, 1\] and leave an even"):
        tiny(type="glm4_moe", partial_rotary=0.3).validate()
    with pytest.raises(ConfigError, match=r"model.kv_lora_rank=8: only model.type=deepseek_v3 has it \(glm4_moe needs 0\)"):
        tiny(type="glm4_moe", kv_lora_rank=8).validate()
    with pytest.raises(ConfigError, match=r"model.rope_mscale=1.0: only model.type=deepseek_v3 has it"):
        tiny(rope_type="yarn", rope_factor=4.0, rope_original_max_len=16, rope_mscale=1.0).validate()
    with pytest.raises(ConfigError, match=r"model.n_kv_heads=2: must be model.n_heads=4: latent attention"):
        tiny(type="deepseek_v3", n_kv_heads=2).validate()
    with pytest.raises(ConfigError, match=r"model.v_head_dim=0: must be > 0 \(deepseek_v3\)"):
        tiny(type="deepseek_v3", v_head_dim=0).validate()
    with pytest.raises(ConfigError, match=r"model.rope_factor=4.0: applies with model.rope_type=yarn only"):
        tiny(rope_factor=4.0).validate()
    with pytest.raises(ConfigError, match=r"model.rope_original_max_len=0: must be > 0 with model.rope_type=yarn"):
        tiny(rope_type="yarn", rope_factor=4.0).validate()
    with pytest.raises(ConfigError, match=r"model.rope_type='linear': supported: default, yarn"):
        tiny(rope_type="linear").validate()
    with pytest.raises(ConfigError, match=r"model.sliding_window=5: only model.type=gpt_oss has it \(qwen3_moe needs 0\)"):
        tiny(sliding_window=5).validate()
    with pytest.raises(ConfigError, match=r"model.sliding_window=0: must be > 0 \(gpt_oss\)"):
        tiny(type="gpt_oss", sliding_window=0).validate()
    with pytest.raises(ConfigError, match=r"model.rope_type='default': gpt_oss needs yarn"):
        tiny(type="gpt_oss", rope_type="default", rope_factor=1.0, rope_original_max_len=0, rope_truncate=True).validate()
    with pytest.raises(ConfigError, match=r"model.rms_norm_eps=1e-06: gpt_oss needs 1e-05"):
        tiny(type="gpt_oss", rms_norm_eps=1e-6).validate()
    with pytest.raises(ConfigError, match=r"model.rope_truncate=False: applies with model.rope_type=yarn only"):
        tiny(rope_truncate=False).validate()
    with pytest.raises(ConfigError, match=r"model.n_group=2: only model.type=glm4_moe or deepseek_v3 has it \(minimax_m2 needs 1\)"):
        tiny(type="minimax_m2", n_group=2).validate()
    with pytest.raises(ConfigError, match=r"model.partial_rotary=0.3: must be in \(0, 1\] and leave an even"):
        tiny(type="minimax_m2", partial_rotary=0.3).validate()
    with pytest.raises(ConfigError, match=r"model.partial_rotary=0.5: only model.type=glm4_moe or minimax_m2 has it"):
        tiny(partial_rotary=0.5).validate()
    # a checkpoint's RoPE scaling (transformers 5 writes it in rope_parameters): YaRN is read,
    # any other kind is refused, naming it
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}}))
    yarn = model_config_from_hf(str(tmp_path))
    assert (yarn.rope_type, yarn.rope_factor, yarn.rope_original_max_len, yarn.rope_theta) == ("yarn", 4.0, 32768, 1e6)
    for rope, error in [({"rope_type": "linear", "factor": 2.0}, r"rope_parameters=.*linear.* is not supported"),
                        ({"rope_type": "yarn", "factor": 4.0}, "rope_parameters has no original_max_position_embeddings"),
                        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                          "attention_factor": 1.2}, "attention_factor is not supported"),
                        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "truncate": "no"},
                         r"rope_parameters.truncate='no' is not true or false"),
                        ({"rope_type": "yarn", "factor": "4", "original_max_position_embeddings": 8},
                         r"rope_parameters.factor='4' is not a number")]:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "rope_parameters": rope}))
        with pytest.raises(ConfigError, match=error):
            model_config_from_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "rope_parameters": {
        "rope_type": "default", "rope_theta": 1e6}}))
    assert model_config_from_hf(str(tmp_path)).rope_theta == 1e6  # not the default 10,000
    glm = tiny(type="glm4_moe")  # a glm base's fields do not leak into a qwen3 checkpoint's config
    assert model_config_from_hf(str(tmp_path), glm).shared_experts == 0


VARIANTS = {"qwen3_moe": {}, "mixtral": {}, "glm4_moe": {},
            # Qwen3-30B-A3B routes each token to 8 of 128 experts: top-k > 2 at toy size
            "qwen3_moe_top4": dict(num_experts=8, top_k=4, d_ff=32),
            "deepseek_v3": {},
            # DeepSeek-V2-Lite's and Moonlight's full q_proj (no query bottleneck), with YaRN
            "deepseek_v3_yarn": dict(q_lora_rank=0, **YARN),
            "qwen3_moe_yarn": dict(rope_type="yarn", rope_factor=4.0, rope_original_max_len=16),
            "gpt_oss": {}, "minimax_m2": {}}


def variant(name: str) -> ModelConfig:
    cfg = tiny(type=name.removesuffix("_top4").removesuffix("_yarn"), **VARIANTS[name])
    cfg.validate()
    return cfg


@pytest.mark.parametrize("name", list(VARIANTS))
def test_same_function_as_transformers(tmp_path, name):
    """transformers loads our checkpoint as is (its own Qwen3-MoE, Mixtral, GLM-4.5 MoE,
    DeepSeek-V3 or GPT-OSS class) and computes the same logits (fp32); for GLM and DeepSeek with grouped
    sigmoid routing and a random correction bias, so a wrong group choice, bias or scaling shows;
    Qwen3 also with top-4; DeepSeek's latent attention with and without the query bottleneck;
    YaRN on 40 positions, past the original 16, where it changes the function; GPT-OSS with
    random sinks and biases, its window of 5 on 40 positions, YaRN untruncated."""
    transformers = pytest.importorskip("transformers")
    cfg = variant(name)
    model_type = cfg.type
    torch.manual_seed(1)
    model = Qwen3MoeForCausalLM(cfg).eval()
    randomise_glm_extras(model)
    save_pretrained(model.canonical_state_dict(), cfg, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(hf).__name__ == {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                                 "glm4_moe": "Glm4MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                                 "gpt_oss": "GptOssForCausalLM", "minimax_m2": "MiniMaxM2ForCausalLM"}[model_type]
    ids = torch.randint(0, 100, (3, 40))
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
        # the same weights without YaRN, without GPT-OSS's window or with its sinks out of
        # reach are other functions: the test sees each of them
        others = [{"rope_type": "default", "rope_factor": 1.0, "rope_original_max_len": 0, "rope_mscale": 0.0,
                   "rope_mscale_all_dim": 0.0}] if cfg.rope_type == "yarn" else []
        if cfg.oai_blocks:
            others += [{"sliding_window": 64}, {"rope_truncate": True}, {"sinks": -1e4}]
        for change in others:
            other = Qwen3MoeForCausalLM(tiny(**{**vars(cfg), **{k: v for k, v in change.items() if k != "sinks"}})).eval()
            state = model.canonical_state_dict()
            if "sinks" in change:
                state = {k: v.fill_(change["sinks"]) if k.endswith(".sinks") else v for k, v in state.items()}
            other.load_canonical_state_dict(state)
            assert (other(ids).logits - logits).abs().max() > 1e-4, change


def test_gpt_oss_window_and_sinks_in_a_packed_row_see_each_sequence_alone():
    """The trainer's packed rows (segment ids, positions restarting per sequence): GPT-OSS's
    sliding window counts only the sequence's own earlier tokens and its sinks stay per query,
    so every position gets the logits of the sequence run alone; padding (-1) stays finite."""
    torch.manual_seed(4)
    model = Qwen3MoeForCausalLM(tiny(type="gpt_oss")).eval()
    randomise_glm_extras(model)
    lengths = [12, 9, 7]
    seqs = [torch.randint(0, 100, (n,)) for n in lengths]
    ids = torch.cat([*seqs, torch.zeros(3, dtype=torch.long)])[None]
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((3,), -1)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(3, dtype=torch.long)])[None]
    with torch.no_grad():
        packed = model(ids, positions=positions, segments=segments).logits[0]
        alone = torch.cat([model(seq[None]).logits[0] for seq in seqs])
    torch.testing.assert_close(packed[:sum(lengths)], alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(packed).all()


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


@pytest.mark.parametrize("name", list(VARIANTS))
def test_trainer_block_has_the_engines_names_and_function(name):
    """The DeepSpeed-wrapped policy publishes exactly the routing model's (HF) names, and with
    the same weights both compute the same logits."""
    from rlpost.trainer.ds_engine import DistEnv, init_distributed
    from rlpost.trainer.policy import build_policy
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init_distributed(DistEnv(0, 1, "127.0.0.1", port))
    cfg = variant(name)
    torch.manual_seed(2)
    trainer_model = build_policy(cfg).eval()
    randomise_glm_extras(trainer_model)
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
    # a value of the wrong JSON type is a one-line error naming it, never silently converted
    # (bool("false") is True: a GLM checkpoint would lose its q/k/v biases' meaning)
    for key, value, kind in [("num_hidden_layers", "two", "an integer"), ("hidden_size", [64], "an integer"),
                             ("tie_word_embeddings", "false", "true or false"), ("rope_theta", "1e6", "a number")]:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", key: value}))
        with pytest.raises(ConfigError, match=re.escape(f"config.json {key}={value!r} is not {kind}")):
            model_config_from_hf(str(tmp_path))
    glm = {"model_type": "glm4_moe", "attention_bias": "false", "num_hidden_layers": 2}
    (tmp_path / "config.json").write_text(json.dumps(glm))
    with pytest.raises(ConfigError, match=r"config.json attention_bias='false' is not true or false"):
        model_config_from_hf(str(tmp_path))


def test_model_path_sizes_are_checked_against_the_rest_of_the_config(tmp_path):
    """A checkpoint shorter than the configured completion budget is refused at start-up, naming
    the field, not at the first generation."""
    from rlpost.cli_config import load_config
    from rlpost.run import Run

    cfg = tiny(max_seq_len=16)
    save_pretrained(Qwen3MoeForCausalLM(cfg).canonical_state_dict(), cfg, str(tmp_path))
    with pytest.raises(ConfigError, match=r"rollout.max_new_tokens=20: must be < model.max_seq_len=16"):
        load_config([f"model.path={tmp_path}", "rollout.max_new_tokens=20"])
    # and the other way: a longer checkpoint takes a budget the default model.max_seq_len (64) would not
    cfg = tiny(max_seq_len=256)
    save_pretrained(Qwen3MoeForCausalLM(cfg).canonical_state_dict(), cfg, str(tmp_path))
    run_cfg = load_config([f"model.path={tmp_path}", "rollout.max_new_tokens=100"])
    assert run_cfg.model.max_seq_len == 256 and Run(run_cfg).cfg.model.max_seq_len == 256


def _init_single_rank():
    import socket

    from rlpost.trainer.ds_engine import DistEnv, init_distributed

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init_distributed(DistEnv(0, 1, "127.0.0.1", port))


@pytest.mark.parametrize("top_k", [1, 2, 3])  # 3: rlpost's router into DeepSpeed's dispatch
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
    if top_k >= 2:
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


def test_glm_routing_replay_and_gradients_through_deepspeeds_dispatch():
    """glm4_moe in the trainer: DeepSpeed's MoE layer dispatches the routing computed by
    rlpost's router (top-4, groups, correction bias, scaling), replays the engine's experts for
    the layers that have them (the dense first layer has none: routing is (B, T, moe_layers, k)),
    and the router, experts, shared expert and biases all get gradients; the correction bias
    is a buffer (never trained)."""
    from rlpost.trainer.policy import build_policy

    _init_single_rank()
    cfg = tiny(type="glm4_moe")
    torch.manual_seed(5)
    trainer_model = build_policy(cfg).train()
    randomise_glm_extras(trainer_model)
    engine_model = Qwen3MoeForCausalLM(cfg).eval()
    engine_model.load_canonical_state_dict(trainer_model.canonical_state_dict())
    ids = torch.randint(0, 100, (2, 9))
    natural = trainer_model(ids)
    own = natural.routed_experts
    assert own.shape == (2, 9, cfg.moe_layers, 4) and natural.expert_counts.shape == (cfg.moe_layers, 8)
    assert natural.expert_counts.sum(-1).tolist() == [2 * 9 * 4] * cfg.moe_layers and natural.aux_loss > 0
    with torch.no_grad():
        torch.testing.assert_close(trainer_model(ids, replay_experts=own).logits, natural.logits, atol=1e-6, rtol=0)
        other = torch.stack([(own[..., 0] + 1 + j) % 8 for j in range(4)], dim=-1)  # 4 distinct, not the first choice
        replayed = trainer_model(ids, replay_experts=other)
        torch.testing.assert_close(replayed.logits, engine_model(ids, replay_experts=other).logits, atol=2e-5, rtol=0)
    assert (replayed.logits - natural.logits).abs().max() > 1e-3
    assert replayed.expert_counts[0].tolist() == torch.bincount(other[:, :, 0].reshape(-1), minlength=8).tolist()
    (natural.logits.logsumexp(-1).sum() + natural.aux_loss).backward()
    grads = {n: p.grad for n, p in trainer_model.named_parameters()}
    for suffix in ("1.mlp.moe.deepspeed_moe.gate.wg.weight", "1.mlp.shared_experts.up_proj.weight",
                   "0.mlp.gate_proj.weight", "0.self_attn.q_proj.bias"):
        name = next(n for n in grads if n.endswith(suffix))
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert not any("e_score_correction_bias" in n for n in grads)
    assert any(n.endswith("gate.e_score_correction_bias") for n, _ in trainer_model.named_buffers())


def test_glm_correction_bias_stays_fp32_in_bf16_trainer_and_engine():
    """A bf16 engine (``.to(bfloat16)``) or trainer (DeepSpeed's ``.bfloat16()``) keeps the
    router's correction bias in fp32 with its exact values, as vLLM and transformers hold it:
    in bf16 it would lose the digits that decide near-ties between experts."""
    from rlpost.trainer.policy import build_policy

    _init_single_rank()
    cfg = tiny(type="glm4_moe")
    for model in (Qwen3MoeForCausalLM(cfg), build_policy(cfg)):
        randomise_glm_extras(model)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.add_(1e-3 * torch.arange(8))  # digits bf16 cannot hold
        before = {k: v.clone() for k, v in model.canonical_state_dict().items() if k.endswith("correction_bias")}
        model.to(torch.bfloat16)
        after = {k: v for k, v in model.canonical_state_dict().items() if k.endswith("correction_bias")}
        assert len(after) == cfg.moe_layers and all(v.dtype == torch.float32 for v in after.values())
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16
        model(torch.randint(0, 100, (1, 5)))  # still runs in bf16
