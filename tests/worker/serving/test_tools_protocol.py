"""Chat requests with tools: what the schema takes and refuses, and how tools, earlier calls and
tool outputs reach the prompt through a DeepSeek-V3-style template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dsworker.chat.template import render_chat, template_reads
from dsworker.chat.tool_calls import tools_prompt
from dsworker.serving.protocol import ApiError, ChatCompletionRequest, parse_request

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
WEATHER_TOOL = json.loads((Path(__file__).parents[2] / "data/weather_tool.json").read_text())
USER = {"role": "user", "content": "Weather in Paris?"}

# Written for this test after DeepSeek-V3's template: the last system message is the system
# prompt; an assistant message whose content is none renders its tool_calls; tool outputs are
# grouped, and the model answers right after them. It never reads `tools`.
V3_STYLE = (
    "{% set ns = namespace(system='', outputs=false) %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] %}"
    "{% endif %}{% endfor %}"
    "{{ bos_token }}{{ ns.system }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' and m['content'] is none %}"
    "{{ '<｜Assistant｜><｜tool▁calls▁begin｜>' }}"
    "{% for c in m['tool_calls'] %}{% if not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<｜tool▁call▁begin｜>' + c['type'] + '<｜tool▁sep｜>' + c['function']['name'] }}"
    "{{ '\n```json\n' + c['function']['arguments'] + '\n```<｜tool▁call▁end｜>' }}"
    "{% endfor %}{{ '<｜tool▁calls▁end｜>' + eos_token }}"
    "{% elif m['role'] == 'assistant' %}"
    "{% if ns.outputs %}{{ '<｜tool▁outputs▁end｜>' }}{% set ns.outputs = false %}"
    "{% else %}{{ '<｜Assistant｜>' }}{% endif %}{{ m['content'] + eos_token }}"
    "{% elif m['role'] == 'tool' %}"
    "{% if ns.outputs %}{{ '\n' }}{% else %}{{ '<｜tool▁outputs▁begin｜>' }}"
    "{% set ns.outputs = true %}{% endif %}"
    "{{ '<｜tool▁output▁begin｜>' + m['content'] + '<｜tool▁output▁end｜>' }}"
    "{% endif %}{% endfor %}"
    "{% if ns.outputs %}{{ '<｜tool▁outputs▁end｜>' }}"
    "{% elif add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)
# One that renders the offered tools itself (as vLLM's example DeepSeek-V3 tool template does).
READS_TOOLS = (
    "{{ bos_token }}{% if tools %}TOOLS:{% for t in tools %}{{ t['function']['name'] }};"
    "{% endfor %}{% endif %}{% for m in messages %}{{ m['role'] }}={{ m['content'] }}|"
    "{% endfor %}"
)


def request(**fields: Any) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, json.dumps({"messages": [USER], **fields}).encode())


def refused(param: str, **fields: Any) -> str:
    with pytest.raises(ApiError) as err:
        request(**fields).offered_tools("deepseek_v3")
    assert err.value.status == 400 and err.value.param == param, err.value.message
    return err.value.message


def test_tools_need_the_parser_and_the_refusal_says_how_to_enable_it() -> None:
    req = request(tools=[WEATHER_TOOL])
    with pytest.raises(ApiError) as err:
        req.offered_tools(None)
    assert err.value.param == "tools"
    assert "toolCallParser: deepseek_v3" in err.value.message
    assert "spec.serving.toolCallParser" in err.value.message
    assert req.offered_tools("deepseek_v3") == [WEATHER_TOOL]  # "auto" is the default
    assert request(tools=[WEATHER_TOOL], tool_choice="auto").offered_tools("deepseek_v3")


def test_tool_choice_none_offers_nothing_even_without_the_parser() -> None:
    for parser in (None, "deepseek_v3"):
        assert request(tools=[WEATHER_TOOL], tool_choice="none").offered_tools(parser) == []
        assert request(tools=None, tool_choice=None).offered_tools(parser) == []


@pytest.mark.parametrize(
    ("choice", "says"),
    [
        ("sometimes", "is not one of"),
        ({"type": "function"}, 'is {"type": "function", "function": {"name": ...}}'),
        ({"type": "retrieval", "function": {"name": "get_weather"}}, '{"type": "function"'),
        ({"type": "function", "function": {"name": ""}}, '"function": {"name": ...}}'),
    ],
)
def test_malformed_tool_choice_is_refused(choice: Any, says: str) -> None:
    assert says in refused("tool_choice", tools=[WEATHER_TOOL], tool_choice=choice)


def test_required_and_named_tool_choice_are_taken_and_force_calls() -> None:
    """Both reach the prompt like "auto"; the grammar (guided decoding) forces the call."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        req = request(tools=[WEATHER_TOOL], tool_choice=choice)
        assert req.offered_tools("deepseek_v3") == [WEATHER_TOOL]
        spec = req.chat_grammar_spec([WEATHER_TOOL], reasoning=False)
        assert spec is not None and spec.kind == "structural_tag" and spec.param == "tools"
    assert request(tools=[WEATHER_TOOL]).chat_grammar_spec([WEATHER_TOOL], False) is None


def test_tool_choice_without_tools_and_malformed_tools_are_refused() -> None:
    assert "needs tools" in refused("tool_choice", tool_choice="auto")
    assert "needs tools" in refused("tool_choice", tools=[], tool_choice="auto")
    refused("tools", tools=[{"type": "retrieval"}])
    refused("tools", tools=[{"type": "function", "function": {"name": "has space"}}])
    refused("tools", tools=[{"type": "function", "function": {"description": "no name"}}])


def test_messages_carry_tool_calls_and_tool_call_ids_to_the_template() -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    messages = [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]},
    ]  # fmt: skip
    got = parse_request(ChatCompletionRequest, json.dumps({"messages": messages}).encode())
    assert got.template_messages() == [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "18C", "tool_call_id": "call_1"},
        # empty content is none (DeepSeek's template tests for it); object arguments are text
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
    ]  # fmt: skip
    with pytest.raises(ApiError, match="tool_calls belong to assistant messages"):
        parse_request(
            ChatCompletionRequest,
            json.dumps({"messages": [{**USER, "tool_calls": [call]}]}).encode(),
        )


def test_tools_reach_a_template_that_does_not_read_them_through_the_system_prompt() -> None:
    assert not template_reads(V3_STYLE, "tools") and template_reads(READS_TOOLS, "tools")
    assert not template_reads(None, "tools")  # the default plain template
    system = {"role": "system", "content": "Be brief."}
    text = render_chat([system, USER], V3_STYLE, bos_token=BOS, eos_token=EOS,
                       tools=[WEATHER_TOOL])  # fmt: skip
    prompt = tools_prompt([WEATHER_TOOL])
    assert text == f"{BOS}Be brief.\n\n{prompt}<｜User｜>Weather in Paris?<｜Assistant｜>"
    assert json.dumps(WEATHER_TOOL) in prompt
    bare = render_chat([USER], V3_STYLE, bos_token=BOS, eos_token=EOS, tools=[WEATHER_TOOL])
    assert bare == f"{BOS}{prompt}<｜User｜>Weather in Paris?<｜Assistant｜>"
    # a template that renders the tools gets them as `tools`, and no second copy
    assert render_chat([USER], READS_TOOLS, bos_token=BOS, tools=[WEATHER_TOOL]) == (
        f"{BOS}TOOLS:get_weather;user=Weather in Paris?|"
    )
    assert render_chat([USER], V3_STYLE, bos_token=BOS, eos_token=EOS) == (
        f"{BOS}<｜User｜>Weather in Paris?<｜Assistant｜>"
    )


def test_earlier_calls_and_tool_outputs_render_like_transformers() -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    raw = {
        "messages": [
            USER,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "call_2", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Lyon"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "21C"},
        ],
        "tools": [WEATHER_TOOL],
    }  # fmt: skip
    req = parse_request(ChatCompletionRequest, json.dumps(raw).encode())
    messages, tools = req.template_messages(), req.offered_tools("deepseek_v3")
    ours = render_chat(messages, V3_STYLE, bos_token=BOS, eos_token=EOS, tools=tools)
    prompt = tools_prompt(tools)
    assert ours == (
        f"{BOS}{prompt}<｜User｜>Weather in Paris?"
        "<｜Assistant｜><｜tool▁calls▁begin｜>"
        '<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n```'
        "<｜tool▁call▁end｜>\n"
        '<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Lyon"}\n```'
        f"<｜tool▁call▁end｜><｜tool▁calls▁end｜>{EOS}"
        "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>18C<｜tool▁output▁end｜>\n"
        "<｜tool▁output▁begin｜>21C<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
    )
    with_system = [{"role": "system", "content": prompt}, *messages]
    theirs = render_jinja_template(
        [with_system], tools=tools, chat_template=V3_STYLE, bos_token=BOS, eos_token=EOS,
        add_generation_prompt=True,
    )  # fmt: skip
    theirs = theirs[0][0] if isinstance(theirs, tuple) else theirs
    assert ours == theirs
