"""Reward sources. Each environment turns a task's response into a reward with a reason."""

from __future__ import annotations

from rlpost.config import EnvConfig


def make_env(cfg: EnvConfig):
    """The environment named by ``env.name``."""
    if cfg.name == "arithmetic":
        from rlpost.envs.arithmetic import ArithmeticEnv

        return ArithmeticEnv(cfg)
    if cfg.name == "longtail":
        from rlpost.envs.longtail import LongTailEnv

        return LongTailEnv(cfg)
    raise ValueError(f"env.name={cfg.name!r}: unknown environment (arithmetic, longtail)")
