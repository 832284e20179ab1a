"""What a request asks its output to follow, as a grammar spec that dsworker.chat.grammars compiles.

Pure (no torch, no xgrammar), so the request side is tested without either: OpenAI's
`response_format` (json_object, json_schema) and a forced `tool_choice` ("required" or a named
function, in DeepSeek-V3's call markup) become a GrammarSpec whose text is also its cache key.
Everything a client can get wrong here is a GrammarError naming the request field (a 400).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from dsworker.chat.reasoning import END as THINK_END
from dsworker.chat.tool_calls import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP

# A schema's JSON text may hold this much: compile time and memory grow with it, and a request
# body (maxRequestBytes) could otherwise carry a megabyte of schema.
MAX_SPEC_BYTES = 64 * 1024
# Nesting of a schema's JSON: compile time grows steeply with it (900 nested arrays, 22 KB, took
# 45 s and 0.9 GB over V3's vocabulary), while real schemas stay within a few levels.
MAX_SPEC_DEPTH = 32
# Whitespace characters allowed between two JSON tokens inside a structural tag (forced tool-call
# arguments, R1's answer after its thinking): xgrammar's structural tags take a cap, not "none",
# and a cap keeps a model from writing blanks forever.
JSON_WHITESPACE = 1
# What DeepSeek's call markup wraps the arguments in (tool_calls.py parses the same).
ARGS_OPEN = "\n```json\n"
ARGS_CLOSE = "\n```"
ANY_OBJECT: dict[str, Any] = {"type": "object"}


class GrammarError(ValueError):
    """A spec that cannot be built or compiled; `param` is the request field to blame."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class GrammarSpec:
    """A grammar to compile: a JSON schema (compiled without free whitespace) or an xgrammar
    structural tag, both as JSON text; (kind, text) is the compiled grammar's cache key."""

    kind: Literal["json_schema", "structural_tag"]
    text: str
    param: str  # the request field its errors name

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.text)


def _depth(value: Any) -> int:
    """How deep JSON containers nest in `value` (a scalar is 0), without recursing."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if isinstance(node, dict | list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


def _check_depth(schema: Any, param: str, what: str) -> None:
    if _depth(schema) > MAX_SPEC_DEPTH:
        raise GrammarError(
            f"{what} nests deeper than the {MAX_SPEC_DEPTH} levels this server compiles; "
            "flatten it",
            param,
        )


def _text(value: Any, param: str, what: str) -> str:
    """Compact JSON text of `value` (key order kept: properties are generated in it), bounded."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    size = len(text.encode())
    if size > MAX_SPEC_BYTES:
        raise GrammarError(
            f"{what} is {size} bytes as JSON, more than the {MAX_SPEC_BYTES} this server "
            "compiles; simplify it",
            param,
        )
    return text


def json_object(param: str = "response_format", reasoning: bool = False) -> GrammarSpec:
    """response_format json_object: any JSON object (OpenAI's mode wants an object on top)."""
    return json_schema(ANY_OBJECT, param, reasoning)


def json_schema(
    schema: Any, param: str = "response_format", reasoning: bool = False
) -> GrammarSpec:
    """response_format json_schema: text following `schema` (a JSON object). With `reasoning`
    (R1), the JSON is the answer after free thinking up to `</think>`, not the thinking."""
    if not isinstance(schema, dict):
        raise GrammarError("response_format.json_schema.schema must be a JSON Schema object", param)
    _check_depth(schema, param, "response_format's schema")
    if not reasoning:
        return GrammarSpec("json_schema", _text(schema, param, "response_format's schema"), param)
    answer = {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": JSON_WHITESPACE}
    tag = {"type": "structural_tag", "format": _after_thinking(answer)}
    return GrammarSpec("structural_tag", _text(tag, param, "response_format's schema"), param)


def _after_thinking(answer: dict[str, Any]) -> dict[str, Any]:
    """R1's free thinking up to `</think>`, an optional blank line as R1 writes it, `answer`."""
    think = {
        "type": "tag",
        "begin": "",
        "content": {"type": "any_text", "excludes": [THINK_END]},
        "end": THINK_END,
    }
    blank = {"type": "optional", "content": {"type": "const_string", "value": "\n\n"}}
    return {"type": "sequence", "elements": [think, blank, answer]}


def _call_tag(tool: dict[str, Any]) -> dict[str, Any]:
    """One call of `tool` (an OpenAI tool object) in DeepSeek-V3's markup, its arguments
    following the tool's parameters schema (any object when it has none)."""
    function = tool["function"]
    return {
        "type": "tag",
        "begin": f"{CALL_BEGIN}function{SEP}{function['name']}{ARGS_OPEN}",
        "content": {
            "type": "json_schema",
            "json_schema": function.get("parameters") or ANY_OBJECT,
            "max_whitespace_cnt": JSON_WHITESPACE,
        },
        "end": f"{ARGS_CLOSE}{CALL_END}",
    }


def forced_tool_calls(
    tools: list[dict[str, Any]],
    name: str | None,
    parallel: bool = True,
    reasoning: bool = False,
) -> GrammarSpec:
    """tool_choice "required" (`name` None: one or more calls of any offered tool, one unless
    `parallel`) or naming a function (exactly one call of it), as the answer's only text.

    With `reasoning` (R1), free thinking up to `</think>` comes first, and then an optional
    blank line before the calls, as R1 writes it."""
    chosen = tools
    if name is not None:
        chosen = [t for t in tools if t["function"]["name"] == name][:1]
        if not chosen:
            offered = ", ".join(repr(t["function"]["name"]) for t in tools)
            raise GrammarError(
                f"tool_choice names function {name!r}, which is not among the tools ({offered})",
                "tool_choice",
            )
    for t in chosen:
        params = t["function"].get("parameters")
        if params is not None and (
            not isinstance(params, dict) or params.get("type", "object") != "object"
        ):
            raise GrammarError(
                f"tool {t['function']['name']!r}: parameters must be a JSON Schema of an object "
                '({"type": "object", ...}), as OpenAI requires, to force a call of it',
                "tools",
            )
        _check_depth(params, "tools", f"tool {t['function']['name']!r}'s parameters")
    calls = {
        "type": "tags_with_separator",
        "tags": [_call_tag(t) for t in chosen],
        "separator": "\n",
        "at_least_one": True,
        "stop_after_first": name is not None or not parallel,
    }
    block: dict[str, Any] = {
        "type": "tag",
        "begin": CALLS_BEGIN,
        "content": calls,
        "end": CALLS_END,
    }
    if reasoning:
        block = _after_thinking(block)
    tag = {"type": "structural_tag", "format": block}
    return GrammarSpec("structural_tag", _text(tag, "tools", "the tools' parameters"), "tools")
