"""Reward sources. Each environment turns a task's response into a reward with a reason."""

from __future__ import annotations

from rlpost.config import EnvConfig, SandboxConfig


def make_env(cfg: EnvConfig, sandbox: SandboxConfig | None = None):
    """The environment named by ``env.name`` (code-running envs get the sandbox settings), or
    the user's own, ``package.module:Factory`` (rlpost/envs/custom.py)."""
    if ":" in cfg.name:
        from rlpost.envs.custom import load_custom_env

        return load_custom_env(cfg, sandbox)
    if cfg.name == "arithmetic":
        from rlpost.envs.arithmetic import ArithmeticEnv

        return ArithmeticEnv(cfg)
    if cfg.name == "longtail":
        from rlpost.envs.longtail import LongTailEnv

        return LongTailEnv(cfg)
    if cfg.name == "coding":
        from rlpost.envs.coding import CodingEnv

        return CodingEnv(cfg, sandbox)
    if cfg.name == "tools":
        from rlpost.envs.tools import ToolEnv

        return ToolEnv(cfg, sandbox)
    if cfg.name == "dataset":
        from rlpost.envs.dataset import DatasetEnv

        return DatasetEnv(cfg, sandbox)
    raise ValueError(f"env.name={cfg.name!r}: unknown environment (arithmetic, longtail, coding, tools, dataset)")
