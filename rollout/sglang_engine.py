"""SGLang behind the engine seam: token ids in, token ids + per-token logprobs (+ routed experts)
out, in-place versioned weight updates, abort with partial outputs, pause/resume.

SGLang's offline ``sglang.Engine`` keeps its tokenizer manager (an asyncio object) in this
process and runs the scheduler and the model in subprocesses, so generation goes on between two
``step()`` calls: this is a server engine, not a stepped one. Each submitted request is one
streaming ``generate_request`` consumed by a task on the engine's own event loop; ``step()`` runs
that loop until a request finishes or some request has gained ``engine.chunk_tokens`` tokens,
which gives the worker its chunk-boundary checks (stop, APRIL cut, new weights) without SGLang
ever calling back into it.

SGLang streams cumulative outputs (``output_ids`` and ``meta_info.output_token_logprobs``, a
list of ``(logprob, token_id, text)``), so an aborted request's partial tokens are simply the last
snapshot. Its default logprobs are ``log softmax(logits / temperature)``, what the trainer
recomputes (top-p is not folded in, unlike vLLM's ``processed_logprobs``). Routed experts come
base64-encoded int32 for positions ``[routed_experts_start_len, seq_len - 1)``; asking from
``len(input) - 1`` gives exactly one row per generated token, the convention of
:class:`GenOutput`.

Everything that turns our records into SGLang's and back is a plain function here, so it is
tested on CPU (SGLang itself has no CPU build: its tests carry the ``gpu`` marker).
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

from rlpost.config import EngineConfig, ModelConfig
from rlpost.rollout.engine import GenOutput, GenRequest, ServedEngineBase, moe_layer_rows

# An update or an abort that SGLang has not answered within this long is a dead engine.
_CONTROL_TIMEOUT_S = 120.0
# step() hands control back to the worker at least this often, finished requests or not.
_MAX_STEP_S = 0.5


# ---------------------------------------------------------------------- records <-> SGLang
def sampling_params(request: GenRequest, eos_id: int) -> dict:
    """SGLang ``sampling_params`` for ``request``. Stops on our EOS and the request's stop ids
    (``ignore_eos`` would disable ``stop_token_ids`` too); special tokens are never skipped and
    stop tokens are kept in the output, so the token ids are exactly what was sampled."""
    stops = sorted({eos_id, *request.stop_ids} - {-1})
    return {"max_new_tokens": int(request.max_new_tokens), "temperature": float(request.temperature),
            "top_p": float(request.top_p), "top_k": -1, "min_p": 0.0, "stop_token_ids": stops or None,
            "skip_special_tokens": False, "no_stop_trim": True}


def generate_kwargs(request: GenRequest, eos_id: int, rid: str, routed_experts: bool) -> dict:
    """Fields of SGLang's ``GenerateReqInput`` for one streamed, token-id request."""
    kwargs = {"input_ids": request.input_ids, "sampling_params": sampling_params(request, eos_id),
              "rid": rid, "stream": True, "return_logprob": True, "logprob_start_len": -1}
    if routed_experts:
        kwargs.update(return_routed_experts=True, routed_experts_start_len=len(request.input_ids) - 1)
    return kwargs


def finish_reason(meta_info: dict) -> str | None:
    """SGLang's ``meta_info.finish_reason`` (None while running; a dict or a string when done) as
    ours: "stop", "length" or "abort"."""
    reason = meta_info.get("finish_reason")
    if reason is None:
        return None
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    if kind in ("stop", "length", "abort"):
        return kind
    raise ValueError(f"SGLang finish_reason {reason!r}: expected type stop, length or abort")


def decode_routed_experts(encoded: str | None, n_tokens: int, model_cfg: ModelConfig) -> np.ndarray | None:
    """One (moe_layers, top_k) row per generated token, or None when SGLang sent no routing or a
    length that does not match (partial routing is worse than none). SGLang may report every
    layer or only those with experts; the first dense layers' rows are dropped."""
    if not encoded or n_tokens == 0:
        return None
    flat = np.frombuffer(base64.b64decode(encoded), dtype=np.int32)
    if flat.size % (n_tokens * model_cfg.top_k):
        return None
    return moe_layer_rows(flat.reshape(n_tokens, -1, model_cfg.top_k).astype(np.int16), model_cfg)


@dataclass
class _Stream:
    """The latest cumulative snapshot of one request."""

    vid: str
    task: asyncio.Task | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    experts: str | None = None
    reason: str | None = None

    def update(self, out: dict) -> None:
        meta = out.get("meta_info", {})
        self.tokens = list(out.get("output_ids", []))
        self.logprobs = [float(entry[0]) for entry in meta.get("output_token_logprobs", [])]
        self.experts = meta.get("routed_experts", self.experts)
        self.reason = finish_reason(meta)


def output_of(stream: _Stream, reason: str, model_cfg: ModelConfig) -> GenOutput:
    """Our GenOutput from a stream's last snapshot; refuses an engine whose logprobs do not cover
    its tokens (the trainer's importance ratios would silently be wrong)."""
    if len(stream.logprobs) != len(stream.tokens):
        raise RuntimeError(f"SGLang request {stream.vid}: {len(stream.tokens)} tokens but "
                           f"{len(stream.logprobs)} logprobs")
    experts = decode_routed_experts(stream.experts, len(stream.tokens), model_cfg)
    return GenOutput(stream.tokens, stream.logprobs, experts, reason)


def weights_payload(state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """The published state dict as SGLang's ``update_weights_from_tensor`` takes it: Hugging Face
    names unchanged (SGLang's Qwen3-MoE and Mixtral loaders read checkpoint names and stack q/k/v,
    gate/up and experts themselves), contiguous tensors, the tied ``lm_head`` left out (SGLang
    ties it)."""
    payload = []
    for name, tensor in state_dict.items():
        if model_cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if not name.startswith(("model.", "lm_head.")):
            raise ValueError(f"weight {name!r} is not a Hugging Face model name (model.* or lm_head.*)")
        payload.append((name, tensor.detach().contiguous()))
    return payload


# ---------------------------------------------------------------------- the engine
class SGLangEngine(ServedEngineBase):
    """``sglang.Engine`` driven through the engine seam (see the module doc)."""

    name = "SGLang"

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, eos_id: int,
                 pad_id: int = 0, device: str = "cuda", seed: int = 0, model_path: str | None = None):
        if not torch.cuda.is_available():
            raise RuntimeError("engine.name=sglang needs a CUDA GPU (SGLang has no CPU build); "
                               "use engine=vllm or engine=native on CPU")
        try:
            import sglang
            from sglang.srt.managers.io_struct import (ContinueGenerationReqInput, GenerateReqInput,
                                                       PauseGenerationReqInput)
        except ImportError as exc:
            raise RuntimeError("engine.name=sglang needs SGLang: pip install 'sglang==0.5.15' "
                               "(CUDA, torch 2.11.0), see the README") from exc
        self._GenerateReqInput = GenerateReqInput
        self._Pause, self._Continue = PauseGenerationReqInput, ContinueGenerationReqInput
        model_path = self._init_served(model_cfg, engine_cfg, eos_id, pad_id, model_path)
        t0 = time.perf_counter()
        self.llm = sglang.Engine(
            model_path=model_path, skip_tokenizer_init=True, dtype=engine_cfg.dtype, random_seed=seed,
            context_length=model_cfg.max_seq_len, max_running_requests=engine_cfg.max_batch_size,
            mem_fraction_static=engine_cfg.gpu_memory_utilization,
            disable_radix_cache=not engine_cfg.prefix_caching, disable_cuda_graph=engine_cfg.enforce_eager,
            enable_return_routed_experts=engine_cfg.return_routed_experts, log_level="error",
            tp_size=engine_cfg.tensor_parallel_size,
            ep_size=engine_cfg.tensor_parallel_size if engine_cfg.expert_parallel else 1)
        self.start_s = time.perf_counter() - t0
        self._manager = self.llm.tokenizer_manager
        self._loop: asyncio.AbstractEventLoop = self.llm.loop
        self._progress = asyncio.Event()

    # ------------------------------------------------------------------ the engine seam
    def submit(self, rid: int, request: GenRequest) -> None:
        self._check_new_rid(rid, request)
        # SGLang aborts by rid *prefix*: uuids keep "r1" from also aborting "r10"
        stream = _Stream(f"rlpost-{uuid.uuid4().hex}")
        obj = self._GenerateReqInput(**generate_kwargs(request, self.eos_id, stream.vid,
                                                       self.cfg.return_routed_experts))
        stream.task = self._loop.create_task(self._consume(stream, obj))
        self._streams[rid] = stream

    async def _consume(self, stream: _Stream, obj) -> None:
        async for out in self._manager.generate_request(obj, None):
            stream.update(out)
            self._progress.set()
        self._progress.set()

    async def _advance(self) -> None:
        """Until a request finishes, one gains ``chunk_tokens`` tokens, or ``_MAX_STEP_S`` passes."""
        start = {rid: len(s.tokens) for rid, s in self._streams.items()}
        deadline = self._loop.time() + _MAX_STEP_S
        while True:
            if any(s.task.done() for s in self._streams.values()):
                return
            if any(len(s.tokens) - start[rid] >= self.cfg.chunk_tokens for rid, s in self._streams.items()):
                return
            left = deadline - self._loop.time()
            if left <= 0:
                return
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), timeout=left)
            except asyncio.TimeoutError:
                return

    def step(self) -> list[tuple[int, GenOutput]]:
        if self._streams:
            self._loop.run_until_complete(self._advance())
        done = [rid for rid, s in self._streams.items() if s.task.done()]
        return [(rid, self._close(rid)) for rid in done]

    def abort(self, rids: list[int]) -> list[tuple[int, GenOutput]]:
        live = [rid for rid in rids if rid in self._streams]
        for rid in live:
            self._manager.abort_request(rid=self._streams[rid].vid)
        tasks = [self._streams[rid].task for rid in live]
        if tasks:
            _, pending = self._loop.run_until_complete(asyncio.wait(tasks, timeout=_CONTROL_TIMEOUT_S))
            if pending:
                raise RuntimeError(f"SGLang did not end {len(pending)} aborted requests in {_CONTROL_TIMEOUT_S} s")
        return [(rid, self._close(rid, "abort")) for rid in live]

    def _close(self, rid: int, reason: str | None = None) -> GenOutput:
        stream = self._streams.pop(rid)
        if stream.task.done() and not stream.task.cancelled() and stream.task.exception() is not None:
            raise RuntimeError(f"SGLang request {stream.vid} failed: {stream.task.exception()!r}")
        return output_of(stream, reason or stream.reason or "stop", self.model_cfg)

    def pause(self) -> None:
        """Stop decoding in place (requests keep their KV cache) until :meth:`resume`."""
        self._loop.run_until_complete(self._manager.pause_generation(self._Pause(mode="in_place")))

    def resume(self) -> None:
        self._loop.run_until_complete(self._manager.continue_generation(self._Continue()))

    def _load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """The radix cache is flushed with the update (its entries hold the old weights' KV)."""
        ok, message = self.llm.update_weights_from_tensor(weights_payload(state_dict, self.model_cfg),
                                                          flush_cache=True)
        if not ok:
            raise RuntimeError(f"SGLang weights v{version}: update_weights_from_tensor failed: {message}")

    def close(self) -> None:
        self.llm.shutdown()
