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


def test_the_sampler_draws_from_the_tempered_nucleus_and_reports_its_logprobs():
    """The inverse-CDF sampler: frequencies match softmax(logits / T), tokens outside the top-p
    nucleus or of zero probability are never drawn, logprobs are the tempered ones, greedy rows
    take the argmax with the untempered logprob."""
    from rlpost.rollout.native import _sample

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    rows = 40_000
    g = torch.Generator().manual_seed(0)
    for temp in (1.0, 0.5):
        ids, logp = _sample(logits.repeat(rows, 1), torch.full((rows,), temp), torch.ones(rows), g)
        want = torch.softmax(logits[0] / temp, -1)
        freq = torch.bincount(ids, minlength=5).double() / rows
        assert torch.allclose(freq, want.double(), atol=0.01) and freq[4] == 0
        assert torch.allclose(logp, torch.log(want)[ids], atol=1e-5)
    # top-p 0.8 keeps tokens 0 and 1 (0.665 + 0.245 cross 0.8 at token 1), renormalised
    ids, _ = _sample(logits.repeat(rows, 1), torch.ones(rows), torch.full((rows,), 0.8), g)
    freq = torch.bincount(ids, minlength=5).double() / rows
    p = torch.softmax(logits[0], -1)[:2].double()
    assert freq[2:].sum() == 0 and abs(freq[0] - p[0] / p.sum()) < 0.01
    temps = torch.tensor([0.0, 1.0])
    ids, logp = _sample(torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0]]), temps, torch.ones(2), g)
    assert int(ids[0]) == 1 and abs(float(logp[0]) - float(torch.log_softmax(torch.tensor([0.0, 3.0, 1.0]), -1)[1])) < 1e-6


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


def _alone(engine, req):
    return engine.generate([req])[0]


@pytest.mark.parametrize("late_prompt", [[1, 7], [1, 8, 9, 10, 13, 11, 12, 16, 4, 5, 6, 7, 8, 9]])
def test_requests_admitted_mid_generation_match_running_alone(small_cfg, late_prompt):
    """Continuous batching: a request admitted at a chunk boundary is prefilled into the running
    batch (shorter input: dead cache columns trimmed; longer: running rows shifted right) and
    every row's tokens, logprobs and experts equal generating it alone."""
    engine = make_engine(small_cfg, chunk_tokens=3, eos_id=-1)
    early = [GenRequest(p, 12, temperature=0.0) for p in prompts()[:2]]
    late = [GenRequest(late_prompt, 10, temperature=0.0), GenRequest([1, 4, 5], 7, temperature=0.0)]
    offered = []

    def admit(free: int):
        offered.append(free)
        return [late.pop(0)] if late else []

    reqs = list(early)
    admitted = list(late)
    outs = engine.generate(reqs, admit=admit)
    assert len(outs) == 4 and offered[0] == engine.cfg.max_batch_size - 2
    for req, out in zip(early + admitted, outs):
        ref = _alone(engine, req)
        assert out.token_ids == ref.token_ids and out.finish_reason == ref.finish_reason == "length"
        np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
        assert np.array_equal(out.routed_experts, ref.routed_experts)


def test_a_full_batch_starts_queued_requests_as_rows_free_up(small_cfg):
    """max_batch_size rows at most; a finished row's place goes to the next waiting request at
    the boundary where it finishes, not after the slowest row of the batch."""
    torch.manual_seed(123)
    engine = NativeEngine(small_cfg.model, EngineConfig(chunk_tokens=2, max_batch_size=2), eos_id=-1)
    engine.load_weights(engine.model.state_dict(), version=0)
    budgets = [2, 14, 4, 3]
    reqs = [GenRequest(prompts()[i % 3], n, temperature=0.0) for i, n in enumerate(budgets)]
    order = []
    outs = engine.generate(reqs, on_finished=lambda i, o: order.append(i))
    assert [len(o.token_ids) for o in outs] == budgets
    assert order == [0, 2, 3, 1]  # the long row 1 runs beside 0, then 2, then 3
    for req, out in zip(reqs, outs):
        assert out.token_ids == _alone(engine, req).token_ids


def test_abort_returns_queued_requests_unstarted(small_cfg):
    torch.manual_seed(123)
    engine = NativeEngine(small_cfg.model, EngineConfig(chunk_tokens=2, max_batch_size=1), eos_id=-1)
    engine.load_weights(engine.model.state_dict(), version=0)
    outs = engine.generate([GenRequest(p, 6, temperature=0.0) for p in prompts()], should_stop=lambda: True)
    assert [o.finish_reason for o in outs] == ["abort"] * 3
    assert [len(o.token_ids) for o in outs] == [2, 0, 0]


def test_retained_kv_resumes_without_prefill_and_matches_recompute_with_same_weights(small_cfg):
    """engine.reuse_kv: a stopped sample's cache is kept under its cache_key; resuming it feeds
    only its last token. With unchanged weights that is exactly the uninterrupted generation."""
    torch.manual_seed(123)
    engine = NativeEngine(small_cfg.model, EngineConfig(chunk_tokens=3, reuse_kv=True), eos_id=-1)
    engine.load_weights(engine.model.state_dict(), version=0)
    full = greedy(engine)
    calls = {"n": 0}

    def stop_once():
        calls["n"] += 1
        return calls["n"] == 1

    reqs = [GenRequest(p, 12, temperature=0.0, cache_key=f"s{i}") for i, p in enumerate(prompts())]
    cut = engine.generate(reqs, should_stop=stop_once)
    assert set(engine.retained) == {"s0", "s1", "s2"}
    # a fresh request joins the resumed ones: retained rows and prefilled rows share the batch
    resumed = engine.generate([GenRequest(p, 12 - len(c.token_ids), temperature=0.0, prefix_ids=c.token_ids,
                                          cache_key=f"s{i}") for i, (p, c) in enumerate(zip(prompts(), cut))]
                              + [GenRequest(prompts()[0], 12, temperature=0.0)])
    assert engine.retained_hits == 3 and not engine.retained
    for f, c, r in zip(full, cut, resumed):
        assert c.token_ids + r.token_ids == f.token_ids
        np.testing.assert_allclose(c.logprobs + r.logprobs, f.logprobs, atol=1e-5)
    assert resumed[3].token_ids == full[0].token_ids


def test_retained_kv_is_not_used_for_a_different_continuation(small_cfg):
    """A resumed request whose tokens differ from what was cached (e.g. a tool observation was
    appended) is prefilled from scratch, not continued from the stale cache."""
    torch.manual_seed(123)
    engine = NativeEngine(small_cfg.model, EngineConfig(chunk_tokens=3, reuse_kv=True), eos_id=-1)
    engine.load_weights(engine.model.state_dict(), version=0)
    cut = engine.generate([GenRequest(prompts()[0], 12, temperature=0.0, cache_key="a")], should_stop=lambda: True)
    other = cut[0].token_ids + [4, 5]
    out = engine.generate([GenRequest(prompts()[0], 6, temperature=0.0, prefix_ids=other, cache_key="a")])
    assert engine.retained_hits == 0
    assert out[0].token_ids == engine.generate([GenRequest(prompts()[0], 6, temperature=0.0, prefix_ids=other)])[0].token_ids


def test_rows_leaving_and_a_cache_growing_past_its_headroom_match_running_alone(small_cfg):
    """Finished rows leave the cache lazily and the cache starts with little headroom and grows:
    neither may change what the surviving rows generate."""
    engine = make_engine(small_cfg, chunk_tokens=4, eos_id=-1)
    budgets = [3, 45, 9, 26]
    reqs = [GenRequest(p, b, temperature=0.0) for p, b in zip(prompts() + [[1, 5, 6]], budgets)]
    outs = engine.generate(reqs)
    for req, out in zip(reqs, outs):
        ref = _alone(engine, req)
        assert len(out.token_ids) == req.max_new_tokens and out.token_ids == ref.token_ids
        np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)


def test_stacked_experts_equal_the_per_expert_path_and_follow_new_weights(small_cfg):
    """Small batches run every expert in one batched matmul on stacked weights; the result must
    equal routing tokens to each expert, and loading new weights must rebuild the stack."""
    from rlpost.modeling import RoutedSparseMoe

    torch.manual_seed(0)
    moe, other = RoutedSparseMoe(small_cfg.model), RoutedSparseMoe(small_cfg.model)
    x = torch.randn(3, 7, small_cfg.model.d_model)
    with torch.inference_mode():
        dense, _, _, experts = moe(x)
        moe.DENSE_MAX_TOKENS = 0  # the per-expert (index) path
        routed, _, _, same_experts = moe(x)
        moe.DENSE_MAX_TOKENS = RoutedSparseMoe.DENSE_MAX_TOKENS
        torch.testing.assert_close(dense, routed, atol=1e-5, rtol=1e-5)
        assert torch.equal(experts, same_experts)
        moe.load_state_dict(other.state_dict())
        torch.testing.assert_close(moe(x)[0], other(x)[0], atol=1e-5, rtol=1e-5)


def test_the_native_engine_runs_where_ray_put_the_worker(small_cfg):
    """engine.num_gpus=0: the CPU. engine.num_gpus>0: the GPU Ray assigned (a clear error when
    the worker sees none, instead of silently generating on the CPU)."""
    from rlpost.rollout.worker import engine_device

    assert engine_device(0) == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"engine.num_gpus=1: this rollout worker sees no CUDA device"):
            engine_device(1)


@pytest.mark.gpu
def test_the_native_engine_generates_on_the_gpu_it_was_given(small_cfg):
    from rlpost.rollout.worker import engine_device

    torch.manual_seed(123)
    engine = NativeEngine(small_cfg.model, EngineConfig(chunk_tokens=4), eos_id=EOS, device=engine_device(0.5))
    cpu = make_engine(small_cfg)
    engine.load_weights(cpu.model.state_dict(), version=0)
    assert next(engine.model.parameters()).is_cuda
    assert [o.token_ids for o in greedy(engine)] == [o.token_ids for o in greedy(cpu)]


@pytest.mark.parametrize("arch", ["deepseek_v3", "gpt_oss", "minimax_m2"])
def test_latent_attention_sinks_window_and_yarn_decode_from_the_cache_as_the_model_computes_in_full(small_cfg, arch):
    """model.type=deepseek_v3 with YaRN, gpt_oss and minimax_m2 in the native engine: keys and values of
    other widths than the heads' (latent attention's no-rope + rope keys, narrower values),
    GPT-OSS's sinks and 5-token sliding window on sequences 3-5 windows long, or MiniMax-M2's
    keys normalised over the whole projection and rotated on half their dims, go through the
    batched, left-padded cache, a cut and resume, admission mid-generation and retained caches;
    every token and logprob is what the model computes over the whole sequence without a cache,
    and the routed experts are reported for the layers that have them."""
    from glm_toy import DEEPSEEK, MINIMAX, OSS, YARN, randomise_glm_extras
    from rlpost.config import ModelConfig
    from rlpost.modeling import Qwen3MoeForCausalLM

    arch_fields = {"deepseek_v3": {**DEEPSEEK, **YARN}, "gpt_oss": OSS, "minimax_m2": MINIMAX}[arch]
    cfg = ModelConfig(**{**arch_fields, "type": arch, "vocab_size": small_cfg.model.vocab_size, "max_seq_len": 64,
                         "init_std": 0.3})
    cfg.validate()
    torch.manual_seed(7)
    engine = NativeEngine(cfg, EngineConfig(chunk_tokens=3, reuse_kv=True), eos_id=-1)
    model = Qwen3MoeForCausalLM(cfg)
    randomise_glm_extras(model)
    engine.load_weights(model.canonical_state_dict(), version=0)
    budgets = [20, 9, 14]  # past the original 16 positions YaRN extends
    reqs = [GenRequest(p, b, temperature=0.0, cache_key=f"s{i}") for i, (p, b) in enumerate(zip(prompts(), budgets))]
    calls = {"n": 0}

    def stop_once():
        calls["n"] += 1
        return calls["n"] == 2

    cut = engine.generate(reqs, should_stop=stop_once)
    assert [len(c.token_ids) for c in cut] == [6, 6, 6] and engine.retained
    late = GenRequest([1, 9, 10, 11], 10, temperature=0.0)
    rest = engine.generate([GenRequest(p, b - len(c.token_ids), temperature=0.0, prefix_ids=c.token_ids, cache_key=f"s{i}")
                            for i, (p, b, c) in enumerate(zip(prompts(), budgets, cut))] + [late])
    assert engine.retained_hits >= 2
    outs = [(c.token_ids + r.token_ids, c.logprobs + r.logprobs, [*c.routed_experts, *r.routed_experts])
            for c, r in zip(cut, rest)] + [(rest[3].token_ids, rest[3].logprobs, list(rest[3].routed_experts))]
    for prompt, (tokens, logprobs, experts) in zip(prompts() + [late.prompt_ids], outs):
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            full = engine.model(ids)
        step = full.logits[0, len(prompt) - 1:-1].log_softmax(-1)
        assert step.argmax(-1).tolist() == tokens
        np.testing.assert_allclose(logprobs, step.max(-1).values.numpy(), atol=1e-4)
        assert np.array_equal(np.stack(experts), full.routed_experts[0, len(prompt) - 1:-1].numpy())
        assert np.stack(experts).shape == (len(tokens), cfg.moe_layers, cfg.top_k)
