"""Node-local shared-memory weight slots (rlpost/weight_slots.py): what a reader gets is exactly
one published version, never a mix, and the writer never waits on readers of the newest slot."""

import os
import resource
import signal
import threading
import time

import pytest
import torch

from rlpost.records import WeightVersion
from rlpost.weight_slots import SlotMissingError, SlotReader, SlotSpaceError, SlotWriter, slot_paths
from rlpost.weights import load_published


def _state(fill: float) -> dict[str, torch.Tensor]:
    return {"embed.weight": torch.full((64, 32), fill), "norm.weight": torch.full((5,), fill).to(torch.bfloat16),
            "steps": torch.tensor(int(fill), dtype=torch.int64), "empty": torch.zeros(0, 4)}


def _copy_into(out: dict):
    def load(state, version):
        out.clear()
        out.update({k: v.clone() for k, v in state.items()}, version=version)
    return load


def test_a_reader_gets_exactly_the_version_asked_for_in_every_dtype(tmp_path):
    base = str(tmp_path / "w")
    writer, reader = SlotWriter(base), SlotReader()
    state = {"a": torch.randn(7, 5), "b": torch.randn(3).to(torch.bfloat16),
             "c": torch.randn(2, 3, 4).to(torch.float16), "d": torch.tensor(11), "e": torch.zeros(0, 4)}
    writer.write(_state(1.0), 1)
    writer.write(state, 2)  # the other slot, with another layout
    got: dict = {}
    assert reader.load(base, 1, _copy_into(got)) and got["version"] == 1 and float(got["embed.weight"][0, 0]) == 1.0
    writer.write(_state(3.0), 3)  # overwrites v1's slot
    assert not reader.load(base, 1, _copy_into(got))  # gone: the caller asks Redis for the newest
    assert reader.load(base, 2, _copy_into(got)) and got["version"] == 2
    for name, tensor in state.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape and torch.equal(got[name], tensor)
    assert all(os.path.exists(p) for p in slot_paths(base))
    writer.close(unlink=True)
    assert not any(os.path.exists(p) for p in slot_paths(base))


def test_readers_never_see_a_torn_version_while_the_writer_keeps_publishing(tmp_path):
    base = str(tmp_path / "w")
    writer = SlotWriter(base)
    writer.write(_state(1.0), 1)
    stop, errors, loads = threading.Event(), [], []

    def publish():
        version = 1
        while not stop.is_set():
            version += 1
            writer.write(_state(float(version % 200)), version)  # every value exact in bf16

    def read():
        reader, last = SlotReader(), 1
        while not stop.is_set():
            got: dict = {}
            version = max(reader.versions(base))  # what Redis would announce
            if not reader.load(base, version, _copy_into(got)):
                continue  # overwritten meanwhile
            values = {float(t.float().mean()) for k, t in got.items() if k not in ("version", "empty")}
            if values != {float(version % 200)} or version < last:
                errors.append((version, values))
            last = version
            loads.append(version)

    threads = [threading.Thread(target=publish)] + [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(loads) > 20 and len(set(loads)) > 5


def test_the_writer_waits_only_for_readers_of_the_slot_it_overwrites(tmp_path):
    """A reader copying v1 holds its slot: v2 goes to the other slot at once, v3 (into v1's slot)
    waits until the reader is done, and the reader's copy is v1 unmixed."""
    base = str(tmp_path / "w")
    writer = SlotWriter(base)
    writer.write(_state(1.0), 1)
    inside, release, got = threading.Event(), threading.Event(), {}

    def slow_load(state, version):
        inside.set()
        release.wait(5)
        _copy_into(got)(state, version)

    reader = threading.Thread(target=SlotReader().load, args=(base, 1, slow_load))
    reader.start()
    assert inside.wait(5)
    t0 = time.perf_counter()
    writer.write(_state(2.0), 2)
    assert time.perf_counter() - t0 < 0.2
    timer = threading.Timer(0.5, release.set)
    timer.start()
    t0 = time.perf_counter()
    writer.write(_state(3.0), 3)
    waited = time.perf_counter() - t0
    reader.join()
    assert waited >= 0.4 and got["version"] == 1 and torch.equal(got["embed.weight"], torch.full((64, 32), 1.0))


def test_a_reader_on_another_node_and_a_full_shm_fail_with_what_to_do(tmp_path):
    with pytest.raises(SlotMissingError, match="trainer.weight_transport=shm needs every rollout worker"):
        SlotReader().load(str(tmp_path / "absent"), 1, lambda s, v: None)
    with pytest.raises(SlotMissingError, match="not on this node"):
        load_published(WeightVersion(1, "shm", str(tmp_path / "absent")), lambda s, v: None)
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, previous[1]))  # a 1 MiB /dev/shm, in effect
    try:
        with pytest.raises(SlotSpaceError, match=r"cannot hold the weights: a slot needs 4\.0 MiB.*--shm-size"):
            SlotWriter(str(tmp_path / "w")).write({"w": torch.zeros(1 << 20)}, 1)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, handler)


def test_slots_left_with_newer_versions_by_a_killed_run_are_never_read(tmp_path):
    """A run killed at v7 and resumed from its v2 checkpoint: Redis announces v2 again while the
    slots still hold v6 and v7, weights the trainer no longer has. Workers wait for the resumed
    trainer's v2 instead of loading v7."""
    base = str(tmp_path / "w")
    old = SlotWriter(base)
    for version in range(1, 8):
        old.write(_state(9.0), version)
    old.close()  # killed: the files stay
    announced, got = WeightVersion(2, "shm", base), {}
    assert not SlotReader().load(base, 2, _copy_into(got))
    threading.Timer(0.3, lambda: SlotWriter(base).write(_state(2.0), 2)).start()  # the resumed trainer
    t0 = time.perf_counter()
    assert load_published(announced, _copy_into(got), refresh=lambda: announced) == 2
    assert time.perf_counter() - t0 >= 0.25 and torch.equal(got["embed.weight"], torch.full((64, 32), 2.0))
    assert sorted(SlotReader().versions(base)) == [-1, 2]  # the v7 left over was invalidated


def test_slot_paths_someone_else_prepared_are_refused(tmp_path):
    """/dev/shm is shared by every user of a node: a symlink planted at a slot's path must not make
    the trainer write weights elsewhere, and a slot others can read or write is not used."""
    from rlpost.weight_slots import SlotOwnerError

    target = tmp_path / "victim"
    target.write_text("keep me")
    os.symlink(target, tmp_path / "w.0")
    with pytest.raises(SlotOwnerError, match="symbolic link"):
        SlotWriter(str(tmp_path / "w"))
    assert target.read_text() == "keep me"
    open_slot = tmp_path / "x.0"
    open_slot.write_bytes(b"")
    open_slot.chmod(0o666)
    with pytest.raises(SlotOwnerError, match=r"mode 0o666: refusing"):
        SlotWriter(str(tmp_path / "x"))


def test_a_reader_hung_mid_copy_fails_the_publish_after_the_timeout_instead_of_hanging_it(tmp_path):
    from rlpost.weight_slots import SlotLockTimeout, _Mapping

    base = str(tmp_path / "w")
    writer = SlotWriter(base, lock_timeout_s=0.3)
    writer.write(_state(1.0), 1)
    writer.write(_state(2.0), 2)
    hung = _Mapping(slot_paths(base)[0], writable=False)  # another open file: its own lock
    hung.lock(exclusive=False)  # holds v1's slot, the one v3 must overwrite, and never lets go
    t0 = time.perf_counter()
    with pytest.raises(SlotLockTimeout, match=r"a reader has held this weight slot for over 0 s \(a rollout worker hung"):
        writer.write(_state(3.0), 3)
    assert 0.3 <= time.perf_counter() - t0 < 2
    hung.unlock()
    writer.write(_state(3.0), 3)  # let go: the publish goes through
    got = {}
    assert SlotReader().load(base, 3, _copy_into(got)) and torch.equal(got["embed.weight"], torch.full((64, 32), 3.0))


def test_a_system_without_a_shared_memory_filesystem_is_a_space_error(tmp_path):
    """(macOS has no /dev/shm): ``auto`` then sends weights through Ray instead of failing."""
    with pytest.raises(SlotSpaceError, match="no shared-memory filesystem"):
        SlotWriter(str(tmp_path / "absent-dir" / "w"))


def test_slots_removed_under_a_running_pair_are_made_again_and_found(tmp_path):
    """Slot files removed while the run goes on (an operator, or systemd-logind's RemoveIPC when
    the user's last session ends): the writer and the workers would each go on with a file nobody
    else can open, and a restarted worker would find no slots. The writer makes them again at its
    next publish; readers, old and new, follow to the new files."""
    from rlpost.weight_slots import remove_slots

    base = str(tmp_path / "w")
    writer, reader, got = SlotWriter(base), SlotReader(), {}
    writer.write(_state(1.0), 1)
    assert reader.load(base, 1, _copy_into(got))
    remove_slots(base)
    assert reader.load(base, 1, _copy_into(got))  # the file it holds still has v1
    assert not reader.load(base, 2, _copy_into(got))  # not published yet: no error, ask again
    writer.write(_state(2.0), 2)
    assert all(os.path.exists(p) for p in slot_paths(base))
    assert reader.load(base, 2, _copy_into(got)) and torch.equal(got["embed.weight"], torch.full((64, 32), 2.0))
    assert SlotReader().load(base, 2, _copy_into(got))  # a restarted worker finds them
    # another writer (a trainer restarted after someone cleaned up) makes new files: followed too
    remove_slots(base)
    SlotWriter(base).write(_state(3.0), 3)
    assert reader.load(base, 3, _copy_into(got)) and torch.equal(got["embed.weight"], torch.full((64, 32), 3.0))
    assert sorted(reader.versions(base)) == [-1, 3]
