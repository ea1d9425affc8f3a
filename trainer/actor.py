"""One DeepSpeed rank of the trainer, run as a Ray actor.

It talks to rollout workers only through Redis (complete groups in, versions out) and the weight
publisher. Each rank reads whole GRPO groups from the ``complete`` consumer group, so ranks train
disjoint data; DeepSpeed all-reduces gradients. Items are acked only after the optimiser step, so
a rank that dies mid-step leaves its groups pending for reclaim.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass

import numpy as np
import torch

from rlpost.buffer import Delivery, RedisBuffer
from rlpost.config import RlpostConfig
from rlpost.modeling import save_pretrained
from rlpost.records import Trajectory
from rlpost.rollout_dump import SAMPLES_KEY, trained_rows
from rlpost.scheduler import too_stale
from rlpost.weights import WeightPublisher
from rlpost.trainer.batch import TrainBatch, collate, sft_batch, split_into, token_budget_bins
from rlpost.trainer.ds_engine import LAYOUT_FILE, DistEnv, build_engine, init_distributed
from rlpost.trainer.losses import (advantages, policy_loss, scattered_logprobs,
                                   scattered_logprobs_and_entropy, scored_positions, token_logprobs)
from rlpost.trainer.lr_schedule import lr_at
from rlpost.trainer.mismatch import MismatchMeter, ReplayMeter
from rlpost.modeling import Qwen3MoeForCausalLM
from rlpost.trainer.policy import build_policy


@dataclass
class Collected:
    """What one step's collection read from ``complete``."""

    groups: list[Delivery]  # to train
    stale_restarted: int  # too stale: sent back as tasks
    dropped: list[Delivery]  # uniform rewards: consumed untrained (rollout.filter_uniform_groups)
    # already trained, or a second copy of a group this step holds: acked away. Nonzero after a
    # crash, a reclaim or a lost Redis reply; never trained twice.
    redelivered: int


# model.layers.<l>.mlp.experts.<j>.<proj>.weight (Mixtral: block_sparse_moe): a routed expert's
# parameter, in HF names
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.(?:mlp|block_sparse_moe)\.experts\.)(\d+)(\..+)$")


def tool_use_metrics(trajs: list[Trajectory]) -> dict[str, float]:
    """How often the policy reaches for its tools (tool envs report ``tool_calls`` per sample):
    the figure that shows RL unlearning a teacher's habit of answering without them."""
    calls = [t.env_info.get("tool_calls") for t in trajs]
    calls = [c for c in calls if isinstance(c, int) and not isinstance(c, bool)]
    if not calls:
        return {}
    return {"env/tool_calls_mean": float(np.mean(calls)), "env/tool_use_frac": float(np.mean([c > 0 for c in calls]))}


class TrainerRank:
    def __init__(self, cfg: RlpostConfig, dist_env: DistEnv, buffer_url: str, run: str, run_dir: str,
                 buffer_auth: dict | None = None):
        torch.set_num_threads(cfg.trainer.threads)
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.rank = dist_env.rank
        self.world = dist_env.world_size
        self.device = init_distributed(dist_env)
        self.model = build_policy(cfg.model, ep_size=cfg.trainer.ep_size)
        samples = cfg.rollout.batch_prompts * cfg.rollout.group_size
        self.engine, self.precision, self.accum = build_engine(
            self.model, cfg.trainer, cfg.trainer.lr, samples, self.device, self.world)
        self.buffer = RedisBuffer.from_url(buffer_url, run, **(buffer_auth or {}))
        self.buffer.vocab_size = cfg.model.vocab_size or None
        self.publisher = WeightPublisher(self.buffer, cfg.trainer.weight_transport, run_dir)
        self.run_dir = run_dir
        self.version = 0
        self.ref_model: Qwen3MoeForCausalLM | None = None
        self.consumer = f"trainer-{self.rank}"
        self._own_pending_read = False

    # ------------------------------------------------------------------ weights (expert-parallel aware)
    def _expert_slice(self) -> tuple[int, int]:
        """(first global expert index held here, experts held here). DeepSpeed forms expert-
        parallel groups of consecutive ranks, so rank r holds slice r % ep_size."""
        ep = self.cfg.trainer.ep_size
        local = self.cfg.model.num_experts // ep
        return (self.rank % ep) * local, local

    def canonical_state(self) -> dict[str, torch.Tensor]:
        """All weights under Hugging Face names. With ``trainer.ep_size > 1`` each rank holds only
        its slice of every layer's experts: the slices are renumbered to global expert indices and
        gathered from every rank (a collective: every rank must call this)."""
        local = self.engine.module.canonical_state_dict()
        if self.cfg.trainer.ep_size == 1:
            return local
        import torch.distributed as dist

        first, _ = self._expert_slice()
        shared, mine = {}, {}
        for name, tensor in local.items():
            match = _EXPERT_KEY.match(name)
            if match:
                mine[f"{match[1]}{first + int(match[2])}{match[3]}"] = tensor
            else:
                shared[name] = tensor
        parts: list = [None] * self.world
        dist.all_gather_object(parts, mine)
        for part in parts:
            shared.update(part)
        return shared

    def _local_view(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A full (all experts, HF names) state as this rank's module names it: its expert slice
        renumbered from 0, the other experts left out."""
        if self.cfg.trainer.ep_size == 1:
            return state
        first, count = self._expert_slice()
        out = {}
        for name, tensor in state.items():
            match = _EXPERT_KEY.match(name)
            if match is None:
                out[name] = tensor
            elif first <= int(match[2]) < first + count:
                out[f"{match[1]}{int(match[2]) - first}{match[3]}"] = tensor
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights into the module *and* the optimizer's fp32 master copies: ZeRO-1/2 (and
        the bf16 optimizer) step on their own fp32 partitions and copy them back into the module,
        so loading only the module would be undone by the next step."""
        self.engine.module.load_canonical_state_dict(self._local_view(state))
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()

    def reset_optimizer_state(self) -> None:
        """Forget Adam moments (e.g. the warm-up's), so a run is the same whether its warm-up was
        trained now or loaded from the cache."""
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        inner.state.clear()

    def publish(self) -> dict:
        """Publish the current weights as ``self.version`` (rank 0 publishes; every rank takes part
        in gathering expert slices when the experts are split)."""
        t0 = time.perf_counter()
        state = self.canonical_state()
        if self.rank != 0:
            return {}
        wv = self.publisher.publish(state, self.version)
        return {"weights/version": wv.version, "weights/push_s": time.perf_counter() - t0,
                "weights/bytes": wv.num_bytes}

    def release_weights(self) -> None:
        """At the end of the run: remove the shared-memory weight slots (if this rank has any)."""
        self.publisher.close(unlink=True)

    def save_pretrained(self, path: str) -> None:
        """A Hugging Face checkpoint with every expert (collective: call it on every rank)."""
        state = self.canonical_state()
        if self.rank == 0:
            save_pretrained(state, self.cfg.model, path)

    def layout(self) -> dict:
        """How this rank's DeepSpeed state is partitioned (a checkpoint loads only into the same)."""
        return {"num_ranks": self.world, "ep_size": self.cfg.trainer.ep_size,
                "zero_stage": self.engine.zero_optimization_stage(), "precision": self.precision}

    def save_checkpoint(self, folder: str, tag: str) -> None:
        """DeepSpeed checkpoint (model + optimizer, collective) plus the version counter, and
        the ranks' layout (rank 0), which a resumed run checks before loading."""
        self.engine.save_checkpoint(folder, tag=tag, client_state={"version": self.version})
        if self.rank == 0:
            with open(os.path.join(folder, tag, LAYOUT_FILE), "w") as fh:
                json.dump(self.layout(), fh)

    def load_checkpoint(self, folder: str, tag: str | None = None) -> int:
        _, client = self.engine.load_checkpoint(folder, tag=tag)
        self.version = int((client or {}).get("version", 0))
        return self.version

    def _set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    # ------------------------------------------------------------------ warm-up
    def sft_step(self, examples: list[tuple[list[int], list[int]]], lr: float) -> dict:
        """One supervised step on (prompt, target) pairs; this rank takes its slice, split into
        DeepSpeed's ``accum`` micro-batches so the engine reaches its accumulation boundary."""
        self._set_lr(lr)
        mine = examples[self.rank::self.world]
        self.engine.train()
        nll_sum = aux_sum = 0.0
        for chunk in self._micro_slices(len(mine)):
            input_ids, targets, mask = (t.to(self.device) for t in sft_batch(mine[chunk]))
            logits, aux, _, _ = self.engine(input_ids, logits_at=scored_positions(mask))
            nll = -token_logprobs(logits, targets[mask.bool()]).sum() / mask.sum()
            self.engine.backward(nll + self.cfg.model.aux_loss_coef * aux)
            self.engine.step()
            nll_sum, aux_sum = nll_sum + nll.item(), aux_sum + aux.item()
        return {"sft/loss": nll_sum / self.accum, "sft/aux_loss": aux_sum / self.accum}

    def _micro_slices(self, n: int) -> list[slice]:
        """Exactly ``self.accum`` slices covering ``n`` rows (DeepSpeed steps after that many)."""
        bounds = np.linspace(0, n, self.accum + 1).round().astype(int)
        return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def begin_rl(self) -> None:
        """Switch to the RL learning rate with fresh Adam moments, and freeze the reference policy
        for the KL term."""
        self._set_lr(self.cfg.trainer.lr)
        self.reset_optimizer_state()
        if self.cfg.trainer.kl_coef > 0:
            self.set_reference(self.canonical_state())

    def set_reference(self, state: dict[str, torch.Tensor]) -> None:
        """The frozen KL reference policy, from a full state (all experts, HF names): at the
        start of RL, and again in ranks restarted mid-run (it must stay the policy RL started
        from). A plain model of the same definition, not a copy of the DeepSpeed module (which
        holds process groups that cannot be copied: kl_coef > 0 crashed at the start of RL)."""
        self.ref_model = Qwen3MoeForCausalLM(self.cfg.model).to(self.device).eval()
        self.ref_model.load_canonical_state_dict(state)
        for p in self.ref_model.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ RL step
    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over every trainer rank (batch-wide advantage statistics), on the
        rank's device: NCCL reduces only CUDA tensors."""
        import torch.distributed as dist

        total = values.to(self.device, copy=True)
        dist.all_reduce(total)
        return total.cpu()

    def _collect_groups(self, want: int, timeout_s: float, step: int = 0) -> Collected:
        """Read ``want`` whole, untrained, fresh-enough groups from Redis (blocking).

        Already-trained duplicates, and second copies of a group read in this step, are acked
        away (a sample is never trained twice, whatever Redis delivers); groups with a token more than
        ``rollout.max_staleness`` versions behind the current weights go back as fresh tasks;
        with ``rollout.filter_uniform_groups``, groups whose rewards are all equal are consumed
        without training (the driver submits prompts in their place) until
        ``rollout.filter_max_batches`` x ``want`` of them were dropped in this step."""
        got: list[Delivery] = []
        # a previous life's unfinished step comes first (a rank restarted after dying mid-step)
        pending = [] if self._own_pending_read else self.buffer.read_own_complete(self.consumer, count=want)
        self._own_pending_read = True
        stale_restarted = redelivered = 0
        r = self.cfg.rollout
        bound = r.max_staleness
        drop_budget = math.ceil(r.filter_max_batches * want) if r.filter_uniform_groups else 0
        dropped: list[Delivery] = []
        held: set[str] = set()  # trajectory ids of the groups taken or dropped in this step
        deadline = time.monotonic() + timeout_s
        reclaim = True  # at the start, then whenever a read comes back empty
        while len(got) < want:
            if time.monotonic() > deadline:
                raise TimeoutError(f"trainer rank {self.rank}: {len(got)}/{want} groups after {timeout_s}s")
            fresh = pending or self.buffer.read_complete(self.consumer, want - len(got), block_ms=200)
            pending = []
            if reclaim or not fresh:
                fresh += self.buffer.reclaim("complete", "trainer", self.consumer,
                                             self.cfg.buffer.reclaim_idle_ms, count=want - len(got))
                reclaim = False
            if not fresh:
                continue
            # one round trip for the trained-set check of every group read, one for each outcome
            trained = self.buffer.already_trained([t.traj_id for d in fresh for t in d.item.group])
            duplicates, copies, stale, uniform, at = [], [], [], [], 0
            for d in fresh:
                group = d.item.group
                at += len(group)
                ids = {t.traj_id for t in group}
                if all(trained[at - len(group):at]):
                    duplicates.append(d)
                elif ids & held:
                    copies.append(d)
                elif self.cfg.mode != "sync" and too_stale(_oldest(group), self.version, bound):
                    stale.append(d)  # not held: its prompt comes back, under the same ids, to be trained
                elif len(dropped) + len(uniform) < drop_budget and len({t.reward for t in group}) == 1:
                    uniform.append(d)
                    held |= ids
                else:
                    got.append(d)
                    held |= ids
            self.buffer.ack_trained(duplicates)
            self.buffer.discard_copies(copies)
            self.buffer.requeue(stale)
            self.buffer.ack_filtered(uniform)
            if uniform:  # logged now: a rank that dies before the step ends must not lose the record
                self._log_ids(step, [], [t.traj_id for d in uniform for t in d.item.group])
            stale_restarted += len(stale)
            redelivered += len(duplicates) + len(copies)
            dropped += uniform
        return Collected(got[:want], stale_restarted, dropped, redelivered)

    def train_step(self, step: int, timeout_s: float = 600.0) -> dict:
        t_wait = time.perf_counter()
        want = self.cfg.rollout.batch_prompts // self.world
        collected = self._collect_groups(want, timeout_s, step)
        deliveries = collected.groups
        if self.cfg.mode == "april" and self.rank == 0:
            self.buffer.advance_round()  # the batch is full: workers park what is unfinished
        t0 = time.perf_counter()
        groups: list[list[Trajectory]] = [d.item.group for d in deliveries]
        trajs = [t for g in groups for t in g]
        rewards = torch.tensor([[t.reward for t in g] for g in groups], dtype=torch.float32)
        tokens = torch.tensor([[int(t.loss_mask.sum()) for t in g] for g in groups], dtype=torch.float32)
        adv = advantages(rewards, self.cfg.trainer.advantage, self.cfg.trainer.adv_std_norm, tokens,
                         self._sum_over_ranks if self.world > 1 else None).reshape(-1)
        batch = collate(trajs, adv, sort_by_length=self.accum > 1,
                        mask_truncated=self.cfg.trainer.mask_truncated).to(self.device)
        lr = lr_at(step, self.cfg.trainer)
        self._set_lr(lr)
        metrics = self._optimise(batch)
        metrics["train/lr"] = lr
        self.buffer.ack_trained(deliveries)
        self._log_ids(step, trajs)
        t1 = time.perf_counter()

        trained_version = self.version
        self.version += 1
        if self.version % self.cfg.trainer.publish_every == 0:
            metrics.update(self.publish())
        metrics.update(self._batch_metrics(trajs, rewards, trained_version, batch))
        metrics.update({"advantage/abs_mean": float(adv.abs().mean()), "advantage/max": float(adv.max()),
                        "advantage/min": float(adv.min())})
        metrics.update({
            "step": step,
            "train/step_s": t1 - t0,
            "train/wait_s": t0 - t_wait,
            "train/tokens_per_s": batch.num_tokens / max(t1 - t0, 1e-9),
            "train/samples": len(trajs),
            "staleness/restarted_groups": collected.stale_restarted,
            "filter/dropped_groups": len(collected.dropped),
            "buffer/redelivered_groups": collected.redelivered,
        })
        every = self.cfg.logger.rollouts_every
        if every and step % every == 0:  # the driver decodes and writes them (rlpost/rollout_dump.py)
            metrics[SAMPLES_KEY] = trained_rows(trajs, adv.tolist())
        return metrics

    def _batch_metrics(self, trajs: list[Trajectory], rewards: torch.Tensor, version: int,
                       batch: TrainBatch) -> dict:
        bound = self.cfg.rollout.max_staleness
        trained = batch.mask.bool()
        versions = batch.versions[trained].cpu().numpy()
        lags = version - versions
        lengths = np.array([len(t) for t in trajs])
        resumes = np.array([t.num_resumes for t in trajs])
        out = {
            "reward/mean": float(rewards.mean()),
            # the env's verdict: an overlong penalty lowers the trained reward, not the accuracy
            "reward/accuracy": float(np.mean([t.env_info.get("env_reward", t.reward) >= 1.0 for t in trajs])),
            "reward/overlong_penalty_mean": float(np.mean([t.env_info.get("overlong_penalty", 0.0) for t in trajs])),
            "reward/group_all_same_frac": float((rewards.std(dim=1) == 0).float().mean()),
            "response/len_mean": float(lengths.mean()),
            "response/len_max": int(lengths.max()),
            "response/truncated_frac": float(np.mean([t.status.value == "truncated" for t in trajs])),
            "train/tokens": batch.num_tokens,
            "weights/version_lag_mean": float(lags.mean()) if lags.size else 0.0,
            "weights/version_lag_max": int(lags.max()) if lags.size else 0,
            "offpolicy/token_frac": float((lags > 0).mean()) if lags.size else 0.0,
            "offpolicy/resumes_mean": float(resumes.mean()),
            "offpolicy/resumes_max": int(resumes.max()),
            "offpolicy/resumed_sample_frac": float((resumes > 0).mean()),
        }
        out.update(tool_use_metrics(trajs))
        for k in range(bound + 1):
            out[f"staleness/lag{k}_tokens"] = int((lags == k).sum())
        out[f"staleness/lag{bound + 1}plus_tokens"] = int((lags > bound).sum())
        return out

    def _log_ids(self, step: int, trajs: list[Trajectory], filtered: list[str] | None = None) -> None:
        """Append the trained ids (for audits: nothing lost, nothing trained twice), or the ids
        of groups the uniform-reward filter dropped (``filtered``, with no trained ids)."""
        record = {"step": step, "version": self.version, "ids": [t.traj_id for t in trajs],
                  "lengths": [len(t) for t in trajs], "status": [t.status.value for t in trajs]}
        if filtered:
            record["filtered"] = filtered
        with open(os.path.join(self.run_dir, f"trained_ids.rank{self.rank}.jsonl"), "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def _replay(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """The forward's routing-replay argument for ``batch``: nothing when replay is off or
        the batch carries no engine routing of this model's (moe_layers, top_k) shape (another
        model's routing in the buffer is not replayed; ``replay/token_frac`` shows it)."""
        m = self.cfg.model
        if not self.cfg.trainer.routing_replay or batch.engine_experts is None \
                or tuple(batch.engine_experts.shape[2:]) != (m.moe_layers, m.top_k):
            return {}
        return {"replay_experts": batch.replay_experts()}

    def _proximal_logp(self, batch: TrainBatch, temperature: float) -> torch.Tensor:
        """(B, L-1) logprobs of the current weights, in the step's micro-batches when they go by
        tokens (the whole batch in one forward would defeat the token budget)."""
        if not self.cfg.trainer.max_tokens_per_micro_batch:
            with torch.no_grad():
                logits = self.engine(batch.input_ids, logits_at=scored_positions(batch.mask),
                                     **self._replay(batch)).logits
            return scattered_logprobs(logits, batch.targets, batch.mask, temperature)
        out = torch.zeros_like(batch.behav_logp)
        for rows, _ in self._micro_batches(batch):
            mb = batch.select(rows)
            with torch.no_grad():
                logits = self.engine(mb.input_ids, logits_at=scored_positions(mb.mask), **self._replay(mb)).logits
            index = torch.as_tensor(rows, device=out.device)
            out[index, :mb.mask.shape[1]] = scattered_logprobs(logits, mb.targets, mb.mask, temperature)
        return out

    def _micro_batches(self, batch: TrainBatch) -> list[tuple[list[int], float]]:
        """(rows, weight) of each micro-batch of ``batch``: ``self.accum`` contiguous slices, or
        with ``trainer.max_tokens_per_micro_batch`` bins of at most that many tokens, as many on
        every rank as the rank that needs most (a rank with too few rows runs a copy of its
        shortest one with weight 0: its collectives must still take place)."""
        budget = self.cfg.trainer.max_tokens_per_micro_batch
        if not budget:
            return [(list(range(s.start, s.stop)), 1.0) for s in self._micro_slices(batch.input_ids.shape[0])]
        lengths = batch.lengths.tolist()
        bins = token_budget_bins(lengths, budget)
        count = len(bins)
        if self.world > 1:
            import torch.distributed as dist

            most = torch.tensor([count], device=self.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            count = int(most.item())
        shortest = min(range(len(lengths)), key=lengths.__getitem__)
        return [(rows, 1.0) if rows else ([shortest], 0.0) for rows in split_into(bins, lengths, count)]

    def _optimise(self, batch: TrainBatch) -> dict:
        cfg = self.cfg.trainer
        temperature = self.cfg.rollout.temperature
        self.engine.train()
        sums: dict[str, float] = {}
        counts_total = None
        n_updates = fillers = 0
        mismatch = MismatchMeter()
        replayed = ReplayMeter(self.cfg.model)
        # With several optimiser steps per batch, the proximal policy (the weights before the
        # first step) must be computed up front; with one it equals the current weights.
        prox_all = self._proximal_logp(batch, temperature) if cfg.ppo_minibatches > 1 else None
        rows = np.array_split(np.arange(batch.input_ids.shape[0]), cfg.ppo_minibatches)
        for minibatch in rows:
            mb_all = batch.slice(int(minibatch[0]), int(minibatch[-1]) + 1)
            offset = int(minibatch[0])
            micro = self._micro_batches(mb_all)
            for i, (micro_rows, weight) in enumerate(micro):
                mb = mb_all.select(micro_rows)
                prox = None
                if prox_all is not None:
                    at_rows = torch.as_tensor([offset + r for r in micro_rows], device=prox_all.device)
                    prox = prox_all[at_rows, :mb.mask.shape[1]]
                # DeepSpeed averages the micro-batches; weigh each by its share of the minibatch so
                # the step optimises the minibatch-wide token (or sequence) mean exactly.
                if cfg.loss_agg == "token_mean":
                    share = float(mb.mask.sum()) / max(float(mb_all.mask.sum()), 1.0)
                else:
                    share = mb.input_ids.shape[0] / mb_all.input_ids.shape[0]
                if cfg.pack_sequences:
                    mb, prox = mb.packed(self.cfg.model.max_seq_len, prox)
                at = scored_positions(mb.mask)
                replay = self._replay(mb)
                logits, aux, counts, routed = self.engine(mb.input_ids, **mb.model_inputs(), logits_at=at, **replay)
                new_logp, entropy = scattered_logprobs_and_entropy(logits, mb.targets, mb.mask, temperature,
                                                                   entropy_grad=cfg.entropy_coef > 0)
                ref_logp = None
                if self.ref_model is not None:
                    with torch.no_grad():
                        ref_logits = self.ref_model(mb.input_ids, **mb.model_inputs(), logits_at=at, **replay).logits
                        ref_logp = scattered_logprobs(ref_logits, mb.targets, mb.mask, temperature)
                old_logp = new_logp.detach() if prox is None else prox
                out = policy_loss(new_logp, old_logp, mb.behav_logp, mb.advantages, mb.mask,
                                  cfg.clip_eps, cfg.clip_eps_high, cfg.tis_cap, ref_logp, cfg.kl_coef,
                                  cfg.loss_agg, cfg.off_policy, mb.versions < self.version,
                                  mb.seq_ids, entropy, cfg.entropy_coef, cfg.ratio_level,
                                  self.cfg.rollout.max_new_tokens, cfg.clip_ratio_c,
                                  is_level=cfg.is_level, is_floor=cfg.is_floor, is_veto=cfg.is_veto)
                # DeepSpeed divides by its accumulation steps (self.accum: len(micro) with
                # micro-batches by samples, 1 by tokens, where the count varies per step)
                per_micro = out.loss * share * len(micro) + self.cfg.model.aux_loss_coef * aux
                loss = weight * per_micro * self.accum / len(micro)
                if cfg.max_tokens_per_micro_batch:
                    self.engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
                self.engine.backward(loss)
                self.engine.step()
                if weight == 0:  # a rank's filler micro-batch: its collectives ran, nothing to report
                    fillers += 1
                    continue
                # train-inference mismatch on on-policy tokens (made by the weights being trained)
                mismatch.add(old_logp, mb.behav_logp, mb.mask.bool() & (mb.versions == self.version),
                             routed, mb.engine_experts)
                if cfg.routing_replay:
                    replayed.add(mb.mask.bool(), replay.get("replay_experts"))
                for k, v in {**out.metrics, "loss": per_micro.item(), "aux_loss": aux.item()}.items():
                    sums[k] = sums.get(k, 0.0) + v
                counts_total = counts if counts_total is None else counts_total + counts
                n_updates += 1
        metrics = {f"train/{k}": v / n_updates for k, v in sums.items()}
        metrics["train/micro_batches"] = n_updates + fillers
        metrics["train/filler_micro_batches"] = fillers
        metrics["train/grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        metrics.update(mismatch.metrics())
        metrics.update(replayed.metrics())
        frac = (counts_total.float() / counts_total.sum(dim=-1, keepdim=True)).cpu()
        for sparse in range(frac.shape[0]):  # named by the model's layer index (dense layers have none)
            layer = sparse + self.cfg.model.first_dense_layers
            for e in range(frac.shape[1]):
                metrics[f"moe/layer{layer}_expert{e}_frac"] = float(frac[sparse, e])
        metrics["moe/max_expert_frac"] = float(frac.max())
        return metrics

    def set_version(self, version: int) -> None:
        """After a restart from a checkpoint: continue the version counter past what was already
        published, so workers see newer weights and versions never go backwards."""
        self.version = version

    def where(self) -> dict:
        from rlpost.placement import where

        first, count = self._expert_slice()
        return {**where(), "rank": self.rank, "device": str(self.device), "experts": [first, first + count]}

    def ping(self) -> int:
        return os.getpid()


def _oldest(group: list[Trajectory]) -> int:
    """The oldest policy version of any trainable token in the group."""
    versions = [int(t.versions[t.loss_mask.astype(bool)].min()) for t in group if t.loss_mask.any()]
    return min(versions) if versions else 1 << 30
