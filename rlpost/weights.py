"""Versioned weight transport between the trainer and rollout workers.

The trainer publishes a canonical state dict with a version number; workers poll the version in
Redis at chunk boundaries (cheap) and fetch the tensors only when it changed. Transports:

* ``ray``: one ``ray.put`` by the trainer, many zero-copy gets by workers on the node. The
  reference is parked in a small named actor (:class:`WeightStore`) so the object stays alive and
  workers can find it without pickling anything through Redis. The tensors travel as a table of
  (name, dtype, shape) plus one uint8 numpy view per tensor: Ray writes numpy buffers into its
  object store out of band (one copy, no pickling of the data; a dict of torch tensors costs a
  pickle per tensor on both sides, and concatenating into one flat buffer first cost a second
  full copy), and a worker's tensors are read-only views of the store's memory that the engine
  copies into its own weights (one copy per worker). bench/weight_push.py measures the path.
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


WireWeights = tuple[list[tuple[str, str, tuple[int, ...]]], list[np.ndarray]]


def to_wire(state: dict[str, torch.Tensor]) -> WireWeights:
    """(name, dtype, shape) per tensor and a uint8 numpy view of each (no copy of CPU tensors)."""
    table, arrays = [], []
    for name, tensor in state.items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        table.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)))
        arrays.append(flat.view(torch.uint8).numpy())
    return table, arrays


def from_wire(wire: WireWeights) -> dict[str, torch.Tensor]:
    """The tensors, as *read-only* views of the arrays (Ray hands out views of its store): a
    consumer copies them into its own weights, as every engine's ``load_weights`` does."""
    import warnings

    table, arrays = wire
    out = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for (name, dtype, shape), raw in zip(table, arrays):
            kind = getattr(torch, dtype)
            if raw.size == 0:  # an empty array has no stride to reinterpret
                out[name] = torch.empty(shape, dtype=kind)
                continue
            out[name] = torch.from_numpy(raw).view(kind).reshape(shape)
    return out


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
            ray.get(_store(location).put.remote(version, [ray.put(to_wire(state))]))
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
        return from_wire(ray.get(ref)), version
    if wv.transport == "file":
        return load_file(wv.location), wv.version
    raise ValueError(f"unknown weight transport {wv.transport!r} for v{wv.version}")
