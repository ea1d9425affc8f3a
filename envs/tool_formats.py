"""Tool calls as each model family writes them, read back into (name, arguments).

The chat template renders a conversation's calls (``tool_calls`` messages) in the family's syntax;
these parsers read the calls a policy wrote in that syntax, as vLLM's and SGLang's tool parsers of
the same names do:

* ``hermes`` (Qwen2.5, Qwen3, QwQ): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
* ``qwen3_coder`` (Qwen3-Coder, Qwen3.5): ``<tool_call><function=NAME><parameter=KEY>VALUE
  </parameter>...</function></tool_call>``;
* ``glm45`` (GLM-4.5, 4.6, 4.7): ``<tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE
  </arg_value>...</tool_call>``;
* ``minimax_m2`` (MiniMax-M2, M2.1, M2.5): ``<minimax:tool_call><invoke name="NAME"><parameter
  name="KEY">VALUE</parameter>...</invoke>...</minimax:tool_call>``.

The XML formats write every value as text; a value is converted by the type the tool's JSON
schema gives that parameter (integer, number, boolean, object, array: read as JSON; string: kept
as written, one newline trimmed at each end as the templates add them), and kept as text when the
schema says nothing or the text is not of that type (the tool then reports the bad argument).
Text outside the calls is the model's prose. A malformed call is an error message, observed by
the model as the result of that call, never an exception: the policy writes this text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from rlpost.config import TOOL_FORMATS


_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_CODER_FUNCTION = re.compile(r"<function=([^>\n]*)>(.*?)</function>", re.S)
_CODER_PARAMETER = re.compile(r"<parameter=([^>\n]*)>(.*?)</parameter>", re.S)
_GLM_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)
_MINIMAX_BLOCK = re.compile(r"<minimax:tool_call>(.*?)</minimax:tool_call>", re.S)
_MINIMAX_INVOKE = re.compile(r"<invoke\s+name=\"([^\"]*)\"\s*>(.*?)</invoke>", re.S)
_MINIMAX_PARAMETER = re.compile(r"<parameter\s+name=\"([^\"]*)\"\s*>(.*?)</parameter>", re.S)

# what a chat template's text shows of its family's call syntax, most specific first (``auto``)
_TEMPLATE_MARKERS = (("minimax_m2", "<minimax:tool_call>"), ("glm45", "<arg_key>"),
                     ("qwen3_coder", "<function="), ("hermes", "<tool_call>"))


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


def format_of_template(template: str | None) -> str:
    """The call syntax a chat template renders (``env.tool_format=auto``): the first family
    whose markers its text holds; hermes when none."""
    for name, marker in _TEMPLATE_MARKERS:
        if template and marker in template:
            return name
    return "hermes"


def parse_tool_calls(text: str, fmt: str, schemas: dict[str, dict[str, Any]] | None = None) -> list[ToolCall | str]:
    """The calls of one assistant turn in ``fmt``, in order; ``schemas`` maps a tool's name to
    its parameters' JSON schema (``{"properties": {...}}``) for the XML formats' values."""
    if fmt == "hermes":
        return parse_hermes(text)
    if fmt == "qwen3_coder":
        return _parse_qwen3_coder(text, schemas or {})
    if fmt == "glm45":
        return _parse_glm45(text, schemas or {})
    if fmt == "minimax_m2":
        return _parse_minimax_m2(text, schemas or {})
    raise ValueError(f"tool format {fmt!r}: must be one of {', '.join(TOOL_FORMATS[1:])}")


def parse_hermes(text: str) -> list[ToolCall | str]:
    calls: list[ToolCall | str] = []
    for body in _HERMES_CALL.findall(text):
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested thousands deep
            calls.append(f"error: the tool call is not JSON ({getattr(exc, 'msg', type(exc).__name__)})")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append('error: a tool call is {"name": ..., "arguments": {...}}')
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some checkpoints write the arguments as a JSON string
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):
                pass
        if not isinstance(args, dict):
            calls.append(f'error: "arguments" of {obj["name"]} must be an object')
            continue
        calls.append(ToolCall(obj["name"], args))
    return calls


def _parse_qwen3_coder(text: str, schemas: dict[str, dict[str, Any]]) -> list[ToolCall | str]:
    calls: list[ToolCall | str] = []
    for body in _TOOL_CALL.findall(text):
        function = _CODER_FUNCTION.search(body)
        if function is None:
            calls.append("error: a tool call is <function=NAME><parameter=KEY>VALUE</parameter>...</function>")
            continue
        name = function.group(1).strip()
        pairs = [(k.strip(), v) for k, v in _CODER_PARAMETER.findall(function.group(2))]
        calls.append(_call(name, pairs, schemas))
    return calls


def _parse_glm45(text: str, schemas: dict[str, dict[str, Any]]) -> list[ToolCall | str]:
    calls: list[ToolCall | str] = []
    for body in _TOOL_CALL.findall(text):
        name = body.split("<arg_key>", 1)[0].strip()
        if not name or "<" in name:
            calls.append("error: a tool call is NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>...")
            continue
        pairs = [(k.strip(), v) for k, v in _GLM_ARG.findall(body)]
        calls.append(_call(name, pairs, schemas))
    return calls


def _parse_minimax_m2(text: str, schemas: dict[str, dict[str, Any]]) -> list[ToolCall | str]:
    calls: list[ToolCall | str] = []
    for block in _MINIMAX_BLOCK.findall(text):
        invokes = _MINIMAX_INVOKE.findall(block)
        if not invokes:
            calls.append('error: a tool call is <invoke name="NAME"><parameter name="KEY">VALUE</parameter>...</invoke>')
        for name, body in invokes:
            calls.append(_call(name.strip(), _MINIMAX_PARAMETER.findall(body), schemas))
    return calls


def _call(name: str, pairs: list[tuple[str, str]], schemas: dict[str, dict[str, Any]]) -> ToolCall | str:
    if not name:
        return "error: a tool call names no function"
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        return f"error: {name}: a parameter is given twice ({', '.join(sorted({k for k in keys if keys.count(k) > 1}))})"
    properties = (schemas.get(name) or {}).get("properties") or {}
    return ToolCall(name, {k: _typed(v, (properties.get(k) or {}).get("type")) for k, v in pairs})


def _typed(value: str, kind: Any) -> Any:
    """``value`` (text) as the schema's ``kind`` says, else the text itself."""
    text = value[1:] if value.startswith("\n") else value
    text = text[:-1] if text.endswith("\n") else text
    kinds = set(kind) if isinstance(kind, list) else {kind}
    if kinds & {"integer", "number", "boolean", "object", "array", "null"}:
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):
            return text
        if _fits(parsed, kinds):
            return parsed
    return text


def _fits(value: Any, kinds: set) -> bool:
    checks = {"integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "boolean": lambda v: isinstance(v, bool), "object": lambda v: isinstance(v, dict),
              "array": lambda v: isinstance(v, list), "null": lambda v: v is None,
              "string": lambda v: isinstance(v, str)}
    return any(checks[k](value) for k in kinds if k in checks)
