"""Collate trajectories into the padded tensors the loss works on.

Position j of every (B, L-1) tensor scores the token at j+1 given the tokens up to j. For a
sample with prompt length P and response length R, response token i sits at j = P-1+i.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rlpost.records import Status, Trajectory


@dataclass
class TrainBatch:
    input_ids: torch.Tensor      # (B, L) prompt + response, right-padded
    targets: torch.Tensor        # (B, L-1) next tokens
    mask: torch.Tensor           # (B, L-1) 1 where a trainable response token is scored
    behav_logp: torch.Tensor     # (B, L-1) behaviour logprobs at those positions
    versions: torch.Tensor       # (B, L-1) policy version of each scored token (-1 elsewhere)
    advantages: torch.Tensor     # (B,), or (B, L-1) per token once packed
    lengths: torch.Tensor        # (B,) tokens used in each row
    # Packed batches only (several sequences per row, see :meth:`packed`): each token's position
    # within its own sequence and the sequence it belongs to (-1: padding).
    positions: torch.Tensor | None = None  # (B, L)
    segments: torch.Tensor | None = None   # (B, L)
    num_seqs: int = 0
    # (B, L-1, n_layers, top_k): the experts the engine routed the hidden state at each position
    # through (-1 where it did not report them); None when no sample carries routing.
    engine_experts: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    @property
    def is_packed(self) -> bool:
        return self.segments is not None

    @property
    def seq_ids(self) -> torch.Tensor | None:
        """(B, L-1) for a packed batch: the sequence each scored position belongs to (for
        per-sequence loss means); None when every row is one sequence."""
        return None if self.segments is None else self.segments[:, :-1]

    @property
    def sequences(self) -> int:
        return self.num_seqs if self.is_packed else self.input_ids.shape[0]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the policy's forward for this batch."""
        if not self.is_packed:
            return {}
        return {"positions": self.positions, "segments": self.segments}

    def replay_experts(self) -> torch.Tensor | None:
        """(B, L, n_layers, top_k) routing for the policy's forward under routing replay: the
        engine's experts at every position that scores a token, -1 (the trainer's own router)
        at the last column and wherever the engine did not report them."""
        if self.engine_experts is None:
            return None
        last = self.engine_experts.new_full((self.engine_experts.shape[0], 1, *self.engine_experts.shape[2:]), -1)
        return torch.cat([self.engine_experts, last], dim=1)

    def to(self, device) -> "TrainBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return TrainBatch(**moved)

    def select(self, rows: list[int]) -> "TrainBatch":
        """The given rows (a token-budget micro-batch), padding columns none of them uses trimmed."""
        if self.is_packed:
            raise ValueError("select rows before packing")
        if rows and list(rows) == list(range(rows[0], rows[0] + len(rows))):
            return self.slice(rows[0], rows[0] + len(rows))  # contiguous: views, no copy
        index = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        lengths = self.lengths[index.to(self.lengths.device)]
        width = int(lengths.max())
        experts = None if self.engine_experts is None else self.engine_experts[index, :width - 1]
        return TrainBatch(self.input_ids[index, :width], self.targets[index, :width - 1],
                          self.mask[index, :width - 1], self.behav_logp[index, :width - 1],
                          self.versions[index, :width - 1], self.advantages[index.to(self.advantages.device)],
                          lengths, engine_experts=experts)

    def slice(self, start: int, end: int) -> "TrainBatch":
        """Rows ``start:end``, with the padding columns none of them uses trimmed away: sorted by
        length, the micro-batches of a long-tail batch are mostly short and cost accordingly."""
        width = int(self.lengths[start:end].max())
        experts = None if self.engine_experts is None else self.engine_experts[start:end, :width - 1]
        return TrainBatch(self.input_ids[start:end, :width], self.targets[start:end, :width - 1],
                          self.mask[start:end, :width - 1], self.behav_logp[start:end, :width - 1],
                          self.versions[start:end, :width - 1], self.advantages[start:end],
                          self.lengths[start:end], engine_experts=experts)

    def packed(self, width: int, extra: torch.Tensor | None = None) -> tuple["TrainBatch", torch.Tensor | None]:
        """The same sequences packed into rows of at most ``width`` tokens (first-fit decreasing),
        each attending only within itself and keeping its own positions: a long-tail batch
        otherwise spends most of its FLOPs on padding (slime / verl pack for the same reason).
        ``extra`` is a (B, L-1) per-position tensor (e.g. proximal logprobs) packed alongside."""
        if self.is_packed:
            raise ValueError("batch is already packed")
        lengths = self.lengths.tolist()
        if max(lengths) > width:
            raise ValueError(f"a sequence of {max(lengths)} tokens does not fit pack width {width}")
        bins = token_budget_bins(lengths, width)
        fill = [sum(lengths[r] for r in members) for members in bins]
        rows, cols = len(bins), max(fill)
        dev = self.input_ids.device
        # where each sequence starts: (bin, column offset), then one scatter per tensor
        bin_of = torch.empty(len(lengths), dtype=torch.long)
        start_of = torch.empty(len(lengths), dtype=torch.long)
        for b, members in enumerate(bins):
            at = 0
            for row in members:
                bin_of[row], start_of[row] = b, at
                at += lengths[row]
        bin_of, start_of, n = bin_of.to(dev), start_of.to(dev), self.lengths.to(dev)

        def scatter(src: torch.Tensor, used: torch.Tensor, fill_value, shape) -> torch.Tensor:
            span = torch.arange(src.shape[1], device=dev)
            keep = span[None, :] < used[:, None]
            dst = torch.full(shape, fill_value, dtype=src.dtype, device=dev)
            dst[bin_of[:, None].expand_as(keep)[keep], (start_of[:, None] + span[None, :])[keep]] = src[keep]
            return dst

        seq_ids = torch.arange(len(lengths), device=dev)[:, None].expand_as(self.input_ids)
        positions_src = torch.arange(self.input_ids.shape[1], device=dev)[None, :].expand_as(self.input_ids)
        input_ids = scatter(self.input_ids, n, 0, (rows, cols))
        positions = scatter(positions_src, n, 0, (rows, cols))
        segments = scatter(seq_ids, n, -1, (rows, cols))
        per_pos = [self.targets, self.mask, self.behav_logp, self.versions,
                   self.advantages[:, None].expand_as(self.mask)] + ([extra] if extra is not None else [])
        # a sequence's last position would score the next sequence's first token: the (B, L-1)
        # tensors take only its first n-1 positions (the mask is 0 past them)
        out = [scatter(t, n - 1, -1 if t is self.versions else 0, (rows, cols - 1)) for t in per_pos]
        targets, mask, behav, versions, advantages = out[:5]
        experts = None
        if self.engine_experts is not None:
            experts = scatter(self.engine_experts, n - 1, -1, (rows, cols - 1, *self.engine_experts.shape[2:]))
        packed = TrainBatch(input_ids, targets, mask, behav, versions, advantages, torch.tensor(fill),
                            positions, segments, len(lengths), engine_experts=experts)
        return packed, (out[5] if extra is not None else None)


def collate(trajs: list[Trajectory], advantages: torch.Tensor, pad_id: int = 0,
            sort_by_length: bool = False, mask_truncated: bool = False) -> TrainBatch:
    """Pad ``trajs`` into a batch; ``sort_by_length`` orders rows shortest first (advantages move
    with their rows) so contiguous micro-batches are length buckets. ``mask_truncated`` (DAPO's
    overlong filtering): samples cut at the token budget keep their rows but train no token, so
    an answer that was merely not finished is neither rewarded nor punished for its tokens.

    Vectorised: every field of every trajectory is concatenated once and scattered into the
    padded tensors with one indexed assignment. Row by row, six small tensor copies per
    trajectory cost 6 ms for a 256-sample batch, on the critical path of every step."""
    if sort_by_length:
        order = sorted(range(len(trajs)), key=lambda i: len(trajs[i].prompt_ids) + len(trajs[i]))
        trajs = [trajs[i] for i in order]
        advantages = advantages[torch.tensor(order, dtype=torch.long)]
    b = len(trajs)
    p_len = np.fromiter((len(t.prompt_ids) for t in trajs), dtype=np.int64, count=b)
    r_len = np.fromiter((len(t) for t in trajs), dtype=np.int64, count=b)
    lengths = p_len + r_len
    L = int(lengths.max())
    rows = np.arange(b)
    # prompt token k of row i sits at column k; response token k at column p_len[i] + k, and is
    # scored at position p_len[i] - 1 + k of the (B, L-1) tensors
    p_rows, p_cols = np.repeat(rows, p_len), _within(p_len)
    r_rows, r_cols = np.repeat(rows, r_len), np.repeat(p_len, r_len) + _within(r_len)
    input_ids = np.full((b, L), pad_id, dtype=np.int64)
    input_ids[p_rows, p_cols] = np.concatenate([t.prompt_ids for t in trajs])
    mask = np.zeros((b, L - 1), dtype=np.float32)
    behav = np.zeros((b, L - 1), dtype=np.float32)
    versions = np.full((b, L - 1), -1, dtype=np.int64)
    experts = None
    if r_rows.size:
        input_ids[r_rows, r_cols] = np.concatenate([t.response_ids for t in trajs])
        mask[r_rows, r_cols - 1] = np.concatenate([t.loss_mask for t in trajs])
        if mask_truncated:  # row i is trajs[i]
            mask[np.array([t.status == Status.TRUNCATED for t in trajs])] = 0
        behav[r_rows, r_cols - 1] = np.concatenate([t.logprobs for t in trajs])
        versions[r_rows, r_cols - 1] = np.concatenate([t.versions for t in trajs])
        shapes = {t.routed_experts.shape[1:] for t in trajs if t.routed_experts.size}
        if len(shapes) == 1:
            experts = np.full((b, L - 1, *shapes.pop()), -1, dtype=np.int16)
            routed = np.repeat(np.array([t.routed_experts.size > 0 for t in trajs]), r_len)
            experts[r_rows[routed], r_cols[routed] - 1] = np.concatenate(
                [t.routed_experts for t in trajs if t.routed_experts.size])
    input_ids = torch.from_numpy(input_ids)
    return TrainBatch(input_ids, input_ids[:, 1:].clone(), torch.from_numpy(mask), torch.from_numpy(behav),
                      torch.from_numpy(versions), advantages.float(), torch.from_numpy(lengths),
                      engine_experts=None if experts is None else torch.from_numpy(experts))


def _within(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., counts[0]-1, 0, 1, ..., counts[1]-1, ...: each element's index in its row."""
    starts = np.cumsum(counts) - counts
    return np.arange(int(counts.sum())) - np.repeat(starts, counts)


def token_budget_bins(lengths: list[int], budget: int) -> list[list[int]]:
    """Rows (indices into ``lengths``) in as few bins of at most ``budget`` tokens as first-fit
    decreasing finds; a row longer than the budget gets a bin of its own."""
    bins: list[list[int]] = []
    fill: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        for b, used in enumerate(fill):
            if used + lengths[row] <= budget:
                bins[b].append(row)
                fill[b] += lengths[row]
                break
        else:
            bins.append([row])
            fill.append(lengths[row])
    return bins


def split_into(bins: list[list[int]], lengths: list[int], count: int) -> list[list[int]]:
    """``bins`` made exactly ``count`` (>= len(bins)) by halving the bin with the most tokens among
    those with two rows or more (each half stays within the budget its bin kept), then, when no
    bin can be split, adding empty bins: every rank must run the same number of micro-batches
    (expert-parallel all-to-alls and ZeRO-2's per-backward reductions are collectives)."""
    bins = [list(b) for b in bins]
    if count < len(bins):
        raise ValueError(f"count={count} is fewer than the {len(bins)} bins the rows need")
    while len(bins) < count:
        splittable = [b for b in bins if len(b) > 1]
        if not splittable:
            bins.append([])
            continue
        largest = max(splittable, key=lambda b: sum(lengths[r] for r in b))
        bins.remove(largest)
        ordered = sorted(largest, key=lambda r: -lengths[r])
        halves: tuple[list[int], list[int]] = ([], [])
        for row in ordered:  # longest first into the lighter half
            min(halves, key=lambda h: sum(lengths[r] for r in h)).append(row)
        bins += [halves[0], halves[1]]
    return bins


def sft_batch(examples: list[tuple], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, targets, mask) for supervised warm-up on (prompt, target[, target loss mask])
    examples; a target mask of 0 (tool observations) keeps those tokens out of the loss."""
    L = max(len(ex[0]) + len(ex[1]) for ex in examples)
    b = len(examples)
    input_ids = torch.full((b, L), pad_id, dtype=torch.long)
    mask = torch.zeros((b, L - 1))
    for row, ex in enumerate(examples):
        p, t = ex[0], ex[1]
        target_mask = ex[2] if len(ex) > 2 else [1] * len(t)
        input_ids[row, :len(p) + len(t)] = torch.tensor(list(p) + list(t))
        mask[row, len(p) - 1:len(p) - 1 + len(t)] = torch.tensor(target_mask, dtype=torch.float32)
    return input_ids, input_ids[:, 1:].clone(), mask
