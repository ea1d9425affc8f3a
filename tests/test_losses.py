"""Advantage and loss math against values computed by hand."""

import math

import pytest
import torch

from rlpost.trainer.losses import advantages, grpo_advantages, policy_loss, token_logprobs


def test_grpo_advantages_group_normalised():
    adv = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    expected = 0.5 / math.sqrt(1 / 3)  # mean 0.5, unbiased std sqrt(1/3)
    assert torch.allclose(adv[0], torch.tensor([expected, -expected, -expected, expected]), atol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))  # a uniform group carries no signal
    no_std = grpo_advantages(torch.tensor([[3.0, 1.0]]), std_norm=False)
    assert torch.equal(no_std, torch.tensor([[1.0, -1.0]]))
    with pytest.raises(ValueError, match="groups, group_size"):
        grpo_advantages(torch.tensor([1.0, 2.0]))


def test_rloo_subtracts_the_mean_of_the_other_samples():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    adv = advantages(rewards, "rloo")
    assert torch.allclose(adv[0], torch.tensor([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3]))
    assert torch.allclose(adv[1], torch.tensor([3.0, -1.0, -1.0, -1.0]))  # 3 - 0, 0 - 1
    assert torch.equal(advantages(rewards, "grpo"), grpo_advantages(rewards))
    with pytest.raises(ValueError, match="estimator='gae'"):
        advantages(rewards, "gae")


def test_reinforce_pp_baseline_whitens_group_centred_rewards_over_the_batch_by_tokens():
    """Group mean subtracted, then mean 0 and std 1 over every trained token of the batch: one
    scale for every group, where GRPO's division by each group's std scales up the groups the
    policy nearly always (or never) solves."""
    rewards = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    tokens = torch.tensor([[2.0, 2.0, 2.0, 6.0], [3.0, 3.0, 3.0, 3.0]])
    adv = advantages(rewards, "reinforce_pp_baseline", token_counts=tokens)
    per_token = adv.reshape(-1).repeat_interleave(tokens.reshape(-1).long())
    assert per_token.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert per_token.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    ratio = adv / (centred - (centred * tokens).sum() / tokens.sum())
    assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio))  # one affine map for the whole batch
    grpo_scale = grpo_advantages(rewards)[:, 0] / centred[:, 0]
    assert grpo_scale[0] > grpo_scale[1] * 1.1  # the 3-of-4 group weighs more under GRPO


def _whiten_on_two_ranks(rank: int, store_path: str, rewards, tokens, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)

    def summed(values):
        total = values.clone()
        dist.all_reduce(total)
        return total

    half = rewards.shape[0] // 2
    mine = slice(rank * half, (rank + 1) * half)
    out[rank] = advantages(rewards[mine], "reinforce_pp_baseline", token_counts=tokens[mine], all_reduce=summed)
    dist.destroy_process_group()


def test_reinforce_pp_baseline_over_two_real_ranks_equals_the_whole_batch(tmp_path):
    """Two gloo processes, each holding half the groups, whiten with the batch-wide statistics:
    the same advantages as one process holding all of them (and not what each half gives alone)."""
    import torch.multiprocessing as mp

    gen = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (6, 4), generator=gen).float()
    rewards[:3] *= 2.0  # the two halves have different spreads
    tokens = torch.randint(1, 9, (6, 4), generator=gen).float()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_whiten_on_two_ranks, args=(str(tmp_path / "store"), rewards, tokens, out), nprocs=2)
        both = torch.cat([out[0], out[1]])
    whole = advantages(rewards, "reinforce_pp_baseline", token_counts=tokens)
    assert torch.allclose(both, whole, atol=1e-6)
    alone = advantages(rewards[:3], "reinforce_pp_baseline", token_counts=tokens[:3])
    assert not torch.allclose(alone, whole[:3], atol=1e-3)


def hand_case():
    # row 0 (A=+1): token 0 ratio 1.5 (clipped at 1.28), token 1 ratio 0.5 with IS 4 -> capped 2,
    #               token 2 masked out.  row 1 (A=-1): token 0 ratio 1.5 (unclipped side wins).
    new = torch.tensor([[math.log(1.5), math.log(0.5), -3.0], [math.log(1.5), 0.0, 0.0]], requires_grad=True)
    old = torch.zeros(2, 3)
    behav = torch.tensor([[0.0, math.log(0.25), -1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    return new, old, behav, mask, adv


def test_ppo_clip_with_truncated_is_matches_hand_values():
    new, old, behav, mask, adv = hand_case()
    out = policy_loss(new, old, behav, adv, mask, clip_eps=0.2, clip_eps_high=0.28, tis_cap=2.0)
    # per-token: -1.28 (clipped), 2 * -0.5 (IS capped at 2), +1.5 ; token mean over 3 tokens
    assert out.loss.item() == pytest.approx((-1.28 - 1.0 + 1.5) / 3, abs=1e-6)
    assert out.metrics["clip_frac"] == pytest.approx(1 / 3)
    assert out.metrics["is_weight_mean"] == pytest.approx((1 + 2 + 1) / 3)
    assert out.metrics["is_weight_max"] == pytest.approx(4.0)
    assert out.metrics["is_capped_frac"] == pytest.approx(1 / 3)
    out.loss.backward()
    # d/d new_logp: clipped token has no gradient; token 1: -A * IS * ratio / N = -2*0.5/3;
    # row 1 token 0: -A * ratio / N = 1.5/3; masked tokens: 0.
    expected = torch.tensor([[0.0, -1 / 3, 0.0], [0.5, 0.0, 0.0]])
    assert torch.allclose(new.grad, expected, atol=1e-6)


def test_each_off_policy_correction_matches_hand_values():
    """The hand case under the other corrections (token level): ``mask_stale`` drops the stale
    token and takes the ratio against the behaviour policy, ``ppo`` takes every ratio against
    the behaviour policy with no weight, ``decoupled`` masks the token whose weight (4) exceeds
    the cap instead of truncating it."""
    new, old, behav, mask, adv = hand_case()
    stale = torch.tensor([[False, True, False], [False, False, False]])
    masked = policy_loss(new, old, behav, adv, mask, 0.2, 0.28, 2.0, correction="mask_stale", stale=stale)
    assert masked.loss.item() == pytest.approx((-1.28 + 1.5) / 2, abs=1e-6)
    plain = policy_loss(new, old, behav, adv, mask, 0.2, 0.28, 2.0, correction="ppo")
    # row 0 token 1: ratio 0.5 / 0.25 = 2 against the behaviour policy, clipped at 1.28
    assert plain.loss.item() == pytest.approx((-1.28 - 1.28 + 1.5) / 3, abs=1e-6)
    assert plain.metrics["is_weight_mean"] == 1.0
    decoupled = policy_loss(new, old, behav, adv, mask, 0.2, 0.28, 2.0, correction="decoupled")
    assert decoupled.loss.item() == pytest.approx((-1.28 + 1.5) / 2, abs=1e-6)
    assert decoupled.metrics["is_weight_mean"] == 1.0  # the weight-4 token is out, not capped


def test_dual_clip_caps_the_loss_of_negative_advantages_at_c():
    """clip_ratio_c=3: a token with A = -1 whose ratio is 5 counts 3 (and gets no gradient), one
    with ratio 2 counts 2; a positive advantage with ratio 5 is clipped at 1.28 as before."""
    new = torch.tensor([[math.log(5.0), math.log(2.0)], [math.log(5.0), 0.0]], requires_grad=True)
    zeros, mask = torch.zeros(2, 2), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([-1.0, 1.0])
    plain = policy_loss(new, zeros, zeros, adv, mask, 0.2, 0.28, 2.0)
    assert plain.loss.item() == pytest.approx((5 + 2 - 1.28) / 3, abs=1e-5)
    assert plain.metrics["dual_clip_frac"] == 0.0
    out = policy_loss(new, zeros, zeros, adv, mask, 0.2, 0.28, 2.0, clip_ratio_c=3.0)
    assert out.loss.item() == pytest.approx((3 + 2 - 1.28) / 3, abs=1e-5)
    assert out.metrics["dual_clip_frac"] == pytest.approx(1 / 3)
    assert out.metrics["clip_frac"] == plain.metrics["clip_frac"] == pytest.approx(1 / 3)  # the A > 0 token
    out.loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] == pytest.approx(2 / 3) and new.grad[1, 0] == 0


def test_seq_mean_aggregation():
    new, old, behav, mask, adv = hand_case()
    out = policy_loss(new, old, behav, adv, mask, 0.2, 0.28, 2.0, loss_agg="seq_mean")
    assert out.loss.item() == pytest.approx(((-1.28 - 1.0) / 2 + 1.5) / 2, abs=1e-6)


def test_dr_grpo_sums_tokens_over_a_constant_length():
    """seq_sum_norm: the token sum divided by sequences x the response budget, whatever the
    lengths (token_mean would divide by the 3 tokens, seq_mean average the two sequences)."""
    new, old, behav, mask, adv = hand_case()
    out = policy_loss(new, old, behav, adv, mask, 0.2, 0.28, 2.0, loss_agg="seq_sum_norm", norm_len=5)
    assert out.loss.item() == pytest.approx((-1.28 - 1.0 + 1.5) / (2 * 5), abs=1e-6)
    with pytest.raises(ValueError, match="norm_len >= 1"):
        policy_loss(new, old, behav, adv, mask, 0.2, 0.28, 2.0, loss_agg="seq_sum_norm")


def test_gspo_takes_one_ratio_per_sequence_with_the_gradient_of_that_ratio():
    """ratio_level=sequence: each sequence's ratio is the geometric mean of its tokens', clipped
    whole, and the gradient equals that of GSPO's sequence objective written out directly."""
    new = torch.tensor([[math.log(1.2), math.log(0.9), -3.0], [math.log(0.5), 0.0, 0.0]], requires_grad=True)
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    out = policy_loss(new, old, old, adv, mask, 0.2, 0.28, 2.0, loss_agg="seq_mean", ratio_level="sequence")
    s0 = math.sqrt(1.2 * 0.9)  # row 0: geometric mean 1.039, inside the clip range
    # row 1 (A=-1): ratio 0.5, clipped at 0.8 (the clipped side wins: no gradient)
    assert out.loss.item() == pytest.approx((-s0 + 0.8) / 2, abs=1e-6)
    assert out.metrics["clip_frac"] == pytest.approx(1 / 3)  # row 1's one token
    out.loss.backward()
    direct = new.detach().clone().requires_grad_(True)
    seq_ratio0 = torch.exp((direct[0] * mask[0]).sum() / mask[0].sum())
    (-seq_ratio0 / 2).backward()  # GSPO's objective for the unclipped sequence, mean over 2 sequences
    assert torch.allclose(new.grad, direct.grad, atol=1e-6) and new.grad[0, 0].item() == pytest.approx(-s0 / 4)
    # a tight range clips row 0 as a whole: both its tokens, where token-level ratios (1.2 and
    # 0.9 against 1 +- 0.01) would clip them in different directions
    tight = policy_loss(new, old, old, adv, mask, 0.01, 0.01, 2.0, loss_agg="seq_mean", ratio_level="sequence")
    assert tight.metrics["clip_frac"] == pytest.approx(1.0)
    assert tight.loss.item() == pytest.approx((-1.01 + 0.99) / 2, abs=1e-6)


def test_gspo_off_policy_weight_is_per_sequence():
    """The behaviour correction at sequence level: old/behav is the geometric mean over the
    sequence (4 and 1 -> 2), truncated at tis_cap (tis) or masking the whole sequence (decoupled);
    token level weighs the two tokens 4 -> cap and 1."""
    new = torch.zeros(1, 2, requires_grad=True)
    behav = torch.tensor([[-math.log(4.0), 0.0]])
    mask, adv = torch.ones(1, 2), torch.tensor([1.0])
    seq = {cap: policy_loss(new, new.detach(), behav, adv, mask, 0.2, 0.28, cap, ratio_level="sequence")
           for cap in (1.5, 3.0)}
    assert seq[3.0].metrics["is_weight_mean"] == pytest.approx(2.0) and seq[3.0].loss.item() == pytest.approx(-2.0)
    assert seq[1.5].metrics["is_weight_mean"] == pytest.approx(1.5) and seq[1.5].metrics["is_capped_frac"] == 1.0
    tok = policy_loss(new, new.detach(), behav, adv, mask, 0.2, 0.28, 1.5)
    assert tok.metrics["is_weight_mean"] == pytest.approx((1.5 + 1.0) / 2)
    dropped = policy_loss(new, new.detach(), behav, adv, mask, 0.2, 0.28, 1.5, correction="decoupled",
                          ratio_level="sequence")
    assert dropped.loss.item() == 0.0  # the whole sequence is masked, not just its first token
    kept = policy_loss(new, new.detach(), behav, adv, mask, 0.2, 0.28, 1.5, correction="decoupled")
    assert kept.loss.item() == pytest.approx(-1.0 / 1)  # token level keeps the second token
    with pytest.raises(ValueError, match="ratio_level='tokens'"):
        policy_loss(new, new.detach(), behav, adv, mask, 0.2, 0.28, 1.5, ratio_level="tokens")


def test_is_levels_floor_and_veto_with_token_level_ratios():
    """verl's rollout correction with GRPO's token-level PPO ratio. Two sequences (A=+1, one
    step: new = old), old/behav per token: row 0 (4, 1, 0.5), row 1 (1, 1e-5 as a flipped
    route would give, 1). ``is_level``: token weighs each token alone; geometric weighs every
    token of a row by the row's geometric mean (2^(1/3) for row 0); sequence by the product (2,
    truncated at the cap). ``is_floor`` masks what weighs less than it at that level (IcePop's
    lower bound); ``is_veto`` drops all of row 1 for its one near-impossible token; the same
    rows packed into one (seq_ids) give the same."""
    new = torch.zeros(2, 3, requires_grad=True)
    behav = -torch.log(torch.tensor([[4.0, 1.0, 0.5], [1.0, 1e-5, 1.0]]))
    mask, adv = torch.ones(2, 3), torch.ones(2)

    def loss(**kw):
        return policy_loss(new, new.detach(), behav, adv, mask, 0.2, 0.28, kw.pop("cap", 3.0), **kw)

    token = loss(is_level="token")
    assert token.loss.item() == pytest.approx(-(3 + 1 + 0.5 + 1 + 1e-5 + 1) / 6, rel=1e-5)
    assert loss().loss.item() == pytest.approx(token.loss.item())  # auto = the ratio's level
    geo = loss(is_level="geometric")
    assert geo.loss.item() == pytest.approx(-(3 * 2 ** (1 / 3) + 3 * 1e-5 ** (1 / 3)) / 6, rel=1e-5)
    product = loss(is_level="sequence", cap=1.5)
    assert product.loss.item() == pytest.approx(-(3 * 1.5 + 3 * 1e-5) / 6, rel=1e-5)
    assert product.metrics["is_capped_frac"] == pytest.approx(0.5)
    # floor: token level masks row 0's 0.5 and row 1's 1e-5; sequence level all of row 1
    floored = loss(is_level="token", is_floor=0.6)
    assert floored.loss.item() == pytest.approx(-(3 + 1 + 1 + 1) / 4, rel=1e-5)
    assert floored.metrics["is_floor_frac"] == pytest.approx(2 / 6)
    seq_floor = loss(is_level="sequence", is_floor=0.6)
    assert seq_floor.loss.item() == pytest.approx(-2.0, rel=1e-5) and seq_floor.metrics["is_floor_frac"] == 0.5
    icepop = loss(is_level="token", correction="decoupled", cap=2.0, is_floor=0.6)  # kept: [0.6, 2]
    assert icepop.loss.item() == pytest.approx(-(1 + 1 + 1) / 3, rel=1e-5)
    # veto: row 1 goes whole (its 1.0 tokens too); row 0's 0.5 is above the veto
    veto = loss(is_level="token", is_veto=1e-4)
    assert veto.loss.item() == pytest.approx(-(3 + 1 + 0.5) / 3, rel=1e-5)
    assert veto.metrics["is_veto_frac"] == pytest.approx(0.5) and token.metrics["is_veto_frac"] == 0.0
    # the k3 mismatch estimate is >= 0 and 0 only without a mismatch; ESS 1 for equal weights
    assert token.metrics["mismatch_k3"] > 0 and 0 < token.metrics["is_ess"] < 1
    same = policy_loss(new, new.detach(), new.detach(), adv, mask, 0.2, 0.28, 2.0)
    assert same.metrics["mismatch_k3"] == 0.0 and same.metrics["is_ess"] == pytest.approx(1.0)
    # packed: both sequences in one row, padding after them
    packed = torch.cat([new.detach().reshape(1, 6), torch.zeros(1, 2)], dim=1).requires_grad_(True)
    p_behav = torch.cat([behav.reshape(1, 6), torch.zeros(1, 2)], dim=1)
    p_mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 2)], dim=1)
    seq_ids = torch.tensor([[0, 0, 0, 1, 1, 1, -1, -1]])
    p_adv = torch.ones(1, 8)
    for kw in ({"is_level": "sequence", "is_floor": 0.6}, {"is_level": "geometric"}, {"is_veto": 1e-4}):
        ref = loss(**kw)
        got = policy_loss(packed, packed.detach(), p_behav, p_adv, p_mask, 0.2, 0.28, 3.0, seq_ids=seq_ids, **kw)
        assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5), kw
    with pytest.raises(ValueError, match="is_level='tokens'"):
        loss(is_level="tokens")
    # a long sequence's product of weights (e^100 here) overflows fp32: masked (decoupled) or
    # truncated (tis), never a NaN loss
    long_new = torch.zeros(2, 200, requires_grad=True)
    long_behav = torch.cat([torch.full((1, 200), -0.5), torch.zeros(1, 200)])
    for correction in ("decoupled", "tis"):
        out = policy_loss(long_new, long_new.detach(), long_behav, adv, torch.ones(2, 200), 0.2, 0.28, 3.0,
                          correction=correction, is_level="sequence")
        assert math.isfinite(out.loss.item()) and all(math.isfinite(v) for v in out.metrics.values()), correction
        assert out.loss.item() == pytest.approx(-1.0 if correction == "decoupled" else -(3.0 + 1.0) / 2)


def test_k3_kl_to_reference():
    new = torch.tensor([[math.log(1.5)]])
    zeros = torch.zeros(1, 1)
    out = policy_loss(new, new.detach(), new.detach(), torch.tensor([0.0]), torch.ones(1, 1), 0.2, 0.2, 2.0,
                      ref_logp=zeros, kl_coef=0.5)
    k3 = 1 / 1.5 + math.log(1.5) - 1
    assert out.metrics["kl"] == pytest.approx(k3, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.5 * k3, abs=1e-6)


def test_token_logprobs_uses_temperature():
    logits = torch.tensor([[[2.0, 0.0]]])
    assert token_logprobs(logits, torch.tensor([[0]])).item() == pytest.approx(-math.log1p(math.exp(-2)))
    assert token_logprobs(logits, torch.tensor([[0]]), temperature=2.0).item() == pytest.approx(
        -math.log1p(math.exp(-1)))


def test_length_bucketed_micro_batches_reproduce_the_batch_token_mean():
    """Sorted, trimmed micro-batches weighted by their token share give the whole-batch loss."""
    import numpy as np

    from rlpost.records import SamplingParams, Task, Trajectory
    from rlpost.trainer.batch import collate

    rng = np.random.default_rng(0)
    trajs = []
    for i, n in enumerate([2, 9, 3, 1, 7, 4]):
        t = Trajectory.start(Task(f"t{i}", [1, 5, 6], "x", 1, SamplingParams()), 0)
        t.append(rng.integers(3, 10, n), rng.uniform(-2, 0, n), version=0)
        trajs.append(t)
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0, -0.5, 0.25])
    full = collate(trajs, adv)
    bucketed = collate(trajs, adv, sort_by_length=True)
    assert bucketed.lengths.tolist() == sorted(full.lengths.tolist())

    def loss(b, new_logp):
        return policy_loss(new_logp, b.behav_logp, b.behav_logp, b.advantages, b.mask, 0.2, 0.28, 2.0).loss

    # same per-token values regardless of layout: use the behaviour logprobs as "new" (ratio 1)
    whole = loss(full, full.behav_logp)
    total = 0.0
    for start, end in ((0, 2), (2, 4), (4, 6)):
        mb = bucketed.slice(start, end)
        assert mb.input_ids.shape[1] == int(mb.lengths.max())  # padding trimmed
        total += loss(mb, mb.behav_logp) * float(mb.mask.sum()) / float(bucketed.mask.sum())
    assert float(total) == pytest.approx(float(whole), abs=1e-6)


@pytest.mark.parametrize("agg,level", [("token_mean", "token"), ("seq_mean", "token"),
                                       ("seq_mean", "sequence"), ("token_mean", "sequence"),
                                       ("seq_sum_norm", "token")])
def test_packed_batch_gives_the_padded_batch_loss(agg, level):
    """Packing moves sequences into shared rows; every scored token keeps its target, behaviour
    logprob, version and advantage, and both loss aggregations and both ratio levels (GSPO's
    per-sequence ratios and IS weights) are unchanged."""
    import numpy as np

    from rlpost.records import SamplingParams, Task, Trajectory
    from rlpost.trainer.batch import collate

    rng = np.random.default_rng(1)
    trajs = []
    for i, n in enumerate([2, 19, 3, 1, 7, 4, 11]):
        t = Trajectory.start(Task(f"t{i}", [1, 5, 6][: 1 + i % 3], "x", 1, SamplingParams()), 0)
        t.append(rng.integers(3, 10, n), rng.uniform(-2, 0, n), version=i % 3,
                 experts=rng.integers(0, 4, (n, 2, 2)))  # the engine's routing travels with its token
        trajs.append(t)
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0, -0.5, 0.25, -2.0])
    padded = collate(trajs, adv)
    packed, _ = padded.packed(width=24)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0] and packed.input_ids.shape[1] <= 24
    assert packed.num_tokens == padded.num_tokens and packed.sequences == len(trajs)
    m = packed.mask.bool()
    for s in range(len(trajs)):
        mine = m & (packed.seq_ids == s)
        row = padded.mask[s].bool()
        assert torch.equal(packed.targets[mine], padded.targets[s][row])
        assert torch.equal(packed.behav_logp[mine], padded.behav_logp[s][row])
        assert torch.equal(packed.versions[mine], padded.versions[s][row])
        assert torch.equal(packed.engine_experts[mine], padded.engine_experts[s][row])
        assert torch.equal(padded.engine_experts[s][row], torch.from_numpy(trajs[s].routed_experts))
        assert torch.all(packed.advantages[mine] == adv[s])
        n = int(padded.lengths[s])
        seg = packed.segments == s
        assert torch.equal(packed.input_ids[seg], padded.input_ids[s, :n])
        assert torch.equal(packed.positions[seg], torch.arange(n))

    def loss(b):
        return policy_loss(b.behav_logp * 0.9, b.behav_logp * 0.95, b.behav_logp, b.advantages, b.mask, 0.05,
                           0.08, 1.05, loss_agg=agg, seq_ids=b.seq_ids, ratio_level=level, norm_len=20)

    out_packed, out_padded = loss(packed), loss(padded)
    assert float(out_packed.loss) == pytest.approx(float(out_padded.loss), abs=1e-6)
    for key in ("clip_frac", "is_weight_mean", "is_capped_frac"):  # some clipped, some capped
        assert out_packed.metrics[key] == pytest.approx(out_padded.metrics[key], abs=1e-6)
        assert 0 < out_padded.metrics[key] < 1 or key == "is_weight_mean"


def test_mismatch_meter_counts_tokens_routed_through_another_expert_set():
    """Routing is compared as sets per layer (top-k order is irrelevant), only on on-policy tokens
    whose engine routing is known; a token differs if any layer does."""
    from rlpost.trainer.mismatch import MismatchMeter

    # 1 row, 4 input positions -> 3 scored positions, 2 layers, top-2
    trainer = torch.tensor([[[[0, 1], [2, 3]], [[0, 1], [2, 3]], [[1, 2], [0, 3]], [[0, 0], [0, 0]]]])
    engine = torch.tensor([[[[1, 0], [3, 2]],     # same sets, other order: equal
                            [[0, 1], [2, 1]],     # layer 1 differs
                            [[-1, -1], [-1, -1]]]], dtype=torch.int16)  # unknown: not counted
    logp = torch.zeros(1, 3)
    meter = MismatchMeter()
    meter.add(logp, logp + 0.5, torch.tensor([[True, True, True]]), trainer, engine)
    m = meter.metrics()
    assert m["mismatch/tokens"] == 3 and m["mismatch/logprob_abs_mean"] == 0.5
    assert m["mismatch/routing_tokens"] == 2 and m["mismatch/routing_token_frac"] == 0.5
    assert m["mismatch/routing_layer_frac"] == 0.25
    # off-policy tokens are left out entirely
    meter = MismatchMeter()
    meter.add(logp, logp, torch.tensor([[False, True, False]]), trainer, engine)
    assert meter.metrics()["mismatch/routing_token_frac"] == 1.0
    assert MismatchMeter().metrics() == {}
    # routing of another (layers, top_k) shape (foreign data in the buffer) is counted, not a crash
    meter = MismatchMeter()
    meter.add(logp, logp, torch.tensor([[True, True, False]]), trainer, torch.zeros(1, 3, 3, 1, dtype=torch.int16))
    assert meter.metrics() == {"mismatch/logprob_abs_mean": 0.0, "mismatch/logprob_abs_max": 0.0,
                               "mismatch/tokens": 2, "mismatch/routing_incomparable_tokens": 2}


def test_replay_input_lines_engine_routing_up_with_the_forward_and_is_counted():
    """The forward's replay tensor has one more column than the scored positions (the last
    input token scores nothing: the router's own choice, -1); the meter counts a trained token
    as replayed only if every layer's row is a valid routing."""
    import numpy as np

    from rlpost.config import ModelConfig
    from rlpost.records import SamplingParams, Task, Trajectory
    from rlpost.trainer.batch import collate
    from rlpost.trainer.mismatch import ReplayMeter

    trajs = []
    for i, experts in enumerate([np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]]]), None]):
        t = Trajectory.start(Task(f"t{i}", [5, 6, 7], "x", 1, SamplingParams()), 0)
        t.append([8, 9], [-0.1, -0.2], version=0, experts=experts)
        trajs.append(t)
    batch = collate(trajs, torch.tensor([1.0, -1.0]))
    replay = batch.replay_experts()
    assert replay.shape == (2, 5, 2, 2)
    assert replay[0, 2:4].tolist() == trajs[0].routed_experts.tolist()  # positions 2, 3 sample tokens 3, 4
    assert (replay[0, :2] == -1).all() and (replay[0, 4] == -1).all() and (replay[1] == -1).all()
    meter = ReplayMeter(ModelConfig(num_experts=4, n_layers=2, top_k=2))
    meter.add(batch.mask.bool(), replay)
    assert meter.metrics() == {"replay/token_frac": 0.5}  # sample 1's engine reported no routing
    replay[0, 3, 1] = torch.tensor([3, 3])  # one layer names an expert twice: not replayed
    meter = ReplayMeter(ModelConfig(num_experts=4, n_layers=2, top_k=2))
    meter.add(batch.mask.bool(), replay)
    meter.add(batch.mask.bool(), None)  # a micro-batch with nothing replayed
    assert meter.metrics() == {"replay/token_frac": 1 / 8}


def test_grpo_advantages_refuse_non_finite_rewards_with_a_clear_error():
    with pytest.raises(ValueError, match=r"rewards must be finite, got \[nan\]"):
        grpo_advantages(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


def test_collate_places_every_token_where_the_loss_reads_it():
    """Row i holds prompt + response right-padded; response token k of a prompt of length P is
    scored at position P-1+k with its logprob, version, loss mask (0 for tool observations) and
    routed experts (-1 where a sample has none); a sample with no response scores nothing."""
    import numpy as np

    from rlpost.records import SamplingParams, Task, Trajectory
    from rlpost.trainer.batch import collate

    rng = np.random.default_rng(0)
    trajs = []
    for i in range(40):
        task = Task(task_id=f"t{i}", prompt_ids=list(rng.integers(3, 20, int(rng.integers(1, 6)))), answer="1",
                    group_size=4, sampling=SamplingParams(1.0, 1.0, 12))
        traj = Trajectory.start(task, 0)
        routed = i % 3 != 0
        for turn in range(int(rng.integers(0, 3))):
            n = int(rng.integers(1, 4))
            traj.append(list(rng.integers(3, 20, n)), list(rng.normal(size=n)), version=turn + 1,
                        experts=rng.integers(0, 4, (n, 2, 2)) if routed else None, trainable=turn != 1)
        trajs.append(traj)
    adv = torch.arange(40, dtype=torch.float32)
    batch = collate(trajs, adv, pad_id=99)
    assert batch.input_ids.shape[1] == max(len(t.prompt_ids) + len(t) for t in trajs)
    for row, t in enumerate(trajs):
        p, r = len(t.prompt_ids), len(t)
        ids = batch.input_ids[row].tolist()
        assert ids[:p + r] == t.prompt_ids.tolist() + t.response_ids.tolist() and set(ids[p + r:]) <= {99}
        scored = slice(p - 1, p - 1 + r)
        assert batch.mask[row, scored].tolist() == t.loss_mask.astype(float).tolist()
        assert batch.mask[row].sum() == t.loss_mask.sum()
        assert torch.allclose(batch.behav_logp[row, scored], torch.from_numpy(t.logprobs))
        assert batch.versions[row, scored].tolist() == t.versions.tolist()
        assert (batch.versions[row, :p - 1] == -1).all() and (batch.versions[row, p - 1 + r:] == -1).all()
        want = t.routed_experts if t.routed_experts.size else -np.ones((r, 2, 2))
        assert batch.engine_experts[row, scored].tolist() == want.tolist()
        assert (batch.engine_experts[row, p - 1 + r:] == -1).all()
        assert batch.targets[row, :p + r - 1].tolist() == ids[1:p + r]
    assert batch.lengths.tolist() == [len(t.prompt_ids) + len(t) for t in trajs]
    assert torch.equal(batch.advantages, adv)
    plain = collate([t for i, t in enumerate(trajs) if i % 3 == 0], adv[:14])
    assert plain.engine_experts is None  # no sample carries routing
    # DAPO's overlong filtering: truncated samples keep their rows and advantages, train nothing
    from rlpost.records import Status

    for i, t in enumerate(trajs):
        t.status = Status.TRUNCATED if i % 4 == 1 else Status.COMPLETE
    filtered = collate(trajs, adv, pad_id=99, sort_by_length=True, mask_truncated=True)
    for row in range(len(trajs)):
        t = trajs[int(adv.tolist().index(filtered.advantages[row].item()))]  # rows move when sorted
        want = 0 if t.status == Status.TRUNCATED else t.loss_mask.sum()
        assert filtered.mask[row].sum() == want
    assert filtered.num_tokens == sum(t.loss_mask.sum() for i, t in enumerate(trajs) if i % 4 != 1) > 0


def test_entropy_is_reported_and_a_bonus_raises_it():
    """train/entropy is the masked mean entropy of the sampling distribution; with entropy_coef
    the loss subtracts it, so a gradient step raises the entropy (without it, no gradient flows
    through the entropy at all)."""
    import math

    from rlpost.trainer.losses import scattered_logprobs_and_entropy

    logits = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)  # 2 scored positions
    targets = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    logp, ent = scattered_logprobs_and_entropy(logits, targets, mask, temperature=1.0, entropy_grad=True)
    p = torch.softmax(torch.tensor([4.0, 0, 0, 0]), -1)
    e, lp = ent.detach(), logp.detach()
    assert float(e[0, 2]) == pytest.approx(math.log(4)) and float(e[0, 1]) == 0.0  # uniform: log V; unscored: 0
    assert float(e[0, 0]) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    assert float(lp[0, 2]) == pytest.approx(-math.log(4)) and float(lp[0, 0]) == pytest.approx(float(p[0].log()), rel=1e-5)
    zeros = torch.zeros(1, 3)
    out = policy_loss(logp, logp.detach(), logp.detach(), torch.zeros(1), mask, 0.2, 0.28, 2.0,
                      entropy=ent, entropy_coef=0.1)
    assert out.metrics["entropy"] == pytest.approx(float((e * mask).sum() / 2))
    assert float(out.loss.detach()) == pytest.approx(-0.1 * out.metrics["entropy"])  # zero advantages: only the bonus
    out.loss.backward()
    with torch.no_grad():
        _, after = scattered_logprobs_and_entropy(logits - 1.0 * logits.grad, targets, mask)
    assert float((after * mask).sum()) > float((e * mask).sum())  # the step raised the entropy
    _, reported = scattered_logprobs_and_entropy(logits, targets, mask)
    assert not reported.requires_grad and policy_loss(zeros, zeros, zeros, torch.zeros(1), mask, 0.2, 0.28, 2.0,
                                                     entropy=reported).metrics["entropy"] > 0


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    from rlpost.config import ConfigError, TrainerConfig
    from rlpost.trainer.lr_schedule import lr_at

    const = TrainerConfig(steps=10, lr=1.0)
    assert [lr_at(s, const) for s in (1, 5, 10)] == [1.0, 1.0, 1.0]  # the default: constant, as before
    warm = TrainerConfig(steps=10, lr=1.0, lr_warmup_steps=4, lr_decay="cosine", min_lr_ratio=0.1)
    assert [lr_at(s, warm) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert lr_at(7, warm) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway down the cosine
    assert lr_at(10, warm) == pytest.approx(0.1) and lr_at(12, warm) == pytest.approx(0.1)  # the floor, past the end
    lin = TrainerConfig(steps=10, lr=2.0, lr_decay="linear")
    assert [lr_at(s, lin) for s in (0, 5, 10)] == [2.0, 1.0, 0.0]
    for bad, message in [({"lr_decay": "step"}, "trainer.lr_decay='step': must be constant, linear or cosine"),
                         ({"lr_warmup_steps": 11}, r"trainer.lr_warmup_steps=11: must be in \[0, trainer.steps=10\]"),
                         ({"min_lr_ratio": float("nan")}, r"trainer.min_lr_ratio=nan: must be in \[0, 1\]")]:
        with pytest.raises(ConfigError, match=message):
            TrainerConfig(steps=10, **bad).validate()
