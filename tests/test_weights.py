"""Weight transports: the format the ray transport ships (a table + one uint8 view per tensor),
which transport a run uses, and what a worker reads when the trainer has moved on."""

import os

import torch

from rlpost.weights import from_wire, to_wire


def test_flatten_round_trips_every_dtype_and_shape():
    state = {
        "embed.weight": torch.randn(7, 5),
        "head.bias": torch.randn(3).to(torch.bfloat16),
        "moe.gate.weight": torch.randn(2, 3, 4).to(torch.float16),
        "steps": torch.tensor(11, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }
    table, arrays = to_wire(state)
    assert all(a.dtype.itemsize == 1 for a in arrays)
    assert sum(a.size for a in arrays) == sum(t.numel() * t.element_size() for t in state.values())
    assert arrays[0].ctypes.data == state["embed.weight"].data_ptr()  # a view, not a copy
    for a in arrays:
        a.flags.writeable = False  # what ray.get hands out
    back = from_wire((table, arrays))
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor)


def test_a_worker_that_read_an_old_version_gets_the_newest_weights(buffer, tmp_path):
    """The trainer may publish again between a worker reading the version key and fetching:
    the fetch returns the newer weights and says which version they are (no crash)."""
    import ray

    from rlpost.weights import WeightPublisher, WeightStore, fetch_weights, store_name

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        store = WeightStore.options(name=store_name(buffer.run)).remote()  # noqa: F841 (kept alive)
        publisher = WeightPublisher(buffer, "ray", str(tmp_path))
        publisher.publish({"w": torch.zeros(3)}, version=1)
        seen = buffer.current_version()
        publisher.publish({"w": torch.ones(3)}, version=2)
        state, version = fetch_weights(seen)
        assert seen.version == 1 and version == 2 and torch.equal(state["w"], torch.ones(3))
    finally:
        ray.shutdown()


def test_auto_uses_the_shm_slots_and_falls_back_to_ray_when_they_do_not_fit(buffer, tmp_path):
    """auto: weights through /dev/shm (read back by load_published); a /dev/shm too small for the
    weights (here: a 1 MiB file-size limit) switches the run to Ray's object store with one line
    on stderr instead of failing, while an explicit shm fails naming what to do."""
    import resource
    import signal

    import pytest
    import ray

    from rlpost.weight_slots import SlotSpaceError, slot_paths
    from rlpost.weights import WeightPublisher, WeightStore, load_published, store_name

    got = {}

    def keep(state, version):
        got.update({k: v.clone() for k, v in state.items()}, version=version)

    publisher = WeightPublisher(buffer, "auto", str(tmp_path))
    publisher.publish({"w": torch.full((3,), 1.0)}, version=1)
    wv = buffer.current_version()
    assert wv.transport == "shm" and os.path.exists(slot_paths(wv.location)[1])
    assert load_published(wv, keep) == 1 and torch.equal(got["w"], torch.ones(3))

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        store = WeightStore.options(name=store_name(buffer.run)).remote()  # noqa: F841 (kept alive)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, previous[1]))
        with pytest.raises(SlotSpaceError, match="--shm-size"):
            WeightPublisher(buffer, "shm", str(tmp_path)).publish({"w": torch.zeros(1 << 20)}, version=2)
        big = torch.arange(1 << 20, dtype=torch.float32)
        assert publisher.publish({"w": big}, version=3).transport == "ray"
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        assert not os.path.exists(slot_paths(wv.location)[0])  # the slots were given up
        assert load_published(buffer.current_version(), keep) == 3 and torch.equal(got["w"], big)
        assert publisher.publish({"w": big}, version=4).transport == "ray"  # for the rest of the run
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, handler)
        ray.shutdown()


def test_placement_allows_shm_only_with_every_worker_on_rank_0s_node():
    import pytest

    from rlpost.placement import BundleInfo, Placement, PlacementError

    def placement(worker_nodes):
        node = lambda n: BundleInfo(0, f"10.0.0.{n}", f"node{n}", [], 0)  # noqa: E731
        return Placement(None, None, [0], list(range(len(worker_nodes))), "10.0.0.1", 1, 0.0, 0.0,
                         bundles={"trainer": [node(1)], "workers": [node(n) for n in worker_nodes]})

    assert placement([1, 1]).weight_transport("auto") == "auto"  # shm, or ray if /dev/shm is too small
    assert placement([1, 1]).weight_transport("shm") == "shm"
    assert placement([1, 2]).weight_transport("auto") == "ray"
    assert placement([1, 2]).weight_transport("file") == "file"
    with pytest.raises(PlacementError, match=r"weight_transport=shm needs every rollout worker on trainer rank 0's "
                                             r"node \(10\.0\.0\.1\); workers were placed on 10\.0\.0\.2"):
        placement([1, 2]).weight_transport("shm")
