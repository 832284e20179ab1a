"""Structured output end to end: `dsworker serve` on CPU with a random tiny DeepSeek-V3 (one
token per byte) answers response_format json_schema / json_object with JSON that follows the
schema, on chat and completions, streamed and not, and with toolCallParser on, tool_choice
"required" or naming a function with a call in DeepSeek-V3's markup that comes back as OpenAI
tool_calls whose arguments follow the tool's parameters. Nothing is scripted: the grammar alone
makes a random model write these."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from serving_helpers import dsworker_serve, stream_choices

SCHEMA = json.loads((Path(__file__).parents[2] / "data/pick_schema.json").read_text())
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA}}
WEATHER_ARGS = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer",
                   "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_ARGS}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
        "required": ["zone"]}}},
]  # fmt: skip
MESSAGES = [{"role": "user", "content": "Pick one."}]


@pytest.fixture(scope="module")
def url(synth_checkpoint, tmp_path_factory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("guided")
    model = synth_checkpoint("v3", "tiny", "bf16")
    # The offered tools reach the prompt as a system text of ~900 byte tokens.
    config = {"modelName": "tiny", "dtype": "float32", "device": "cpu", "maxSeqLen": 2048,
              "maxInputTokenLen": 1536, "maxNewTokens": 400, "toolCallParser": "deepseek_v3"}  # fmt: skip
    with dsworker_serve(model, config, tmp) as (base, log):
        yield base
        assert "guided decoding ready" in log.read_text(errors="replace")  # read at start-up


def post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 3}])
def test_chat_and_completions_follow_the_schema(url: str, sampling: dict[str, Any]) -> None:
    chat = post(url, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 64,
                "response_format": RESPONSE_FORMAT, "n": 2} | sampling)  # fmt: skip
    for choice in chat["choices"]:
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    text = post(url, "/v1/completions", {"prompt": "A pick:", "max_tokens": 64,
                "response_format": RESPONSE_FORMAT} | sampling)["choices"][0]  # fmt: skip
    assert text["finish_reason"] == "stop"
    jsonschema.validate(json.loads(text["text"]), SCHEMA)


def test_a_streamed_answer_parses_once_whole(url: str) -> None:
    body = {"messages": MESSAGES, "max_tokens": 64, "temperature": 0, "stream": True,
            "response_format": RESPONSE_FORMAT}  # fmt: skip
    choices = stream_choices(url, body)
    assert choices[-1]["finish_reason"] == "stop"
    text = "".join(c["delta"].get("content", "") for c in choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert sum(1 for c in choices if c["delta"].get("content")) > 5  # piece by piece


def test_json_object_with_a_bias_toward_closing_it(url: str) -> None:
    close = 5 + ord("}")  # a synthesized tokenizer's ids: 5 special tokens, then the bytes
    body = {"prompt": "An object:", "max_tokens": 16, "temperature": 0,
            "response_format": {"type": "json_object"}, "logit_bias": {str(close): 30}}  # fmt: skip
    choice = post(url, "/v1/completions", body)["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("{}", "stop")


def calls_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["content"] is None
    return [c["function"] for c in choice["message"]["tool_calls"]]


@pytest.mark.parametrize("seed", [1, 2])
def test_tool_choice_required_calls_an_offered_tool_with_valid_arguments(
    url: str, seed: int
) -> None:
    body = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "max_tokens": 400,
            "temperature": 1.0, "seed": seed, "parallel_tool_calls": False}  # fmt: skip
    [call] = calls_of(post(url, "/v1/chat/completions", body))
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call["name"]]
    jsonschema.validate(json.loads(call["arguments"]), schema)


def test_a_named_tool_choice_calls_that_function(url: str) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    body = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": named, "max_tokens": 400,
            "temperature": 0}  # fmt: skip
    [call] = calls_of(post(url, "/v1/chat/completions", body))
    assert call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), WEATHER_ARGS)
    # without the forcing choice the random model calls nothing
    auto = post(url, "/v1/chat/completions", body | {"tool_choice": "auto", "max_tokens": 8})
    assert auto["choices"][0]["finish_reason"] != "tool_calls"


def test_a_schema_xgrammar_refuses_is_a_400_naming_response_format(url: str) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
    r = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES,
                   "response_format": bad}, timeout=60)  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
