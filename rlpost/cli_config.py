"""Compose the hydra config from ``configs/`` + command-line overrides into a typed RlpostConfig.

hydra's compose API (rather than ``@hydra.main``) lets the driver turn every composition or
validation failure into one line naming the key and the value, instead of a stack trace.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlpost.config import ConfigError, RlpostConfig, register_schema


def config_dir() -> str:
    return str(resources.files("rlpost.configs"))


def _describe(exc: BaseException) -> str:
    """One line for a hydra/omegaconf error: the key and what is wrong with it."""
    seen = exc
    while seen is not None:
        full_key = getattr(seen, "full_key", None)
        msg = getattr(seen, "msg", None) or str(seen)
        if full_key:
            msg = msg.splitlines()[0].strip()
            if "is not in struct" in msg:  # a new key under a free-form dict such as env.options
                msg += f" (add a new key with +{full_key}=VALUE)"
            return f"{full_key}: {msg}"
        seen = seen.__cause__ or seen.__context__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines)[:300] if lines else type(exc).__name__


def _fraction(total: Any, frac: Any) -> int:
    """``${rlpost.fraction:N,f}``: floor(N x f), e.g. DAPO's overlong buffer as a share of the
    response budget, so it follows ``rollout.max_new_tokens`` whatever the experiment sets."""
    try:
        return int(int(total) * float(frac))
    except (TypeError, ValueError):
        raise ValueError(f"rlpost.fraction:{total},{frac}: needs a whole number and a fraction") from None


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schema()
    OmegaConf.register_new_resolver("rlpost.fraction", _fraction, replace=True)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except Exception as exc:  # hydra wraps omegaconf errors in several exception types
        raise ConfigError(_describe(exc)) from None


def load_config(overrides: list[str]) -> RlpostConfig:
    """Compose, convert to dataclasses and validate. Raises ConfigError with a one-line message."""
    node = compose(overrides)
    try:
        cfg: Any = OmegaConf.to_object(node)
    except Exception as exc:
        raise ConfigError(_describe(exc)) from None
    return cfg.validate()


SECRET_MASK = "***"


# keys of env.options whose values are masked (a custom env's API key for a remote verifier)
SECRET_OPTION = re.compile(r"key|token|secret|passw", re.IGNORECASE)


def public(cfg: RlpostConfig) -> RlpostConfig:
    """A copy safe to print, write to config.yaml and send to wandb: the Redis password (and a
    password inside buffer.url) and the values of ``env.options`` keys that name a key, token,
    secret or password replaced by ``***``."""
    import copy

    out = copy.deepcopy(cfg)
    if out.buffer.password:
        out.buffer.password = SECRET_MASK
    if out.buffer.url:
        out.buffer.url = re.sub(r"(://[^:/@]*:)[^@/]*@", rf"\g<1>{SECRET_MASK}@", out.buffer.url)
    out.env.options = {k: (SECRET_MASK if SECRET_OPTION.search(str(k)) else v) for k, v in out.env.options.items()}
    return out


def to_yaml(cfg: RlpostConfig) -> str:
    """The resolved config as YAML, secrets masked (``--cfg`` and the run dir's config.yaml)."""
    return OmegaConf.to_yaml(OmegaConf.structured(public(cfg)))


def env_overrides() -> list[str]:
    """Overrides from RLPOST_OVERRIDES (space separated), handy for ``ray job submit`` wrappers."""
    raw = os.environ.get("RLPOST_OVERRIDES", "").strip()
    return raw.split() if raw else []
