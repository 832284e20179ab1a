"""The synthesized checkpoints' chat template takes an OpenAI tool round trip in DeepSeek-V3's
format: earlier calls (content None), the tool outputs, and the turn after them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsworker.chat.byte_level import BOS, CHAT_TEMPLATE, EOS
from dsworker.chat.template import ChatTemplateError, render_chat
from dsworker.chat.tool_calls import split_tool_calls, tools_prompt
from dsworker.serving.protocol import ChatCompletionRequest, parse_request

TOOL = json.loads((Path(__file__).parents[2] / "data/weather_tool.json").read_text())
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
ROUND_TRIP = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
]
CALL_TEXT = (
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
    '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
)


def request_messages(messages: list[dict]) -> list[dict]:
    """The messages as the server hands them to the template."""
    body = json.dumps({"messages": messages, "tools": [TOOL]}).encode()
    return parse_request(ChatCompletionRequest, body).template_messages()


def test_a_tool_round_trip_renders_the_call_and_its_output() -> None:
    text = render_chat(request_messages(ROUND_TRIP), CHAT_TEMPLATE, bos_token=BOS, eos_token=EOS)
    assert text == (
        f"{BOS}Be brief.<｜User｜>Weather in Paris?<｜Assistant｜>{CALL_TEXT}{EOS}"
        "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>18C<｜tool▁output▁end｜>"
        "<｜tool▁outputs▁end｜>"
    )
    # the call as rendered is what the parser reads back from an answer
    [call] = split_tool_calls(CALL_TEXT)[1]
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Paris"}')


def test_the_next_turn_follows_the_outputs_and_several_outputs_share_one_block() -> None:
    second = {**CALL, "id": "call_2", "function": {"name": "get_weather", "arguments": "{}"}}
    messages = [
        *ROUND_TRIP[:2],
        {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL, second]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "21C"},
        {"role": "assistant", "content": "<think>hot?</think>18C and 21C."},
        {"role": "user", "content": "Thanks"},
    ]
    text = render_chat(request_messages(messages), CHAT_TEMPLATE, bos_token=BOS, eos_token=EOS)
    assert text.endswith(
        "<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{}\n"
        f"```<｜tool▁call▁end｜><｜tool▁calls▁end｜>{EOS}"
        "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>18C<｜tool▁output▁end｜>\n"
        "<｜tool▁output▁begin｜>21C<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
        f"18C and 21C.{EOS}<｜User｜>Thanks<｜Assistant｜>"
    )
    assert "<｜Assistant｜>Let me look.<｜tool▁calls▁begin｜>" in text


def test_tools_go_to_the_system_prompt_and_transformers_renders_the_same() -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = request_messages(ROUND_TRIP)
    ours = render_chat(messages, CHAT_TEMPLATE, bos_token=BOS, eos_token=EOS, tools=[TOOL])
    assert ours.startswith(f"{BOS}Be brief.\n\n{tools_prompt([TOOL])}<｜User｜>")
    with_tools = [{**messages[0], "content": f"Be brief.\n\n{tools_prompt([TOOL])}"}, *messages[1:]]
    theirs = render_jinja_template(
        [with_tools], chat_template=CHAT_TEMPLATE, bos_token=BOS, eos_token=EOS,
        add_generation_prompt=True,
    )  # fmt: skip
    assert ours == (theirs[0][0] if isinstance(theirs, tuple) else theirs)


def test_an_unknown_role_is_refused_by_name() -> None:
    with pytest.raises(ChatTemplateError, match="unsupported role function"):
        render_chat([{"role": "function", "content": "x"}], CHAT_TEMPLATE)
