"""Where a reasoning model's committed answer starts, for the built-in verifiers.

Qwen3, DeepSeek-R1/V3.1 and GLM-4.5 think between ``<think>`` and ``</think>`` tokens before they
answer. A verifier that reads the whole response pays for a ``\\boxed{}`` or a code block written
while reasoning, or for the last tentative answer of a response the budget cut mid-thought: an
answer the policy never committed to. With ``env.reasoning`` on (``auto``: when the tokenizer has
both tokens), the verifiers see only what follows the last ``</think>``, and a response whose
reasoning never ended scores 0. Found by token id, not text: decoding may drop the markers as
special tokens, and text the model spells out as ``</think>`` in several tokens is not the marker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlpost.config import ConfigError

THINK_MARKERS = ("<think>", "</think>")
NEVER_ENDED = f"the reasoning never ended (no {THINK_MARKERS[1]})"


def _reasoning_open(ids: list[int], opened: int, closed: int) -> bool:
    """``ids`` leave a reasoning block open: a ``<think>`` after the last ``</think>``."""
    last = {i: at for at, i in enumerate(ids)}
    return last.get(opened, -1) > last.get(closed, -1)


@dataclass(frozen=True)
class ReasoningSplit:
    opened: int          # the <think> token id
    closed: int          # the </think> token id
    # the chat template opens the reasoning itself (DeepSeek-R1's "<think>\n" after the assistant
    # marker): a response without </think> never left it, even with no <think> of its own
    prompt_opens: bool

    @classmethod
    def for_env(cls, tokenizer: Any, mode: str, tokenizer_name: str,
                prompt_ids: Callable[[], list[int]]) -> "ReasoningSplit | None":
        """The split for ``env.reasoning=mode`` (auto | think | none) on ``tokenizer``, or None
        (score the whole response); ``prompt_ids`` gives one rendered prompt (the template's
        generation suffix is the same for all)."""
        if mode == "none":
            return None
        encode = getattr(tokenizer, "encode_template_text", None)  # tokenizers with added tokens
        ids = [encode(marker) if encode is not None else [] for marker in THINK_MARKERS]
        if not all(len(i) == 1 for i in ids):
            if mode == "think":
                raise ConfigError(f"env.reasoning=think: the tokenizer ({tokenizer_name}) has no single "
                                  f"{' / '.join(THINK_MARKERS)} tokens (use auto or none)")
            return None
        opened, closed = ids[0][0], ids[1][0]
        return cls(opened, closed, _reasoning_open(prompt_ids(), opened, closed))

    def final(self, response_ids: list[int]) -> list[int] | None:
        """The ids after the last ``</think>``; the whole response when it never reasoned (and
        the template did not open it); None when its reasoning never ended."""
        ids = [int(i) for i in response_ids]
        if _reasoning_open(ids, self.opened, self.closed):  # opened (again) and not closed after
            return None
        if self.closed in ids:
            return ids[len(ids) - ids[::-1].index(self.closed):]
        return None if self.prompt_opens else ids
