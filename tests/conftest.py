"""Shared fixtures: a real redis-server (private, unix socket) and per-test run namespaces."""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from rlpost.buffer import RedisBuffer, connect  # noqa: E402
from rlpost.redis_server import start_private_redis  # noqa: E402


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    server = start_private_redis(str(tmp_path_factory.mktemp("redis")))
    yield server.url
    server.stop()


@pytest.fixture
def buffer(redis_url):
    buf = RedisBuffer(connect(redis_url), f"test{uuid.uuid4().hex[:8]}")
    buf.ensure_groups()
    yield buf
    buf.reset()


@pytest.fixture(scope="session")
def small_cfg():
    """A validated config small enough for unit tests."""
    from rlpost.cli_config import load_config
    from rlpost.envs.arithmetic import make_tokenizer

    cfg = load_config(["model.d_model=32", "model.d_ff=64", "model.n_heads=2", "model.n_kv_heads=1", "rollout.batch_prompts=4",
                       "rollout.group_size=4", "trainer.weight_transport=file"])
    cfg.model.vocab_size = make_tokenizer().vocab_size
    return cfg


def pytest_collection_modifyitems(config, items):
    """GPU tests skip themselves on machines without CUDA (CI never has one)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
