"""Request fields are strictly typed, as OpenAI's are: a string, a bool or a float where another
type is due is a 400 naming the field, never coerced (issue 16.9)."""

from __future__ import annotations

import json

import pytest

from dsworker.serving.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "10"),
        ("max_tokens", True),
        ("max_tokens", 10.0),
        ("stream", "yes"),
        ("stream", 1),
        ("n", "2"),
        ("seed", "7"),
        ("echo", "true"),
        ("logprobs", "1"),
        ("temperature", "0.5"),
        ("top_k", False),
        ("min_tokens", "1"),
        ("ignore_eos", 0),
        ("return_token_ids", "false"),
        ("stop_token_ids", ["5"]),
    ],
)
def test_completion_fields_of_the_wrong_type_are_refused_naming_them(field: str, value) -> None:
    raw = json.dumps({"prompt": "hi", field: value}).encode()
    with pytest.raises(ApiError) as err:
        parse_request(CompletionRequest, raw)
    assert err.value.status == 400 and err.value.param == field, err.value.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_completion_tokens", "5"),
        ("logprobs", "true"),
        ("top_logprobs", True),
        ("parallel_tool_calls", 0),
        ("stream_options", {"include_usage": "yes"}),
        ("messages", [{"role": "user", "content": 5}]),
    ],
)
def test_chat_fields_of_the_wrong_type_are_refused_naming_them(field: str, value) -> None:
    body = {"messages": MESSAGES, "stream": True, field: value}
    with pytest.raises(ApiError) as err:
        parse_request(ChatCompletionRequest, json.dumps(body).encode())
    assert err.value.status == 400 and err.value.param == field, err.value.message


def test_json_numbers_and_nulls_are_still_taken() -> None:
    """An integer where a float is due is a JSON number like any other; null is the default."""
    body = {"prompt": "hi", "max_tokens": 10, "temperature": 0, "top_p": 1, "n": None,
            "logit_bias": {"5": 1}, "stream": False, "seed": -3}  # fmt: skip
    req = parse_request(CompletionRequest, json.dumps(body).encode())
    assert (req.max_tokens, req.temperature, req.top_p, req.n) == (10, 0.0, 1.0, 1)
    chat = {"messages": MESSAGES, "logprobs": True, "top_logprobs": 2, "tool_choice": "none",
            "tools": [{"type": "function", "function": {"name": "f", "strict": True}}]}  # fmt: skip
    assert parse_request(ChatCompletionRequest, json.dumps(chat).encode()).logprob_count() == 2
