"""Versioned weight transport between the trainer and rollout workers.

The trainer publishes a canonical state dict with a version number; workers poll the version in
Redis at chunk boundaries (cheap) and fetch the tensors only when it changed. Transports:

* ``ray``: one ``ray.put`` by the trainer, many zero-copy gets by workers on the node. The
  reference is parked in a small named actor (:class:`WeightStore`) so the object stays alive and
  workers can find it without pickling anything through Redis.
* ``file``: safetensors in the run directory (a shared filesystem across nodes).
"""

from __future__ import annotations

import os

import ray
import torch
from safetensors.torch import load_file, save_file

from rlpost.buffer import RedisBuffer
from rlpost.records import WeightVersion


@ray.remote(num_cpus=0)
class WeightStore:
    """Holds the ObjectRef of the latest published weights (and nothing else)."""

    def __init__(self):
        self._version = -1
        self._ref = None

    def put(self, version: int, boxed_ref: list) -> None:
        # The ref arrives inside a list so Ray does not resolve it into a copy of the tensors.
        if version > self._version:
            self._version, self._ref = version, boxed_ref[0]

    def get(self, version: int) -> list:
        if version != self._version:
            raise KeyError(f"weights v{version} not held (latest is v{self._version})")
        return [self._ref]


def store_name(run: str) -> str:
    return f"rlpost-weights-{run}"


class WeightPublisher:
    """Trainer side: publish ``state`` as ``version`` over the configured transport."""

    def __init__(self, buffer: RedisBuffer, transport: str, run_dir: str):
        self.buffer = buffer
        self.transport = transport
        self.run_dir = run_dir
        self._store = None

    def publish(self, state: dict[str, torch.Tensor], version: int) -> WeightVersion:
        num_bytes = sum(t.numel() * t.element_size() for t in state.values())
        if self.transport == "ray":
            if self._store is None:
                self._store = ray.get_actor(store_name(self.buffer.run))
            ray.get(self._store.put.remote(version, [ray.put(state)]))
            location = store_name(self.buffer.run)
        elif self.transport == "file":
            folder = os.path.join(self.run_dir, "weights")
            os.makedirs(folder, exist_ok=True)
            location = os.path.join(folder, f"v{version}.safetensors")
            save_file(state, location + ".tmp")
            os.replace(location + ".tmp", location)
        else:
            raise ValueError(f"trainer.weight_transport={self.transport!r}: unknown transport")
        wv = WeightVersion(version=version, transport=self.transport, location=location, num_bytes=num_bytes)
        self.buffer.publish_version(wv)
        return wv


def fetch_weights(wv: WeightVersion) -> dict[str, torch.Tensor]:
    """Worker side: the tensors of a published version."""
    if wv.transport == "ray":
        store = ray.get_actor(wv.location)
        return ray.get(ray.get(store.get.remote(wv.version))[0])
    if wv.transport == "file":
        return load_file(wv.location)
    raise ValueError(f"unknown weight transport {wv.transport!r} for v{wv.version}")
