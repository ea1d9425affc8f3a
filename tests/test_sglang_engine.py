"""SGLang behind the engine seam. On CPU: what we send SGLang and how we read what it streams
back (request/response mapping, routed experts, weight naming), and a clear refusal without a GPU.
With a GPU and SGLang installed (``gpu`` marker): the same checks as the vLLM engine's, for real."""

import base64

import numpy as np
import pytest
import torch

from rlpost.cli_config import load_config
from rlpost.config import EngineConfig, ModelConfig
from rlpost.modeling import Qwen3MoeForCausalLM, save_pretrained
from rlpost.rollout.engine import GenRequest, make_engine
from rlpost.rollout.sglang_engine import (_Stream, decode_routed_experts, finish_reason, generate_kwargs,
                                          output_of, sampling_params, weights_payload)

NO_EOS = -1
PROMPTS = [[1, 4, 5, 13, 6, 16], [1, 7, 16], [1, 8, 9, 10, 13, 11, 12, 16]]


def model_cfg(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=40, max_seq_len=64, init_std=0.3, **kw)


def weights(seed: int, cfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(cfg or model_cfg()).canonical_state_dict()


# ---------------------------------------------------------------------- CPU: mapping
def test_a_request_becomes_a_streamed_token_id_request_that_stops_on_our_ids():
    req = GenRequest([1, 2, 3], 5, temperature=0.7, top_p=0.9, prefix_ids=[7, 8], stop_ids=(11, -1))
    kw = generate_kwargs(req, eos_id=2, rid="rlpost-x", routed_experts=True)
    assert kw["input_ids"] == [1, 2, 3, 7, 8]  # a resumed partial continues from its exact tokens
    assert kw["rid"] == "rlpost-x" and kw["stream"] is True and kw["return_logprob"] is True
    assert kw["logprob_start_len"] == -1  # no prompt logprobs
    # one routing row per generated token: positions [len(input) - 1, seq_len - 1)
    assert kw["return_routed_experts"] is True and kw["routed_experts_start_len"] == 4
    sp = kw["sampling_params"]
    assert sp["max_new_tokens"] == 5 and sp["temperature"] == 0.7 and sp["top_p"] == 0.9
    assert sp["stop_token_ids"] == [2, 11]  # EOS + the request's stop ids, the -1 placeholder dropped
    assert "ignore_eos" not in sp  # SGLang's ignore_eos would disable stop_token_ids as well
    assert sp["no_stop_trim"] is True and sp["skip_special_tokens"] is False
    assert "routed_experts_start_len" not in generate_kwargs(req, 2, "r", routed_experts=False)
    assert sampling_params(GenRequest([1], 3), eos_id=-1)["stop_token_ids"] is None


def test_streamed_snapshots_become_one_output_with_tokens_logprobs_and_routing():
    cfg = model_cfg()
    routing = np.arange(3 * cfg.n_layers * cfg.top_k, dtype=np.int32) % cfg.num_experts
    stream = _Stream("rlpost-a")
    # SGLang streams cumulative snapshots: (logprob, token id, text) per output token
    stream.update({"output_ids": [5], "meta_info": {"output_token_logprobs": [(-0.5, 5, None)],
                                                    "finish_reason": None}})
    assert stream.reason is None
    stream.update({"output_ids": [5, 6, 2], "meta_info": {
        "output_token_logprobs": [(-0.5, 5, None), (-1.25, 6, None), (-0.1, 2, None)],
        "finish_reason": {"type": "stop", "matched": 2},
        "routed_experts": base64.b64encode(routing.tobytes()).decode()}})
    out = output_of(stream, stream.reason, cfg)
    assert out.token_ids == [5, 6, 2] and out.logprobs == [-0.5, -1.25, -0.1] and out.finish_reason == "stop"
    assert out.routed_experts.shape == (3, cfg.n_layers, cfg.top_k)
    np.testing.assert_array_equal(out.routed_experts.reshape(-1), routing)
    bad = _Stream("rlpost-b", tokens=[1, 2], logprobs=[-1.0])
    with pytest.raises(RuntimeError, match="2 tokens but 1 logprobs"):
        output_of(bad, "stop", cfg)


@pytest.mark.parametrize("reason, ours", [
    (None, None), ({"type": "length", "length": 8}, "length"), ({"type": "stop", "matched": 2}, "stop"),
    ({"type": "abort", "message": "Abort before prefill"}, "abort"), ("abort", "abort"),
])
def test_finish_reasons_map_to_ours(reason, ours):
    assert finish_reason({"finish_reason": reason}) == ours


def test_an_unknown_finish_reason_is_refused_by_name():
    with pytest.raises(ValueError, match="'type': 'weird'"):
        finish_reason({"finish_reason": {"type": "weird"}})


def test_routing_of_the_wrong_size_is_dropped_not_misread():
    enc = base64.b64encode(np.zeros(2 * 2 * 2, dtype=np.int32).tobytes()).decode()
    assert decode_routed_experts(enc, 2, ModelConfig(n_layers=2, top_k=2)).shape == (2, 2, 2)
    assert decode_routed_experts(enc, 3, ModelConfig(n_layers=2, top_k=2)) is None  # partial: none
    assert decode_routed_experts(None, 2, ModelConfig(n_layers=2, top_k=2)) is None
    # GLM's first dense layer has no experts: reported for every layer, its rows are dropped;
    # reported for the layers with experts only, taken as they are
    glm = ModelConfig(type="glm4_moe", n_layers=3, first_dense_layers=1, dense_d_ff=8, num_experts=8, top_k=4)
    every = np.arange(2 * 3 * 4, dtype=np.int32)
    got = decode_routed_experts(base64.b64encode(every.tobytes()).decode(), 2, glm)
    np.testing.assert_array_equal(got, every.reshape(2, 3, 4)[:, 1:])
    sparse_only = decode_routed_experts(base64.b64encode(every[:16].tobytes()).decode(), 2, glm)
    assert sparse_only.shape == (2, 2, 4)


def test_published_weights_carry_the_names_of_the_hugging_face_checkpoint_sglang_loads(tmp_path):
    """SGLang loads Qwen3-MoE checkpoints by their Hugging Face names (per-expert
    ``mlp.experts.E.gate_proj``...; it stacks them itself): what we push is exactly the tensor set
    transformers writes when it saves our model as a checkpoint (a tied head left to SGLang)."""
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open

    for tied in (False, True):
        cfg = model_cfg(tie_word_embeddings=tied)
        state = weights(0, cfg)
        save_pretrained(state, cfg, str(tmp_path / f"ours{tied}"))
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / f"ours{tied}"))
        hf.save_pretrained(str(tmp_path / f"hf{tied}"))
        with safe_open(str(tmp_path / f"hf{tied}" / "model.safetensors"), "pt") as fh:
            hf_names = set(fh.keys()) - ({"lm_head.weight"} if tied else set())
        payload = weights_payload(state, cfg)
        assert {n for n, _ in payload} == hf_names
        assert any(".mlp.experts.0.gate_proj.weight" in n for n in hf_names)  # the checkpoint layout
        assert all(t.is_contiguous() for _, t in payload)
    with pytest.raises(ValueError, match="'mlp.moe.deepspeed_moe.gate.wg.weight'"):
        weights_payload({"mlp.moe.deepspeed_moe.gate.wg.weight": torch.zeros(1)}, model_cfg())


def test_engine_sglang_is_a_valid_config_and_needs_a_gpu_with_a_clear_message():
    cfg = load_config(["engine=sglang"])
    assert cfg.engine.name == "sglang" and cfg.engine.return_routed_experts
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="engine.name=sglang needs a CUDA GPU"):
        make_engine(cfg.model, cfg.engine, eos_id=0)


# ---------------------------------------------------------------------- GPU: SGLang for real
def sglang_engine(chunk_tokens=4, model_path=None, **kw):
    from rlpost.rollout.sglang_engine import SGLangEngine

    ecfg = EngineConfig(name="sglang", chunk_tokens=chunk_tokens, max_batch_size=64, dtype="float32",
                        return_routed_experts=True, **kw)
    return SGLangEngine(model_cfg(), ecfg, eos_id=NO_EOS, model_path=model_path)


def greedy(engine, prefixes=None, budget=12, stop_ids=()):
    prefixes = prefixes or [[] for _ in PROMPTS]
    return engine.generate([GenRequest(p, budget - len(x), temperature=0.0, prefix_ids=x, stop_ids=stop_ids)
                            for p, x in zip(PROMPTS, prefixes)])


def native_greedy(state, **kw):
    from rlpost.rollout.native import NativeEngine

    engine = NativeEngine(model_cfg(), EngineConfig(chunk_tokens=4), eos_id=NO_EOS)
    engine.load_weights(state, 0)
    return greedy(engine, **kw)


@pytest.fixture(scope="module")
def engine():
    pytest.importorskip("sglang", reason="SGLang is not installed (pip install sglang==0.5.15, CUDA)")
    e = sglang_engine()
    e.load_weights(weights(0), version=0)
    yield e
    e.close()


@pytest.mark.gpu
def test_sglang_token_ids_logprobs_and_routing_match_the_native_engine(engine):
    ours, ref = greedy(engine), native_greedy(weights(0))
    for o, r in zip(ours, ref):
        assert o.token_ids == r.token_ids and o.finish_reason == "length"
        np.testing.assert_allclose(o.logprobs, r.logprobs, atol=1e-3)
        assert o.routed_experts is not None and o.routed_experts.shape == r.routed_experts.shape
        same = np.sort(o.routed_experts, -1) == np.sort(r.routed_experts, -1)
        assert same.mean() > 0.99
    stopped = greedy(engine, stop_ids=(ours[0].token_ids[0],))
    assert stopped[0].token_ids == ours[0].token_ids[:1] and stopped[0].finish_reason == "stop"


@pytest.mark.gpu
def test_sglang_abort_then_resume_equals_an_uninterrupted_run(engine):
    full = greedy(engine)
    cut = engine.generate([GenRequest(p, 12, temperature=0.0) for p in PROMPTS], should_stop=lambda: True)
    assert [o.finish_reason for o in cut] == ["abort"] * 3
    resumed = greedy(engine, prefixes=[o.token_ids for o in cut])
    for f, c, r in zip(full, cut, resumed):
        assert c.token_ids + r.token_ids == f.token_ids
    assert not engine.has_unfinished()
    engine.pause()
    engine.resume()
    assert [o.token_ids for o in greedy(engine)] == [o.token_ids for o in full]


@pytest.mark.gpu
def test_sglang_weight_update_in_place_equals_a_fresh_engine(engine, tmp_path):
    new = weights(1)
    engine.load_weights(new, version=1)
    assert engine.version == 1
    updated = greedy(engine)
    assert [o.token_ids for o in updated] == [o.token_ids for o in native_greedy(new)]
    save_pretrained(new, model_cfg(), str(tmp_path))
    fresh = sglang_engine(model_path=str(tmp_path))
    try:
        assert [o.token_ids for o in updated] == [o.token_ids for o in greedy(fresh)]
    finally:
        fresh.close()
    engine.load_weights(weights(0), version=2)
    assert [o.token_ids for o in greedy(engine)] == [o.token_ids for o in native_greedy(weights(0))]

