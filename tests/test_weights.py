"""The weight format the ray transport ships (a table + one uint8 view per tensor)."""

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

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
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
