"""Building blocks of the toy MoE shared by the trainer and the native inference engine.

The trainer wraps :class:`ExpertMLP` in DeepSpeed's MoE layer; the engine routes tokens itself
(and records which experts each token used). Both use the attention and block code here and one
canonical weight naming (:func:`canonical_name`), which is also the safetensors format on disk, so
a published state dict loads into either side unchanged.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from rlpost.config import ModelConfig


class ExpertMLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


@dataclass
class KVCache:
    """Per-layer key/value tensors of shape (batch, heads, capacity, head_dim)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, capacity: int, dtype, device) -> "KVCache":
        shape = (batch, cfg.n_heads, capacity, cfg.d_model // cfg.n_heads)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)])


    def select(self, rows: torch.Tensor) -> "KVCache":
        """The cache restricted to batch ``rows`` (finished sequences leave the batch)."""
        return KVCache([k.index_select(0, rows) for k in self.keys],
                       [v.index_select(0, rows) for v in self.values], self.length)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """``attn_mask`` is a boolean (batch, 1, q, k) mask, or None for plain causal attention.
        With a cache, the new keys/values are written at ``cache.length`` and attention covers the
        whole cache prefix."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            start = cache.length
            cache.keys[layer][:, :, start:start + t] = k
            cache.values[layer][:, :, start:start + t] = v
            k = cache.keys[layer][:, :, :start + t]
            v = cache.values[layer][:, :, :start + t]
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed(ids) + self.pos(positions)


def init_weights(module: nn.Module, std: float, n_layers: int) -> None:
    """GPT-2 style init; output projections scaled by depth so the residual stream stays bounded."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            scale = 1.0 / math.sqrt(2 * n_layers) if name.endswith(("proj.weight", "fc2.weight")) else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


_DEEPSPEED_TO_CANONICAL = (
    ("moe.deepspeed_moe.gate.wg.", "moe.gate."),
    ("moe.deepspeed_moe.experts.deepspeed_experts.", "moe.experts."),
)


def canonical_name(name: str) -> str:
    """The on-disk / on-the-wire name of a parameter (DeepSpeed's MoE wrappers stripped)."""
    for src, dst in _DEEPSPEED_TO_CANONICAL:
        name = name.replace(src, dst)
    return name


def topk_route(hidden: torch.Tensor, gate_weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k softmax gating, identical to DeepSpeed's TopKGate with drop_tokens=False, no noise
    and no second-expert sampling: fp32 logits; k=1 weighs by the top probability, k=2
    renormalises the two. Returns (expert ids (N, k), weights (N, k))."""
    logits = F.linear(hidden.float(), gate_weight.float())
    probs = torch.softmax(logits, dim=-1)
    weights, experts = torch.topk(probs, k, dim=-1)
    if k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).eps)
    return experts, weights


def save_pretrained(state: dict[str, torch.Tensor], cfg: ModelConfig, path: str) -> None:
    """Write ``model.safetensors`` + ``config.json`` (the model section) into ``path``."""
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(asdict(cfg), fh, indent=2)


def load_pretrained(path: str) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    with open(os.path.join(path, "config.json")) as fh:
        cfg = ModelConfig(**json.load(fh))
    return load_file(os.path.join(path, "model.safetensors")), cfg
