"""Requests -> grammar specs (guided decoding), without xgrammar: what response_format and a
forced tool_choice become, and what is refused before anything is compiled."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dsworker.chat import grammar_spec as gs
from dsworker.chat.tool_calls import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP
from dsworker.serving.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
CLOCK = {"type": "function", "function": {"name": "get_time"}}


def completion(**fields: Any) -> CompletionRequest:
    return parse_request(CompletionRequest, json.dumps({"prompt": "x", **fields}).encode())


def test_text_is_free_and_json_object_is_any_object() -> None:
    assert completion().grammar_spec() is None
    assert completion(response_format={"type": "text"}).grammar_spec() is None
    assert completion(response_format=None).grammar_spec() is None
    spec = completion(response_format={"type": "json_object"}).grammar_spec()
    assert spec == gs.GrammarSpec("json_schema", '{"type":"object"}', "response_format")


def test_json_schema_keeps_the_property_order_and_ignores_strict() -> None:
    schema = {"type": "object", "properties": {"z": {"type": "integer"}, "a": {"enum": ["x"]}}}
    rf = {"type": "json_schema", "json_schema": {"name": "out-1", "schema": schema, "strict": True}}
    spec = completion(response_format=rf).grammar_spec()
    assert spec is not None and spec.kind == "json_schema"
    assert list(json.loads(spec.text)["properties"]) == ["z", "a"]
    assert spec.key == ("json_schema", spec.text)
    rf["json_schema"]["strict"] = False
    assert completion(response_format=rf).grammar_spec() == spec


def test_schema_text_is_bounded() -> None:
    def schema(n: int) -> dict[str, Any]:
        return {"enum": ["x" * n]}

    room = gs.MAX_SPEC_BYTES - len(json.dumps(schema(0), separators=(",", ":")))
    assert len(gs.json_schema(schema(room)).text.encode()) == gs.MAX_SPEC_BYTES
    with pytest.raises(gs.GrammarError) as err:
        gs.json_schema(schema(room + 1))
    assert err.value.param == "response_format" and "65537 bytes" in err.value.message
    with pytest.raises(gs.GrammarError, match="must be a JSON Schema object"):
        gs.json_schema(True)


def test_schema_nesting_is_bounded() -> None:
    def nested(levels: int) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "integer"}
        for _ in range(levels):
            schema = {"type": "array", "items": schema}
        return schema

    assert gs._depth(nested(15)) == 16 and gs._depth([]) == 1 and gs._depth(3) == 0
    gs.json_schema(nested(31), reasoning=True)  # the wrapping around it does not count
    with pytest.raises(gs.GrammarError, match="nests deeper than the 32 levels") as err:
        gs.json_schema(nested(32))
    assert err.value.param == "response_format"
    params = {"type": "object", "properties": {"a": nested(31)}}
    deep = {"type": "function", "function": {"name": "f", "parameters": params}}
    with pytest.raises(gs.GrammarError, match="'f'.s parameters nests deeper") as err:
        gs.forced_tool_calls([deep], None)
    assert err.value.param == "tools"


def test_a_forced_call_needs_object_parameters() -> None:
    scalar = {"type": "function", "function": {"name": "echo", "parameters": {"type": "string"}}}
    with pytest.raises(gs.GrammarError, match="'echo': parameters must be a JSON Schema of an obj"):
        gs.forced_tool_calls([scalar], None)
    assert gs.forced_tool_calls([WEATHER, CLOCK], "get_weather").param == "tools"


def tag_of(spec: gs.GrammarSpec) -> dict[str, Any]:
    assert spec.kind == "structural_tag" and spec.param == "tools"
    tag = json.loads(spec.text)
    assert tag["type"] == "structural_tag"
    return tag["format"]


def test_required_offers_every_tool_and_named_exactly_one() -> None:
    block = tag_of(gs.forced_tool_calls([WEATHER, CLOCK], None))
    assert (block["begin"], block["end"]) == (CALLS_BEGIN, CALLS_END)
    calls = block["content"]
    assert calls["at_least_one"] and not calls["stop_after_first"] and calls["separator"] == "\n"
    weather, clock = calls["tags"]
    assert weather["begin"] == f"{CALL_BEGIN}function{SEP}get_weather\n```json\n"
    assert weather["end"] == f"\n```{CALL_END}"
    assert weather["content"]["json_schema"] == WEATHER["function"]["parameters"]
    assert weather["content"]["max_whitespace_cnt"] == gs.JSON_WHITESPACE
    assert clock["content"]["json_schema"] == {"type": "object"}  # no parameters: any object
    one = tag_of(gs.forced_tool_calls([WEATHER, CLOCK], None, parallel=False))
    assert one["content"]["stop_after_first"]
    named = tag_of(gs.forced_tool_calls([WEATHER, CLOCK], "get_time"))
    assert [t["begin"] for t in named["content"]["tags"]] == [clock["begin"]]
    assert named["content"]["stop_after_first"]


def test_reasoning_thinks_first_and_an_unknown_name_is_refused() -> None:
    seq = tag_of(gs.forced_tool_calls([WEATHER], None, reasoning=True))
    think, blank, block = seq["elements"]
    assert think["end"] == "</think>" and think["content"]["excludes"] == ["</think>"]
    assert blank == {"type": "optional", "content": {"type": "const_string", "value": "\n\n"}}
    assert block["begin"] == CALLS_BEGIN
    with pytest.raises(gs.GrammarError) as err:
        gs.forced_tool_calls([WEATHER], "launch")
    assert err.value.param == "tool_choice"


def test_a_chat_request_chooses_its_grammar() -> None:
    def chat(**fields: Any) -> ChatCompletionRequest:
        body = {"messages": [{"role": "user", "content": "hi"}], **fields}
        return parse_request(ChatCompletionRequest, json.dumps(body).encode())

    tools = [WEATHER]
    auto = chat(tools=tools, response_format={"type": "json_object"})
    assert auto.chat_grammar_spec(tools, False) == gs.json_object()
    assert chat(tools=tools, tool_choice="required").chat_grammar_spec(tools, True) == (
        gs.forced_tool_calls(tools, None, True, True)
    )
    named = {"type": "function", "function": {"name": "get_weather"}}
    req = chat(tools=tools, tool_choice=named, parallel_tool_calls=False)
    assert req.forced_function == "get_weather"
    assert req.chat_grammar_spec(tools, False) == gs.forced_tool_calls(tools, "get_weather")
    # tool_choice "none" leaves the tools out: the response_format alone applies
    assert chat(tools=tools, tool_choice="none").chat_grammar_spec([], False) is None
    with pytest.raises(ApiError) as err:
        chat(tools=tools, tool_choice=named).chat_grammar_spec([CLOCK], False)
    assert err.value.param == "tool_choice" and err.value.status == 400
