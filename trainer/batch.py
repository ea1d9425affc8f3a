"""Collate trajectories into the padded tensors the loss works on.

Position j of every (B, L-1) tensor scores the token at j+1 given the tokens up to j. For a
sample with prompt length P and response length R, response token i sits at j = P-1+i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlpost.records import Trajectory


@dataclass
class TrainBatch:
    input_ids: torch.Tensor      # (B, L) prompt + response, right-padded
    targets: torch.Tensor        # (B, L-1) next tokens
    mask: torch.Tensor           # (B, L-1) 1 where a trainable response token is scored
    behav_logp: torch.Tensor     # (B, L-1) behaviour logprobs at those positions
    versions: torch.Tensor       # (B, L-1) policy version of each scored token (-1 elsewhere)
    advantages: torch.Tensor     # (B,)
    lengths: torch.Tensor        # (B,) prompt + response length of each row

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return (self.input_ids, self.targets, self.mask, self.behav_logp, self.versions, self.advantages,
                self.lengths)

    def to(self, device) -> "TrainBatch":
        return TrainBatch(*(t.to(device) for t in self._fields()))

    def slice(self, start: int, end: int) -> "TrainBatch":
        """Rows ``start:end``, with the padding columns none of them uses trimmed away: sorted by
        length, the micro-batches of a long-tail batch are mostly short and cost accordingly."""
        width = int(self.lengths[start:end].max())
        return TrainBatch(self.input_ids[start:end, :width], self.targets[start:end, :width - 1],
                          self.mask[start:end, :width - 1], self.behav_logp[start:end, :width - 1],
                          self.versions[start:end, :width - 1], self.advantages[start:end],
                          self.lengths[start:end])


def collate(trajs: list[Trajectory], advantages: torch.Tensor, pad_id: int = 0,
            sort_by_length: bool = False) -> TrainBatch:
    """Pad ``trajs`` into a batch; ``sort_by_length`` orders rows shortest first (advantages move
    with their rows) so contiguous micro-batches are length buckets."""
    if sort_by_length:
        order = sorted(range(len(trajs)), key=lambda i: len(trajs[i].prompt_ids) + len(trajs[i]))
        trajs = [trajs[i] for i in order]
        advantages = advantages[torch.tensor(order, dtype=torch.long)]
    lengths = [len(t.prompt_ids) + len(t) for t in trajs]
    L = max(lengths)
    b = len(trajs)
    input_ids = torch.full((b, L), pad_id, dtype=torch.long)
    mask = torch.zeros((b, L - 1), dtype=torch.float32)
    behav = torch.zeros((b, L - 1), dtype=torch.float32)
    versions = torch.full((b, L - 1), -1, dtype=torch.long)
    for row, t in enumerate(trajs):
        p, r = len(t.prompt_ids), len(t)
        input_ids[row, :p] = torch.from_numpy(t.prompt_ids.astype("int64"))
        if r:
            input_ids[row, p:p + r] = torch.from_numpy(t.response_ids.astype("int64"))
            mask[row, p - 1:p - 1 + r] = torch.from_numpy(t.loss_mask.astype("float32"))
            behav[row, p - 1:p - 1 + r] = torch.from_numpy(t.logprobs.astype("float32"))
            versions[row, p - 1:p - 1 + r] = torch.from_numpy(t.versions.astype("int64"))
    return TrainBatch(input_ids, input_ids[:, 1:].clone(), mask, behav, versions, advantages.float(),
                      torch.tensor(lengths))


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
