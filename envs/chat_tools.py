"""Tool calling in a real checkpoint's chat format: ``env=dataset`` with ``env.tools``.

What verl's multi-turn tool rollouts and slime's agent examples train, on a checkpoint's own chat
template: the tools' JSON schemas go to the template (``tools=``, which lists them in the system
turn as the model was trained to read them); the model writes its calls in its family's syntax
inside an assistant turn and ends the turn with its end-of-turn token (which it generates and is
trained on, as in deployment); the env runs every call of that turn and appends the results as the
template's own tool turn, followed by the opened next assistant turn; generation continues, up to
``env.max_turns`` tool turns. The reward scores the final assistant turn only, the one without a
call: a tool's output is never taken for the model's answer, and a sample that ends on a call (turn
limit or token budget) scores 0.

Token-exact and unforgeable: the observation's template parts (role markers, ``<tool_response>``
tags, the next generation prompt) are cut from the chat template's own rendering of a conversation
with tool results (the part after the assistant's end-of-turn token) and tokenized with special
tokens; each result is tokenized as plain text with no special or added token recognised, so a
tool's output, which the policy controls (python's stdout), can never forge a turn boundary. The
end of an observation (the marker the final turn is found by) must contain an added token for
the same reason: checked at start-up.

Formats (``env.tool_format``, rlpost/envs/tool_formats.py): ``hermes`` (Qwen2.5, Qwen3, QwQ and
the many checkpoints trained on Hermes' format): ``<tool_call>{"name": ..., "arguments": {...}}
</tool_call>``, one or more per turn; ``qwen3_coder``, ``glm45`` and ``minimax_m2``: those
families' XML calls, values typed by the tools' schemas; ``deepseek``: DeepSeek's tool-call
tokens; ``auto`` (default): the syntax the chat template itself renders calls in.

Tools: ``calculator`` (integer arithmetic, parsed, never executed: rlpost/envs/tools.py),
``python`` (the code runs in the sandbox; its stdout, or the error's last line, is observed) and
``package.module:function``, your own Python function: trusted like a custom verifier, its JSON
schema made from its type hints and Google-style docstring (transformers' ``get_json_schema``),
called with the model's arguments as keywords and its result observed as text. Every result is
cut to ``env.tool_output_chars``; a bad call (unknown tool, arguments that are not JSON or do not
fit the function, an exception) is observed as ``error: ...``, never a crash.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from rlpost.config import ConfigError, EnvConfig, SandboxConfig
from rlpost.envs.reasoning import HARMONY_MARKERS, single_token_ids
from rlpost.envs.tool_formats import ToolCall, format_of_template, parse_hermes, parse_tool_calls  # noqa: F401

MAX_CALLS_PER_TURN = 8
_RESULT = "\x00rlpost-result-{}\x00"  # placeholders for results in a probe rendering


@dataclass(frozen=True)
class Tool:
    name: str
    schema: dict[str, Any]  # {"type": "function", "function": {name, description, parameters}}
    run: Callable[..., Any]


def _calculator() -> Tool:
    from rlpost.envs.tools import calculate

    schema = {"type": "function", "function": {
        "name": "calculator",
        "description": "Evaluate an integer arithmetic expression exactly (+, -, *, // and % on integers, parentheses).",
        "parameters": {"type": "object", "required": ["expression"], "properties": {
            "expression": {"type": "string", "description": "the expression, e.g. (37*48) % 7"}}}}}
    return Tool("calculator", schema, lambda expression: calculate(str(expression)))


def _python(sandbox: SandboxConfig) -> Tool:
    pool = []  # one pool per process, made at the first call (workers only)

    def run(code: str) -> str:
        from rlpost.envs.sandbox import SandboxPool

        if not pool:
            pool.append(SandboxPool(sandbox))
        res = pool[0].run_sync(str(code))
        if res.ok:
            return res.stdout
        if res.timed_out:
            return "error: the program timed out"
        last = (res.stderr.strip().splitlines() or [res.reason or f"exit status {res.returncode}"])[-1]
        return f"{res.stdout}error: {last}"

    schema = {"type": "function", "function": {
        "name": "python",
        "description": "Run a Python 3 program in a sandbox (no network, no files kept) and return what it prints.",
        "parameters": {"type": "object", "required": ["code"], "properties": {
            "code": {"type": "string", "description": "the program; print() the results you want to see"}}}}}
    return Tool("python", schema, run)


def _user_tool(spec: str) -> Tool:
    from rlpost.envs.custom import load_callable

    fn = load_callable(spec, "env.tools", "calculator, python or package.module:function")
    try:
        from transformers.utils import get_json_schema

        schema = get_json_schema(fn)
    except Exception as exc:  # transformers explains what the docstring or hints lack
        raise ConfigError(f"env.tools: {spec!r} has no JSON schema ({type(exc).__name__}: {exc}); give it type "
                          f"hints and a Google-style docstring with an Args: section") from None
    return Tool(schema["function"]["name"], schema, fn)


def load_tools(names: list[str], sandbox: SandboxConfig | None) -> list[Tool]:
    """The tools named by ``env.tools``, built (user functions imported) at start-up."""
    tools = []
    for name in names:
        if name == "calculator":
            tools.append(_calculator())
        elif name == "python":
            tools.append(_python(sandbox or SandboxConfig()))
        else:
            tools.append(_user_tool(name))
    seen = [t.name for t in tools]
    dupes = sorted({n for n in seen if seen.count(n) > 1})
    if dupes:
        raise ConfigError(f"env.tools={names!r}: two tools are named {dupes[0]!r}")
    return tools


class ChatToolTurns:
    """One checkpoint's tool turns: parses a turn's calls, runs them, renders the results as its
    chat template does, and finds the final turn of a response (see the module doc)."""

    def __init__(self, tokenizer: Any, cfg: EnvConfig, sandbox: SandboxConfig | None = None):
        from rlpost.tokenizer import HFTokenizer

        if not isinstance(tokenizer, HFTokenizer) or not tokenizer.settings.chat_template:
            raise ConfigError(f"env.tools={list(cfg.tools)!r}: tool calling renders turns with a checkpoint's chat "
                              f"template: needs env.tokenizer=hf (or auto with model.path) and env.chat_template=true")
        self.tok, self.cfg = tokenizer, cfg
        self.tools = {t.name: t for t in load_tools(list(cfg.tools), sandbox)}
        self.schemas = [t.schema for t in self.tools.values()]
        self.parameters = {t.name: t.schema.get("function", {}).get("parameters") or {} for t in self.tools.values()}
        if cfg.tool_format == "auto" and single_token_ids(tokenizer.encode_template_text, HARMONY_MARKERS):
            raise ConfigError(f"env.tools={list(cfg.tools)!r}: the tokenizer of {tokenizer.settings.path} writes "
                              f"GPT-OSS's harmony format ({' / '.join(HARMONY_MARKERS)} tokens), whose tool calls "
                              f"(to=functions.NAME ... <|call|>) rlpost does not parse yet")
        self.format = (format_of_template(tokenizer.template_text) if cfg.tool_format == "auto"
                       else cfg.tool_format)
        self.eos_text = tokenizer.token_text(tokenizer.eos_id)
        try:
            one, two = self._pieces(1), self._pieces(2)
        except ConfigError:
            raise
        except Exception as exc:  # jinja raises the template's own errors
            raise ConfigError(f"env.tools: the chat template of {tokenizer.settings.path} fails on a tool call and "
                              f"its result: {type(exc).__name__}: {exc}") from None
        self.marker = one[-1]
        if two[-1] != self.marker:
            raise ConfigError(f"env.tools: the chat template of {tokenizer.settings.path} ends one and two tool "
                              f"results differently; rlpost cannot find where an observation ends")
        if not set(self.marker) & tokenizer.added_ids:
            raise ConfigError(f"env.tools: the chat template of {tokenizer.settings.path} ends a tool turn with "
                              f"plain text ({tokenizer.token_text_of(self.marker)!r}): a tool's output could forge it")

    # ---------------------------------------------------------------- rendering
    @functools.lru_cache(maxsize=MAX_CALLS_PER_TURN)  # noqa: B019 -- one per env, a few sizes
    def _pieces(self, n: int) -> tuple[tuple[int, ...], ...]:
        """The n + 1 template parts around n results: what follows the assistant's end-of-turn
        token in the template's rendering of a conversation with n tool results, up to the
        opened next assistant turn, cut at the results, each tokenized with special tokens."""
        calls = [{"type": "function", "id": f"call_{i}", "function": {"name": "f", "arguments": {}}} for i in range(n)]
        turn = [*self.tok.messages("?"), {"role": "assistant", "content": "", "tool_calls": calls}]
        results = [{"role": "tool", "tool_call_id": f"call_{i}", "name": "f", "content": _RESULT.format(i)}
                   for i in range(n)]
        before = self.tok.render(turn, add_generation_prompt=False, tools=self.schemas)
        after = self.tok.render(turn + results, add_generation_prompt=True, tools=self.schemas)
        cut = before.rfind(self.eos_text)
        where = f"the chat template of {self.tok.settings.path}"
        if cut < 0:
            raise ConfigError(f"env.tools: {where} does not end an assistant turn with the eos token "
                              f"{self.eos_text!r} (set env.eos_token to its end-of-turn token)")
        cut += len(self.eos_text)
        if not after.startswith(before[:cut]):
            raise ConfigError(f"env.tools: {where} renders the turns before a tool result differently once the result "
                              f"follows; rlpost cannot append results token-exactly")
        delta = after[cut:]
        texts = re.split("\x00rlpost-result-\\d+\x00", delta)
        if len(texts) != n + 1 or [int(i) for i in re.findall("\x00rlpost-result-(\\d+)\x00", delta)] != list(range(n)):
            raise ConfigError(f"env.tools: {where} does not render tool results as tool turns in order")
        return tuple(tuple(self.tok.encode_template_text(t)) for t in texts)

    def observation(self, results: list[str]) -> list[int]:
        """Token ids of the tool turn carrying ``results`` and the opened next assistant turn."""
        pieces = self._pieces(len(results))
        ids = list(pieces[0])
        for result, piece in zip(results, pieces[1:]):
            ids += self.tok.encode(result) + list(piece)  # plain text: no special token from a result
        return ids

    def demonstration(self, prompt: list[dict[str, Any]], demo: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of a warm-up demonstration with tool turns: ``demo`` is the assistant
        and tool messages after the ``prompt`` messages (OpenAI format). Each assistant turn is
        what the template renders for it after its generation prompt, up to and including the
        end-of-turn token (trained: mask 1); each run of tool messages is the observation a
        rollout would append for those results (mask 0). So warm-up and rollouts see one format."""
        conv, ids, mask, i = list(prompt), [], [], 0
        while i < len(demo):
            if demo[i]["role"] == "assistant":
                opened = self.tok.render(conv, add_generation_prompt=True, tools=self.schemas)
                closed = self.tok.render(conv + [demo[i]], add_generation_prompt=False, tools=self.schemas)
                end = closed.find(self.eos_text, len(opened))
                if not closed.startswith(opened) or end < 0:
                    raise ValueError(f"the chat template does not render assistant message {i} of the demonstration "
                                     f"as its generation prompt followed by the turn and {self.eos_text!r}")
                turn = self.tok.encode_template_text(closed[len(opened):end + len(self.eos_text)])
                ids, mask, conv = ids + turn, mask + [1] * len(turn), conv + [demo[i]]
                i += 1
                continue
            results = []
            while i < len(demo) and demo[i]["role"] == "tool":
                results.append(str(demo[i]["content"])[:self.cfg.tool_output_chars])
                conv.append(demo[i])
                i += 1
            obs = self.observation(results)
            ids, mask = ids + obs, mask + [0] * len(obs)
        return ids, mask

    # ---------------------------------------------------------------- turns
    def last_turn(self, response_ids: list[int]) -> list[int]:
        """The tokens of the response's last assistant turn: after the last observation."""
        m, start = len(self.marker), 0
        for at in range(len(response_ids) - m, -1, -1):
            if tuple(response_ids[at:at + m]) == self.marker:
                start = at + m
                break
        return list(response_ids[start:])

    def split(self, response_ids: list[int]) -> tuple[list[list[int]], list[int]]:
        """(the turns that got results, each up to its end-of-turn token, so text inside a result
        is never read as the model's; the final turn, after the last observation), in one scan."""
        m, start, called = len(self.marker), 0, []
        for at in range(len(response_ids) - m + 1):
            if at >= start and tuple(response_ids[at:at + m]) == self.marker:
                turn = response_ids[start:at]
                end = next((j for j, t in enumerate(turn) if t in self.tok.end_ids), len(turn))
                called.append(list(turn[:end]))
                start = at + m
        return called, list(response_ids[start:])

    def parse(self, turn_ids: list[int]) -> list[ToolCall | str]:
        """The calls of one turn, read with special tokens kept (a tokenizer may mark
        ``<tool_call>`` special)."""
        return parse_tool_calls(self.tok.decode_turns(turn_ids), self.format, self.parameters)

    def calls(self, response_ids: list[int]) -> list[ToolCall | str]:
        """The calls of the response's last turn."""
        return self.parse(self.last_turn(response_ids))

    def run(self, call: ToolCall | str) -> str:
        if isinstance(call, str):
            result = call
        elif call.name not in self.tools:
            result = f"error: there is no tool {call.name!r} (tools: {', '.join(self.tools)})"
        else:
            try:
                result = str(self.tools[call.name].run(**call.arguments))
            except TypeError as exc:  # arguments that do not fit the function
                result = f"error: {call.name}: {exc}"
            except Exception as exc:  # noqa: BLE001 -- a failed call is an observation, not a crash
                result = f"error: {call.name}: {type(exc).__name__}: {exc}"
        return result[:self.cfg.tool_output_chars]

    def observe(self, response_ids: list[int]) -> list[int]:
        """The observation for the calls of the last turn ([] when it made none)."""
        calls = self.calls(response_ids)
        if not calls:
            return []
        extra = calls[MAX_CALLS_PER_TURN:]
        results = [self.run(c) for c in calls[:MAX_CALLS_PER_TURN]]
        if extra:
            results[-1] += f"\nerror: at most {MAX_CALLS_PER_TURN} tool calls per turn; {len(extra)} not run"
        return self.observation(results)
