"""A character-level tokenizer for procedurally generated tasks.

Real models bring their own tokenizer; this one exists so the toy loop needs no downloads and
every id is easy to read in a test. Ids 0..2 are reserved for pad, bos and eos.
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
