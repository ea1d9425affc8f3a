"""Advantages (GRPO, RLOO, REINFORCE++) and the off-policy-corrected PPO-clip policy loss, with
token-level ratios (GRPO/DAPO) or sequence-level ones (GSPO).

Three log-probabilities meet in the loss, per token:

* ``behav``: what the inference engine reported when it sampled the token (any older version);
* ``old`` (the *proximal* policy): the trainer's weights before this optimiser step;
* ``new``: the weights being optimised (carries the gradient).

The PPO ratio ``new/old`` is clipped as usual; the truncated importance weight
``min(old/behav, cap)`` (detached) corrects for the gap between the policy that generated the
tokens and the one being trained: staleness and engine/trainer numerical mismatch. This is
decoupled PPO; with one optimiser step per batch ``old == new`` numerically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlpost.config import ADVANTAGE_ESTIMATORS, IS_LEVELS, LOSS_AGGREGATIONS, OFF_POLICY_CORRECTIONS, RATIO_LEVELS


def grpo_advantages(rewards: torch.Tensor, std_norm: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages for rewards shaped (groups, group_size)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (groups, group_size), got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        bad = rewards[~torch.isfinite(rewards)].tolist()[:4]
        raise ValueError(f"rewards must be finite, got {bad} (NaN advantages would poison the whole group)")
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if std_norm:
        centered = centered / (rewards.std(dim=1, keepdim=True, unbiased=True) + eps)
    return centered


def advantages(rewards: torch.Tensor, estimator: str = "grpo", std_norm: bool = True,
               token_counts: torch.Tensor | None = None,
               all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
               eps: float = 1e-6) -> torch.Tensor:
    """Advantages for rewards shaped (groups, group_size), one per sample:

    * ``grpo``: the group's mean subtracted, divided by its std unless ``std_norm`` is off (Dr. GRPO);
    * ``rloo``: the mean of the *other* samples of the group subtracted (REINFORCE leave-one-out,
      an unbiased baseline: ``n/(n-1)`` x the centred reward);
    * ``reinforce_pp_baseline`` (REINFORCE++ with a group baseline, OpenRLHF's
      ``reinforce_baseline``, slime's ``reinforce_plus_plus_baseline``): the group's mean
      subtracted, then whitened over the whole batch, weighted by ``token_counts`` (every trained
      token counts once, as in a per-token normalisation), across every trainer rank through
      ``all_reduce`` (a sum over ranks; None: this batch alone). No per-group std: a group the
      policy nearly always solves keeps a small advantage instead of a blown-up one."""
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}: must be one of {', '.join(ADVANTAGE_ESTIMATORS)}")
    if estimator == "grpo":
        return grpo_advantages(rewards, std_norm, eps)
    centered = grpo_advantages(rewards, std_norm=False)
    n = rewards.shape[1]
    if estimator == "rloo":
        return centered * n / (n - 1)
    weights = torch.ones_like(centered) if token_counts is None else token_counts.to(centered).reshape(centered.shape)
    stats = torch.stack([weights.sum(), (weights * centered).sum(), (weights * centered.square()).sum()]).double()
    if all_reduce is not None:
        stats = all_reduce(stats)
    total, first, second = stats.tolist()
    mean = first / max(total, 1e-12)
    std = max(second / max(total, 1e-12) - mean * mean, 0.0) ** 0.5
    return (centered - mean) / (std + eps)


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The sampling distribution's log-probabilities (fp32) at ``temperature``."""
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return F.log_softmax(logits.float(), dim=-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) per position, with logits shaped (..., V) and targets (...)."""
    return _log_softmax(logits, temperature).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def scored_positions(mask: torch.Tensor) -> torch.Tensor:
    """The (B, L) ``logits_at`` selection of the policy's forward for a (B, L-1) loss mask:
    position j's logits score the token at j+1."""
    return F.pad(mask.bool(), (0, 1))


def scattered_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """(B, L-1) log p(target) from the (N, V) logits of the N positions where ``mask`` is set
    (a forward with ``logits_at=scored_positions(mask)``); 0 elsewhere, never NaN, so ratios of
    unscored positions stay 1."""
    selected = mask.bool()
    return _scatter(selected, token_logprobs(logits, targets[selected], temperature))


def _scatter(selected: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """(N,) values of the N selected positions as a (B, L-1) tensor, 0 elsewhere."""
    return torch.zeros(selected.shape, dtype=flat.dtype, device=flat.device).masked_scatter(selected, flat)


def scattered_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                                   temperature: float = 1.0,
                                   entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`scattered_logprobs` and, from the same log-softmax, the (B, L-1) entropy of the
    sampling distribution (at ``temperature``) at each scored position: the figure that shows a
    policy collapsing onto one answer (0 elsewhere). The entropy carries a gradient only with
    ``entropy_grad`` (an entropy bonus); otherwise no graph is kept for it."""
    selected = mask.bool()
    logp = _log_softmax(logits, temperature)
    chosen = logp.gather(-1, targets[selected].unsqueeze(-1)).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(logp.exp() * logp).sum(-1)
    return _scatter(selected, chosen), _scatter(selected, entropy)


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor
    metrics: dict[str, float]


def policy_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, behav_logp: torch.Tensor,
                advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float, clip_eps_high: float,
                tis_cap: float, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
                loss_agg: str = "token_mean", correction: str = "tis",
                stale: torch.Tensor | None = None, seq_ids: torch.Tensor | None = None,
                entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
                ratio_level: str = "token", norm_len: int = 0, clip_ratio_c: float = 0.0,
                is_level: str = "auto", is_floor: float = 0.0, is_veto: float = 0.0) -> PolicyLossOutput:
    """PPO-clip (asymmetric clip range) with an off-policy correction, + optional k3 KL, minus
    an optional entropy bonus (``entropy_coef`` x the per-token ``entropy``, which must then
    carry the gradient; without a coefficient it is only reported).

    All tensors are (B, T); ``advantages`` may be (B,) and is broadcast over tokens; ``mask`` is 1
    on trainable tokens (generated, not observations or padding). ``correction``:

    * ``tis``: ratio against the proximal policy, times ``min(old/behav, tis_cap)`` (truncated IS);
    * ``decoupled``: the same ratio, times the untruncated ``old/behav``; tokens whose weight
      exceeds ``tis_cap`` are masked instead of truncated (AReaL's decoupled PPO);
    * ``mask_stale``: tokens marked in ``stale`` (generated before the current policy segment) are
      masked; the rest use the plain PPO ratio against the behaviour policy;
    * ``ppo``: no correction: the ratio is taken against the behaviour policy (the baseline).

    ``ratio_level="sequence"`` is GSPO (Zheng et al., 2025, the objective behind Qwen3's MoE RL):
    both ratios are taken per sequence, as the geometric mean of its tokens' ratios
    ``exp(mean_t log(new/base))``, so one rerouted or unlucky token cannot swing its own ratio and
    a whole sequence is clipped or kept together (GSPO's clip ranges are ~1e-3, not 0.2). The
    gradient is GSPO-token's: every token carries its sequence's ratio as a value and its own
    log-probability's gradient, which with ``seq_mean`` is exactly the gradient of the sequence
    ratio. The off-policy weight ``old/behav`` is likewise a per-sequence geometric mean
    (truncated at, or masked above, ``tis_cap``); ``mask_stale`` drops stale tokens first.

    ``clip_ratio_c`` > 1 is dual-clip PPO (Ye et al., 2020; verl's clip_ratio_c, slime's
    --eps-clip-c): for a negative advantage the clipped objective does not bound the ratio from
    above, so one token made far likelier by the stale behaviour policy (ratio 50) pushes with a
    50x gradient; the loss of such tokens is capped at ``-A x clip_ratio_c`` (no gradient beyond).

    The off-policy weight's level, ``is_level`` (verl's rollout correction levels; ``auto``: the
    ratio's, token or geometric): ``token`` (each token's own ``old/behav``), ``geometric`` (a
    sequence's geometric mean of its tokens' weights, on all of them) or ``sequence`` (the
    product over the sequence: the unbiased sequence-level weight, high-variance, so truncated or
    masked at ``tis_cap`` as the others). ``is_floor`` > 0 masks what weighs less than it (token
    or sequence at that level: IcePop's two-sided mask, [is_floor, tis_cap] with
    ``decoupled``); ``is_veto`` > 0 drops every token of a sequence holding any token whose own
    weight is below it (a token the engine sampled that the trainer finds near-impossible: a
    flipped MoE route, a numerics bug; verl's veto threshold).

    ``loss_agg``: ``token_mean`` (every token weighs the same: DAPO), ``seq_mean`` (every sequence
    weighs the same: GRPO's paper, GSPO) or ``seq_sum_norm`` (Dr. GRPO: the sum over tokens divided
    by the number of sequences x the constant ``norm_len``, the response budget, so neither long
    nor short responses are favoured by the normalisation).

    ``seq_ids`` (B, T) names the sequence of each position when several share a row (a packed
    batch); ``seq_mean`` and the sequence-level ratios then work per sequence, not per row."""
    if correction not in OFF_POLICY_CORRECTIONS:
        raise ValueError(f"correction={correction!r}: must be one of {', '.join(OFF_POLICY_CORRECTIONS)}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level={ratio_level!r}: must be one of {', '.join(RATIO_LEVELS)}")
    if is_level not in IS_LEVELS:
        raise ValueError(f"is_level={is_level!r}: must be one of {', '.join(IS_LEVELS)}")
    per_sequence = ratio_level == "sequence"
    if is_level == "auto":
        is_level = "geometric" if per_sequence else "token"
    mask = mask.float()
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(new_logp)
    if correction == "mask_stale" and stale is not None:
        mask = mask * (~stale.bool()).float()
    token_log_is = (old_logp - behav_logp).detach()
    log_is = token_log_is
    if is_level != "token":
        sums, counts, index = _sequence_sums(token_log_is, mask, seq_ids)
        log_is = (sums if is_level == "sequence" else sums / counts.clamp_min(1))[index]
    # a sequence's product overflows fp32 past e^88 (inf x a masked 0 is NaN): e^+-80 is beyond
    # any cap and floor already
    is_raw = torch.exp(log_is.clamp(-80.0, 80.0))
    trained = mask
    floored = vetoed = torch.zeros_like(mask)
    if correction in ("tis", "decoupled"):
        base = old_logp
        if correction == "tis":
            is_weight = is_raw.clamp(max=tis_cap)
        else:
            is_weight = is_raw
            mask = mask * (is_raw <= tis_cap).float()
        if is_floor > 0:
            floored = trained * (is_raw < is_floor).float()
            mask = mask * (1 - floored)
        if is_veto > 0:
            low = (token_log_is < math.log(is_veto)).float() * trained
            hits, _, index = _sequence_sums(low, trained, seq_ids)
            vetoed = trained * (hits[index] > 0).float()
            mask = mask * (1 - vetoed)
    else:
        base = behav_logp
        is_weight = torch.ones_like(is_raw)
    if per_sequence:
        seq_log_ratio = _sequence_mean((new_logp - base).detach(), mask, seq_ids)
        ratio = torch.exp(seq_log_ratio + new_logp - new_logp.detach())
    else:
        ratio = torch.exp(new_logp - base)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps_high)
    pg = torch.maximum(unclipped, clipped)
    ppo_clipped = (pg - unclipped).abs() > 0
    dual_clipped = torch.zeros_like(pg, dtype=torch.bool)
    if clip_ratio_c > 0:
        cap = -advantages * clip_ratio_c
        dual_clipped = (advantages < 0) & (pg > cap)
        pg = torch.where(dual_clipped, cap, pg)
    per_token = is_weight * pg
    kl = torch.zeros_like(per_token)
    if ref_logp is not None and kl_coef > 0:
        log_r = ref_logp - new_logp
        kl = torch.exp(log_r) - log_r - 1  # k3 estimator: unbiased, always >= 0
        per_token = per_token + kl_coef * kl
    if entropy is not None and entropy_coef > 0:
        per_token = per_token - entropy_coef * entropy
    loss = _aggregate(per_token, mask, loss_agg, seq_ids, norm_len)

    n = mask.sum().clamp_min(1)
    with torch.no_grad():
        n_trained = trained.sum().clamp_min(1)
        kept = is_weight * mask
        # the normalised effective sample size of the kept tokens' weights (1: all equal)
        ess = float(kept.sum() ** 2 / (n * kept.square().sum()).clamp_min(1e-12)) if mask.any() else 0.0
        # k3 estimate of KL(behav || old) from the engine's samples: >= 0 per token, 0 when equal
        log_r = token_log_is.clamp(-20, 20)
        metrics = {
            "clip_frac": float((ppo_clipped.float() * mask).sum() / n),
            "dual_clip_frac": float((dual_clipped.float() * mask).sum() / n),
            "is_weight_mean": float((is_weight * mask).sum() / n),
            "is_weight_max": float(is_raw.masked_fill(mask == 0, 0).max()) if mask.any() else 0.0,
            "is_capped_frac": float(((is_raw > tis_cap).float() * mask).sum() / n),
            "kl": float((kl * mask).sum() / n),
            "approx_kl_behav": float(((old_logp - behav_logp) * mask).sum() / n),
            "mismatch_k3": float(((torch.exp(log_r) - 1 - log_r) * trained).sum() / n_trained),
            "is_ess": ess,
            "is_floor_frac": float(floored.sum() / n_trained),
            "is_veto_frac": float(vetoed.sum() / n_trained),
            "pg_loss": float(_aggregate(is_weight * pg, mask, loss_agg, seq_ids, norm_len)),
        }
        if entropy is not None:
            metrics["entropy"] = float((entropy * mask).sum() / n)
    return PolicyLossOutput(loss, metrics)


def _num_sequences(values: torch.Tensor, seq_ids: torch.Tensor | None) -> int:
    """Sequences in the batch: its rows, or the ``seq_ids`` of a packed one (numbered from 0)."""
    return values.shape[0] if seq_ids is None else int(seq_ids.max()) + 1


def _sequence_sums(values: torch.Tensor, mask: torch.Tensor,
                   seq_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S,) the sum of ``values`` over each sequence's masked positions, (S,) how many there are,
    and the (B, T) index of each position's sequence: its row, or its ``seq_ids`` entry in a
    packed batch (padding, -1, is counted in no sequence)."""
    if seq_ids is None:
        index = torch.arange(values.shape[0], device=values.device)[:, None].expand_as(values)
        return (values * mask).sum(-1), mask.sum(-1), index
    ids = seq_ids.reshape(-1)
    real = ids >= 0
    ids, num_seqs = ids.clamp_min(0), _num_sequences(values, seq_ids)
    sums = values.new_zeros(num_seqs).index_add(0, ids, (values * mask).reshape(-1) * real)
    counts = values.new_zeros(num_seqs).index_add(0, ids, mask.reshape(-1) * real)
    return sums, counts, ids.reshape(values.shape)


def _sequence_means(values: torch.Tensor, mask: torch.Tensor,
                    seq_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) the mean of ``values`` over each sequence's masked positions (0 for a sequence with
    none), and the (B, T) index of each position's sequence (:func:`_sequence_sums`)."""
    sums, counts, index = _sequence_sums(values, mask, seq_ids)
    return sums / counts.clamp_min(1), index


def _sequence_mean(values: torch.Tensor, mask: torch.Tensor, seq_ids: torch.Tensor | None) -> torch.Tensor:
    """(B, T): at every position, the mean of ``values`` over the masked positions of its sequence."""
    means, index = _sequence_means(values, mask, seq_ids)
    return means[index]


def _aggregate(values: torch.Tensor, mask: torch.Tensor, how: str,
               seq_ids: torch.Tensor | None = None, norm_len: int = 0) -> torch.Tensor:
    if how == "token_mean":
        return (values * mask).sum() / mask.sum().clamp_min(1)
    if how == "seq_sum_norm":
        if norm_len < 1:
            raise ValueError(f"loss_agg=seq_sum_norm needs norm_len >= 1 (the response budget), got {norm_len}")
        return (values * mask).sum() / (max(_num_sequences(values, seq_ids), 1) * norm_len)
    if how == "seq_mean":
        return _sequence_means(values, mask, seq_ids)[0].mean()
    raise ValueError(f"loss_agg={how!r}: must be one of {', '.join(LOSS_AGGREGATIONS)}")
