"""The toy MoE policy used for training: DeepSpeed MoE feed-forward blocks.

Decoder-only, pre-LayerNorm, learned positions. Every block's FFN is a
``deepspeed.moe.layer.MoE`` with top-k gating and no token dropping (so the native engine,
which routes tokens itself, computes exactly the same function). The forward returns the summed
load-balancing loss and the per-expert token counts, which the trainer adds to its loss and logs.
"""

from __future__ import annotations

import torch
from deepspeed.moe.layer import MoE
from torch import nn

from rlpost.config import ModelConfig
from rlpost.modeling import CausalSelfAttention, Embeddings, ExpertMLP, canonical_name, init_weights


class MoEBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ep_size: int = 1):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.moe = MoE(
            hidden_size=cfg.d_model, expert=ExpertMLP(cfg.d_model, cfg.d_ff), num_experts=cfg.num_experts,
            ep_size=ep_size, k=cfg.top_k, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0,
            drop_tokens=False, use_rts=False, noisy_gate_policy=None, top2_2nd_expert_sampling=False,
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None):
        x = x + self.attn(self.ln1(x), attn_mask=attn_mask)
        out, aux, counts = self.moe(self.ln2(x))
        return x + out, aux, counts


class ToyMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, ep_size: int = 1):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(f"model.vocab_size={cfg.vocab_size}: resolve it from the tokenizer first")
        self.cfg = cfg
        self.embed = Embeddings(cfg)
        self.layers = nn.ModuleList(MoEBlock(cfg, ep_size) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init_std, cfg.n_layers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None):
        """Causal LM over right-padded ``input_ids`` (batch, seq): (logits, aux_loss, expert_counts)
        where expert_counts has shape (n_layers, num_experts). A packed batch passes each token's
        ``positions`` within its sequence and its ``segments`` id: attention stays inside a
        sequence (padding, id -1, attends only to padding)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        mask = None
        if segments is not None:
            causal = torch.ones(input_ids.shape[1], input_ids.shape[1], dtype=torch.bool,
                                device=input_ids.device).tril()
            mask = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]
        x = self.embed(input_ids, positions)
        aux_total = x.new_zeros(())
        counts = []
        for block in self.layers:
            x, aux, c = block(x, mask)
            aux_total = aux_total + aux
            counts.append(c)
        return self.head(self.ln_f(x)), aux_total, torch.stack(counts)

    def canonical_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies under canonical names (the publish / safetensors format)."""
        return {canonical_name(k): v.detach().to("cpu", copy=True).contiguous()
                for k, v in self.state_dict().items()}

    def load_canonical_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = {canonical_name(k): k for k in self.state_dict()}
        missing = set(own) - set(state)
        unexpected = set(state) - set(own)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match model: missing={sorted(missing)[:5]} "
                             f"unexpected={sorted(unexpected)[:5]}")
        self.load_state_dict({own[k]: v for k, v in state.items()})
