"""The interface every inference engine (native, vLLM, SGLang) implements.

Token ids in, token ids out: a request carries the prompt ids and, when it resumes a stopped
generation, the response ids produced so far; the engine continues from exactly those ids
(continuation prefill) and never re-tokenizes anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from rlpost.config import ModelConfig


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    # Response tokens already generated (a resumed partial); they are prefilled, not sampled.
    prefix_ids: list[int] = field(default_factory=list)
    stop_ids: tuple[int, ...] = ()
    # Names the sample across stops and resumes, so an engine may keep its KV cache in between.
    cache_key: str | None = None

    @property
    def input_ids(self) -> list[int]:
        """What the engine feeds before sampling: the prompt, then any resumed response."""
        return list(self.prompt_ids) + list(self.prefix_ids)

    def check_fits(self, max_seq_len: int) -> None:
        """Every engine keeps positions per request: each must fit the model on its own."""
        n = len(self.prompt_ids) + len(self.prefix_ids)
        if self.max_new_tokens <= 0:
            raise ValueError(f"GenRequest.max_new_tokens must be > 0, got {self.max_new_tokens}")
        if n + self.max_new_tokens > max_seq_len:
            raise ValueError(f"prompt+prefix ({n}) + max_new_tokens ({self.max_new_tokens}) exceeds "
                             f"model.max_seq_len={max_seq_len}")


@dataclass
class GenOutput:
    token_ids: list[int]
    logprobs: list[float]
    # (n_new_tokens, moe_layers, top_k): experts that routed the hidden state producing each token
    # in each layer with experts (GLM's first dense layers have none).
    routed_experts: np.ndarray | None
    # "stop" (a stop token was produced), "length" (budget used up) or "abort" (stopped between
    # chunks by the caller; resumable).
    finish_reason: str


def moe_layer_rows(experts: np.ndarray | None, cfg: ModelConfig) -> np.ndarray | None:
    """An engine's (tokens, layers, top_k) routing as ours, (tokens, moe_layers, top_k): an
    engine that reports every layer (dense ones too) has the first dense layers' rows dropped;
    any other shape is no routing (partial routing information is worse than none)."""
    if experts is None or experts.ndim != 3 or experts.shape[2] != cfg.top_k:
        return None
    if experts.shape[1] == cfg.moe_layers:
        return experts
    if experts.shape[1] == cfg.n_layers:
        return np.ascontiguousarray(experts[:, cfg.first_dense_layers:])
    return None


ShouldStop = Callable[[], bool]
# Called at chunk boundaries with (request index, output) for each request that just finished, so
# a worker can ship a finished group before the slowest sample of the batch is done.
OnFinished = Callable[[int, GenOutput], None]
# Called at chunk boundaries with the number of free batch rows; returns requests to start now
# (continuous batching: a worker tops the running batch up from its queue).
Admit = Callable[[int], list[GenRequest]]


class InferenceEngine(Protocol):
    """What every engine implements (AReaL's InferenceEngine shape, token ids only).

    Requests are submitted under caller-chosen integer ids; ``step()`` advances generation by
    about ``engine.chunk_tokens`` tokens per running request and returns the requests that
    finished meanwhile; ``abort(ids)`` stops requests and returns what they generated so far
    (resumable: submit prompt + those tokens again). Weights are swapped in place under a
    version number. The APRIL cut, the weight swap and the admission policy are not the
    engine's business: :meth:`EngineBase.generate` drives any engine through these calls."""

    @property
    def version(self) -> int: ...

    def submit(self, rid: int, request: GenRequest) -> None: ...

    def step(self) -> list[tuple[int, GenOutput]]: ...

    def abort(self, rids: list[int]) -> list[tuple[int, GenOutput]]: ...

    def has_unfinished(self) -> bool: ...

    def free_slots(self) -> int: ...

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def stats(self) -> dict[str, float]: ...


class EngineBase:
    """The one driving loop over :class:`InferenceEngine` calls, shared by every engine."""

    def pause(self) -> None:
        """Stop generating until :meth:`resume`, keeping every request. A stepped engine (native,
        vLLM in-process) generates only inside ``step()``, so it is paused between calls already;
        a server engine (SGLang) overrides this."""

    def resume(self) -> None:
        """Continue after :meth:`pause`."""

    def generate(self, requests: list[GenRequest], should_stop: ShouldStop | None = None,
                 on_finished: OnFinished | None = None, admit: Admit | None = None) -> list[GenOutput]:
        """Generate for all requests, one chunk at a time. After every chunk the requests that
        finished are reported through ``on_finished``, ``should_stop`` is polled (True: every
        unfinished request is aborted and returns with finish_reason "abort", its tokens kept),
        and ``admit(free_slots)`` may return requests that join the running batch (numbered
        after ``requests``). Returns one output per request."""
        requests = list(requests)
        outputs: list[GenOutput | None] = [None] * len(requests)
        for i, r in enumerate(requests):
            self.submit(i, r)

        def report(done: list[tuple[int, GenOutput]]) -> None:
            for i, out in done:
                outputs[i] = out
                if on_finished is not None:
                    on_finished(i, out)

        def top_up() -> None:
            free = self.free_slots()
            if admit is not None and free > 0:
                for r in admit(free):
                    requests.append(r)
                    outputs.append(None)
                    self.submit(len(requests) - 1, r)

        top_up()
        while self.has_unfinished():
            report(self.step())
            if should_stop is not None and should_stop():
                report(self.abort([i for i, out in enumerate(outputs) if out is None]))
                break
            top_up()
        return outputs  # type: ignore[return-value]


class ServedEngineBase(EngineBase):
    """Book-keeping shared by the engines that wrap a serving library (vLLM, SGLang): the running
    requests by our id (``_streams``), the weights version, update timings, and the rule that
    weights change only with no request running (no token may mix two versions)."""

    name = "engine"

    def _init_served(self, model_cfg, engine_cfg, eos_id: int, pad_id: int, model_path: str | None) -> str:
        """Sets the shared fields; returns the checkpoint to start the library from: ``model_path``,
        or a random-init one (these libraries start from a checkpoint; the trainer's first
        publish replaces it), kept on disk as long as the engine lives."""
        from rlpost.modeling import random_checkpoint

        self.model_cfg, self.cfg, self.eos_id, self.pad_id = model_cfg, engine_cfg, eos_id, pad_id
        self._init_dir = None if model_path is not None else random_checkpoint(model_cfg)
        self._version = -1
        self._streams: dict = {}
        self.start_s = 0.0
        self.weight_update_s = 0.0
        self.weight_updates = 0
        return model_path if model_path is not None else self._init_dir.name

    @property
    def version(self) -> int:
        return self._version

    def has_unfinished(self) -> bool:
        return bool(self._streams)

    def free_slots(self) -> int:
        return max(0, self.cfg.max_batch_size - len(self._streams))

    def _check_new_rid(self, rid: int, request: GenRequest) -> None:
        if rid in self._streams:
            raise ValueError(f"request id {rid} is already running")
        request.check_fits(self.model_cfg.max_seq_len)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """In place, between chunks, with no request running (the worker aborts or finishes
        every request before it swaps). The library gets the weights in its checkpoint layout
        (GPT-OSS: experts fused, :func:`rlpost.modeling.hf_layout`)."""
        from rlpost.modeling import hf_layout

        if self._streams:
            raise RuntimeError(f"{self.name} weights v{version}: {len(self._streams)} requests still running")
        t0 = time.perf_counter()
        self._load_weights(hf_layout(state_dict, self.model_cfg), version)
        self._version = version
        self.weight_update_s += time.perf_counter() - t0
        self.weight_updates += 1

    def _load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        return {"running": len(self._streams), "weight_update_s": self.weight_update_s,
                "weight_updates": self.weight_updates, "start_s": self.start_s}


def make_engine(model_cfg, engine_cfg, eos_id: int, pad_id: int = 0, seed: int = 0,
                device: str = "cpu") -> InferenceEngine:
    """The engine ``engine.name`` names (imported only when chosen: vLLM is an optional extra)."""
    if engine_cfg.name == "native":
        from rlpost.rollout.native import NativeEngine

        return NativeEngine(model_cfg, engine_cfg, eos_id=eos_id, pad_id=pad_id, device=device, seed=seed)
    if engine_cfg.name == "vllm":
        from rlpost.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_cfg, engine_cfg, eos_id=eos_id, pad_id=pad_id, device=device, seed=seed)
    if engine_cfg.name == "sglang":
        from rlpost.rollout.sglang_engine import SGLangEngine

        return SGLangEngine(model_cfg, engine_cfg, eos_id=eos_id, pad_id=pad_id, device=device, seed=seed)
    raise ValueError(f"engine.name={engine_cfg.name!r}: must be native, vllm or sglang")
