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


@pytest.fixture(scope="session")
def ray_head():
    """One local Ray head that the end-to-end runs join through RAY_ADDRESS, as a run on a
    cluster does: each run saves starting and stopping a Ray of its own (measured: a 4-step run
    26 s alone, 18.5 s joining). Its own ports and temporary dir, so that tests starting other
    Ray clusters, or a plain ray.init(), never find it (tests/ray_nodes.py). The runs that must
    start their own Ray do not take this fixture: the README's local loop, the placement check on
    a machine without GPUs, and the runs whose user modules come through the driver's PYTHONPATH
    (a joined cluster's actors get the head's environment, as on a real cluster, where such
    modules come with the job's working_dir)."""
    import shutil
    import tempfile

    from ray_nodes import free_port, start_ray_node, stop_ray_node

    temp_dir = tempfile.mkdtemp(prefix="rlpost-ray-", dir="/tmp")  # short: Ray's unix sockets live here
    head, address = start_ray_node(temp_dir, "--head", f"--port={free_port()}", "--num-cpus=16",
                                   "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                                   f"--dashboard-agent-listen-port={free_port()}")
    yield address
    stop_ray_node(head)
    shutil.rmtree(temp_dir, ignore_errors=True)


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
