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
* ``shm``: two slots in ``/dev/shm`` that the trainer and every worker keep mapped
  (rlpost/weight_slots.py): one copy in, one copy out per worker, no Ray call at all. Only for
  workers on the trainer's node. ``auto`` (the default) is ``shm`` when the placement put every
  worker there and ``/dev/shm`` can hold two copies of the weights, else ``ray``.
* ``file``: safetensors in the run directory (a shared filesystem across nodes).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import ray
import torch
from safetensors.torch import load_file, save_file

from rlpost.buffer import RedisBuffer
from rlpost.config import WEIGHT_TRANSPORTS
from rlpost.records import WeightVersion
from rlpost.weight_slots import SlotReader, SlotSpaceError, SlotWriter, slot_base


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
        if transport not in WEIGHT_TRANSPORTS:
            raise ValueError(f"trainer.weight_transport={transport!r}: must be one of {', '.join(WEIGHT_TRANSPORTS)}")
        self.buffer = buffer
        self.transport = transport
        self.run_dir = run_dir
        self._slots: SlotWriter | None = None

    def _write_slots(self, state: dict[str, torch.Tensor], version: int) -> str | None:
        """The slots' base path, or None when ``auto`` finds /dev/shm too small (then ray from now on)."""
        try:
            if self._slots is None:
                self._slots = SlotWriter(slot_base(self.buffer.run))
            self._slots.write(state, version)
        except SlotSpaceError as exc:
            if self.transport == "shm":
                raise
            print(f"rlpost: weights go through Ray's object store: {exc}", file=sys.stderr, flush=True)
            self.close(unlink=True)
            self.transport = "ray"
            return None
        return self._slots.base

    def publish(self, state: dict[str, torch.Tensor], version: int) -> WeightVersion:
        num_bytes = sum(t.numel() * t.element_size() for t in state.values())
        transport = self.transport
        if transport in ("auto", "shm"):
            location = self._write_slots(state, version)
            transport = "shm" if location is not None else "ray"
        if transport == "ray":
            location = store_name(self.buffer.run)
            ray.get(_store(location).put.remote(version, [ray.put(to_wire(state))]))
        elif transport == "file":
            folder = os.path.join(self.run_dir, "weights")
            os.makedirs(folder, exist_ok=True)
            location = os.path.join(folder, f"v{version}.safetensors")
            save_file(state, location + ".tmp")
            os.replace(location + ".tmp", location)
        wv = WeightVersion(version=version, transport=transport, location=location, num_bytes=num_bytes)
        self.buffer.publish_version(wv)
        return wv

    def close(self, unlink: bool = False) -> None:
        """Let go of the shared-memory slots (``unlink``: remove them, at the end of the run)."""
        if self._slots is not None:
            self._slots.close(unlink=unlink)
            self._slots = None


_reader: SlotReader | None = None


def load_published(wv: WeightVersion, load: Callable[[dict[str, torch.Tensor], int], None],
                   refresh: Callable[[], WeightVersion | None] | None = None, timeout_s: float = 60.0) -> int:
    """Worker side: ``load(tensors, version)`` with the weights of ``wv`` or of a newer version
    published since (``refresh`` reads the version record again); returns the version. With
    ``shm`` the tensors are views of the slot, valid only during the call (every engine's
    ``load_weights`` copies them into its own)."""
    global _reader
    deadline = time.monotonic() + timeout_s
    while wv.transport == "shm":
        if _reader is None:
            _reader = SlotReader()
        if _reader.load(wv.location, wv.version, load):
            return wv.version
        if time.monotonic() > deadline:
            raise TimeoutError(f"weights v{wv.version} are not in {wv.location}.{{0,1}} (they hold "
                               f"{_reader.versions(wv.location)}) and no newer version was published "
                               f"within {timeout_s:.0f} s")
        time.sleep(0.001)  # moved on (or a resumed run's first publish is on its way): ask again
        wv = (refresh() if refresh is not None else None) or wv
    state, version = fetch_weights(wv)
    load(state, version)
    return version


def fetch_weights(wv: WeightVersion) -> tuple[dict[str, torch.Tensor], int]:
    """Worker side, for the transports that hand over a copy (``ray``, ``file``): (tensors,
    version) of ``wv`` or of a newer version published since."""
    if wv.transport == "ray":
        version, ref = ray.get(_store(wv.location).get.remote(wv.version))
        return from_wire(ray.get(ref)), version
    if wv.transport == "file":
        return load_file(wv.location), wv.version
    raise ValueError(f"weights v{wv.version}: transport {wv.transport!r} hands over no copy (use load_published)")
