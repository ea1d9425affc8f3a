"""The native engine: KV-cache generation, stop-and-continue, agreement with the trainer model."""

import numpy as np
import pytest
import torch

from rlpost.config import EngineConfig
from rlpost.rollout.engine import GenRequest
from rlpost.rollout.native import NativeEngine

EOS = 2


def make_engine(cfg, chunk_tokens=4, seed=0, eos_id=EOS) -> NativeEngine:
    torch.manual_seed(123)
    engine = NativeEngine(cfg.model, EngineConfig(chunk_tokens=chunk_tokens), eos_id=eos_id, seed=seed)
    engine.load_weights(engine.model.state_dict(), version=0)
    return engine


def prompts():
    return [[1, 4, 5, 13, 6, 16], [1, 7, 16], [1, 8, 9, 10, 13, 11, 12, 16]]


def greedy(engine, prefix=None, max_new=12, stop_ids=()):
    prefix = prefix or [[] for _ in prompts()]
    reqs = [GenRequest(p, max_new - len(x), temperature=0.0, prefix_ids=x, stop_ids=stop_ids)
            for p, x in zip(prompts(), prefix)]
    return engine.generate(reqs)


def test_stop_and_continue_equals_uninterrupted_greedy(small_cfg):
    # No reachable EOS, so every row of the random model runs to its budget.
    engine = make_engine(small_cfg, chunk_tokens=3, eos_id=-1)
    full = greedy(engine)
    assert all(len(o.token_ids) == 12 for o in full)
    calls = {"n": 0}

    def stop_once():
        calls["n"] += 1
        return calls["n"] == 1

    reqs = [GenRequest(p, 12, temperature=0.0) for p in prompts()]
    cut = engine.generate(reqs, should_stop=stop_once)
    assert all(o.finish_reason == "abort" for o in cut)
    assert all(len(o.token_ids) == 3 for o in cut)  # stopped at the first chunk boundary
    resumed = greedy(engine, prefix=[o.token_ids for o in cut])
    for f, c, r in zip(full, cut, resumed):
        assert c.token_ids + r.token_ids == f.token_ids
        np.testing.assert_allclose(c.logprobs + r.logprobs, f.logprobs, atol=1e-5)
        assert np.array_equal(np.concatenate([c.routed_experts, r.routed_experts]), f.routed_experts)


def test_batching_with_left_padding_matches_single_requests(small_cfg):
    engine = make_engine(small_cfg)
    batched = greedy(engine)
    for p, out in zip(prompts(), batched):
        single = engine.generate([GenRequest(p, 12, temperature=0.0)])[0]
        assert single.token_ids == out.token_ids
        np.testing.assert_allclose(single.logprobs, out.logprobs, atol=1e-5)


def test_budget_stop_tokens_and_expert_shapes(small_cfg):
    engine = make_engine(small_cfg)
    outs = engine.generate([GenRequest(p, 5, temperature=1.0) for p in prompts()])
    for o in outs:
        assert 1 <= len(o.token_ids) <= 5 and len(o.logprobs) == len(o.token_ids)
        assert o.routed_experts.shape == (len(o.token_ids), small_cfg.model.n_layers, small_cfg.model.top_k)
        assert (o.routed_experts >= 0).all() and (o.routed_experts < small_cfg.model.num_experts).all()
        assert all(lp <= 0 for lp in o.logprobs)
        assert o.finish_reason in ("stop", "length")
        if o.finish_reason == "length":
            assert len(o.token_ids) == 5
    # the first greedy token as a stop token ends every row after one token
    first = [o.token_ids[0] for o in greedy(engine)]
    outs = greedy(engine, stop_ids=tuple(first))
    assert [len(o.token_ids) for o in outs] == [1, 1, 1]
    assert {o.finish_reason for o in outs} == {"stop"}


def test_sampling_is_seeded_and_temperature_matters(small_cfg):
    reqs = [GenRequest(p, 8, temperature=1.0) for p in prompts()]
    a = make_engine(small_cfg, seed=7).generate(reqs)
    b = make_engine(small_cfg, seed=7).generate(reqs)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_too_long_request_is_a_clear_error(small_cfg):
    engine = make_engine(small_cfg)
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.generate([GenRequest([1] * 60, 10)])


def test_finished_rows_are_reported_at_chunk_boundaries_and_leave_the_batch(small_cfg):
    engine = make_engine(small_cfg, chunk_tokens=2)
    # the first greedy token of row 1 is a stop token for row 1 only: it finishes after one token
    first = greedy(engine)[1].token_ids[0]
    reqs = [GenRequest(p, 10, temperature=0.0, stop_ids=(first,) if i == 1 else ()) for i, p in enumerate(prompts())]
    engine.eos_id = -1
    seen = []
    polls = []

    def should_stop():
        polls.append(list(seen))
        return False

    outs = engine.generate(reqs, should_stop=should_stop, on_finished=lambda i, o: seen.append((i, o)))
    assert [i for i, _ in seen].count(1) == 1 and sorted(i for i, _ in seen) == [0, 1, 2]
    assert seen[0][0] == 1 and seen[0][1] is outs[1] and outs[1].finish_reason == "stop"
    assert polls[0] == [(1, outs[1])]  # reported at the first boundary, before the others finish
    assert [len(o.token_ids) for o in outs] == [10, 1, 10]


def test_rows_that_fit_alone_fit_together(small_cfg):
    """A resumed row (long prefix, small remaining budget) batched with a fresh row (short prompt,
    full budget): each fits max_seq_len on its own, so the batch must be accepted."""
    engine = make_engine(small_cfg, eos_id=-1)
    limit = small_cfg.model.max_seq_len
    fresh = GenRequest([1, 4], limit - 2, temperature=0.0)
    resumed = GenRequest([1, 4], 4, temperature=0.0, prefix_ids=[5] * (limit - 8))
    outs = engine.generate([fresh, resumed])
    assert [len(o.token_ids) for o in outs] == [limit - 2, 4]
