"""The interface every inference engine (native, vLLM, SGLang) implements.

Token ids in, token ids out: a request carries the prompt ids and, when it resumes a stopped
generation, the response ids produced so far; the engine continues from exactly those ids
(continuation prefill) and never re-tokenizes anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch


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


@dataclass
class GenOutput:
    token_ids: list[int]
    logprobs: list[float]
    # (n_new_tokens, n_layers, top_k): experts that routed the hidden state producing each token.
    routed_experts: np.ndarray | None
    # "stop" (a stop token was produced), "length" (budget used up) or "abort" (stopped between
    # chunks by the caller; resumable).
    finish_reason: str


ShouldStop = Callable[[], bool]
# Called at chunk boundaries with (request index, output) for each request that just finished, so
# a worker can ship a finished group before the slowest sample of the batch is done.
OnFinished = Callable[[int, GenOutput], None]
# Called at chunk boundaries with the number of free batch rows; returns requests to start now
# (continuous batching: a worker tops the running batch up from its queue).
Admit = Callable[[int], list[GenRequest]]


class InferenceEngine(Protocol):
    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None: ...

    @property
    def version(self) -> int: ...

    def generate(self, requests: list[GenRequest], should_stop: ShouldStop | None = None,
                 on_finished: OnFinished | None = None, admit: Admit | None = None) -> list[GenOutput]:
        """Generate for all requests; ``should_stop`` is polled at chunk boundaries and, when it
        returns True, every unfinished request returns with finish_reason "abort". Requests
        returned by ``admit`` join the running batch and get outputs numbered after ``requests``."""
        ...
