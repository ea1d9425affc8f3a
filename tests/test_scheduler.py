"""Admission and staleness rules: deterministic unit tests (no Ray, no Redis, no sleeps)."""

import pytest

from rlpost.scheduler import groups_to_admit, too_stale


def simulate(mode: str, steps: int, batch: int = 4, over_sampling: float = 1.0, eta: int = 1) -> list[int]:
    """Groups submitted before each step when every step trains exactly one batch."""
    submitted = trained = 0
    out = []
    for step in range(steps):
        n = groups_to_admit(mode, step, submitted, trained, batch, over_sampling, eta)
        submitted += n
        out.append(n)
        trained += batch
    return out


def test_sync_submits_one_batch_per_step():
    assert simulate("sync", 4) == [4, 4, 4, 4]


@pytest.mark.parametrize("eta, first", [(0, 4), (1, 8), (3, 16)])
def test_async_runs_eta_batches_ahead_then_one_per_step(eta, first):
    assert simulate("async", 4, eta=eta) == [first, 4, 4, 4]


def test_async_capacity_rule_bounds_how_far_generation_runs_ahead():
    # a group submitted before step s is trained at step s + eta at the latest
    batch, eta = 4, 2
    submitted = trained = 0
    for step in range(6):
        submitted += groups_to_admit("async", step, submitted, trained, batch, 1.0, eta)
        assert submitted <= (step + 1 + eta) * batch
        trained += batch
    # a stalled trainer stops admission once the window is full
    assert groups_to_admit("async", 2, submitted=20, trained_groups=8, batch=4, max_staleness=2) == 0


def test_april_keeps_over_sampling_times_batch_in_flight():
    assert simulate("april", 3, batch=4, over_sampling=2.0) == [8, 4, 4]
    assert simulate("april", 2, batch=5, over_sampling=1.5) == [8, 5]  # ceil(7.5)
    # parked partials count as in flight: nothing new while 8 are still unfinished
    assert groups_to_admit("april", 3, submitted=20, trained_groups=12, batch=4, over_sampling=2.0) == 0


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="mode='fast'"):
        groups_to_admit("fast", 0, 0, 0, 4)


@pytest.mark.parametrize("oldest, current, eta, stale", [
    (5, 5, 0, False), (4, 5, 0, True), (4, 5, 1, False), (3, 5, 1, True), (0, 8, 8, False), (0, 9, 8, True),
])
def test_staleness_rule(oldest, current, eta, stale):
    assert too_stale(oldest, current, eta) is stale
