"""The flat weight format the ray transport ships (one byte buffer + a table)."""

import torch

from rlpost.weights import flatten_state, unflatten_state


def test_flatten_round_trips_every_dtype_and_shape():
    state = {
        "embed.weight": torch.randn(7, 5),
        "head.bias": torch.randn(3).to(torch.bfloat16),
        "moe.gate.weight": torch.randn(2, 3, 4).to(torch.float16),
        "steps": torch.tensor(11, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }
    table, buffer = flatten_state(state)
    assert buffer.dtype.itemsize == 1 and buffer.size >= sum(t.numel() * t.element_size() for t in state.values())
    buffer.flags.writeable = False  # what ray.get hands out
    back = unflatten_state((table, buffer))
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor)
