"""The policy model: Qwen3-MoE (Hugging Face's ``qwen3_moe`` architecture), written once, and
Mixtral (``mixtral``) as its variant without q/k norms and with Mixtral's parameter names.

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
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from rlpost.config import ConfigError, ModelConfig

HF_MODEL_TYPE = "qwen3_moe"
# model.type -> the Hugging Face architecture written to and read from config.json
HF_ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}


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


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of ``x`` (B, heads, T, D) at ``positions`` (B, T), neox layout (the
    two halves of the head dimension rotate together, as in HF's ``rotate_half``)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    freqs = positions.float()[:, None, :, None] * inv_freq  # (B, 1, T, D/2)
    cos, sin = freqs.cos(), freqs.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


@dataclass
class KVCache:
    """Per-layer key/value tensors of shape (batch, kv_heads, capacity, head_dim); keys are stored
    after the rotary embedding."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, capacity: int, dtype, device) -> "KVCache":
        shape = (batch, cfg.n_kv_heads, capacity, cfg.head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)])

    def select(self, rows: torch.Tensor) -> "KVCache":
        """The cache restricted to batch ``rows`` (finished sequences leave the batch)."""
        return KVCache([k.index_select(0, rows) for k in self.keys],
                       [v.index_select(0, rows) for v in self.values], self.length)


class Qwen3MoeAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim, self.theta = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        # Qwen3 normalises each head's queries and keys before the rotary embedding; Mixtral does not
        self.qk_norm = cfg.type == "qwen3_moe"
        if self.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """``attn_mask`` is a boolean (batch, 1, q, k) mask, or None for plain causal attention.
        With a cache, the new keys/values are written at ``cache.length`` and attention covers the
        whole cache prefix."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = rotary(q, positions, self.theta), rotary(k, positions, self.theta)
        if cache is not None:
            start = cache.length
            cache.keys[layer][:, :, start:start + t] = k
            cache.values[layer][:, :, start:start + t] = v
            k = cache.keys[layer][:, :, :start + t]
            v = cache.values[layer][:, :, :start + t]
        gqa = self.n_heads != self.n_kv
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class SwiGLUExpert(nn.Module):
    """One expert: ``down(silu(gate(x)) * up(x))``, no biases (HF ``Qwen3MoeMLP``)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEResult(NamedTuple):
    out: torch.Tensor
    aux_loss: torch.Tensor | None        # load-balancing loss (training blocks)
    expert_counts: torch.Tensor | None   # (num_experts,) tokens per expert (training blocks)
    # (..., top_k) the router's own experts for each token (routing blocks), also under replay:
    # what the trainer's router would pick, for the routing-mismatch metric
    experts: torch.Tensor | None


def topk_route(hidden: torch.Tensor, gate_weight: torch.Tensor, k: int,
               replay: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax top-k gating over fp32 logits, identical to DeepSpeed's TopKGate with
    drop_tokens=False, no noise and no second-expert sampling, and to Qwen3-MoE's router: k=1
    weighs by the top probability, k=2 renormalises the two (``norm_topk_prob``).
    Returns (experts used (N, k), their weights (N, k), the router's own top-k (N, k)); see
    :func:`route` for ``replay``."""
    return route(torch.softmax(F.linear(hidden.float(), gate_weight.float()), dim=-1), k, replay)


def route(probs: torch.Tensor, k: int, replay: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing from router probabilities (N, E), as :func:`topk_route`.

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


def replayable(replay: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(N,) rows of ``replay`` (N, k) that name k distinct experts in [0, num_experts): only
    those are replayed (a row the engine did not fill is -1; anything else is not a routing)."""
    ok = ((replay >= 0) & (replay < num_experts)).all(dim=-1)
    if replay.shape[-1] > 1:
        ordered = replay.sort(dim=-1).values
        ok &= (ordered[:, 1:] != ordered[:, :-1]).all(dim=-1)
    return ok


class RoutedSparseMoe(nn.Module):
    """HF's ``Qwen3MoeSparseMoeBlock`` (``gate`` + ``experts.{i}``) that routes tokens itself and
    reports each token's experts: the inference block."""

    DENSE_MAX_TOKENS = 256

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k = cfg.top_k
        self.gate = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert(cfg.d_model, cfg.d_ff) for _ in range(cfg.num_experts))
        self._stack: tuple[torch.Tensor, torch.Tensor] | None = None
        # loading weights copies into the parameters: the stack is rebuilt on next use
        self.register_load_state_dict_post_hook(RoutedSparseMoe._forget_stack)

    @staticmethod
    def _forget_stack(module: "RoutedSparseMoe", _incompatible=None) -> None:
        module._stack = None

    def _apply(self, fn, *args, **kwargs):  # .to() / .float(): the stack must follow
        self._stack = None
        return super()._apply(fn, *args, **kwargs)

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate|up weights (E, D, 2F), down weights (E, F, D)): every expert in one batched
        matmul; built on first use after a weight load."""
        if self._stack is None:
            self._stack = (torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]).t()
                                        for e in self.experts]).contiguous(),
                           torch.stack([e.down_proj.weight.t() for e in self.experts]).contiguous())
        return self._stack

    def forward(self, x: torch.Tensor, replay: torch.Tensor | None = None) -> MoEResult:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        experts, weights, own = topk_route(flat, self.gate.weight, self.k,
                                           None if replay is None else replay.reshape(-1, self.k))
        if flat.shape[0] <= self.DENSE_MAX_TOKENS:
            # a decode step: every expert on every token (two batched matmuls) and a gather beat
            # per-expert index bookkeeping on small batches (same math: each token still gets
            # its top-k experts)
            w13, w2 = self._stacked()
            gate, up = torch.bmm(flat.expand(w13.shape[0], -1, -1), w13).chunk(2, dim=-1)
            every = torch.bmm(F.silu(gate) * up, w2).transpose(0, 1)  # (N, E, D)
            picked = every.gather(1, experts[:, :, None].expand(-1, -1, shape[-1]))  # (N, k, D)
            out = (picked * weights[:, :, None].to(flat.dtype)).sum(dim=1)
        else:
            out = torch.zeros_like(flat)
            for e, expert in enumerate(self.experts):
                rows, slot = torch.nonzero(experts == e, as_tuple=True)
                if rows.numel():
                    out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None].to(flat.dtype))
        return MoEResult(out.view(shape), None, None, own.view(*shape[:-1], self.k))


MoEFactory = Callable[[ModelConfig], nn.Module]


class Qwen3MoeDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_factory: MoEFactory):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.self_attn = Qwen3MoeAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = moe_factory(cfg)

    def forward(self, x, positions, attn_mask, cache, layer, replay=None) -> tuple[torch.Tensor, MoEResult]:
        x = x + self.self_attn(self.input_layernorm(x), positions, attn_mask, cache, layer)
        h = self.post_attention_layernorm(x)
        moe = self.mlp(h) if replay is None else self.mlp(h, replay)
        return x + moe.out, moe


class Qwen3MoeModel(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_factory: MoEFactory):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Qwen3MoeDecoderLayer(cfg, moe_factory) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)


class CausalLMOutput(NamedTuple):
    logits: torch.Tensor                 # (B, T, V), or (N, V) at the N positions of ``logits_at``
    aux_loss: torch.Tensor               # summed load-balancing loss (0 for routing blocks)
    expert_counts: torch.Tensor | None   # (n_layers, num_experts), training blocks
    routed_experts: torch.Tensor | None  # (B, T, n_layers, top_k), routing blocks


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

        ``replay_experts`` (B, T, n_layers, top_k) routes the hidden state at each position
        through the experts the inference engine used there (rollout routing replay); -1 rows
        are routed by this model's own router."""
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
            x, moe = layer(x, positions, attn_mask, cache, i,
                           None if replay_experts is None else replay_experts[:, :, i])
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
    so the residual stream stays bounded; norms start at one."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            scale = 1.0 / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)


# DeepSpeed's MoE wrappers -> Hugging Face names (the trainer's block is ``mlp.moe``)
_DEEPSPEED_TO_CANONICAL = (
    ("mlp.moe.deepspeed_moe.gate.wg.", "mlp.gate."),
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
    """The on-disk / on-the-wire (Hugging Face) name of a parameter of a ``model_type`` model."""
    for src, dst in _DEEPSPEED_TO_CANONICAL:
        name = name.replace(src, dst)
    if model_type == "mixtral":
        for src, dst in _QWEN3_TO_MIXTRAL:
            name = name.replace(src, dst)
    return name


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


def _fields(model_type: str) -> dict[str, str]:
    return _MIXTRAL_FIELDS if model_type == "mixtral" else _HF_FIELDS


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """``config.json`` of a ``qwen3_moe`` or ``mixtral`` checkpoint for ``cfg`` (every layer sparse)."""
    out = {"architectures": [HF_ARCHITECTURES[cfg.type]], "model_type": cfg.type, "torch_dtype": dtype,
           "hidden_act": "silu", "attention_dropout": 0.0, "output_router_logits": False, "use_cache": True,
           "sliding_window": None, "rope_scaling": None}
    if cfg.type == "mixtral":
        out["router_jitter_noise"] = 0.0
    else:
        out.update({"attention_bias": False, "intermediate_size": cfg.d_ff, "decoder_sparse_step": 1,
                    "mlp_only_layers": [], "norm_topk_prob": cfg.top_k > 1, "use_sliding_window": False,
                    "max_window_layers": cfg.n_layers})
    out.update({hf: getattr(cfg, ours) for ours, hf in _fields(cfg.type).items()})
    try:  # what every Hugging Face config.json records; without it transformers 5 takes a local
        # checkpoint for an old Mistral one and warns that its tokenizer's regex is wrong
        out["transformers_version"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        pass
    return out


def model_config_from_hf(path: str, base: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig of the checkpoint at ``path`` (its ``config.json``); fields the file does
    not set keep ``base``'s values. Refuses, naming the field, what this model cannot express."""
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
    model_type = hf.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise ConfigError(f"model.path={path!r}: model_type={model_type!r} is not supported "
                          f"(supported: {', '.join(HF_ARCHITECTURES)})")
    unsupported = {"mlp_only_layers": [], "decoder_sparse_step": 1, "use_sliding_window": False,
                   "attention_bias": False, "rope_scaling": None}
    if model_type == "mixtral":  # a sliding window would make vLLM attend differently from the trainer
        unsupported = {"sliding_window": None, "rope_scaling": None}
    for key, wanted in unsupported.items():
        if hf.get(key, wanted) != wanted:
            raise ConfigError(f"model.path={path!r}: config.json {key}={hf[key]!r} is not supported "
                              f"(needs {wanted!r})")
    cfg = ModelConfig(**vars(base)) if base is not None else ModelConfig()
    cfg.type = model_type
    for ours, key in _fields(model_type).items():
        if key in hf and hf[key] is not None:
            setattr(cfg, ours, type(getattr(cfg, ours))(hf[key]))
    if "head_dim" not in hf:
        cfg.head_dim = cfg.d_model // cfg.n_heads
    if model_type == "qwen3_moe" and cfg.top_k > 1 and hf.get("norm_topk_prob") is False:
        raise ConfigError(f"model.path={path!r}: norm_topk_prob=false with top_k={cfg.top_k} is not "
                          f"supported (DeepSpeed's top-2 gate renormalises)")
    cfg.path = path
    return cfg


def save_pretrained(state: dict[str, torch.Tensor], cfg: ModelConfig, path: str, dtype: str = "float32") -> None:
    """Write a Hugging Face checkpoint: ``model.safetensors`` + ``config.json``."""
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"format": "pt"})
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
    cfg = model_config_from_hf(path, base)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ConfigError(f"model.path={path!r}: no *.safetensors weights there")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state, cfg
