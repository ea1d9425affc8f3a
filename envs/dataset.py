"""Your own prompts and verifier: a JSONL dataset with a math, exact-match or custom reward.

What slime (``--prompt-data``, ``--input-key``, ``--label-key``, ``--rm-type``,
``--custom-rm-path``), OpenRLHF (``--prompt_data``, ``--input_key``, ``--label_key``,
``--reward_func``) and verl (a dataset plus ``custom_reward_function``) users start from:

* ``env.train_path``: one JSON object per line (or a ``.json`` list of objects), with the prompt
  under ``env.prompt_key`` and the reference answer under ``env.answer_key``; ``env.sft_key``
  (optional) holds the warm-up target (e.g. a worked solution ending in the answer).
  ``env.eval_path`` holds the held-out set; without it ``env.num_eval`` records are held out
  from the training file (a seeded split), and training never sees them. ``env.eval_sets``
  (``{name: path}``, slime's several ``--eval-prompt-data``) adds named benchmarks evaluated at
  the same points, reported as ``eval/<name>/accuracy``.
* ``env.prompt_template`` wraps each prompt (``{prompt}`` is replaced).
* With a real checkpoint, ``env.tokenizer=hf`` renders each prompt through the checkpoint's chat
  template (rlpost/tokenizer.py ``HFTokenizer``), and a prompt may then also be a conversation,
  verl's and OpenAI's ``[{"role": ..., "content": ...}, ...]`` ending in the user's turn (the
  template wraps that turn's content).
* ``env.reward``: ``math`` (the committed final answer, numerically equivalent to the reference:
  rlpost/envs/answers.py), ``exact`` (the whole response, stripped, equals the reference), or
  ``package.module:function``, your own verifier: ``function(response: str, label)``
  returning a float or ``(float, info dict)``; ``label`` is the record's answer as text, or the
  JSON object or list itself when the record holds one (verl's dict ground truths), and a
  verifier with a third parameter also gets ``{key: value}`` of the record's ``env.extra_keys``
  (verl's ``extra_info``), run in the rollout workers' reward threads with
  ``env.reward_timeout_s`` and checked to be finite and within ``env.reward_range``. It is your
  code, trusted like the rest of the config; the model's text is only its input. Code-running
  verifiers belong in the sandboxed coding env.
* ``env.tools`` (with a checkpoint's chat template): the model may call tools (``calculator``,
  ``python`` in the sandbox, your functions) in its chat format for up to ``env.max_turns`` tool
  turns before its final answer; the reward scores the final turn (rlpost/envs/chat_tools.py).

Bad data is a config error that names the file, the line and the key, before anything starts.
Training prompts are drawn as seeded permutations of the training records, one epoch after
another, so task ``i`` is the same record on every node and after a resume.
"""

from __future__ import annotations

import functools
import json
import numbers
import os
import random
from dataclasses import dataclass
from typing import Any, Callable

from rlpost.config import ConfigError, EnvConfig, SandboxConfig
from rlpost.records import SamplingParams, Task
from rlpost.tokenizer import ended as response_ended
from rlpost.tokenizer import env_tokenizer

from rlpost.envs.answers import equivalent, extract_answer
from rlpost.envs.base import RewardResult, eval_task_set
from rlpost.envs.reasoning import ReasoningSplit


CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Record:
    prompt: str | list[dict[str, str]]  # a text, or a conversation ending in a user turn (chat template)
    answer: str
    sft_target: str | list[dict[str, Any]]  # a text, or (env.tools) assistant and tool messages
    where: str  # "file:line", for error messages


def load_records(path: str, cfg: EnvConfig, field: str, sft: bool = True) -> list[Record]:
    """The records of ``path`` (JSONL, or a JSON list when it ends in .json), checked; ``sft``
    False: no ``env.sft_key`` needed (an extra eval set: the answer stands in)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{field}={path!r}: no such file")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if path.endswith(".json"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{field}={path!r}: not JSON ({exc})") from None
        if not isinstance(rows, list):
            raise ConfigError(f"{field}={path!r}: a .json dataset must be a list of objects")
        numbered = [(i + 1, row) for i, row in enumerate(rows)]
    else:
        numbered = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{field}={path!r}: line {n} is not JSON ({exc.msg})") from None
    custom = ":" in cfg.reward
    records = []
    for n, row in numbered:
        where = f"{path}:{n}"
        if not isinstance(row, dict):
            raise ConfigError(f"{field}={path!r}: record {n} is {type(row).__name__}, not an object")
        values: list = []
        for key_field, key in (("env.prompt_key", cfg.prompt_key), ("env.answer_key", cfg.answer_key),
                               ("env.sft_key", (sft and cfg.sft_key) or cfg.answer_key)):
            value = row.get(key)
            if key_field == "env.prompt_key" and isinstance(value, list):
                values.append(_messages(value, f"{field}={path!r}: record {n}: {key_field}={key!r}", cfg))
                continue
            if key_field == "env.sft_key" and cfg.tools and sft and isinstance(value, list):
                values.append(_demonstration(value, f"{field}={path!r}: record {n}: {key_field}={key!r}"))
                continue
            if custom and key_field != "env.prompt_key" and isinstance(value, (dict, list)) and value:
                # a structured label (verl's dict ground truth): the verifier gets the object; it is no
                # warm-up target, which then must come from env.sft_key
                values.append(value if key_field == "env.answer_key" else "")
                continue
            if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value).strip() == "":
                structured = " (a list or object needs a custom verifier, env.reward=package.module:function)" \
                    if isinstance(value, (dict, list)) and value and not custom else ""
                raise ConfigError(f"{field}={path!r}: record {n} has no usable {key_field}={key!r} "
                                  f"(got {str(value)[:80]!r}; keys: {sorted(row)[:8]}){structured}")
            values.append(str(value))
        label, answer = values[1], values[1]
        if custom:  # what the verifier gets travels with the task as JSON (Task.answer is text)
            extra = {key: row.get(key) for key in cfg.extra_keys}
            answer = json.dumps({"label": label, "extra": extra}, ensure_ascii=False, separators=(",", ":"))
        records.append(Record(values[0], answer, values[2], where))
    if not records:
        raise ConfigError(f"{field}={path!r}: no records")
    for key in cfg.extra_keys:  # a key no record has is a typo, not data
        if all(key not in row for _, row in numbered if isinstance(row, dict)):
            raise ConfigError(f"env.extra_keys: {key!r} is in no record of {field}={path!r} "
                              f"(keys: {sorted(numbered[0][1])[:8]})")
    return records


def _messages(value: list, where: str, cfg: EnvConfig) -> list[dict[str, str]]:
    """A prompt given as a conversation (verl's and OpenAI's ``[{"role", "content"}, ...]``),
    checked: it needs the checkpoint's chat template, and it must end with the user's turn."""
    if cfg.tokenizer != "hf" or not cfg.chat_template:
        raise ConfigError(f"{where} is a list of messages: that needs a chat template (env.tokenizer=hf with "
                          f"env.chat_template=true; this is env.tokenizer={cfg.tokenizer})")
    for i, message in enumerate(value):
        if (not isinstance(message, dict) or message.get("role") not in CHAT_ROLES
                or not isinstance(message.get("content"), str)):
            raise ConfigError(f"{where}: message {i} must be {{\"role\": one of {', '.join(CHAT_ROLES)}, "
                              f"\"content\": a string}} (got {str(message)[:80]!r})")
    if not value or value[-1]["role"] != "user":
        raise ConfigError(f"{where}: the last message must be the user's (the model answers it)")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _demonstration(value: list, where: str) -> list[dict[str, Any]]:
    """A warm-up demonstration with tool turns (``env.tools``): OpenAI-format assistant messages
    (``content``, optional ``tool_calls``) and the ``tool`` messages answering them, ending in an
    assistant turn without calls (the final answer). Checked here, so a typo is one line."""
    def bad(i: int, rule: str) -> ConfigError:
        return ConfigError(f"{where}: message {i} {rule} (got {str(value[i])[:80]!r})")

    for i, m in enumerate(value):
        # OpenAI writes a turn that only calls tools with "content": null
        null_ok = isinstance(m, dict) and m.get("role") == "assistant" and m.get("content", "") is None
        if not isinstance(m, dict) or m.get("role") not in ("assistant", "tool") or not (
                isinstance(m.get("content", ""), str) or null_ok):
            raise bad(i, 'must be {"role": "assistant" or "tool", "content": a string}')
        calls = m.get("tool_calls", [])
        if m["role"] == "tool" and calls:
            raise bad(i, "is a tool result: it makes no calls")
        if not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
                and isinstance(c["function"].get("arguments", {}), (dict, str)) for c in calls):
            raise bad(i, 'has tool_calls that are not [{"type": "function", "function": {"name", "arguments"}}]')
    if not value or value[0]["role"] != "assistant" or value[-1]["role"] != "assistant" or value[-1].get("tool_calls"):
        raise ConfigError(f"{where}: a demonstration starts with an assistant turn and ends with one that makes no "
                          f"call (the final answer)")
    return [{**m, "content": m.get("content") or ""} for m in value]


def _unpack(answer: str) -> tuple[Any, dict[str, Any]]:
    """(label, extra fields) of a custom verifier's task answer; a plain text answer (a task
    written by an older rlpost, resumed from its Redis file) is the label itself."""
    try:
        packed = json.loads(answer)
    except ValueError:
        return answer, {}
    if isinstance(packed, dict) and set(packed) == {"label", "extra"} and isinstance(packed["extra"], dict):
        return packed["label"], packed["extra"]
    return answer, {}


def _takes_extra(fn: Callable, cfg: EnvConfig) -> bool:
    """Whether the verifier is called with the record's ``env.extra_keys`` fields as a third
    argument: it is when it accepts one (verl's ``extra_info``); asking for extra keys from a
    two-argument verifier is a config error."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: called as (response, label)
        params = []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes = len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)
    if cfg.extra_keys and not takes:
        raise ConfigError(f"env.extra_keys={list(cfg.extra_keys)}: env.reward={cfg.reward!r} takes (response, label); "
                          f"give it a third parameter for the records' extra fields")
    return takes


def load_reward_fn(spec: str) -> Callable[[str, str], Any]:
    """The user's verifier, ``package.module:function`` (imported at start-up)."""
    from rlpost.envs.custom import load_callable

    return load_callable(spec, "env.reward", "math, exact or package.module:function")


def _plain(info: Any) -> dict[str, Any]:
    """A verifier's info as the record can carry it (msgpack, bounded): plain scalars kept,
    anything else as a short repr, so a verifier's objects never break a worker's shipment."""
    if not isinstance(info, dict):
        return {"info": repr(info)[:200]}
    out = {}
    for key, value in list(info.items())[:16]:
        if isinstance(value, str):
            value = value[:200]
        elif not isinstance(value, (bool, int, float, type(None))) or (isinstance(value, int) and abs(value) >= 2**63):
            value = repr(value)[:200]
        out[str(key)[:64]] = value
    return out


class DatasetEnv:
    name = "dataset"

    def __init__(self, cfg: EnvConfig, sandbox: SandboxConfig | None = None):
        self.cfg = cfg
        self.reward_range = (float(cfg.reward_range[0]), float(cfg.reward_range[1]))
        records = load_records(cfg.train_path, cfg, "env.train_path")
        if cfg.eval_path:
            self._train, self._eval = records, load_records(cfg.eval_path, cfg, "env.eval_path")[:cfg.num_eval]
        else:
            if cfg.num_eval >= len(records):
                raise ConfigError(f"env.num_eval={cfg.num_eval}: env.train_path has only {len(records)} records "
                                  f"(hold out fewer, or give env.eval_path)")
            order = list(range(len(records)))
            random.Random(f"{cfg.seed}/holdout").shuffle(order)
            held = set(order[:cfg.num_eval])
            self._eval = [records[i] for i in sorted(held)]
            self._train = [r for i, r in enumerate(records) if i not in held]
        self._eval_sets = {name: load_records(path, cfg, f"env.eval_sets.{name}", sft=False)[:cfg.num_eval]
                           for name, path in cfg.eval_sets.items()}
        alphabet = ""
        if cfg.tokenizer in ("char", "auto"):  # a character vocabulary over every text the run will encode
            every = self._train + self._eval + [r for rs in self._eval_sets.values() for r in rs]
            labels = [_unpack(r.answer)[0] if ":" in cfg.reward else r.answer for r in every]  # not the JSON
            texts = [self._prompt(r) for r in every] + [r.sft_target for r in every if isinstance(r.sft_target, str)] + \
                [label for label in labels if isinstance(label, str)]
            alphabet = "".join(sorted(set("".join(texts))))
        self.tokenizer = env_tokenizer(cfg, alphabet)
        self._reward_fn = None if cfg.reward in ("math", "exact") else load_reward_fn(cfg.reward)
        self._reward_takes_extra = self._reward_fn is not None and _takes_extra(self._reward_fn, cfg)
        self.missing_sft = any(r.sft_target == "" for r in self._train)  # structured labels, no env.sft_key
        self.turns = None
        if cfg.tools:
            from rlpost.envs.chat_tools import ChatToolTurns

            self.turns = ChatToolTurns(self.tokenizer, cfg, sandbox)
        # python calls run model-written code: the driver smoke-tests the sandbox first
        self.sandboxed = "python" in cfg.tools
        # math / exact score the answer after a reasoning model's </think> (envs/reasoning.py)
        self._reasoning = None if self._reward_fn is not None else ReasoningSplit.for_env(
            self.tokenizer, cfg.reasoning, cfg.tokenizer, lambda: self._prompt_ids(self._train[0]))

    @functools.cached_property
    def longest_train_prompt(self) -> tuple[int, str]:
        """(tokens, "file:line") of the longest training prompt: the driver checks it against
        model.max_seq_len at start-up (workers never tokenize the whole file for it)."""
        lengths = [len(self._prompt_ids(r)) for r in self._train]
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        return lengths[longest], self._train[longest].where

    def drop_long_prompts(self, max_seq_len: int, train_new_tokens: int) -> dict[str, list[str]]:
        """``env.filter_long_prompts``: drop the records whose prompt leaves no room for its
        completion budget in ``max_seq_len`` (training: ``train_new_tokens``; eval sets: their
        own budget) instead of refusing the run, as verl's ``filter_overlong_prompts`` and slime's
        ``--rollout-max-prompt-len`` do. Returns where the dropped records were, per set
        (``train``, ``eval``, each extra eval set's name). Called once, by the driver, before any
        task is made: it alone turns records into tasks, so every task index keeps one meaning."""
        budget = self.cfg.eval_max_new_tokens or self.max_answer_len() + 1

        def keep(records: list[Record], limit: int) -> tuple[list[tuple[Record, int]], list[str]]:
            lengths = [len(self._prompt_ids(r)) for r in records]
            return ([(r, n) for r, n in zip(records, lengths) if n <= limit],
                    [r.where for r, n in zip(records, lengths) if n > limit])

        dropped: dict[str, list[str]] = {}
        train, dropped["train"] = keep(self._train, max_seq_len - train_new_tokens)
        evals, dropped["eval"] = keep(self._eval, max_seq_len - budget)
        sets = {}
        for name, records in self._eval_sets.items():
            sets[name], dropped[name] = keep(records, max_seq_len - budget)
        for name, kept in [("train", train), ("eval", evals), *sets.items()]:
            if not kept:
                raise ConfigError(f"env.filter_long_prompts=true: every {name} prompt is longer than model.max_seq_len="
                                  f"{max_seq_len} leaves room for (first: {dropped[name][0]})")
        self._train, self._eval = [r for r, _ in train], [r for r, _ in evals]
        self._eval_sets = {name: [r for r, _ in kept] for name, kept in sets.items()}
        longest, n = max(train, key=lambda kept: kept[1])  # measured here: not tokenized a second time
        self.__dict__["longest_train_prompt"] = (n, longest.where)
        self._epoch_order.cache_clear()
        return dropped

    def _prompt(self, r: Record) -> str:
        return self.cfg.prompt_template.replace("{prompt}", r.prompt)

    def _prompt_messages(self, r: Record) -> list[dict[str, str]]:
        """The prompt as chat messages: a text as a user turn (after env.system_prompt), a
        conversation with ``env.prompt_template`` applied to its last (user) turn."""
        if isinstance(r.prompt, str):
            return self.tokenizer.messages(self._prompt(r))
        return r.prompt[:-1] + [{"role": "user", "content": self.cfg.prompt_template.replace("{prompt}", r.prompt[-1]["content"])}]

    def _prompt_ids(self, r: Record) -> list[int]:
        """The prompt's tokens: a text through ``env.prompt_template`` (and the chat template, with
        env.tokenizer=hf), a conversation through the chat template with the template applied to
        its last (user) turn; with ``env.tools`` the template also gets the tools' schemas."""
        if isinstance(r.prompt, str) and self.turns is None:
            return self.tokenizer.encode(self._prompt(r), bos=True)
        return self.tokenizer.encode_chat(self._prompt_messages(r), tools=None if self.turns is None else self.turns.schemas)

    def train_record(self, index: int, seed: int) -> Record:
        epoch, at = divmod(index, len(self._train))
        return self._train[self._epoch_order(seed, epoch)[at]]

    @functools.lru_cache(maxsize=4)  # noqa: B019 -- one env per process; a few epochs' orders
    def _epoch_order(self, seed: int, epoch: int) -> list[int]:
        """The training records' order in ``epoch`` (one shuffle per epoch, not per task)."""
        order = list(range(len(self._train)))
        random.Random(f"{self.cfg.seed}/{seed}/epoch{epoch}").shuffle(order)
        return order

    def max_answer_len(self) -> int:
        """Tokens of the longest warm-up target: what a completion must at least be allowed
        (tokenized once, where asked: the driver; rollout workers only score)."""
        return self._longest_target

    @functools.cached_property
    def _longest_target(self) -> int:
        every = self._train + self._eval + [r for rs in self._eval_sets.values() for r in rs]
        # the end-of-turn token of a text target is not counted (the budgets add one for it)
        return max(len(ids) - (mask is None) for ids, mask in map(self._target, every))

    def _target(self, r: Record) -> tuple[list[int], list[int] | None]:
        """(ids, loss mask or None) of a record's warm-up target, the end-of-turn token included."""
        if isinstance(r.sft_target, list):  # env.tools: a demonstration with tool turns
            return self.turns.demonstration(self._prompt_messages(r), r.sft_target)
        return self.tokenizer.encode(r.sft_target) + [self.tokenizer.eos_id], None

    def _task(self, r: Record, task_id: str, purpose: str, group_size: int, sampling: SamplingParams) -> Task:
        # with tools, every end of an assistant turn is a possible tool turn (has_tool_call decides)
        meta = {} if self.turns is None else {"stop_ids": list(self.tokenizer.end_ids), "max_turns": self.cfg.max_turns}
        return Task(task_id=task_id, prompt_ids=self._prompt_ids(r), answer=r.answer,
                    group_size=group_size, sampling=sampling, purpose=purpose, env=self.name, meta=meta)

    def train_task(self, index: int, seed: int, group_size: int, sampling: SamplingParams) -> Task:
        return self._task(self.train_record(index, seed), f"train-{seed}-{index}", "train", group_size, sampling)

    def eval_tasks(self, tag: str, min_version: int) -> list[Task]:
        budget = self.cfg.eval_max_new_tokens or self.max_answer_len() + 1
        tasks = eval_task_set(self._eval, self._task, tag, min_version, budget)
        for name, records in self._eval_sets.items():
            tasks += eval_task_set(records, self._task, tag, min_version, budget, set_name=name)
        return tasks

    def sft_example(self, index: int, seed: int) -> tuple:
        """(prompt, target) or, for a demonstration with tool turns, (prompt, target, loss mask):
        the observations in it are not trained on, as in RL."""
        r = self.train_record(index, seed)
        target, mask = self._target(r)
        return (self._prompt_ids(r), target) if mask is None else (self._prompt_ids(r), target, mask)

    # ------------------------------------------------------------------ tool turns (env.tools)
    def has_tool_call(self, response_ids: list[int]) -> bool:
        """Whether the turn that just ended calls a tool (the worker then asks ``observe``)."""
        return self.turns is not None and bool(self.turns.calls(response_ids))

    def observe(self, response_ids: list[int]) -> list[int]:
        if self.turns is None:
            raise RuntimeError("env.tools is empty: this dataset env makes no tool turns")
        return self.turns.observe(response_ids)

    def score(self, answer: str, response_ids: list[int]) -> RewardResult:
        if self.turns is not None:
            called, final = self.turns.split(response_ids)
            # tool_calls feeds env/tool_use_frac and env/tool_calls_mean (as the toy tools env's)
            used = {"tool_turns": len(called), "tool_calls": sum(len(self.turns.parse(t)) for t in called)}
            if self.turns.parse(final):  # the turn limit or the budget cut it before an answer
                return RewardResult(0.0, {"reason": "ended on a tool call, with no final answer", **used, "ended": False})
            result = self._score_text(answer, final)
            return RewardResult(result.reward, {**result.info, **used})
        return self._score_text(answer, response_ids)

    def _score_text(self, answer: str, response_ids: list[int]) -> RewardResult:
        ended = response_ended(self.tokenizer, response_ids)
        final = response_ids if self._reasoning is None else self._reasoning.final(response_ids)
        if final is None:
            return RewardResult(0.0, {"reason": self._reasoning.unfinished, "ended": ended})
        text = self.tokenizer.decode(final)  # a custom verifier has no split: the whole response
        if self._reward_fn is not None:
            label, extra = _unpack(answer)
            args = (text, label, extra) if self._reward_takes_extra else (text, label)
            out = self._reward_fn(*args)
            reward, info = out if isinstance(out, tuple) and len(out) == 2 else (out, {})
            if isinstance(reward, numbers.Real) and not isinstance(reward, bool):
                reward = float(reward)  # numpy scalars; anything else is refused by the range check
            return RewardResult(reward, {**_plain(info), "ended": ended})
        if self.cfg.reward == "exact":
            return RewardResult(1.0 if text.strip() == answer.strip() else 0.0, {"ended": ended})
        committed = extract_answer(text)
        return RewardResult(1.0 if equivalent(committed, answer) else 0.0,
                            {"extracted": None if committed is None else committed[:64], "ended": ended})
