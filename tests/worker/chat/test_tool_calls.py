"""DeepSeek-V3 tool calls parsed from an answer fed whole or in any pieces; malformed markup is
content; the prompt that offers the tools; one choice's message and deltas (ChatOutput)."""

from __future__ import annotations

import itertools
import json

import pytest

from dsworker.chat.assistant_message import ChatOutput
from dsworker.chat.tool_calls import (
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    SEP,
    ToolCallSplitter,
    parse_call,
    split_tool_calls,
    tools_prompt,
    with_tools_prompt,
)


def call(name: str, args: str, kind: str = "function") -> str:
    return f"{CALL_BEGIN}{kind}{SEP}{name}\n```json\n{args}\n```{CALL_END}"


WEATHER = call("get_weather", '{"city": "Paris"}')
TIME = call("get_time", "{}")

# (text, content, [(name, arguments)])
GOOD = [
    (CALLS_BEGIN + WEATHER + CALLS_END, "", [("get_weather", '{"city": "Paris"}')]),
    (
        "Let me check.\n\n" + CALLS_BEGIN + WEATHER + "\n" + TIME + CALLS_END,
        "Let me check.\n\n",
        [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")],
    ),
    # the answer ends (EOS) after the last call without the closing marker
    (CALLS_BEGIN + TIME + "\n", "", [("get_time", "{}")]),
    # text after the block is content too; a tag-like "<" in content is not held for ever
    ("a<b " + CALLS_BEGIN + TIME + CALLS_END + "\nok", "a<b \nok", [("get_time", "{}")]),
    # nested JSON with a fence-like string and unicode
    (
        CALLS_BEGIN + call("f-1.x", '{"q": "```", "n": [1, {"é": null}]}') + CALLS_END,
        "",
        [("f-1.x", '{"q": "```", "n": [1, {"é": null}]}')],
    ),
    # whitespace the model may put around the parts
    (
        CALLS_BEGIN + f" {CALL_BEGIN} function {SEP} f \n```json \n {{}} \n```\n{CALL_END}",
        "",
        [("f", "{}")],
    ),
    ("no calls at all", "no calls at all", []),
]

BAD_BODIES = [
    call("get_weather", '{"city": Paris}'),  # arguments are not JSON
    call("", "{}"),  # no name
    call("get_weather", "[1, 2]"),  # arguments are not an object
    call("get_weather", "{}", kind="module"),  # not a function call
    f"{CALL_BEGIN}get_weather{SEP}{{}}{CALL_END}",  # DeepSeek-V3.1's format, not V3's
    f"{CALL_BEGIN}function{SEP}f\n{{}}{CALL_END}",  # no fence
]

# Malformed markup: from the first bad call on, the raw text is content.
RAW = (
    [f"Hi {CALLS_BEGIN}{body}{CALLS_END}" for body in BAD_BODIES]
    + [
        CALLS_BEGIN + WEATHER[:-3],  # cut off (max_tokens)
        CALLS_BEGIN + CALLS_END + "x",  # a block without calls
        CALLS_BEGIN + "text",
        "x" + CALLS_BEGIN,
        "x" + CALLS_BEGIN[:5],  # a marker's start at the very end
    ]
)
BAD = [(text, text, []) for text in RAW] + [
    # a good call, then a bad one: the good one stays a call
    (
        CALLS_BEGIN + TIME + "\n" + BAD_BODIES[0] + CALLS_END,
        "\n" + BAD_BODIES[0] + CALLS_END,
        [("get_time", "{}")],
    ),
]
CASES = GOOD + BAD


def counter() -> object:
    n = itertools.count()
    return lambda: f"call_{next(n)}"


def named(calls: list) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_whole_text(text: str, content: str, calls: list) -> None:
    got_content, got_calls = split_tool_calls(text)
    assert (got_content, named(got_calls)) == (content, calls)
    assert all(c.id.startswith("call_") and len(c.id) > 10 for c in got_calls)
    assert len({c.id for c in got_calls}) == len(got_calls)
    for c in got_calls:
        assert isinstance(json.loads(c.arguments), dict)


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_every_two_and_three_piece_split_streams_the_same(
    text: str, content: str, calls: list
) -> None:
    well_formed = "｜" not in content
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            s = ToolCallSplitter(counter())  # type: ignore[arg-type]
            got = [s.feed(text[:i]), s.feed(text[i:j]), s.feed(text[j:], final=True)]
            assert "".join(g[0] for g in got) == content, (i, j)
            assert [c for g in got for c in named(g[1])] == calls, (i, j)
            assert [c.id for g in got for c in g[1]] == [f"call_{k}" for k in range(len(calls))]
            if well_formed:  # no piece of a marker ever reaches the client as content
                assert all("｜" not in g[0] for g in got), (i, j)


def test_a_call_is_handed_out_once_its_end_marker_arrives() -> None:
    s = ToolCallSplitter(counter())  # type: ignore[arg-type]
    assert s.feed("Checking <｜tool▁cal") == ("Checking ", [])
    assert s.feed("ls▁begin｜>" + WEATHER[:-4]) == ("", [])
    content, calls = s.feed(WEATHER[-4:] + "\n")
    assert content == "" and named(calls) == [("get_weather", '{"city": "Paris"}')]
    assert s.feed(CALLS_END) == ("", [])
    assert s.feed(" done", final=True) == (" done", [])


def test_parse_call_refuses_without_raising() -> None:
    for body in BAD_BODIES:
        inner = body[len(CALL_BEGIN) : body.rindex(CALL_END)]
        assert parse_call(inner) is None
    assert parse_call("function" + SEP + "f\n```json\n" + "[" * 100000 + "\n```") is None


def test_chat_output_streams_calls_as_indexed_deltas_and_finishes_with_tool_calls() -> None:
    text = "<think>Weather and time.</think>" + GOOD[1][0]
    out = ChatOutput(reasoning=True, tools=True)
    deltas = [out.feed(text[k : k + 7], final=k + 7 >= len(text)) for k in range(0, len(text), 7)]
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [(c["index"], c["type"], c["function"]["name"]) for c in calls] == [
        (0, "function", "get_weather"),
        (1, "function", "get_time"),
    ]
    assert all(c["id"].startswith("call_") for c in calls)
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Weather and time."
    assert "".join(d.get("content", "") for d in deltas) == "Let me check.\n\n"
    assert out.finish_reason(None) is None and out.finish_reason("stop") == "tool_calls"


def test_chat_output_message() -> None:
    message = ChatOutput(reasoning=False, tools=True).message(GOOD[0][0])
    assert message["content"] is None and "reasoning_content" not in message
    assert message["tool_calls"] == [
        {
            "id": message["tool_calls"][0]["id"],
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]
    plain = ChatOutput(reasoning=False, tools=True)
    assert plain.message("just text") == {"role": "assistant", "content": "just text"}
    assert plain.finish_reason("length") == "length"
    # without the parser the markup is the answer's text
    off = ChatOutput(reasoning=False, tools=False).message(GOOD[0][0])
    assert off == {"role": "assistant", "content": GOOD[0][0]}
    one = ChatOutput(reasoning=False, tools=True, max_calls=1)  # parallel_tool_calls: false
    assert [c["function"]["name"] for c in one.message(GOOD[1][0])["tool_calls"]] == ["get_weather"]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "get_time"}},
]


def test_tools_prompt_lists_each_tool_and_the_call_format() -> None:
    text = tools_prompt(TOOLS)
    assert text.startswith("# Tools\n\nYou may call one or more functions")
    assert "<tools>\n" + "\n".join(json.dumps(t) for t in TOOLS) + "\n</tools>" in text
    assert f"{CALL_BEGIN}function{SEP}<function_name>\n```json\n" in text
    assert text.endswith(f"you should print {CALLS_END}")


def test_tools_prompt_joins_the_last_system_message_or_comes_first() -> None:
    user = {"role": "user", "content": "Weather?"}
    assert with_tools_prompt([user], TOOLS) == [
        {"role": "system", "content": tools_prompt(TOOLS)},
        user,
    ]
    first = {"role": "system", "content": "A"}
    last = {"role": "system", "content": "Be brief."}
    got = with_tools_prompt([first, user, last], TOOLS)
    assert got == [
        first,
        user,
        {"role": "system", "content": "Be brief.\n\n" + tools_prompt(TOOLS)},
    ]
    assert last == {"role": "system", "content": "Be brief."}  # the caller's dict is untouched


def test_start_up_warns_when_the_tokenizer_would_drop_the_markers(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    from tokenizers import AddedToken, Tokenizer

    from dsworker.chat.byte_level import BOS, write_tokenizer
    from dsworker.chat.tokenizer import TextTokenizer
    from dsworker.contract.engine_config import EngineConfig
    from dsworker.launch.rank_main import _check_tool_markers

    write_tokenizer(tmp_path, 320)
    path = str(tmp_path / "tokenizer.json")
    tok = Tokenizer.from_file(path)
    tok.add_tokens([AddedToken(CALL_BEGIN, special=False, normalized=False)])  # as DeepSeek's
    tok.add_special_tokens([AddedToken(CALLS_BEGIN, special=True, normalized=False)])
    tok.save(path)
    text = TextTokenizer(tmp_path)
    assert text.marked_special([BOS, CALLS_BEGIN, CALL_BEGIN, SEP]) == [BOS, CALLS_BEGIN]
    _check_tool_markers(EngineConfig(), text)
    assert not caplog.records  # the parser is off: nothing to say
    _check_tool_markers(EngineConfig(toolCallParser="deepseek_v3"), text)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert CALLS_BEGIN in caplog.text and CALL_BEGIN + "," not in caplog.text
