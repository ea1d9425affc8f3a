"""The policy model: Qwen3-MoE (Hugging Face's ``qwen3_moe`` architecture), written once, with
Mixtral (``mixtral``), GLM-4.5 MoE (``glm4_moe``), DeepSeek-V3 (``deepseek_v3``), GPT-OSS
(``gpt_oss``) and MiniMax-M2 (``minimax_m2``) as its variants.

The DeepSpeed trainer and the native inference engine build the same :class:`Qwen3MoeForCausalLM`
and differ only in the sparse MoE block they plug in: the trainer wraps the experts in
DeepSpeed's MoE layer (expert parallelism, load-balancing loss), the engine routes tokens itself
and reports which experts each token used. Parameter names are Hugging Face's
(``model.layers.0.mlp.experts.3.gate_proj.weight``), ``config.json`` is a ``qwen3_moe`` config and
the weights are safetensors, so a checkpoint or a published state dict loads unchanged into the
trainer, the native engine, vLLM, SGLang or ``transformers``.

The math follows the reference implementation: RMSNorm (fp32), grouped-query attention with
per-head RMSNorm on queries and keys before rotary embeddings (neox layout), SwiGLU experts,
softmax top-k routing over fp32 logits with the top-k weights renormalised for k > 1
(``norm_topk_prob``), no shared expert, untied head. ``model.type=mixtral`` drops the q/k norms
and names the sparse block ``block_sparse_moe`` with experts' ``w1``/``w3``/``w2`` (gate, up,
down), as Mixtral checkpoints, vLLM's and SGLang's Mixtral loaders and ``transformers`` expect; the
routing (softmax, top-k, renormalised) is the same.

``model.type=glm4_moe`` is GLM-4.5's (and GLM-4.5-Air's) architecture, whose router is
DeepSeek-V3's: sigmoid scores per expert, a score-correction bias (``e_score_correction_bias``,
a buffer: aux-loss-free load balancing) added only to *choose* the experts, optionally within
the ``topk_group`` best of ``n_group`` expert groups (a group scores by its two best experts),
the chosen experts weighted by their uncorrected scores, renormalised (``norm_topk_prob``) and
multiplied by ``routed_scaling_factor``; a shared expert every token goes through; the first
``first_k_dense_replace`` layers with a dense SwiGLU MLP instead of experts; q/k/v projections
with biases, optional q/k norms and rotary embeddings on the first ``partial_rotary_factor`` of
each head's dimensions. The correction bias is kept as loaded during RL (it is published with
the weights, so every engine routes with the trainer's); the multi-token-prediction layers a
GLM checkpoint carries are not part of the policy and are dropped when it is loaded.

``model.type=deepseek_v3`` (DeepSeek-V3/R1, Moonlight) has GLM's router, experts and
dense first layers, and multi-head latent attention (:class:`DeepseekV3Attention`) in place of
grouped-query attention. ``model.type=gpt_oss`` (gpt-oss-20b/120b) has attention sinks and
biases on q/k/v/o, a sliding window on even layers (:func:`attend_with_sinks`), a router with a
bias and experts with biases and the clamped SwiGLU; its checkpoints fuse each layer's experts
(:func:`hf_layout`), while rlpost's modules, published weights and the trainer keep one per
expert. ``model.type=minimax_m2`` (MiniMax-M2, M2.1, M2.5) routes as GLM does with one group,
no scaling, no shared expert and no dense layers, names its sparse block as Mixtral does
(``block_sparse_moe``, ``w1``/``w3``/``w2``, the correction bias
``block_sparse_moe.e_score_correction_bias``), normalises each token's whole query and key
projections (one RMSNorm over all heads' elements, ``qk_norm_type: per_layer``) and rotates
the first ``rotary_dim`` of each head's dimensions; its multi-token-prediction modules are
dropped on load. Any type may extend its context with YaRN (``rope_type=yarn``), as a checkpoint's
``rope_scaling`` / ``rope_parameters`` says; other RoPE scalings are refused.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from rlpost.config import TYPE_FIELDS, ConfigError, ModelConfig
from rlpost.quantized import dequantized, quantization

HF_MODEL_TYPE = "qwen3_moe"
# model.type -> the Hugging Face architecture written to and read from config.json
HF_ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                    "glm4_moe": "Glm4MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                    "gpt_oss": "GptOssForCausalLM", "minimax_m2": "MiniMaxM2ForCausalLM"}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context ``factor`` (1 when not extended)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (rotary_dim / 2,) fp32, factor on cos/sin) of ``cfg``'s rotary
    embedding, as transformers' ``ROPE_INIT_FUNCTIONS`` (and vLLM's rotary layers) compute them:
    plain RoPE, or YaRN (``rope_type=yarn``): frequencies that turn fewer than ``beta_slow``
    times over the original context are interpolated by ``factor``, those that turn more than
    ``beta_fast`` times kept, a linear ramp between; cos/sin scaled by the attention factor
    (``mscale``/``mscale_all_dim`` as DeepSeek-V3 sets them, else YaRN's 0.1 ln(factor) + 1)."""
    d = cfg.rotary_dim
    base = cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    if cfg.rope_type != "yarn":
        return 1.0 / base, 1.0
    factor = cfg.rope_factor

    def correction_dim(rotations: float) -> float:
        return d * math.log(cfg.rope_original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:  # whole dimensions (GPT-OSS keeps the fractional ends: truncate=false)
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low if high > low else 0.001)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * base)) * (1 - extrapolate) + (1.0 / base) * extrapolate
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        scale = yarn_mscale(factor, cfg.rope_mscale) / yarn_mscale(factor, cfg.rope_mscale_all_dim)
    else:
        scale = yarn_mscale(factor)
    return inv_freq, scale


def rotary(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0,
           interleaved: bool = False) -> torch.Tensor:
    """Rotary embedding of ``x`` (B, heads, T, D) at ``positions`` (B, T), neox layout (the
    two halves of the rotated dimensions rotate together, as in HF's ``rotate_half``). Only the
    first ``2 * len(inv_freq)`` dimensions rotate (GLM's partial rotary); the rest pass unchanged.
    ``interleaved``: the rotated dimensions come in pairs (x0, x1), (x2, x3), ... (DeepSeek's
    layout); they are returned de-interleaved (evens, then odds), as transformers does: queries
    and keys get the same permutation, so their dot products are those of the pairs."""
    d = 2 * inv_freq.shape[0]
    freqs = positions.float()[:, None, :, None] * inv_freq  # (B, 1, T, d/2)
    cos, sin = freqs.cos() * scale, freqs.sin() * scale
    part = x[..., :d].float()
    x1, x2 = (part[..., 0::2], part[..., 1::2]) if interleaved else part.chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return rotated if d == x.shape[-1] else torch.cat([rotated, x[..., d:]], dim=-1)


class Rope:
    """A config's rotary embedding: frequencies computed once, in fp32, held outside the module's
    buffers (a bf16 cast of the model must not round them) and moved to the input's device on
    first use there."""

    def __init__(self, cfg: ModelConfig, interleaved: bool = False):
        self.inv_freq, self.scale = rope_frequencies(cfg)
        self.interleaved = interleaved

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        return rotary(x, positions, self.inv_freq, self.scale, self.interleaved)


@dataclass
class KVCache:
    """Per-layer key/value tensors of shape (batch, kv_heads, capacity, head_dim); keys are stored
    after the rotary embedding. Latent attention stores each head's expanded keys (no-rope and
    rope dims) and values (``v_head_dim``), not the latent: decode then costs no expansion of
    the whole prefix per token, which on the small models this engine serves is the cheaper
    trade (vLLM and SGLang cache the latent)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, capacity: int, dtype, device) -> "KVCache":
        key_dim, value_dim = cfg.head_dim, cfg.head_dim
        if cfg.latent_attention:
            key_dim, value_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        return cls([torch.zeros(batch, cfg.n_kv_heads, capacity, key_dim, dtype=dtype, device=device)
                    for _ in range(cfg.n_layers)],
                   [torch.zeros(batch, cfg.n_kv_heads, capacity, value_dim, dtype=dtype, device=device)
                    for _ in range(cfg.n_layers)])

    def select(self, rows: torch.Tensor) -> "KVCache":
        """The cache restricted to batch ``rows`` (finished sequences leave the batch)."""
        return KVCache([k.index_select(0, rows) for k in self.keys],
                       [v.index_select(0, rows) for v in self.values], self.length)


class Qwen3MoeAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rope = Rope(cfg)
        bias = cfg.attention_bias or cfg.oai_blocks  # GLM: q/k/v biases (never o); GPT-OSS: q/k/v/o
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.oai_blocks)
        self.window = cfg.layer_window(index)
        if cfg.oai_blocks:  # GPT-OSS: one learned logit per head that every query's softmax includes
            self.sinks = nn.Parameter(torch.zeros(cfg.n_heads))
        # Qwen3 normalises each head's queries and keys before the rotary embedding; Mixtral does
        # not; GLM-4.5 does when its config says so (use_qk_norm); MiniMax-M2 normalises each
        # token's whole query and key projections (all heads at once) before splitting heads
        self.qk_norm = cfg.type == "qwen3_moe" or (cfg.type == "glm4_moe" and cfg.qk_norm)
        self.projection_qk_norm = cfg.projection_qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        elif self.projection_qk_norm:
            self.q_norm = RMSNorm(cfg.n_heads * cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.n_kv_heads * cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """``attn_mask`` is a boolean (batch, 1, q, k) mask, or None for plain causal attention.
        With a cache, the new keys/values are written at ``cache.length`` and attention covers the
        whole cache prefix."""
        b, t, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.projection_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(b, t, self.n_heads, self.head_dim), k.view(b, t, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, positions), self.rope(k, positions)
        return self.o_proj(attend(q, k, v, attn_mask, cache, layer, self.n_heads != self.n_kv,
                                  window=self.window, sinks=getattr(self, "sinks", None)))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
           cache: KVCache | None, layer: int, gqa: bool = False, scale: float | None = None,
           window: int = 0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention of ``q`` over ``k``/``v`` (B, heads, T, dims), through the
    cache when there is one; the heads' outputs concatenated (B, T, heads * v dims).
    ``window`` > 0 and ``sinks`` (heads,) are GPT-OSS's: see :func:`attend_with_sinks`."""
    b, _, t, _ = q.shape
    if cache is not None:
        start = cache.length
        cache.keys[layer][:, :, start:start + t] = k
        cache.values[layer][:, :, start:start + t] = v
        k = cache.keys[layer][:, :, :start + t]
        v = cache.values[layer][:, :, :start + t]
    if window or sinks is not None:
        out = attend_with_sinks(q, k, v, attn_mask, window, sinks, scale)
    elif attn_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa, scale=scale)
    return out.transpose(1, 2).reshape(b, t, -1)


def attend_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                      window: int, sinks: torch.Tensor | None, scale: float | None = None) -> torch.Tensor:
    """GPT-OSS's attention (B, heads, T, dims) -> (B, heads, T, dims), written out (SDPA has no
    sinks): each head's softmax also covers a learned logit ``sinks[h]`` whose value is dropped,
    so a query may attend to nothing (its weights then sum to less than one; a fully masked row,
    padding, gives zeros instead of NaN). ``window`` > 0 keeps each query's latest ``window``
    allowed keys (itself included): a token at position p sees positions p - window + 1 .. p,
    as transformers' and vLLM's sliding window. Counting allowed keys instead of comparing
    positions works for every mask the callers build (causal, a packed batch's segments, the
    engine's left-padded lock-step cache): each admits exactly a sequence's earlier tokens."""
    t, s = q.shape[-2], k.shape[-2]
    if attn_mask is None:
        attn_mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)[None, None]
    if window:
        later = attn_mask.flip(-1).cumsum(-1).flip(-1)  # allowed keys at or after each column
        attn_mask = attn_mask & (later <= window)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each key/value head serves a group
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    scores = (q.float() @ k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = scores.masked_fill(~attn_mask, float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return probs.to(v.dtype) @ v


class DeepseekV3Attention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3, HF ``DeepseekV3Attention``): keys and values
    of every head are expanded (``kv_b_proj``) from one normalised latent of ``kv_lora_rank``
    dims; each head's key is its own no-rope part plus one rotary part shared by all heads
    (``qk_rope_head_dim``, rotated in DeepSeek's interleaved layout); queries come from a full
    ``q_proj`` or through a rank-``q_lora_rank`` bottleneck; values have their own width. Softmax
    scale 1/sqrt(qk dims), times YaRN's ``mscale_all_dim`` temperature squared when extended."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.nope, self.rope_dim, self.v_dim = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk_dim = self.nope + self.rope_dim
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, cfg.n_heads * qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.d_model, cfg.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.v_dim, cfg.d_model, bias=False)
        self.rope = Rope(cfg, interleaved=True)
        self.scale = qk_dim ** -0.5
        if cfg.rope_type == "yarn" and cfg.rope_mscale_all_dim:
            self.scale *= yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) ** 2

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if hasattr(self, "q_a_proj") else self.q_proj(x)
        q_pass, q_rot = q.view(b, t, self.n_heads, -1).transpose(1, 2).split([self.nope, self.rope_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(b, t, self.n_heads, -1).transpose(1, 2)
        k_pass, v = kv.split([self.nope, self.v_dim], dim=-1)
        q_rot, k_rot = self.rope(q_rot, positions), self.rope(k_rot.view(b, 1, t, self.rope_dim), positions)
        q = torch.cat([q_pass, q_rot], dim=-1)
        k = torch.cat([k_pass, k_rot.expand(-1, self.n_heads, -1, -1)], dim=-1)
        return self.o_proj(attend(q, k, v, attn_mask, cache, layer, scale=self.scale))


SWIGLU_LIMIT, SWIGLU_ALPHA = 7.0, 1.702  # GPT-OSS's (config.json swiglu_limit; vLLM fixes both)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GPT-OSS's expert activation (HF ``GptOssExperts._apply_gate``): the gate clamped above at
    7, the up projection to [-7, 7], ``(up + 1) * gate * sigmoid(1.702 * gate)``."""
    gate = gate.clamp(max=SWIGLU_LIMIT)
    return (up.clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT) + 1) * gate * torch.sigmoid(gate * SWIGLU_ALPHA)


def expert_activation(gate: torch.Tensor, up: torch.Tensor, oai: bool) -> torch.Tensor:
    return clamped_swiglu(gate, up) if oai else F.silu(gate) * up


class SwiGLUExpert(nn.Module):
    """One expert: ``down(silu(gate(x)) * up(x))``, no biases (HF ``Qwen3MoeMLP``); ``oai``:
    GPT-OSS's, with biases and :func:`clamped_swiglu`."""

    def __init__(self, d_model: int, d_ff: int, oai: bool = False):
        super().__init__()
        self.oai = oai
        self.gate_proj = nn.Linear(d_model, d_ff, bias=oai)
        self.up_proj = nn.Linear(d_model, d_ff, bias=oai)
        self.down_proj = nn.Linear(d_ff, d_model, bias=oai)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(expert_activation(self.gate_proj(x), self.up_proj(x), self.oai))


class MoEResult(NamedTuple):
    out: torch.Tensor
    aux_loss: torch.Tensor | None        # load-balancing loss (training blocks)
    expert_counts: torch.Tensor | None   # (num_experts,) tokens per expert (training blocks)
    # (..., top_k) the router's own experts for each token (routing blocks), also under replay:
    # what the trainer's router would pick, for the routing-mismatch metric
    experts: torch.Tensor | None


def route(probs: torch.Tensor, k: int, replay: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing from router probabilities (N, E): k=1 weighs by the top probability, k > 1
    renormalises the k (``norm_topk_prob``), as DeepSpeed's TopKGate with drop_tokens=False, no
    noise and no second-expert sampling, and Qwen3-MoE's and Mixtral's routers.
    Returns (experts used (N, k), their weights (N, k), the router's own top-k (N, k)).

    ``replay`` (N, k) routes each token through the given experts instead (rollout routing
    replay, R3): the weights are still this router's probabilities of those experts, so the
    gate keeps its gradient; rows that are not k distinct experts in [0, num_experts) (-1: the
    engine did not report them) keep the router's own choice."""
    weights, own = torch.topk(probs, k, dim=-1)
    experts = own
    if replay is not None:
        use = replayable(replay, probs.shape[-1])
        if bool(use.any()):
            experts = torch.where(use[:, None], replay.to(own.device, torch.long).clamp(0, probs.shape[-1] - 1), own)
            weights = probs.gather(-1, experts)
    if k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).eps)
    return experts, weights, own


def route_tokens(hidden: torch.Tensor, gate_weight: torch.Tensor, cfg: ModelConfig,
                 correction_bias: torch.Tensor | None = None, replay: torch.Tensor | None = None,
                 gate_bias: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router of ``cfg.type`` on ``hidden`` (N, D): (experts used (N, k), their weights
    (N, k, fp32), the router's own top-k (N, k), per-expert probabilities (N, E) for the
    load-balancing loss). Softmax models: softmax over fp32 logits, then :func:`route`. glm4_moe (DeepSeek-V3's router, as
    transformers' ``Glm4MoeTopkRouter`` and vLLM's grouped top-k): sigmoid scores; the
    correction bias added to choose; with groups, only the ``topk_group`` groups whose two best
    corrected scores sum highest; weights are the uncorrected scores of the chosen experts,
    renormalised (``norm_topk_prob``) and scaled by ``routed_scaling``. ``replay`` as in
    :func:`route` (the weights are still this router's scores of the replayed experts).
    ``gate_bias``: GPT-OSS's router bias on the logits (its softmax over the top-k logits is
    this renormalised softmax)."""
    logits = F.linear(hidden.float(), gate_weight.float(), None if gate_bias is None else gate_bias.float())
    if not cfg.sigmoid_router:
        probs = torch.softmax(logits, dim=-1)
        return (*route(probs, cfg.top_k, replay), probs)
    scores = logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if cfg.n_group > 1:
        grouped = choice.view(-1, cfg.n_group, cfg.num_experts // cfg.n_group)
        best = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, groups)
        keep = torch.zeros_like(best, dtype=torch.bool).scatter_(1, best.topk(cfg.topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(cfg.num_experts // cfg.n_group, dim=1), float("-inf"))
    own = choice.topk(cfg.top_k, dim=-1).indices
    experts = own
    if replay is not None:
        use = replayable(replay, cfg.num_experts)
        if bool(use.any()):
            experts = torch.where(use[:, None], replay.to(own.device, torch.long).clamp(0, cfg.num_experts - 1), own)
    weights = scores.gather(-1, experts)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return experts, weights * cfg.routed_scaling, own, scores / scores.sum(dim=-1, keepdim=True)


def replayable(replay: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(N,) rows of ``replay`` (N, k) that name k distinct experts in [0, num_experts): only
    those are replayed (a row the engine did not fill is -1; anything else is not a routing)."""
    ok = ((replay >= 0) & (replay < num_experts)).all(dim=-1)
    if replay.shape[-1] > 1:
        ordered = replay.sort(dim=-1).values
        ok &= (ordered[:, 1:] != ordered[:, :-1]).all(dim=-1)
    return ok


class DenseMlp(SwiGLUExpert):
    """A dense layer's MLP (GLM's first ``first_k_dense_replace`` layers): ``mlp.gate_proj`` etc.,
    no router, nothing to report."""

    def forward(self, x: torch.Tensor, replay: torch.Tensor | None = None) -> MoEResult:  # type: ignore[override]
        return MoEResult(super().forward(x), None, None, None)


def shared_expert(cfg: ModelConfig) -> SwiGLUExpert | None:
    """GLM's shared expert (``mlp.shared_experts``, width ``d_ff * shared_experts``), or None."""
    return SwiGLUExpert(cfg.d_model, cfg.d_ff * cfg.shared_experts) if cfg.shared_experts else None


def correction_bias(cfg: ModelConfig) -> torch.Tensor | None:
    """GLM's router score-correction bias (``mlp.gate.e_score_correction_bias``, fp32), or None."""
    return torch.zeros(cfg.num_experts, dtype=torch.float32) if cfg.sigmoid_router else None


def apply_keeping_fp32_bias(block: nn.Module, gate: nn.Module, apply: Callable[[], nn.Module]) -> nn.Module:
    """``block._apply`` (``.to()``, ``.bfloat16()``, DeepSpeed's bf16 cast) with the gate's
    correction bias kept in fp32, its values untouched: the bias shifts sigmoid scores in (0, 1)
    by small amounts that decide near-ties between experts, bf16 keeps 3 significant digits, and
    vLLM, SGLang and transformers all hold it in fp32 (a bf16 trainer or engine would route some
    tokens differently from them)."""
    bias = getattr(gate, "e_score_correction_bias", None)
    out = apply()
    if bias is not None:
        gate.e_score_correction_bias = bias.to(device=gate.e_score_correction_bias.device, dtype=torch.float32)
    return out


class RoutedSparseMoe(nn.Module):
    """HF's ``Qwen3MoeSparseMoeBlock`` (``gate`` + ``experts.{i}``, and GLM's shared expert) that
    routes tokens itself and reports each token's experts: the inference block."""

    DENSE_MAX_TOKENS = 256

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, self.k = cfg, cfg.top_k
        self.gate = nn.Linear(cfg.d_model, cfg.num_experts, bias=cfg.oai_blocks)
        bias = correction_bias(cfg)
        if bias is not None:
            self.gate.register_buffer("e_score_correction_bias", bias)
        self.experts = nn.ModuleList(SwiGLUExpert(cfg.d_model, cfg.d_ff, cfg.oai_blocks) for _ in range(cfg.num_experts))
        shared = shared_expert(cfg)
        if shared is not None:
            self.shared_experts = shared
        self._stack: tuple[torch.Tensor, ...] | None = None
        # loading weights copies into the parameters: the stack is rebuilt on next use
        self.register_load_state_dict_post_hook(RoutedSparseMoe._forget_stack)

    @staticmethod
    def _forget_stack(module: "RoutedSparseMoe", _incompatible=None) -> None:
        module._stack = None

    def _apply(self, fn, *args, **kwargs):  # .to() / .float(): the stack must follow
        self._stack = None
        return apply_keeping_fp32_bias(self, self.gate, lambda: super(RoutedSparseMoe, self)._apply(fn, *args, **kwargs))

    def _stacked(self) -> tuple[torch.Tensor, ...]:
        """(gate|up weights (E, D, 2F), down weights (E, F, D)), and GPT-OSS's biases (E, 1, 2F)
        and (E, 1, D): every expert in one batched matmul; built on first use after a weight load."""
        if self._stack is None:
            stack = [torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]).t()
                                  for e in self.experts]).contiguous(),
                     torch.stack([e.down_proj.weight.t() for e in self.experts]).contiguous()]
            if self.cfg.oai_blocks:
                stack += [torch.stack([torch.cat([e.gate_proj.bias, e.up_proj.bias])[None] for e in self.experts]),
                          torch.stack([e.down_proj.bias[None] for e in self.experts])]
            self._stack = tuple(stack)
        return self._stack

    def forward(self, x: torch.Tensor, replay: torch.Tensor | None = None) -> MoEResult:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        experts, weights, own, _ = route_tokens(flat, self.gate.weight, self.cfg,
                                                getattr(self.gate, "e_score_correction_bias", None),
                                                None if replay is None else replay.reshape(-1, self.k), self.gate.bias)
        if flat.shape[0] <= self.DENSE_MAX_TOKENS:
            # a decode step: every expert on every token (two batched matmuls) and a gather beat
            # per-expert index bookkeeping on small batches (same math: each token still gets
            # its top-k experts)
            w13, w2, *biases = self._stacked()
            gate_up = torch.bmm(flat.expand(w13.shape[0], -1, -1), w13)
            if biases:
                gate_up = gate_up + biases[0]
            gate, up = gate_up.chunk(2, dim=-1)
            every = torch.bmm(expert_activation(gate, up, self.cfg.oai_blocks), w2)
            if biases:
                every = every + biases[1]
            every = every.transpose(0, 1)  # (N, E, D)
            picked = every.gather(1, experts[:, :, None].expand(-1, -1, shape[-1]))  # (N, k, D)
            out = (picked * weights[:, :, None].to(flat.dtype)).sum(dim=1)
        else:
            out = torch.zeros_like(flat)
            for e, expert in enumerate(self.experts):
                rows, slot = torch.nonzero(experts == e, as_tuple=True)
                if rows.numel():
                    out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None].to(flat.dtype))
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(flat)
        return MoEResult(out.view(shape), None, None, own.view(*shape[:-1], self.k))


MoEFactory = Callable[[ModelConfig], nn.Module]


class Qwen3MoeDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_factory: MoEFactory, index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.self_attn = DeepseekV3Attention(cfg) if cfg.latent_attention else Qwen3MoeAttention(cfg, index)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = moe_factory(cfg) if index >= cfg.first_dense_layers else DenseMlp(cfg.d_model, cfg.dense_d_ff)

    def forward(self, x, positions, attn_mask, cache, layer, replay=None) -> tuple[torch.Tensor, MoEResult]:
        x = x + self.self_attn(self.input_layernorm(x), positions, attn_mask, cache, layer)
        h = self.post_attention_layernorm(x)
        moe = self.mlp(h) if replay is None else self.mlp(h, replay)
        return x + moe.out, moe


class Qwen3MoeModel(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_factory: MoEFactory):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Qwen3MoeDecoderLayer(cfg, moe_factory, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)


class CausalLMOutput(NamedTuple):
    logits: torch.Tensor                 # (B, T, V), or (N, V) at the N positions of ``logits_at``
    aux_loss: torch.Tensor               # summed load-balancing loss (0 for routing blocks)
    expert_counts: torch.Tensor | None   # (moe_layers, num_experts), training blocks
    routed_experts: torch.Tensor | None  # (B, T, moe_layers, top_k), routing blocks


class Qwen3MoeForCausalLM(nn.Module):
    """The policy. ``moe_factory`` builds each layer's sparse block (default: the routing block
    of the native engine; the trainer passes DeepSpeed's)."""

    def __init__(self, cfg: ModelConfig, moe_factory: MoEFactory = RoutedSparseMoe):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(f"model.vocab_size={cfg.vocab_size}: resolve it from the tokenizer first")
        self.cfg = cfg
        self.model = Qwen3MoeModel(cfg, moe_factory)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        init_weights(self, cfg.init_std, cfg.n_layers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_at: torch.Tensor | None = None,
                replay_experts: torch.Tensor | None = None) -> CausalLMOutput:
        """Causal LM over ``input_ids`` (B, T). ``positions`` (B, T) default to 0..T-1. A packed
        batch passes each token's ``segments`` id: attention stays inside a sequence (padding,
        id -1, attends only to padding). The engine passes its own ``attn_mask`` and ``cache``
        (new keys/values are written at ``cache.length``, which advances by T).

        ``logits_at`` (B, T) bool selects the positions whose logits are wanted (returned as
        (N, V), row-major): with a real vocabulary (151,936 for Qwen3) the LM head over every
        prompt position costs more than the rest of a small model, and the loss scores only
        response tokens, an engine's prefill only the last position.

        ``replay_experts`` (B, T, moe_layers, top_k) routes the hidden state at each position
        through the experts the inference engine used there (rollout routing replay); -1 rows
        are routed by this model's own router. Routing covers the layers with experts only
        (``cfg.moe_layers``: GLM's first dense layers have none)."""
        b, t = input_ids.shape
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        if segments is not None:
            causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
            attn_mask = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]
        x = self.model.embed_tokens(input_ids)
        aux_total = x.new_zeros(())
        counts, routed = [], []
        for i, layer in enumerate(self.model.layers):
            sparse = i - self.cfg.first_dense_layers
            x, moe = layer(x, positions, attn_mask, cache, i,
                           None if replay_experts is None or sparse < 0 else replay_experts[:, :, sparse])
            if moe.aux_loss is not None:
                aux_total = aux_total + moe.aux_loss
            if moe.expert_counts is not None:
                counts.append(moe.expert_counts)
            if moe.experts is not None:
                routed.append(moe.experts)
        if cache is not None:
            cache.length += t
        hidden = self.model.norm(x)
        if logits_at is not None:
            hidden = hidden[logits_at]
        return CausalLMOutput(self.lm_head(hidden), aux_total,
                              torch.stack(counts) if counts else None,
                              torch.stack(routed, dim=2) if routed else None)

    def canonical_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies under Hugging Face names (the publish / safetensors format)."""
        state = {canonical_name(k, self.cfg.type): v.detach().to("cpu", copy=True).contiguous()
                 for k, v in self.state_dict().items()}
        if self.cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        return state

    def load_canonical_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = {canonical_name(k, self.cfg.type): k for k in self.state_dict()}
        if self.cfg.tie_word_embeddings:
            own.pop("lm_head.weight", None)
        missing = set(own) - set(state)
        unexpected = set(state) - set(own)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match model: missing={sorted(missing)[:5]} "
                             f"unexpected={sorted(unexpected)[:5]}")
        self.load_state_dict({own[k]: v for k, v in state.items()}, strict=not self.cfg.tie_word_embeddings)


def init_weights(module: nn.Module, std: float, n_layers: int) -> None:
    """Normal init of every matrix; output projections (``o_proj``, ``down_proj``) scaled by depth
    so the residual stream stays bounded; norms start at one, biases at zero."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            scale = 1.0 / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)
        elif name.endswith(".bias"):
            nn.init.zeros_(p)


# DeepSpeed's MoE wrappers -> Hugging Face names (the trainer's block is ``mlp.moe``)
_DEEPSPEED_TO_CANONICAL = (
    ("mlp.moe.deepspeed_moe.gate.wg.", "mlp.gate."),
    ("mlp.moe.deepspeed_moe.gate.e_score_correction_bias", "mlp.gate.e_score_correction_bias"),
    ("mlp.moe.deepspeed_moe.experts.deepspeed_experts.", "mlp.experts."),
)


# Qwen3-MoE's names (the modules' own) -> Mixtral's: the sparse block is ``block_sparse_moe`` and
# an expert's gate/up/down projections are w1/w3/w2
_QWEN3_TO_MIXTRAL = (
    (".mlp.experts.", ".block_sparse_moe.experts."),
    (".mlp.gate.", ".block_sparse_moe.gate."),
    (".gate_proj.", ".w1."),
    (".up_proj.", ".w3."),
    (".down_proj.", ".w2."),
)


def canonical_name(name: str, model_type: str = HF_MODEL_TYPE) -> str:
    """The on-the-wire (Hugging Face) name of a parameter of a ``model_type`` model; also the
    on-disk one except for GPT-OSS's experts (:func:`hf_layout`)."""
    for src, dst in _DEEPSPEED_TO_CANONICAL:
        name = name.replace(src, dst)
    if model_type in ("mixtral", "minimax_m2"):
        for src, dst in _QWEN3_TO_MIXTRAL:
            name = name.replace(src, dst)
        if model_type == "minimax_m2":  # MiniMax-M2 keeps the correction bias beside the gate
            name = name.replace(".block_sparse_moe.gate.e_score_correction_bias", ".block_sparse_moe.e_score_correction_bias")
    elif model_type == "gpt_oss":
        name = name.replace(".mlp.gate.", ".mlp.router.")
    return name


_EXPERT = re.compile(r"(.*\.mlp\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|bias)$")
# a GPT-OSS checkpoint's fused expert tensors, each ``<layer>.mlp.experts.<name>`` (E, ...)
FUSED_EXPERT_TENSORS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


def hf_layout(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """``state`` as a Hugging Face checkpoint of ``cfg.type`` stores it. The same dict for every
    type but GPT-OSS, whose checkpoints (and vLLM's and SGLang's loaders) hold each layer's
    experts fused: ``mlp.experts.gate_up_proj`` (E, D, 2F) with gate and up columns
    interleaved, ``gate_up_proj_bias`` (E, 2F), ``down_proj`` (E, F, D), ``down_proj_bias``
    (E, D), where rlpost keeps one module per expert (DeepSpeed's MoE layer splits experts as
    modules over expert-parallel ranks, and routing replay indexes them) and publishes them so."""
    if not cfg.oai_blocks:
        return state
    out, parts = {}, {}
    for name, tensor in state.items():
        match = _EXPERT.match(name)
        if match is None:
            out[name] = tensor
        else:
            prefix, expert, proj, kind = match.groups()
            parts.setdefault(prefix, {})[(int(expert), proj, kind)] = tensor
    for prefix, p in parts.items():
        experts = range(cfg.num_experts)
        gate = torch.stack([p[(e, "gate_proj", "weight")] for e in experts])  # (E, F, D)
        up = torch.stack([p[(e, "up_proj", "weight")] for e in experts])
        out[prefix + "gate_up_proj"] = torch.stack([gate, up], dim=2).flatten(1, 2).transpose(1, 2).contiguous()
        out[prefix + "gate_up_proj_bias"] = torch.stack(
            [torch.stack([p[(e, "gate_proj", "bias")], p[(e, "up_proj", "bias")]], dim=1).flatten() for e in experts])
        out[prefix + "down_proj"] = torch.stack([p[(e, "down_proj", "weight")].t() for e in experts]).contiguous()
        out[prefix + "down_proj_bias"] = torch.stack([p[(e, "down_proj", "bias")] for e in experts])
    return out


def split_layout(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_layout`: a checkpoint's GPT-OSS experts one module each."""
    if not cfg.oai_blocks:
        return state
    out = {}
    for name, tensor in state.items():
        prefix, _, fused = name.rpartition(".")
        if not prefix.endswith(".mlp.experts") or fused not in FUSED_EXPERT_TENSORS:
            out[name] = tensor
            continue
        for e in range(tensor.shape[0]):
            at = f"{prefix}.{e}."
            if fused == "gate_up_proj":  # (D, 2F), columns gate0, up0, gate1, up1, ...
                out[at + "gate_proj.weight"] = tensor[e, :, 0::2].t().contiguous()
                out[at + "up_proj.weight"] = tensor[e, :, 1::2].t().contiguous()
            elif fused == "gate_up_proj_bias":
                out[at + "gate_proj.bias"], out[at + "up_proj.bias"] = tensor[e, 0::2].clone(), tensor[e, 1::2].clone()
            elif fused == "down_proj":
                out[at + "down_proj.weight"] = tensor[e].t().contiguous()
            else:
                out[at + "down_proj.bias"] = tensor[e].clone()
    return out


# ---------------------------------------------------------------------- Hugging Face checkpoints
_HF_FIELDS = {  # ModelConfig field -> config.json key
    "vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
    "d_ff": "moe_intermediate_size", "num_experts": "num_experts", "top_k": "num_experts_per_tok",
    "max_seq_len": "max_position_embeddings", "rope_theta": "rope_theta", "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings", "aux_loss_coef": "router_aux_loss_coef",
    "init_std": "initializer_range",
}


# Mixtral's config.json names two fields differently (and has no q/k norm, no norm_topk_prob:
# it always renormalises the top-k weights)
_MIXTRAL_FIELDS = {**_HF_FIELDS, "d_ff": "intermediate_size", "num_experts": "num_local_experts"}


# GLM-4.5's: DeepSeek-V3's router names, dense first layers, the shared expert
_GLM_FIELDS = {**_HF_FIELDS, "num_experts": "n_routed_experts", "first_dense_layers": "first_k_dense_replace",
               "dense_d_ff": "intermediate_size", "shared_experts": "n_shared_experts", "n_group": "n_group",
               "topk_group": "topk_group", "routed_scaling": "routed_scaling_factor",
               "norm_topk_prob": "norm_topk_prob", "attention_bias": "attention_bias", "qk_norm": "use_qk_norm",
               "partial_rotary": "partial_rotary_factor"}
# what transformers' (and vLLM's) Glm4MoeConfig assume when a config.json leaves a key out
_GLM_DEFAULTS = {"first_k_dense_replace": 1, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
                 "routed_scaling_factor": 1.0, "norm_topk_prob": True, "attention_bias": False,
                 "use_qk_norm": False, "partial_rotary_factor": 0.5}


# DeepSeek-V3's: GLM's router and experts, latent attention (no head_dim: its heads have no one width)
_DEEPSEEK_FIELDS = {**{k: v for k, v in _GLM_FIELDS.items()
                       if k not in ("head_dim", "attention_bias", "qk_norm", "partial_rotary")},
                    "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank",
                    "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim",
                    "v_head_dim": "v_head_dim"}
# transformers' DeepseekV3Config defaults for keys a config.json leaves out (DeepSeek-V3's sizes)
_DEEPSEEK_DEFAULTS = {"first_k_dense_replace": 3, "n_shared_experts": 1, "n_group": 8, "topk_group": 4,
                      "routed_scaling_factor": 2.5, "norm_topk_prob": True, "q_lora_rank": 1536,
                      "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}
# GPT-OSS's: Mixtral's expert names and its sliding window (its sinks, biases and activation
# come with the type)
_GPT_OSS_FIELDS = {**_MIXTRAL_FIELDS, "sliding_window": "sliding_window"}
# MiniMax-M2's: Mixtral's names; its rotary width is config.json's rotary_dim (read in
# model_config_from_hf), written also as partial_rotary_factor for transformers
_MINIMAX_FIELDS = {**_MIXTRAL_FIELDS, "partial_rotary": "partial_rotary_factor"}
# what MiniMax-M2's architecture fixes (vLLM's and transformers' classes have no other): a
# config.json that says otherwise is refused by name
_MINIMAX_FIXED = {"hidden_act": "silu", "scoring_func": "sigmoid", "use_routing_bias": True, "use_qk_norm": True,
                  "qk_norm_type": "per_layer", "shared_intermediate_size": 0, "attention_bias": False,
                  "sliding_window": None}
# YaRN's config.json keys (in rope_parameters, or the older rope_scaling) -> ModelConfig fields
_YARN_FIELDS = {"factor": "rope_factor", "original_max_position_embeddings": "rope_original_max_len",
                "beta_fast": "rope_beta_fast", "beta_slow": "rope_beta_slow", "mscale": "rope_mscale",
                "mscale_all_dim": "rope_mscale_all_dim", "truncate": "rope_truncate"}


def _fields(model_type: str) -> dict[str, str]:
    return {"mixtral": _MIXTRAL_FIELDS, "glm4_moe": _GLM_FIELDS, "deepseek_v3": _DEEPSEEK_FIELDS,
            "gpt_oss": _GPT_OSS_FIELDS, "minimax_m2": _MINIMAX_FIELDS}.get(model_type, _HF_FIELDS)


def _gpt_oss_layer_types(n_layers: int) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """``config.json`` of a ``qwen3_moe``, ``mixtral``, ``glm4_moe``, ``deepseek_v3``, ``gpt_oss`` or
    ``minimax_m2`` checkpoint for ``cfg``."""
    out = {"architectures": [HF_ARCHITECTURES[cfg.type]], "model_type": cfg.type, "torch_dtype": dtype,
           "hidden_act": "silu", "attention_dropout": 0.0, "output_router_logits": False, "use_cache": True,
           "sliding_window": None, "rope_scaling": None}
    if cfg.type == "mixtral":
        out["router_jitter_noise"] = 0.0
    elif cfg.oai_blocks:
        out.update({"attention_bias": True, "swiglu_limit": SWIGLU_LIMIT,
                    "layer_types": _gpt_oss_layer_types(cfg.n_layers)})
    elif cfg.projection_qk_norm:  # MiniMax-M2: vLLM reads rotary_dim, transformers partial_rotary_factor
        out.update({**{k: v for k, v in _MINIMAX_FIXED.items() if v is not None}, "rotary_dim": cfg.rotary_dim,
                    "attn_type_list": [1] * cfg.n_layers, "num_mtp_modules": 0, "use_mtp": False,
                    "router_jitter_noise": 0.0})
    elif cfg.sigmoid_router:  # no multi-token-prediction layers: the policy has none
        out["num_nextn_predict_layers"] = 0
        if cfg.latent_attention:  # DeepSeek-V3's router as its config.json names it (vLLM reads these)
            out.update({"topk_method": "noaux_tc", "scoring_func": "sigmoid", "rope_interleave": True,
                        "attention_bias": False, "moe_layer_freq": 1})
    else:
        out.update({"attention_bias": False, "intermediate_size": cfg.d_ff, "decoder_sparse_step": 1,
                    "mlp_only_layers": [], "norm_topk_prob": cfg.top_k > 1, "use_sliding_window": False,
                    "max_window_layers": cfg.n_layers})
    out.update({hf: getattr(cfg, ours) for ours, hf in _fields(cfg.type).items()})
    if cfg.sigmoid_router and not cfg.dense_d_ff and not cfg.projection_qk_norm:  # no dense layer uses it; loaders want a width
        out["intermediate_size"] = cfg.d_ff
    if cfg.latent_attention and not cfg.q_lora_rank:
        out["q_lora_rank"] = None  # a full q_proj
    if cfg.rope_type == "yarn":  # the long-standing key, which transformers and vLLM both read
        out["rope_scaling"] = {"rope_type": "yarn", "type": "yarn",
                               **{hf: getattr(cfg, ours) for hf, ours in _YARN_FIELDS.items()
                                  if getattr(cfg, ours) != getattr(ModelConfig, ours)
                                  or hf not in ("mscale", "mscale_all_dim", "truncate")}}
    try:  # what every Hugging Face config.json records; without it transformers 5 takes a local
        # checkpoint for an old Mistral one and warns that its tokenizer's regex is wrong
        out["transformers_version"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        pass
    return out


def _read_config_json(path: str) -> dict:
    """The checkpoint's ``config.json`` as a dict, or a one-line config error naming model.path."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ConfigError(f"model.path={path!r}: no config.json there (a Hugging Face checkpoint folder)")
    try:
        with open(file) as fh:
            hf = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model.path={path!r}: config.json is not readable JSON ({exc})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"model.path={path!r}: config.json is not a JSON object")
    return hf


def model_config_from_hf(path: str, base: ModelConfig | None = None, hf: dict | None = None) -> ModelConfig:
    """The ModelConfig of the checkpoint at ``path`` (its ``config.json``, or ``hf`` already read
    from it); fields the file does not set keep ``base``'s values. Refuses, naming the field,
    what this model cannot express."""
    if hf is None:
        hf = _read_config_json(path)
    model_type = hf.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise ConfigError(f"model.path={path!r}: model_type={model_type!r} is not supported "
                          f"(supported: {', '.join(HF_ARCHITECTURES)})")
    unsupported = {"mlp_only_layers": [], "decoder_sparse_step": 1, "use_sliding_window": False,
                   "attention_bias": False}
    if model_type == "mixtral":  # a sliding window would make vLLM attend differently from the trainer
        unsupported = {"sliding_window": None}
    elif model_type == "glm4_moe":
        unsupported = {"hidden_act": "silu", "scoring_func": "sigmoid", "topk_method": "noaux_tc"}
    elif model_type == "deepseek_v3":
        unsupported = {"hidden_act": "silu", "scoring_func": "sigmoid", "topk_method": "noaux_tc",
                       "attention_bias": False, "rope_interleave": True, "moe_layer_freq": 1}
    elif model_type == "gpt_oss":
        unsupported = {"attention_bias": True, "swiglu_limit": SWIGLU_LIMIT}
        layers = hf.get("num_hidden_layers")
        if hf.get("layer_types") is not None and isinstance(layers, int) and \
                hf["layer_types"] != _gpt_oss_layer_types(layers):
            raise ConfigError(f"model.path={path!r}: config.json layer_types={hf['layer_types']!r} is not supported "
                              f"(needs sliding_attention on even layers, full_attention on odd ones, as vLLM assumes)")
    elif model_type == "minimax_m2":
        unsupported = _MINIMAX_FIXED
        kinds = hf.get("attn_type_list")
        if kinds is not None and (not isinstance(kinds, list) or any(k != 1 for k in kinds)):
            raise ConfigError(f"model.path={path!r}: config.json attn_type_list={kinds!r} is not supported "
                              f"(needs 1, softmax attention, for every layer: MiniMax-01's linear attention is not)")
    quantization(hf, path)  # refuses what cannot be dequantized on load
    for key, wanted in unsupported.items():
        if hf.get(key, wanted) != wanted:
            raise ConfigError(f"model.path={path!r}: config.json {key}={hf[key]!r} is not supported "
                              f"(needs {wanted!r})")
    rope = _rope_fields(hf, path)
    # transformers 5 writes rope_theta (and GLM's partial_rotary_factor) inside rope_parameters
    nested = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    null_q_lora = model_type == "deepseek_v3" and "q_lora_rank" in hf and hf["q_lora_rank"] is None
    hf = {**nested, **{k: v for k, v in hf.items() if v is not None}}
    hf = {**{"glm4_moe": _GLM_DEFAULTS, "deepseek_v3": _DEEPSEEK_DEFAULTS}.get(model_type, {}), **hf}
    cfg = ModelConfig(**vars(base)) if base is not None else ModelConfig()
    cfg.type = model_type
    for name in set().union(*TYPE_FIELDS.values()) - set(TYPE_FIELDS.get(model_type, ())):
        setattr(cfg, name, getattr(ModelConfig, name))  # a base's fields of another architecture do not carry over
    for ours, key in _fields(model_type).items():
        if key in hf and hf[key] is not None:
            setattr(cfg, ours, _json_value(hf[key], type(getattr(cfg, ours)), key, path))
    for name, value in rope.items():
        setattr(cfg, name, value)
    if null_q_lora:
        cfg.q_lora_rank = 0
    if "head_dim" not in hf:
        cfg.head_dim = cfg.d_model // cfg.n_heads
    if model_type == "minimax_m2" and hf.get("rotary_dim") is not None:
        rotary_dim = _json_value(hf["rotary_dim"], int, "rotary_dim", path)
        if "partial_rotary_factor" in hf and rotary_dim != int(cfg.head_dim * cfg.partial_rotary):
            raise ConfigError(f"model.path={path!r}: config.json rotary_dim={rotary_dim} and partial_rotary_factor="
                              f"{hf['partial_rotary_factor']!r} disagree (head_dim={cfg.head_dim})")
        cfg.partial_rotary = rotary_dim / cfg.head_dim
        if cfg.rotary_dim != rotary_dim:
            raise ConfigError(f"model.path={path!r}: config.json rotary_dim={rotary_dim} is not a share of "
                              f"head_dim={cfg.head_dim} that rotary embeddings can use")
    if model_type == "qwen3_moe" and cfg.top_k > 1 and hf.get("norm_topk_prob") is False:
        raise ConfigError(f"model.path={path!r}: norm_topk_prob=false with top_k={cfg.top_k} is not "
                          f"supported (DeepSpeed's top-2 gate renormalises)")
    cfg.path = path
    return cfg


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _rope_fields(hf: dict, path: str) -> dict:
    """The ``rope_*`` fields of config.json's RoPE settings (``rope_parameters``, transformers 5's,
    else the older ``rope_scaling``): plain RoPE or YaRN; any other scaling is refused by name."""
    key = "rope_parameters" if hf.get("rope_parameters") is not None else "rope_scaling"
    rope = hf.get(key) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else None
    if kind not in ("default", "yarn"):
        raise ConfigError(f"model.path={path!r}: config.json {key}={rope!r} is not supported "
                          f"(rope_type 'default' or 'yarn')")
    fields = {name: getattr(ModelConfig, name) for name in _YARN_FIELDS.values()}
    fields["rope_type"] = kind
    if kind == "yarn":
        for needed in ("factor", "original_max_position_embeddings"):
            if rope.get(needed) is None:
                raise ConfigError(f"model.path={path!r}: config.json {key} has no {needed} (YaRN needs it)")
        if rope.get("attention_factor") is not None:
            raise ConfigError(f"model.path={path!r}: config.json {key}={rope!r}: attention_factor is not supported")
        for hf_key, name in _YARN_FIELDS.items():
            if rope.get(hf_key) is not None:
                fields[name] = _json_value(rope[hf_key], type(fields[name]), f"{key}.{hf_key}", path)
    return fields


def _json_value(value, kind: type, key: str, path: str):
    """``value`` of config.json ``key`` as ``kind``, only when JSON gave that kind (a number for a
    float): ``bool("false")`` is True and ``int([64])`` a TypeError from deep inside, so anything
    else is a one-line config error."""
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise ConfigError(f"model.path={path!r}: config.json {key}={value!r} is not {_KIND_NAMES[kind]}")


def save_pretrained(state: dict[str, torch.Tensor], cfg: ModelConfig, path: str, dtype: str = "float32") -> None:
    """Write a Hugging Face checkpoint: ``model.safetensors`` + ``config.json``."""
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file({k: v.contiguous() for k, v in hf_layout(state, cfg).items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(hf_config(cfg, dtype), fh, indent=2)


def random_checkpoint(cfg: ModelConfig) -> tempfile.TemporaryDirectory:
    """A random-init checkpoint of ``cfg`` in a temporary folder, for engines that can only start
    from a checkpoint (vLLM, SGLang) before the trainer's first publish. The folder is removed
    when the returned object is (keep it as long as the engine may re-read it)."""
    folder = tempfile.TemporaryDirectory(prefix="rlpost-init-")
    save_pretrained(Qwen3MoeForCausalLM(cfg).canonical_state_dict(), cfg, folder.name)
    return folder


def load_pretrained(path: str, base: ModelConfig | None = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(state dict, config) of the checkpoint at ``path`` (one or several safetensors files)."""
    hf = _read_config_json(path)
    cfg = model_config_from_hf(path, base, hf)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ConfigError(f"model.path={path!r}: no *.safetensors weights there")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    # GLM checkpoints carry their multi-token-prediction module as extra layers after the last
    # one (num_nextn_predict_layers; MiniMax-M2's num_mtp_modules): a speculative-decoding head
    # the policy does not have
    mtp_key = "num_mtp_modules" if cfg.projection_qk_norm else "num_nextn_predict_layers"
    mtp = _json_value(hf.get(mtp_key) or 0, int, mtp_key, path)
    extra = tuple(f"model.layers.{i}." for i in range(cfg.n_layers, cfg.n_layers + mtp))
    if extra:
        state = {k: v for k, v in state.items() if not k.startswith(extra)}
    return split_layout(dequantized(state, quantization(hf, path), path), cfg), cfg
