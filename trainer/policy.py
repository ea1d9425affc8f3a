"""The trainer's policy: the shared Qwen3-MoE definition with DeepSpeed's MoE layer as the
sparse block.

Only the block differs from the native engine's model: ``deepspeed.moe.layer.MoE`` holds the
experts (so ``trainer.ep_size`` can split them over ranks) and returns the load-balancing loss and
per-expert token counts, which the trainer adds to its loss and logs; the block also reports
each token's experts (recomputed from the same gate) for the routing-mismatch metric. Its gate is configured to
compute exactly the engine's routing (top-k softmax, no token dropping, no noise, no
second-expert sampling), and :func:`rlpost.modeling.canonical_name` maps its parameter names to
Hugging Face's.

Rollout routing replay (``trainer.routing_replay``, R3): the gate is replaced by
:class:`ReplayTopKGate`, which routes each token through the experts the inference engine used
for it when the forward pass is given them. Without replay a bf16 engine and the fp32 trainer
send some tokens through different experts, and the trainer then updates experts the sample
never used and scores it with a router the engine did not follow.

Routers DeepSpeed's gate does not compute (``model.type=glm4_moe`` and ``deepseek_v3``: sigmoid
scores with a correction bias, expert groups, scaled weights; ``gpt_oss``: a router bias) and softmax top-k for k > 2 (Qwen3-30B-A3B's
top-8; one router for engine and trainer instead of DeepSpeed's ``topkgating``) take the same path as replay with
nothing to replay: :func:`rlpost.modeling.route_tokens` routes, the gate returns DeepSpeed's
sparse-route layout, and DeepSpeed's MoE layer dispatches (and all-to-alls under expert
parallelism) as for its own gate. GLM's and DeepSeek's shared expert is a plain dense SwiGLU next to the MoE
layer (data-parallel, not split over expert-parallel ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from deepspeed.utils import groups
from torch import nn

from rlpost.config import ModelConfig
from rlpost.modeling import (MoEResult, Qwen3MoeForCausalLM, SwiGLUExpert, apply_keeping_fp32_bias, correction_bias,
                             route_tokens, shared_expert)


class ReplayTopKGate(TopKGate):
    """DeepSpeed's top-k gate that can follow given experts.

    With ``self.replay`` unset it is DeepSpeed's gate unchanged. Set to (S, k) expert ids (-1
    rows: unknown), it returns the same sparse-route layout DeepSpeed's MoE layer dispatches
    from (indices, capacity slots, weights, all (k, S)), with the replayed experts and this
    router's probabilities of them as weights (renormalised for k = 2), no token dropped; the
    load-balancing loss and expert counts are DeepSpeed's formulas over the experts used."""

    replay: torch.Tensor | None = None
    own: torch.Tensor | None = None  # after a routed forward: the router's own top-k (S, k)
    model_cfg: ModelConfig  # set by DeepSpeedSparseMoe: which router this is

    @property
    def deepspeed_routes(self) -> bool:
        """DeepSpeed's own gate computes this router (softmax, top-1 or top-2, no bias)."""
        return not self.model_cfg.sigmoid_router and not self.model_cfg.oai_blocks and self.k <= 2

    def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):  # noqa: A002
        if self.replay is None and self.deepspeed_routes:
            return super().forward(input, used_token, sparse_routes, use_tutel)
        if not sparse_routes or use_tutel or used_token is not None:
            raise NotImplementedError("routing replay and rlpost's router need DeepSpeed's sparse-route "
                                      "dispatch (no tutel, no used_token)")
        if groups.mpu is not None:
            raise NotImplementedError("routing replay and rlpost's router with tensor-parallel experts")
        experts, weights, own, probs = route_tokens(input, self.wg.weight, self.model_cfg,
                                                    getattr(self, "e_score_correction_bias", None), self.replay,
                                                    self.wg.bias)
        self.own = own.detach()
        num_experts = probs.shape[-1]
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, experts, True)
        exp_counts = mask.sum(dim=0).detach()
        if self.deepspeed_routes:
            # DeepSpeed's top-1/top-2 balancing loss: mean router probability x share of tokens
            # whose first expert is e (the replayed first expert here)
            first = F.one_hot(experts[:, 0], num_experts).float()
            l_aux = torch.sum(probs.mean(dim=0) * first.mean(dim=0)) * num_experts
        else:
            # DeepSpeed's top-k (and Switch/HF's) loss over all k picks: E / k x sum over experts
            # of mean probability x share of tokens routed there; glm's probabilities are the
            # normalised sigmoid scores (DeepSeek-V3's sequence-wise balance loss, per batch here)
            l_aux = torch.sum(probs.mean(dim=0) * mask.float().mean(dim=0)) * num_experts / self.k
        capacity = exp_counts.max()
        if self.ep_group is not None and dist.get_world_size(group=self.ep_group) > 1:
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        slots = (torch.cumsum(mask, dim=0) - 1).gather(1, experts)  # each (token, expert) pair's slot
        return (l_aux, capacity, num_experts, experts.t().contiguous().to(torch.int32),
                slots.t().contiguous().to(torch.int32), weights.t().contiguous(), exp_counts)


class DeepSpeedSparseMoe(nn.Module):
    def __init__(self, cfg: ModelConfig, ep_size: int = 1):
        super().__init__()
        self.moe = MoE(
            hidden_size=cfg.d_model, expert=SwiGLUExpert(cfg.d_model, cfg.d_ff, cfg.oai_blocks),
            num_experts=cfg.num_experts,
            ep_size=ep_size, k=cfg.top_k, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0,
            drop_tokens=False, use_rts=False, noisy_gate_policy=None, top2_2nd_expert_sampling=False,
        )
        self.k = cfg.top_k
        # the gate DeepSpeed built becomes a ReplayTopKGate in place (same state, parameters and
        # names; no new module, so the random stream and every initial weight are unchanged)
        gate = self.moe.deepspeed_moe.gate
        gate.__class__ = ReplayTopKGate
        gate.model_cfg = cfg
        bias = correction_bias(cfg)
        if bias is not None:  # a buffer: loaded, saved and published, never trained
            gate.register_buffer("e_score_correction_bias", bias)
        if cfg.oai_blocks:  # GPT-OSS's router bias (trained), on DeepSpeed's bias-free gate
            gate.wg.bias = nn.Parameter(torch.zeros(cfg.num_experts, dtype=gate.wg.weight.dtype))
        shared = shared_expert(cfg)
        if shared is not None:
            self.shared_experts = shared

    def _apply(self, fn, *args, **kwargs):
        return apply_keeping_fp32_bias(self, self.moe.deepspeed_moe.gate,
                                       lambda: super(DeepSpeedSparseMoe, self)._apply(fn, *args, **kwargs))

    def forward(self, x: torch.Tensor, replay: torch.Tensor | None = None) -> MoEResult:
        gate = self.moe.deepspeed_moe.gate
        gate.replay = None if replay is None else replay.reshape(-1, self.k)
        try:
            out, aux, counts = self.moe(x)
            own = gate.own
        finally:
            gate.replay = gate.own = None
        if own is None:
            # DeepSpeed's gate does not return its routing; recompute the router's own ids (one
            # small matmul per layer) so the trainer can compare them with the engine's
            with torch.no_grad():
                _, _, own, _ = route_tokens(x.reshape(-1, x.shape[-1]), gate.wg.weight, gate.model_cfg,
                                            gate_bias=gate.wg.bias)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return MoEResult(out, aux, counts, own.view(*x.shape[:-1], self.k))


def build_policy(cfg: ModelConfig, ep_size: int = 1) -> Qwen3MoeForCausalLM:
    """The trainable policy (random init; load a checkpoint with ``load_canonical_state_dict``)."""
    return Qwen3MoeForCausalLM(cfg, moe_factory=lambda c: DeepSpeedSparseMoe(c, ep_size))
