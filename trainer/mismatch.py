"""Train-inference mismatch on on-policy tokens: how far the engine that sampled a token is from
the trainer's forward pass over the same weights.

Two numbers per step. Logprobs: mean and max of |trainer - engine| (the importance ratio's noise
floor; native stays at fp32 noise, bf16 engines do not). Routing: the share of tokens for which
the engine sent the hidden state through a different expert set than the trainer does in some
layer. MoE RL lives or dies by the second: when the routers disagree the trainer updates experts
the sample never used (Qwen3-30B-A3B runs collapse without routing replay). Only tokens made by
the weights being trained count (older tokens differ because the weights did).
"""

from __future__ import annotations

import torch

from rlpost.config import ModelConfig
from rlpost.modeling import replayable


class MismatchMeter:
    def __init__(self) -> None:
        self.logprob_sum = 0.0
        self.logprob_max = 0.0
        self.tokens = 0
        self.routing_tokens = 0        # on-policy tokens whose engine routing is known
        self.routing_token_diff = 0    # ... routed through another expert set in some layer
        self.routing_pairs = 0         # (token, layer) pairs compared
        self.routing_pair_diff = 0
        self.routing_incomparable = 0  # tokens whose engine routing has another (layers, top_k) shape

    def add(self, trainer_logp: torch.Tensor, engine_logp: torch.Tensor, on_policy: torch.Tensor,
            trainer_experts: torch.Tensor | None = None, engine_experts: torch.Tensor | None = None) -> None:
        """``on_policy`` (B, L-1) selects the tokens; experts are (B, L, n_layers, top_k) for the
        trainer (every input position) and (B, L-1, n_layers, top_k) for the engine (-1: unknown);
        position j routed the hidden state that scored target j."""
        if not bool(on_policy.any()):
            return
        gap = (trainer_logp - engine_logp)[on_policy].abs()
        self.logprob_sum += float(gap.sum())
        self.logprob_max = max(self.logprob_max, float(gap.max()))
        self.tokens += int(on_policy.sum())
        if trainer_experts is None or engine_experts is None:
            return
        if engine_experts.shape[2:] != trainer_experts.shape[2:]:
            # routing of another shape (another model's, or foreign data in the buffer) cannot be
            # compared: counted, never a crash of the training step
            self.routing_incomparable += int(on_policy.sum())
            return
        ours = trainer_experts[:, :engine_experts.shape[1]].sort(dim=-1).values  # the set, not the order
        theirs = engine_experts.to(ours.device, torch.long).sort(dim=-1).values
        known = on_policy & (theirs[..., 0, 0] >= 0)
        if not bool(known.any()):
            return
        differs = (ours != theirs).any(dim=-1)[known]  # (tokens, layers)
        self.routing_tokens += int(known.sum())
        self.routing_token_diff += int(differs.any(dim=-1).sum())
        self.routing_pairs += differs.numel()
        self.routing_pair_diff += int(differs.sum())

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.tokens:
            out.update({"mismatch/logprob_abs_mean": self.logprob_sum / self.tokens,
                        "mismatch/logprob_abs_max": self.logprob_max, "mismatch/tokens": self.tokens})
        if self.routing_tokens:
            out.update({"mismatch/routing_token_frac": self.routing_token_diff / self.routing_tokens,
                        "mismatch/routing_layer_frac": self.routing_pair_diff / self.routing_pairs,
                        "mismatch/routing_tokens": self.routing_tokens})
        if self.routing_incomparable:
            out["mismatch/routing_incomparable_tokens"] = self.routing_incomparable
        return out


class ReplayMeter:
    """Under routing replay: the share of trained tokens whose engine routing was replayed in
    every layer (the rest, e.g. samples from an engine that did not report routing, kept the
    trainer's router). A figure well below 1 means replay is not doing its job."""

    def __init__(self, model_cfg: ModelConfig) -> None:
        self.num_experts = model_cfg.num_experts
        self.tokens = 0
        self.replayed = 0

    def add(self, scored: torch.Tensor, replayed_experts: torch.Tensor | None) -> None:
        """``scored`` (B, L-1) bool; ``replayed_experts`` (B, L, n_layers, top_k), what the
        forward was given (None: nothing replayed)."""
        self.tokens += int(scored.sum())
        if replayed_experts is None or not bool(scored.any()):
            return
        rows = replayed_experts[:, :-1][scored]  # (tokens, n_layers, top_k)
        ok = replayable(rows.reshape(-1, rows.shape[-1]), self.num_experts).view(rows.shape[:2])
        self.replayed += int(ok.all(dim=-1).sum())

    def metrics(self) -> dict[str, float]:
        return {"replay/token_frac": self.replayed / self.tokens} if self.tokens else {}
