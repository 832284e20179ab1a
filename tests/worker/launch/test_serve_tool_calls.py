"""Tool calling end to end: `dsworker serve` with toolCallParser deepseek_v3, on CPU, answers a
chat request with OpenAI `tool_calls` that the real model wrote, token by token.

A random checkpoint never writes call markup by itself, so this one is scripted by its weights
alone: every attention and MLP output projection is zero, so the last hidden state is the token's
own embedding, and the embeddings and lm_head rows chain `<｜Assistant｜>` through the call's
tokens to EOS (the call's pieces are added to the tokenizer as ordinary, non-special tokens, as
the markers are in DeepSeek-V3's tokenizer). Engine, sampler, detokenizer and server are the ones
production runs; the prompt side (tools in the system prompt, since the synthetic chat template
does not render them) is checked through the prompt's token count.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file
from serving_helpers import dsworker_serve, stream_choices
from tokenizers import AddedToken, Tokenizer

from dsworker.chat.byte_level import ASSISTANT, BOS, CHAT_TEMPLATE, EOS, EOS_ID
from dsworker.chat.template import render_chat
from dsworker.chat.tool_calls import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP, tools_prompt

ARGUMENTS = '{"city": "Paris"}'
SCRIPT = [CALLS_BEGIN, CALL_BEGIN, "function", SEP, "get_weather", "\n```json\n", ARGUMENTS,
          "\n```", CALL_END, CALLS_END]  # fmt: skip
TOOL = json.loads((Path(__file__).parents[2] / "data/weather_tool.json").read_text())
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


def script_checkpoint(src: Path, dst: Path) -> None:
    """Copy `src` and make its greedy answer after <｜Assistant｜> SCRIPT, then EOS."""
    shutil.copytree(src, dst)
    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p in SCRIPT])
    tok.save(str(dst / "tokenizer.json"))
    chain = [tok.token_to_id(ASSISTANT), *(tok.token_to_id(p) for p in SCRIPT), EOS_ID]
    for path in sorted(dst.glob("*.safetensors")):
        tensors = load_file(path)
        for name, t in tensors.items():
            if name.endswith(("self_attn.o_proj.weight", "down_proj.weight")):
                t.zero_()  # no layer adds to the residual stream
            elif name == "model.embed_tokens.weight":
                for k, token in enumerate(chain[:-1]):
                    t[token] = 0
                    t[token, k] = 1  # the k-th link's hidden state: unit vector k
            elif name == "lm_head.weight":
                for k, token in enumerate(chain[1:]):
                    t[token] = 0
                    t[token, k] = 1  # ... whose top logit is the next link
        save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def served(synth_checkpoint, tmp_path_factory) -> Iterator[tuple[str, Tokenizer]]:
    tmp = tmp_path_factory.mktemp("tools")
    model = tmp / "model"
    script_checkpoint(synth_checkpoint("v3", "tiny", "bf16"), model)
    # The serving defaults for maxSeqLen and maxInputTokenLen: the tiny model's context holds them.
    config = {"modelName": "tiny", "dtype": "float32", "device": "cpu", "maxNewTokens": 32,
              "toolCallParser": "deepseek_v3"}  # fmt: skip
    with dsworker_serve(model, config, tmp) as (url, _):
        yield url, Tokenizer.from_file(str(model / "tokenizer.json"))


def chat(url: str, messages: list[dict] = MESSAGES, **extra: object) -> dict:
    body = {"messages": messages, "tools": [TOOL], "max_tokens": 32, "temperature": 0} | extra
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_model_calls_the_tool_and_the_answer_says_so(served) -> None:
    url, _ = served
    body = chat(url)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": ARGUMENTS}
    assert body["usage"]["completion_tokens"] == len(SCRIPT) + 1  # the call's tokens and EOS


def test_streamed_call_is_one_delta_and_no_markup_leaks(served) -> None:
    url, _ = served
    body = {"messages": MESSAGES, "tools": [TOOL], "max_tokens": 32, "temperature": 0,
            "stream": True}  # fmt: skip
    choices = stream_choices(url, body)
    calls = [t for c in choices for t in c["delta"].get("tool_calls", [])]
    assert [(t["index"], t["function"]["name"], t["function"]["arguments"]) for t in calls] == [
        (0, "get_weather", ARGUMENTS)
    ]
    assert "".join(c["delta"].get("content", "") for c in choices) == ""
    assert choices[-1]["finish_reason"] == "tool_calls"


def test_tools_reach_the_prompt_and_tool_choice_none_keeps_the_raw_text(served) -> None:
    url, tok = served
    offered = chat(url)
    plain = chat(url, tool_choice="none")
    message = plain["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "".join(SCRIPT)}
    assert plain["choices"][0]["finish_reason"] == "stop"

    with_tools = [{"role": "system", "content": tools_prompt([TOOL])}, *MESSAGES]
    assert offered["usage"]["prompt_tokens"] == tokens(tok, with_tools)
    assert plain["usage"]["prompt_tokens"] == tokens(tok, MESSAGES)
    assert tokens(tok, with_tools) > tokens(tok, MESSAGES) + 100


def tokens(tok: Tokenizer, messages: list[dict]) -> int:
    """The prompt's token count through the synthesized checkpoint's chat template."""
    text = render_chat(messages, CHAT_TEMPLATE, bos_token=BOS, eos_token=EOS)
    return len(tok.encode(text, add_special_tokens=False).ids)


def test_forcing_the_call_lets_the_models_own_marker_tokens_through(served) -> None:
    """tool_choice naming the function (guided decoding): the grammar allows the whole-marker
    tokens this tokenizer has (ordinary added tokens, as in DeepSeek-V3's), so the scripted call
    comes out token for token as unforced."""
    url, _ = served
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in (named, "required"):
        body = chat(url, tool_choice=choice, return_token_ids=True)
        [call] = body["choices"][0]["message"]["tool_calls"]
        assert call["function"] == {"name": "get_weather", "arguments": ARGUMENTS}
        assert body["usage"]["completion_tokens"] == len(SCRIPT) + 1


def test_a_two_turn_tool_round_trip(served) -> None:
    """The client sends the call back as the answer said it (content None), then the tool's
    output: the second turn is answered, with the call and the output in its prompt."""
    url, tok = served
    first = chat(url)["choices"][0]["message"]
    assert first["content"] is None and first["tool_calls"]
    output = {"role": "tool", "tool_call_id": first["tool_calls"][0]["id"], "content": "18C, sunny"}
    messages = [*MESSAGES, first, output]
    second = chat(url, messages)
    assert second["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    system = {"role": "system", "content": tools_prompt([TOOL])}
    assert second["usage"]["prompt_tokens"] == tokens(tok, [system, *messages])
    rendered = render_chat([system, *messages], CHAT_TEMPLATE, bos_token=BOS, eos_token=EOS)
    assert rendered.endswith(f"{CALLS_END}{EOS}<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>"
                             "18C, sunny<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")  # fmt: skip
    assert f"{CALL_BEGIN}function{SEP}get_weather\n```json\n{ARGUMENTS}\n```{CALL_END}" in rendered
