"""The trainer's policy: the shared Qwen3-MoE definition with DeepSpeed's MoE layer as the
sparse block.

Only the block differs from the native engine's model: ``deepspeed.moe.layer.MoE`` holds the
experts (so ``trainer.ep_size`` can split them over ranks) and returns the load-balancing loss and
per-expert token counts, which the trainer adds to its loss and logs; the block also reports
each token's experts (recomputed from the same gate) for the routing-mismatch metric. Its gate is configured to
compute exactly the engine's routing (top-k softmax, no token dropping, no noise, no
second-expert sampling), and :func:`rlpost.modeling.canonical_name` maps its parameter names to
Hugging Face's.
"""

from __future__ import annotations

import torch
from deepspeed.moe.layer import MoE
from torch import nn

from rlpost.config import ModelConfig
from rlpost.modeling import MoEResult, Qwen3MoeForCausalLM, SwiGLUExpert, topk_route


class DeepSpeedSparseMoe(nn.Module):
    def __init__(self, cfg: ModelConfig, ep_size: int = 1):
        super().__init__()
        self.moe = MoE(
            hidden_size=cfg.d_model, expert=SwiGLUExpert(cfg.d_model, cfg.d_ff), num_experts=cfg.num_experts,
            ep_size=ep_size, k=cfg.top_k, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0,
            drop_tokens=False, use_rts=False, noisy_gate_policy=None, top2_2nd_expert_sampling=False,
        )
        self.k = cfg.top_k

    def forward(self, x: torch.Tensor) -> MoEResult:
        out, aux, counts = self.moe(x)
        # DeepSpeed does not return its routing; recompute the ids from the same gate (one small
        # matmul per layer) so the trainer can compare them with the engine's routing
        with torch.no_grad():
            experts, _ = topk_route(x.reshape(-1, x.shape[-1]), self.moe.deepspeed_moe.gate.wg.weight, self.k)
        return MoEResult(out, aux, counts, experts.view(*x.shape[:-1], self.k))


def build_policy(cfg: ModelConfig, ep_size: int = 1) -> Qwen3MoeForCausalLM:
    """The trainable policy (random init; load a checkpoint with ``load_canonical_state_dict``)."""
    return Qwen3MoeForCausalLM(cfg, moe_factory=lambda c: DeepSpeedSparseMoe(c, ep_size))
