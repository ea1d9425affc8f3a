"""Node-local weights in two shared-memory slots, for rollout workers on the trainer's node.

Why: through Ray's object store every version costs a fresh object (the writer and each reader
fault in its pages again), an actor round trip to publish the reference and one per worker to look
it up: 16-19 ms for 4 MB to four workers on two cores (bench/weight_push.py). Here the trainer
writes each version into one of two files in ``/dev/shm`` that every process keeps mapped, so a
push is one copy in, one copy out per reader, and the version number in Redis: 6 ms.

The protocol: the writer alternates slots, so the slot it overwrites holds the version *before*
the newest, and takes an exclusive ``flock`` on it while writing (header version -1 meanwhile);
a reader takes a shared ``flock`` on the slot holding the version Redis announced, checks the
header again under the lock and lets its engine copy the tensors out (a version overwritten
meanwhile sends it back to Redis for the newer one). Locks are system calls, so the order of the
writes is guaranteed on any CPU, and a slow reader delays the writer by at most one copy of the
version before the newest instead of ever seeing torn weights. Space is reserved up front
(``posix_fallocate``), so a too-small ``/dev/shm`` (Docker's default is 64 MB) is an error at
the first publish, not a SIGBUS in the middle of a copy. Slot files removed while the run goes
on (systemd-logind's RemoveIPC does that when the user's last login session ends) are made again
at the next publish, and readers follow the path to the new files.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import struct
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

MAGIC = b"RLPWSLT1"
_HEADER = struct.Struct("<8sqqq")  # magic, version (-1: being written), table bytes, data offset
_ALIGN = 4096
SHM_ROOT = "/dev/shm"
LOCK_TIMEOUT_S = 120.0  # far beyond one copy of any model's weights


class SlotSpaceError(RuntimeError):
    """The shared-memory filesystem cannot hold the weights."""


class SlotOwnerError(RuntimeError):
    """A slot path that is not a private file of this user."""


class SlotLockTimeout(TimeoutError):
    """A slot stayed locked by another process for longer than anyone should take to copy it."""


class SlotMissingError(RuntimeError):
    """This node has no slots: the reader is not on the trainer's node."""


def slot_base(run: str, root: str = SHM_ROOT) -> str:
    return os.path.join(root, f"rlpost-weights-{run}")


def slot_paths(base: str) -> tuple[str, str]:
    return base + ".0", base + ".1"


def remove_slots(base: str) -> None:
    """Unlink both slots (processes that have them mapped keep their mapping until they close it)."""
    for path in slot_paths(base):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _layout(state: dict[str, torch.Tensor]) -> tuple[bytes, int, int, list[tuple[torch.Tensor, int, int]]]:
    """The table (json: name, dtype, shape, offset from the data start, bytes per tensor), where
    the data starts, the slot's size, and (tensor, absolute offset, bytes) per tensor. Tensors start
    on 64-byte boundaries."""
    entries, rows, offset = [], [], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        rows.append([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offset, nbytes])
        entries.append((tensor, offset, nbytes))
        offset += (nbytes + 63) // 64 * 64
    table = json.dumps(rows).encode()
    data_offset = _round_up(_HEADER.size + len(table))
    return table, data_offset, data_offset + offset, [(t, data_offset + o, b) for t, o, b in entries]


class _Mapping:
    """One slot file, opened and mapped once per process (remapped only if the file grew)."""

    def __init__(self, path: str, writable: bool):
        self.path = path
        self.writable = writable
        flags = (os.O_RDWR | os.O_CREAT if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags, 0o600)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise SlotOwnerError(f"{path} is a symbolic link: refusing to use it as a weight slot") from None
        info = os.fstat(self.fd)
        if info.st_uid != os.geteuid() or info.st_mode & 0o077:
            os.close(self.fd)
            # /dev/shm is shared by every user of the node: a slot someone else made (or can read or
            # write) would let them read the policy or swap in their own weights
            raise SlotOwnerError(f"{path} belongs to uid {info.st_uid} with mode {oct(info.st_mode & 0o777)}: "
                                 f"refusing to use it as a weight slot (it must be ours and private)")
        self.map: mmap.mmap | None = None
        self.size = 0

    def ensure(self, size: int = 0) -> mmap.mmap:
        """The mapping, covering at least ``size`` bytes (the writer grows the file to it)."""
        current = os.fstat(self.fd).st_size
        if self.writable and current < size:
            try:
                os.posix_fallocate(self.fd, 0, size)
            except OSError as exc:
                free = os.statvfs(os.path.dirname(self.path))
                raise SlotSpaceError(
                    f"{os.path.dirname(self.path)} cannot hold the weights: a slot needs {size / 2**20:.1f} MiB "
                    f"(two slots), {free.f_bavail * free.f_frsize / 2**20:.1f} MiB free ({exc.strerror}); "
                    f"grow it (Docker: --shm-size) or use trainer.weight_transport=ray") from None
            current = size
        if self.map is None or self.size != current:
            if current < _HEADER.size:
                raise SlotMissingError(f"{self.path} holds no weights yet")
            self.map = mmap.mmap(self.fd, current, access=mmap.ACCESS_WRITE if self.writable else mmap.ACCESS_READ)
            self.size = current
        return self.map

    def header(self) -> tuple[int, int, int]:
        """(version, table bytes, data offset); version -1 while a write is under way."""
        magic, version, table_len, data_offset = _HEADER.unpack_from(self.ensure(), 0)
        if magic != MAGIC:
            return -1, 0, 0
        return version, table_len, data_offset

    def version(self) -> int:
        """The version the slot holds; -1 while written, or before it ever was."""
        try:
            return self.header()[0]
        except SlotMissingError:
            return -1

    def lock(self, exclusive: bool, timeout_s: float = LOCK_TIMEOUT_S) -> None:
        """flock, waiting at most ``timeout_s``: a process that dies lets go of its locks, but one
        that hangs mid-copy must not hang the trainer's publish (or a worker's load) forever."""
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(self.fd, mode)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SlotLockTimeout(
                        f"{self.path}: {'a reader' if exclusive else 'the writer'} has held this weight slot for "
                        f"over {timeout_s:.0f} s ({'a rollout worker hung while loading weights?' if exclusive else 'the trainer hung while publishing?'})") from None
                time.sleep(0.0005)

    def unlock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def replaced(self) -> bool:
        """Whether the path no longer names the file this process has open: removed (by an
        operator, or systemd-logind's RemoveIPC when the user's last session ends) or removed and
        made again by another writer. Both sides would go on with a file nobody else sees."""
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return True
        held = os.fstat(self.fd)
        return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)

    def close(self) -> None:
        # the mapping itself goes with its last view (closing it under a live view would fail)
        self.map = None
        os.close(self.fd)


class SlotWriter:
    """The trainer's side: ``write(state, version)`` into the slot not holding the newest version."""

    def __init__(self, base: str, lock_timeout_s: float = LOCK_TIMEOUT_S):
        root = os.path.dirname(base)
        if not os.path.isdir(root) or not hasattr(os, "posix_fallocate"):  # e.g. macOS
            raise SlotSpaceError(f"{root} cannot hold the weights: this system has no shared-memory "
                                 f"filesystem there (or no posix_fallocate); use trainer.weight_transport=ray")
        self.base = base
        self.lock_timeout_s = lock_timeout_s
        self._open()

    def _open(self) -> None:
        self._slots = [_Mapping(path, writable=True) for path in slot_paths(self.base)]
        # a restarted trainer goes on from the files as it finds them: overwrite the older slot
        versions = [slot.version() for slot in self._slots]
        self._next = 0 if versions[0] <= versions[1] else 1

    def write(self, state: dict[str, torch.Tensor], version: int) -> None:
        if any(slot.replaced() for slot in self._slots):  # two stat calls: nothing next to a copy
            for slot in self._slots:
                slot.close()
            self._open()  # workers started from now on would find no slots, or someone else's
        table, data_offset, size, entries = _layout(state)
        other = self._slots[self._next ^ 1]
        if other.version() > version:  # left by a crashed run under this name: not ours
            other.lock(exclusive=True, timeout_s=self.lock_timeout_s)
            try:
                _HEADER.pack_into(other.ensure(), 0, MAGIC, -1, 0, 0)
            finally:
                other.unlock()
        slot = self._slots[self._next]
        slot.lock(exclusive=True, timeout_s=self.lock_timeout_s)
        try:
            buf = slot.ensure(size)
            _HEADER.pack_into(buf, 0, MAGIC, -1, len(table), data_offset)
            buf[_HEADER.size:_HEADER.size + len(table)] = table
            with torch.no_grad():
                for tensor, offset, nbytes in entries:
                    if not nbytes:
                        continue
                    src = tensor.detach().reshape(-1).view(torch.uint8)
                    if src.device.type == "cpu":  # memcpy: 58 ms for 400 MB here, copy_ 63
                        np.copyto(np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=offset), src.numpy())
                    else:  # one device-to-host copy, straight into the slot
                        torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset).copy_(src)
            _HEADER.pack_into(buf, 0, MAGIC, version, len(table), data_offset)
        finally:
            slot.unlock()
        self._next ^= 1

    def close(self, unlink: bool = False) -> None:
        for slot in self._slots:
            slot.close()
        if unlink:
            remove_slots(self.base)


class SlotReader:
    """A rollout worker's side: load exactly the version Redis announced through a callback that
    copies the tensors out while the slot is locked against the writer.

    Exactly, not "the newest there": slots outlive a trainer killed without cleaning up, and a run
    resumed from an earlier checkpoint announces an older version than the slots hold; reading the
    newest would load weights the trainer no longer has, under a version it has not reached."""

    def __init__(self, lock_timeout_s: float = LOCK_TIMEOUT_S):
        self.lock_timeout_s = lock_timeout_s
        self._slots: dict[str, _Mapping] = {}
        self._seen: set[str] = set()  # slots of a pair found once: gone now is a removal, not another node

    def _slot(self, path: str) -> _Mapping | None:
        if path not in self._slots:
            try:
                self._slots[path] = _Mapping(path, writable=False)
                self._seen.update(slot_paths(path.rsplit(".", 1)[0]))  # the pair was there
            except FileNotFoundError:
                if path in self._seen:  # removed: the trainer makes it again at its next publish
                    return None
                raise SlotMissingError(
                    f"{path} is not on this node: trainer.weight_transport=shm needs every rollout worker "
                    f"on the trainer's node (use trainer.weight_transport=ray or auto)") from None
        return self._slots[path]

    def versions(self, base: str) -> list[int]:
        """The versions the two slots hold now (-1: being written or empty)."""
        return [slot.version() if (slot := self._slot(path)) is not None else -1 for path in slot_paths(base)]

    def load(self, base: str, version: int, load: Callable[[dict[str, torch.Tensor], int], None]) -> bool:
        """Calls ``load(tensors, version)`` with read-only views of the slot holding ``version``
        (valid only inside the call: copy them out) and returns True; False, without waiting, when
        no slot holds it (the trainer has moved on, or not yet written it): ask Redis again."""
        if self._find(base, version, load):
            return True
        if self._forget_replaced(base):  # the trainer writes to new files: look there
            return self._find(base, version, load)
        return False

    def _forget_replaced(self, base: str) -> bool:
        """Closes the slots whose path now names another file (or none); whether there were any."""
        stale = [path for path in slot_paths(base) if path in self._slots and self._slots[path].replaced()]
        for path in stale:
            self._slots.pop(path).close()
        return bool(stale)

    def _find(self, base: str, version: int, load: Callable[[dict[str, torch.Tensor], int], None]) -> bool:
        for path in slot_paths(base):
            slot = self._slot(path)
            if slot is None or slot.version() != version:
                continue
            slot.lock(exclusive=False, timeout_s=self.lock_timeout_s)
            try:
                held, table_len, data_offset = slot.header()
                if held == version:  # not overwritten between the peek and the lock
                    load(self._views(slot, table_len, data_offset), version)
                    return True
            finally:
                slot.unlock()
        return False

    @staticmethod
    def _views(slot: _Mapping, table_len: int, data_offset: int) -> dict[str, torch.Tensor]:
        buf = slot.map
        table = json.loads(bytes(buf[_HEADER.size:_HEADER.size + table_len]))
        out = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            for name, dtype, shape, offset, nbytes in table:
                kind = getattr(torch, dtype)
                if nbytes == 0:
                    out[name] = torch.empty(shape, dtype=kind)
                    continue
                raw = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=data_offset + offset)
                out[name] = raw.view(kind).reshape(shape)
        return out

    def close(self) -> None:
        for slot in self._slots.values():
            slot.close()
        self._slots.clear()
