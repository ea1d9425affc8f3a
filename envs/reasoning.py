"""Where a reasoning model's committed answer starts, for the built-in verifiers.

Qwen3, DeepSeek-R1/V3.1 and GLM-4.5 think between ``<think>`` and ``</think>`` tokens before they
answer. A verifier that reads the whole response pays for a ``\\boxed{}`` or a code block written
while reasoning, or for the last tentative answer of a response the budget cut mid-thought: an
answer the policy never committed to. With ``env.reasoning`` on (``auto``: when the tokenizer has
both tokens), the verifiers see only what follows the last ``</think>``, and a response whose
reasoning never ended scores 0. Found by token id, not text: decoding may drop the markers as
special tokens, and text the model spells out as ``</think>`` in several tokens is not the marker.

GPT-OSS writes OpenAI's harmony format instead: messages ``<|channel|>NAME<|message|>TEXT``
ended by ``<|end|>`` (``<|return|>`` for the turn's last, ``<|call|>`` for a tool call), the
next one opened by ``<|start|>assistant``; its reasoning is the ``analysis`` channel and its
answer the ``final`` one. With ``env.reasoning=harmony`` (``auto``: when the tokenizer has
single ``<|channel|>`` and ``<|message|>`` tokens, whatever else it has) the verifiers see only
the text of the response's last message, and only when that message is on the final channel: an
answer written while analysing, or a response cut before it reached its final message, earns
nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlpost.config import ConfigError

THINK_MARKERS = ("<think>", "</think>")
NEVER_ENDED = f"the reasoning never ended (no {THINK_MARKERS[1]})"
HARMONY_MARKERS = ("<|channel|>", "<|message|>")
HARMONY_ENDS = ("<|end|>", "<|return|>", "<|call|>", "<|start|>")  # what ends a message's text
NO_FINAL = "the response's last message is not on the final channel (harmony: no <|channel|>final<|message|>)"


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
                prompt_ids: Callable[[], list[int]]) -> "ReasoningSplit | HarmonySplit | None":
        """The split for ``env.reasoning=mode`` (auto | think | harmony | none) on ``tokenizer``, or None
        (score the whole response); ``prompt_ids`` gives one rendered prompt (the template's
        generation suffix is the same for all)."""
        if mode == "none":
            return None
        encode = getattr(tokenizer, "encode_template_text", None)  # tokenizers with added tokens
        think = single_token_ids(encode, THINK_MARKERS)
        harmony = single_token_ids(encode, HARMONY_MARKERS)
        if mode in ("harmony", "auto") and harmony:  # the more specific: GPT-OSS's tokenizer has only these
            return HarmonySplit(*harmony, frozenset(single_token_ids(encode, HARMONY_ENDS, partial=True)),
                                tokenizer.decode)
        if mode in ("think", "auto") and think:
            opened, closed = think
            return cls(opened, closed, _reasoning_open(prompt_ids(), opened, closed))
        if mode != "auto":
            markers = THINK_MARKERS if mode == "think" else HARMONY_MARKERS
            raise ConfigError(f"env.reasoning={mode}: the tokenizer ({tokenizer_name}) has no single "
                              f"{' / '.join(markers)} tokens (use auto or none)")
        return None

    @property
    def unfinished(self) -> str:
        """Why :meth:`final` found no answer (the reward's reason)."""
        return NEVER_ENDED

    def final(self, response_ids: list[int]) -> list[int] | None:
        """The ids after the last ``</think>``; the whole response when it never reasoned (and
        the template did not open it); None when its reasoning never ended."""
        ids = [int(i) for i in response_ids]
        if _reasoning_open(ids, self.opened, self.closed):  # opened (again) and not closed after
            return None
        if self.closed in ids:
            return ids[len(ids) - ids[::-1].index(self.closed):]
        return None if self.prompt_opens else ids


def single_token_ids(encode: Callable[[str], list[int]] | None, markers: tuple[str, ...],
                     partial: bool = False) -> list[int]:
    """The id of each marker that is one token of the tokenizer; [] unless all are (``partial``:
    those that are)."""
    ids = [encode(marker) if encode is not None else [] for marker in markers]
    single = [i[0] for i in ids if len(i) == 1]
    return single if partial or len(single) == len(markers) else []


@dataclass(frozen=True)
class HarmonySplit:
    """GPT-OSS's harmony messages (module doc): the answer is the response's last message, on
    the final channel."""

    channel: int                 # <|channel|>
    message: int                 # <|message|>
    ends: frozenset[int]         # <|end|>, <|return|>, <|call|>, <|start|>
    decode: Callable[[list[int]], str]

    @property
    def unfinished(self) -> str:
        return NO_FINAL

    def final(self, response_ids: list[int]) -> list[int] | None:
        """The text ids of the response's last message when its channel is ``final``, else None."""
        ids = [int(i) for i in response_ids]
        heads = [at for at, i in enumerate(ids) if i == self.channel]
        if not heads:
            return None
        head = heads[-1]
        try:
            body = ids.index(self.message, head + 1)
        except ValueError:
            return None  # cut inside the header
        name = self.decode(ids[head + 1:body]).split()
        if name[:1] != ["final"]:
            return None
        text = ids[body + 1:]
        end = next((at for at, i in enumerate(text) if i in self.ends), len(text))
        if any(i in (self.channel, self.message) for i in text[end:]):
            return None  # a message began after the final one's end: not the last
        return text[:end]
