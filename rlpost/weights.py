"""Versioned weight transport between the trainer and rollout workers.

The trainer publishes a canonical state dict with a version number; workers poll the version in
Redis at chunk boundaries (cheap) and fetch the tensors only when it changed. Transports:

* ``ray``: one ``ray.put`` by the trainer, many zero-copy gets by workers on the node. The
  reference is parked in a small named actor (:class:`WeightStore`) so the object stays alive and
  workers can find it without pickling anything through Redis. The tensors travel as one flat
  byte buffer plus a table of (name, dtype, shape, offset): Ray stores numpy buffers without
  pickling them, where a dict of torch tensors costs a pickle per tensor on both sides.
* ``file``: safetensors in the run directory (a shared filesystem across nodes).
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
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
        """[held version, ref] of the newest weights, which may already be newer than the
        ``version`` a worker read from Redis a moment ago (a worker wants the newest anyway)."""
        if version > self._version:
            raise KeyError(f"weights v{version} not published yet (latest is v{self._version})")
        return [self._version, self._ref]


def store_name(run: str) -> str:
    return f"rlpost-weights-{run}"


FlatWeights = tuple[list[tuple[str, str, tuple[int, ...], int, int]], np.ndarray]


def flatten_state(state: dict[str, torch.Tensor]) -> FlatWeights:
    """One contiguous byte buffer holding every tensor, and the table to cut it up again."""
    table, parts, offset = [], [], 0
    for name, tensor in state.items():
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        table.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset, raw.size))
        padding = -raw.size % 64  # every tensor starts aligned, so it can be viewed in place
        parts += [raw, np.zeros(padding, dtype=np.uint8)]
        offset += raw.size + padding
    return table, (np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8))


def unflatten_state(flat: FlatWeights) -> dict[str, torch.Tensor]:
    table, buffer = flat
    data = torch.from_numpy(np.array(buffer, copy=True))  # Ray hands out read-only views
    return {name: data[offset:offset + size].view(getattr(torch, dtype)).reshape(shape)
            for name, dtype, shape, offset, size in table}


@lru_cache(maxsize=8)
def _store(name: str):
    return ray.get_actor(name)


class WeightPublisher:
    """Trainer side: publish ``state`` as ``version`` over the configured transport."""

    def __init__(self, buffer: RedisBuffer, transport: str, run_dir: str):
        self.buffer = buffer
        self.transport = transport
        self.run_dir = run_dir

    def publish(self, state: dict[str, torch.Tensor], version: int) -> WeightVersion:
        num_bytes = sum(t.numel() * t.element_size() for t in state.values())
        if self.transport == "ray":
            location = store_name(self.buffer.run)
            ray.get(_store(location).put.remote(version, [ray.put(flatten_state(state))]))
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


def fetch_weights(wv: WeightVersion) -> tuple[dict[str, torch.Tensor], int]:
    """Worker side: (tensors, version) of ``wv`` or of a newer version published since."""
    if wv.transport == "ray":
        version, ref = ray.get(_store(wv.location).get.remote(wv.version))
        return unflatten_state(ray.get(ref)), version
    if wv.transport == "file":
        return load_file(wv.location), wv.version
    raise ValueError(f"unknown weight transport {wv.transport!r} for v{wv.version}")
