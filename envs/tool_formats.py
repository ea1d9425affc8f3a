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
  name="KEY">VALUE</parameter>...</invoke>...</minimax:tool_call>``;
* ``deepseek_v32`` (DeepSeek-V3.2's DSML, plain text): ``<｜DSML｜function_calls><｜DSML｜invoke
  name="NAME"><｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>...
  </｜DSML｜invoke>...</｜DSML｜function_calls>``, a value read as JSON when ``string="false"``;
* ``deepseek`` (DeepSeek-V3.1, V3.2-Exp's chat format, R1-0528 and V3-0324): between
  ``<｜tool▁calls▁begin｜>`` and ``<｜tool▁calls▁end｜>``, each call ``<｜tool▁call▁begin｜>NAME
  <｜tool▁sep｜>{json}<｜tool▁call▁end｜>`` (V3.1) or ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
  ```json {json} ```<｜tool▁call▁end｜>`` (V3, R1), arguments as JSON like hermes'.

The XML formats write every value as text (DSML says which are JSON); a value is converted by the
type the tool's JSON schema gives that parameter (integer, number, boolean, object, array: read
as JSON; string: kept as written, one newline trimmed at each end as the templates add them), and
kept as text when the schema says nothing or the text is not of that type (the tool then reports
the bad argument).
Text outside the calls is the model's prose. A malformed call is an error message, observed by
the model as the result of that call, never an exception: the policy writes this text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from rlpost.config import TOOL_FORMATS


_NAME_ATTRIBUTE = re.compile(r'\s+name="([^"]*)"\s*')
_DSML_PARAMETER = re.compile(r'\s+name="([^"]*)"(?:\s+string="(true|false)")?\s*')
_DSML = "｜DSML｜"
_SPACE = re.compile(r"\s*")
_DEEPSEEK_FENCED = re.compile(r"\A([^\n`]*)\n```(?:json)?\n?(.*?)\n?```\s*\Z", re.S)

# what a chat template's text shows of its family's call syntax, most specific first (``auto``)
_TEMPLATE_MARKERS = (("deepseek_v32", f"<{_DSML}function_calls>"), ("deepseek", "<｜tool▁calls▁begin｜>"),
                     ("minimax_m2", "<minimax:tool_call>"), ("glm45", "<arg_key>"), ("qwen3_coder", "<function="),
                     ("hermes", "<tool_call>"))


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
    if fmt == "deepseek":
        return _parse_deepseek(text)
    if fmt == "deepseek_v32":
        return _parse_deepseek_v32(text, schemas or {})
    raise ValueError(f"tool format {fmt!r}: must be one of {', '.join(TOOL_FORMATS[1:])}")


def _tagged(text: str, opening: str, closing: str, head_end: str | None = None) -> list[tuple[str, str]]:
    """(head, body) of every ``opening HEAD head_end BODY closing`` in ``text``, leftmost first
    and each closed by the nearest ``closing`` (a lazy regex's matches), found in one pass: a
    lazy regex rescans the rest of the text from every unclosed opening, which a policy writing
    ``<tool_call>`` 50,000 times turned into minutes per sample. No ``head_end``: head is ''."""
    found: list[tuple[str, str]] = []
    at = 0
    while (i := text.find(opening, at)) >= 0:
        start, head = i + len(opening), ""
        if head_end is not None:
            h = text.find(head_end, start)
            if h < 0:
                break
            head, start = text[start:h], h + len(head_end)
        j = text.find(closing, start)
        if j < 0:  # nothing after can be closed either
            break
        found.append((head, text[start:j]))
        at = j + len(closing)
    return found


def _bodies(text: str, opening: str, closing: str) -> list[str]:
    return [body for _, body in _tagged(text, opening, closing)]


def parse_hermes(text: str) -> list[ToolCall | str]:
    calls: list[ToolCall | str] = []
    for body in _bodies(text, "<tool_call>", "</tool_call>"):
        try:
            obj = json.loads(body.strip())
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested thousands deep
            calls.append(f"error: the tool call is not JSON ({getattr(exc, 'msg', type(exc).__name__)})")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append('error: a tool call is {"name": ..., "arguments": {...}}')
            continue
        calls.append(_json_call(obj["name"], obj.get("arguments", {})))
    return calls


def _json_call(name: str, args: Any) -> ToolCall | str:
    """A call whose arguments came as JSON (an object, or a string holding one, as some
    checkpoints write them)."""
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError) as exc:
            return f"error: the arguments of {name} are not JSON ({getattr(exc, 'msg', type(exc).__name__)})"
    if not isinstance(args, dict):
        return f'error: "arguments" of {name} must be an object'
    return ToolCall(name, args)


def _parse_deepseek(text: str) -> list[ToolCall | str]:
    calls: list[ToolCall | str] = []
    for block in _bodies(text, "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"):
        for body in _bodies(block, "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"):
            left, sep, right = body.partition("<｜tool▁sep｜>")
            fenced = _DEEPSEEK_FENCED.match(right) if left.strip() == "function" else None
            name, args = (fenced.group(1).strip(), fenced.group(2)) if fenced else (left.strip(), right.strip())
            if not sep or not name:
                calls.append("error: a tool call is NAME<｜tool▁sep｜>{json arguments}")
                continue
            calls.append(_json_call(name, args or "{}"))
    return calls


def _parse_qwen3_coder(text: str, schemas: dict[str, dict[str, Any]]) -> list[ToolCall | str]:
    calls: list[ToolCall | str] = []
    for body in _bodies(text, "<tool_call>", "</tool_call>"):
        functions = _tagged(body, "<function=", "</function>", ">")
        if not functions:
            calls.append("error: a tool call is <function=NAME><parameter=KEY>VALUE</parameter>...</function>")
            continue
        name, inner = functions[0]
        pairs = [(k.strip(), v) for k, v in _tagged(inner, "<parameter=", "</parameter>", ">")]
        calls.append(_call(name.strip(), pairs, schemas))
    return calls


def _glm_pairs(body: str) -> list[tuple[str, str]]:
    """GLM's ``<arg_key>K</arg_key> <arg_value>V</arg_value>`` pairs (only whitespace between a
    key and its value), in one pass."""
    pairs, at = [], 0
    while (k := body.find("<arg_key>", at)) >= 0:
        k_end = body.find("</arg_key>", k)
        if k_end < 0:
            break
        v = _SPACE.match(body, k_end + len("</arg_key>")).end()
        at = v
        if not body.startswith("<arg_value>", v):
            continue
        v_end = body.find("</arg_value>", v)
        if v_end < 0:
            break
        pairs.append((body[k + len("<arg_key>"):k_end].strip(), body[v + len("<arg_value>"):v_end]))
        at = v_end + len("</arg_value>")
    return pairs


def _parse_glm45(text: str, schemas: dict[str, dict[str, Any]]) -> list[ToolCall | str]:
    calls: list[ToolCall | str] = []
    for body in _bodies(text, "<tool_call>", "</tool_call>"):
        name = body.split("<arg_key>", 1)[0].strip()
        if not name or "<" in name:
            calls.append("error: a tool call is NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>...")
            continue
        calls.append(_call(name, _glm_pairs(body), schemas))
    return calls


def _parse_invokes(text: str, block: str, prefix: str, parameter: re.Pattern, usage: str,
                   schemas: dict[str, dict[str, Any]]) -> list[ToolCall | str]:
    """MiniMax-M2's and DSML's calls: ``<BLOCK><PREFIXinvoke name="NAME"><PREFIXparameter ...>
    VALUE</PREFIXparameter>...</PREFIXinvoke>...</BLOCK>``. ``parameter`` matches a parameter's
    attributes: its name, and where it has a second group (DSML's ``string``) whether the value
    is a string (kept as written) or JSON (``false``; kept as text when it is not JSON, for the
    tool to report); without that attribute a value is typed by the schema."""
    calls: list[ToolCall | str] = []
    for body in _bodies(text, f"<{block}>", f"</{block}>"):
        invokes = [(m.group(1), inner) for head, inner in _tagged(body, f"<{prefix}invoke", f"</{prefix}invoke>", ">")
                   if (m := _NAME_ATTRIBUTE.fullmatch(head)) is not None]
        if not invokes:
            calls.append(f"error: a tool call is {usage}")
        for name, inner in invokes:
            params = [(m.group(1), m.group(2) if parameter.groups > 1 else None, value)
                      for head, value in _tagged(inner, f"<{prefix}parameter", f"</{prefix}parameter>", ">")
                      if (m := parameter.fullmatch(head)) is not None]
            call = _call(name.strip(), [(key, value) for key, _, value in params], schemas)
            declared = {key: value if string == "true" else _json_or_text(value)
                        for key, string, value in params if string is not None}
            if isinstance(call, ToolCall) and declared:
                call = ToolCall(call.name, {**call.arguments, **declared})
            calls.append(call)
    return calls


def _parse_minimax_m2(text: str, schemas: dict[str, dict[str, Any]]) -> list[ToolCall | str]:
    return _parse_invokes(text, "minimax:tool_call", "", _NAME_ATTRIBUTE,
                          '<invoke name="NAME"><parameter name="KEY">VALUE</parameter>...</invoke>', schemas)


def _parse_deepseek_v32(text: str, schemas: dict[str, dict[str, Any]]) -> list[ToolCall | str]:
    return _parse_invokes(text, f"{_DSML}function_calls", _DSML, _DSML_PARAMETER,
                          f'<{_DSML}invoke name="NAME"><{_DSML}parameter name="KEY" string="true|false">VALUE'
                          f'</{_DSML}parameter>...</{_DSML}invoke>', schemas)


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return value


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
