"""Your own environment, by import path: ``env.name=package.module:Factory``.

The factory (usually a class) is called as ``Factory(env_cfg, sandbox=sandbox_cfg)`` on the
driver and in every rollout worker, so the module must be importable on every node (installed, or
on ``PYTHONPATH``; with ``ray job submit``, in the working dir). ``env.options`` carries its own
settings (``+env.options.difficulty=3`` on the command line). What it returns must implement
:class:`rlpost.envs.base.Env` (checked here at start-up, with the missing pieces named); its
rewards go through the built-in envs' guard (timeout per sample, finite and inside its
``reward_range``), and ``observe`` (multi-turn tool use) is optional and bounded the same way.
slime's ``--custom-generate-function-path`` / ``--custom-rm-path`` and OpenRLHF's
``--agent_func_path`` fill the same need.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from rlpost.config import ConfigError, EnvConfig, SandboxConfig, is_reward_range

REQUIRED_ATTRIBUTES = ("name", "tokenizer", "reward_range")
# sft_example (warm-up demonstrations) is optional: an env without them runs with warmup.steps=0
REQUIRED_METHODS = ("train_task", "eval_tasks", "max_answer_len", "score")
TOKENIZER_ATTRIBUTES = ("vocab_size", "eos_id", "encode", "decode")


def load_callable(spec: str, key: str, alternatives: str) -> Callable:
    """``package.module:name`` imported now, so a typo fails at start-up with one line naming
    ``key``, not later in a worker (``alternatives``: what else the key accepts)."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{key}={spec!r}: cannot load it ({type(exc).__name__}: {exc}); use {alternatives} "
                          f"importable on every node") from None
    if not callable(fn):
        raise ConfigError(f"{key}={spec!r}: {type(fn).__name__} is not callable")
    return fn


def load_custom_env(cfg: EnvConfig, sandbox: SandboxConfig | None = None) -> Any:
    """The env built by ``cfg.name``'s factory, checked against the Env protocol."""
    spec = cfg.name
    factory = load_callable(spec, "env.name", "one of the built-in envs or package.module:Factory")
    try:
        env = factory(cfg, sandbox=sandbox)
    except ConfigError:
        raise
    except Exception as exc:  # the user's constructor: one line naming it, not their traceback
        raise ConfigError(f"env.name={spec!r}: building it failed ({type(exc).__name__}: {exc})") from None
    check_env(env, spec)
    return env


def check_env(env: Any, spec: str) -> None:
    """One line naming what ``env`` lacks of the Env protocol, or nothing."""
    missing = [a for a in REQUIRED_ATTRIBUTES if not hasattr(env, a)]
    missing += [m for m in REQUIRED_METHODS if not callable(getattr(env, m, None))]
    tokenizer = getattr(env, "tokenizer", None)
    if tokenizer is not None:
        missing += [f"tokenizer.{a}" for a in TOKENIZER_ATTRIBUTES if not hasattr(tokenizer, a)]
    if missing:
        raise ConfigError(f"env.name={spec!r}: the env lacks {', '.join(missing)} (see rlpost/envs/base.py Env)")
    if not is_reward_range(env.reward_range):
        raise ConfigError(f"env.name={spec!r}: reward_range={env.reward_range!r} must be (low, high), finite, "
                          f"low < high")
    for optional in ("observe", "sft_example"):
        if hasattr(env, optional) and not callable(getattr(env, optional)):
            raise ConfigError(f"env.name={spec!r}: {optional} is not callable")
