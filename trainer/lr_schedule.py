"""The RL learning rate per step: linear warm-up, then constant, linear or cosine decay.

What slime (``--lr-warmup-iters``, ``--lr-decay-style``, ``--min-lr``), verl
(``lr_warmup_steps``, ``warmup_style``, ``min_lr_ratio``) and OpenRLHF (``--lr_warmup_ratio``,
cosine to a minimum) users set. A pure function of the step number, so a resumed or restarted
trainer continues the same curve. The decay runs over ``trainer.steps``: a run stopped earlier
by ``time_limit_s`` ends partway down it.
"""

from __future__ import annotations

import math

from rlpost.config import TrainerConfig


def lr_at(step: int, cfg: TrainerConfig) -> float:
    """Learning rate of RL step ``step`` (1-based: the first optimiser step is step 1)."""
    if cfg.lr_warmup_steps and step <= cfg.lr_warmup_steps:
        return cfg.lr * step / cfg.lr_warmup_steps
    if cfg.lr_decay == "constant":
        return cfg.lr
    span = max(cfg.steps - cfg.lr_warmup_steps, 1)
    progress = min(max(step - cfg.lr_warmup_steps, 0) / span, 1.0)
    shape = 1.0 - progress if cfg.lr_decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * shape
