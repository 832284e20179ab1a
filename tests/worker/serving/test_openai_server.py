"""The HTTP API over a fake model: request validation, OpenAI shapes, streaming, health, metrics.

The fake runner predicts "previous token + 1", so every expected output is known exactly and the
real engine loop, scheduler, sampler and text streaming run underneath.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from counting_model import CountingRunner, SlowRunner, counting_state, live_server
from fastapi.testclient import TestClient
from tiny_vocab import EOS_ID, FIM, WEATHER_TOOL, WORDS, write_model_dir

from dsworker.chat.tokenizer import TextTokenizer
from dsworker.chat.tool_calls import CALLS_BEGIN
from dsworker.contract.engine_config import EngineConfig
from dsworker.engine.control import LocalChannel
from dsworker.engine.loop import EngineLoop
from dsworker.engine.metrics import Metrics
from dsworker.engine.requests import GenRequest, SamplingParams
from dsworker.engine.scheduler import Scheduler
from dsworker.engine.steps import StepError
from dsworker.serving import protocol as oa
from dsworker.serving.app import create_app
from dsworker.serving.state import ServerState
from waiting import wait_until


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[TestClient, ServerState, CountingRunner]]:
    cfg = EngineConfig(
        modelName="tiny", maxSeqLen=40, maxInputTokenLen=20, maxNewTokens=30, maxBatchSize=2,
        maxRequestBytes=4096,
    )  # fmt: skip
    tok = TextTokenizer(write_model_dir(tmp_path))
    state = ServerState(config=cfg, metrics=Metrics())
    runner = CountingRunner(len(WORDS))
    fatal: list[BaseException] = []
    state.fatal = fatal  # type: ignore[attr-defined]
    loop = EngineLoop(
        runner,
        Scheduler(cfg.maxBatchSize, cfg.maxSeqLen, 64),
        tok.decode,
        LocalChannel(),
        state.metrics,
        on_fatal=fatal.append,
    )
    app = create_app(state)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 503
        assert client.post("/v1/completions", json={"prompt": "w1"}).status_code == 503
        loop.start()
        state.tokenizer, state.engine, state.ready = tok, loop, True
        yield client, state, runner
        loop.stop()


def ids(*words: str) -> list[int]:
    return [WORDS.index(w) for w in words]


def test_health_models_and_greedy_completion(served) -> None:
    client, _, _ = served
    assert client.get("/health").json() == {"status": "ok"}
    models_ = client.get("/v1/models").json()
    assert models_["data"][0]["id"] == "tiny"
    r = client.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": "w1 w2", "max_tokens": 3, "temperature": 0,
              "return_token_ids": True},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["token_ids"] == ids("w3", "w4", "w5")
    # WordLevel joins words with spaces, so the first word keeps the space after the prompt
    assert choice["text"] == " w3 w4 w5"
    assert choice["finish_reason"] == "length"
    # BOS is prepended to plain prompts (add_bos_token)
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_eos_and_stop_strings_finish_with_stop(served) -> None:
    client, _, _ = served
    r = client.post("/v1/completions", json={"prompt": "w7", "max_tokens": 10, "temperature": 0})
    assert r.json()["choices"][0] | {"logprobs": None} == {
        "index": 0, "text": " w8 w9", "logprobs": None, "finish_reason": "stop"
    }  # fmt: skip
    r = client.post(
        "/v1/completions",
        json={"prompt": [4, 5], "max_tokens": 10, "temperature": 0, "stop": ["w8"]},
    )
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and "w8" not in choice["text"]
    assert choice["text"] == " w2 w3 w4 w5 w6 w7 "
    # The last allowed token completes the stop string: the text was cut, so "stop", not "length".
    body = {"prompt": [4, 5], "max_tokens": 3, "temperature": 0, "stop": ["w4"]}
    for stream in (False, True):
        with client.stream("POST", "/v1/completions", json=body | {"stream": stream}) as r:
            lines = [ln for ln in r.iter_lines() if ln.strip()]
        if stream:
            chunks = [json.loads(ln[6:])["choices"][0] for ln in lines if ln.startswith("data: {")]
            text, reason = "".join(c["text"] for c in chunks), chunks[-1]["finish_reason"]
        else:
            choice = json.loads("".join(lines))["choices"][0]
            text, reason = choice["text"], choice["finish_reason"]
        assert (text, reason) == (" w2 w3 ", "stop"), stream


def test_stop_token_ids_end_without_text_and_outlive_ignore_eos(served) -> None:
    client, _, _ = served
    body = {"prompt": "w1", "max_tokens": 10, "temperature": 0, "return_token_ids": True}
    choice = client.post("/v1/completions", json=body | {"stop_token_ids": [8]}).json()["choices"]
    assert choice[0]["text"] == " w2 w3" and choice[0]["finish_reason"] == "stop"
    assert choice[0]["token_ids"] == ids("w2", "w3", "w4")
    # w9 is followed by EOS; ignore_eos goes on through it, to the request's own stop token.
    body |= {"prompt": "w7", "ignore_eos": True, "stop_token_ids": [WORDS.index("Assistant:")]}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["token_ids"] == ids("w8", "w9", "</s>", "User:", "Assistant:")
    assert choice["finish_reason"] == "stop" and "Assistant:" not in choice["text"]


def test_min_tokens_holds_eos_back(served) -> None:
    """w9 is followed by EOS; with min_tokens 4 EOS is ruled out until 4 tokens are out."""
    client, _, _ = served
    body = {"prompt": "w7", "max_tokens": 10, "temperature": 0, "return_token_ids": True}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]
    assert plain["token_ids"] == ids("w8", "w9", "</s>")
    held = client.post("/v1/completions", json=body | {"min_tokens": 4}).json()["choices"][0]
    assert held["token_ids"][:2] == ids("w8", "w9") and len(held["token_ids"]) == 5
    assert "</s>" not in [WORDS[t] for t in held["token_ids"][:4]]
    assert held["token_ids"][4] == EOS_ID and held["finish_reason"] == "stop"


def test_streamed_chat_uses_template_and_ends_with_done(tmp_path: Path, served) -> None:
    client, state, runner = served
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "w3"}],
            "max_tokens": 2,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[len("data: ") :]) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len({(c["id"], c["created"], c["object"]) for c in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finals[-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 2
    # Default template: "<s>User: w3\n\nAssistant:" -> the last prompt token is "Assistant:" (3),
    # so the counting model answers w0 (4) then w1 (5).
    assert text.split() == ["w0", "w1"]
    first = [s for s in runner.steps if s.items and s.items[0].start == 0][-1]
    assert list(first.items[0].tokens) == ids("<s>", "User:", "w3", "Assistant:")


def test_logprobs_of_completions_and_streamed_chat(served) -> None:
    """The counting model puts logit 10 on its token and 0 on the other V - 1 (fp32 logprobs)."""
    client, _, _ = served
    v = len(WORDS)
    want = 10.0 - math.log(math.exp(10.0) + v - 1)
    other = -math.log(math.exp(10.0) + v - 1)
    r = client.post(
        "/v1/completions",
        json={"prompt": "w1 w2", "max_tokens": 2, "temperature": 0, "logprobs": 2},
    )
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["w3", "w4"]
    assert lp["token_logprobs"] == pytest.approx([want, want], abs=1e-6)
    assert lp["text_offset"] == [0, 2]
    assert len(lp["top_logprobs"]) == 2 and lp["top_logprobs"][0]["w3"] == pytest.approx(
        want, abs=1e-6
    )
    assert sorted(lp["top_logprobs"][0].values())[0] == pytest.approx(other, abs=1e-6)
    plain = client.post("/v1/completions", json={"prompt": "w1", "max_tokens": 1})
    assert plain.json()["choices"][0]["logprobs"] is None

    body = {"messages": [{"role": "user", "content": "w3"}], "max_tokens": 2, "temperature": 0,
            "stream": True, "logprobs": True, "top_logprobs": 1}  # fmt: skip
    with client.stream("POST", "/v1/chat/completions", json=body) as stream:
        lines = [ln for ln in stream.iter_lines() if ln.startswith("data: {")]
    entries = [
        e
        for ln in lines
        for c in json.loads(ln[6:])["choices"]
        for e in ((c.get("logprobs") or {}).get("content") or [])
    ]
    assert [e["token"] for e in entries] == ["w0", "w1"]
    assert [e["bytes"] for e in entries] == [list(b"w0"), list(b"w1")]
    assert [e["logprob"] for e in entries] == pytest.approx([want, want], abs=1e-6)
    assert [[t["token"] for t in e["top_logprobs"]] for e in entries] == [["w0"], ["w1"]]


def test_suffix_asks_for_the_middle_in_deepseeks_fim_format(served) -> None:
    client, state, runner = served
    body = {"prompt": "w1 w2", "suffix": "w8", "max_tokens": 1, "temperature": 0}
    assert client.post("/v1/completions", json=body).status_code == 200
    first = [s for s in runner.steps if s.items and s.items[0].start == 0][-1]
    assert list(first.items[0].tokens) == ids("<s>", FIM[0], "w1", "w2", FIM[1], "w8", FIM[2])
    for bad in ({"prompt": [5, 6]}, {"echo": True}):
        r = client.post("/v1/completions", json=body | bad)
        assert r.status_code == 400 and "suffix" in r.json()["error"]["message"]
    state.tokenizer.fim_tokens = None  # a tokenizer without the markers
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"


def test_echo_prefixes_the_prompt_and_its_logprobs(served) -> None:
    """lm-evaluation-harness scores a text this way: echo, logprobs, one new token."""
    client, _, _ = served
    v = len(WORDS)
    want = 10.0 - math.log(math.exp(10.0) + v - 1)
    other = -math.log(math.exp(10.0) + v - 1)
    body = {"prompt": "w1 w2 w7", "max_tokens": 1, "temperature": 0, "echo": True}
    r = client.post("/v1/completions", json=body | {"logprobs": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "w1 w2 w7 w8"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["<s>", "w1", "w2", "w7", "w8"]
    # Nothing predicts BOS; the counting model expects </s> after it, w2 after w1, w3 after w2.
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([other, want, other, want], abs=1e-6)
    assert [sorted(t) for t in lp["top_logprobs"][1:]] == [
        ["</s>", "w1"], ["w2"], ["w3", "w7"], ["w8"]
    ]  # fmt: skip
    assert lp["text_offset"] == [0, 3, 5, 7, 9]
    assert r.json()["usage"]["prompt_tokens"] == 4

    plain = client.post("/v1/completions", json=body | {"prompt": [5, 6], "n": 2}).json()
    assert [c["text"] for c in plain["choices"]] == ["w1 w2 w3"] * 2
    assert plain["choices"][0]["logprobs"] is None

    with client.stream("POST", "/v1/completions", json=body | {"stream": True, "logprobs": 0}) as s:
        chunks = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == "w1 w2 w7 w8" and texts[0].startswith("w1 w2 w7")
    streamed = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    assert streamed == lp["tokens"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "w1", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "w1", "temperature": 5}, "temperature"),
        ({"prompt": "w1", "n": 17}, "n"),
        ({"prompt": "w1", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": [999]}, "prompt"),
        ({"prompt": "w1", "max_tokens": 31}, "max_tokens"),
        ({"prompt": "w1", "model": "other"}, "model"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "w1", "logprobs": 21}, "logprobs"),
        ({"prompt": ["w1", 5]}, "prompt"),
        ({"prompt": "w1", "stream_options": {"include_usage": True}}, None),
        ({"prompt": "w1", "logit_bias": {"6": -101}}, "logit_bias"),
        ({"prompt": "w1", "logit_bias": {"w2": 1}}, "logit_bias"),
        ({"prompt": "w1", "logit_bias": {"²": 1}}, "logit_bias"),
        ({"prompt": "w1", "logit_bias": {"1" * 11: 1}}, "logit_bias"),
        ({"prompt": "w1", "logit_bias": {"999": 1}}, "logit_bias"),
        ({"prompt": "w1", "max_tokens": "10"}, "max_tokens"),  # strict types, as OpenAI's
        ({"prompt": "w1", "max_tokens": True}, "max_tokens"),
        ({"prompt": "w1", "stream": "yes"}, "stream"),
    ],
)
def test_bad_requests_are_openai_shaped(served, body: dict, param: str) -> None:
    client, _, _ = served
    r = client.post("/v1/completions", json=body)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"]


def test_logit_bias_moves_the_choice(served) -> None:
    """The counting model's next token has logit 10; +20 on w3 beats it at every step."""
    client, _, _ = served
    body = {"prompt": "w1", "max_tokens": 2, "temperature": 0, "logit_bias": {"7": 20}}
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == " w3 w3"
    body["logit_bias"] = {"7": 6, "07": 6}  # one token named twice: +12 beats the model's 10
    assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == " w3 w3"
    body["logit_bias"] = {"6": -100}  # w2, the model's choice, ruled out: the first 0-logit wins
    r = client.post("/v1/completions", json=body | {"return_token_ids": True})
    assert r.json()["choices"][0]["token_ids"][0] == 0


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"tools": [WEATHER_TOOL]}, "tools", "toolCallParser: deepseek_v3"),  # the parser is off
        ({"tool_choice": "auto"}, "tool_choice", "needs tools"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "required"}, "tools", "toolCallParser"),
    ],
)
def test_chat_features_that_would_be_ignored_are_refused(
    served, extra: dict, param: str | None, says: str
) -> None:
    client, _, _ = served
    body = {"messages": [{"role": "user", "content": "w1"}], "max_tokens": 1} | extra
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and says in r.json()["error"]["message"]


def schema_format(schema: object, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


@pytest.mark.parametrize(
    ("response_format", "says"),
    [
        ({"type": "regex"}, "'text', 'json_object' or 'json_schema'"),
        ({"type": "json_schema"}, 'needs json_schema: {"name": ..., "schema": ...}'),
        ({"type": "json_schema", "json_schema": {"name": "a"}}, "schema: Field required"),
        (schema_format({"type": "object"}, name="has space"), "json_schema.name"),
        (schema_format([1, 2]), "valid dictionary"),
        (schema_format({"type": "nope"}), 'cannot be compiled: Unsupported type "nope"'),
        (schema_format({"type": "string", "pattern": "[a-"}), "Unclosed '['"),
        (schema_format({"type": "integer", "minimum": 3, "maximum": 1}), "Invalid range"),
        (schema_format({"enum": ["x" * 1000] * 70}), "more than the 65536 this server compiles"),
    ],
)
def test_bad_response_formats_are_400s_naming_it_on_both_endpoints(
    served, response_format: dict, says: str
) -> None:
    client, state, _ = served
    state.config = state.config.model_copy(update={"maxRequestBytes": 1 << 20})
    chat = {"messages": [{"role": "user", "content": "w1"}], "max_tokens": 1}
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", {"prompt": "w1"})):
        r = client.post(path, json=body | {"response_format": response_format})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "response_format" and says in err["message"], err


def test_a_grammar_that_compiles_too_long_is_a_400(served, monkeypatch: pytest.MonkeyPatch) -> None:
    client, state, _ = served
    monkeypatch.setattr(state.grammars, "timeout_s", 0.0)  # done only if it were instant
    body = {"prompt": "w1", "response_format": schema_format({"enum": ["never compiled"]})}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    assert "took more than 0 s to compile; simplify it" in r.json()["error"]["message"]


def test_busy_grammar_threads_refuse_new_schemas_but_serve_cached_ones(served) -> None:
    """Slow schemas compiling on every grammar thread (held here) must not stall guided
    requests whose grammar is already compiled, nor queue new ones behind them."""
    client, state, _ = served
    cached = {"prompt": "w1", "max_tokens": 3, "response_format": {"type": "json_object"}}
    assert client.post("/v1/completions", json=cached).status_code == 200  # compiled now
    held = 0
    while state.grammars.slots.acquire(blocking=False):
        held += 1
    try:
        new = {"prompt": "w1", "response_format": schema_format({"type": "integer"})}
        r = client.post("/v1/completions", json=new)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy", r.text
        assert r.json()["error"]["param"] == "response_format"
        assert client.post("/v1/completions", json=cached).status_code == 200
    finally:
        for _ in range(held):
            state.grammars.slots.release()
    assert held == 2
    r = client.post("/v1/completions", json=new)  # compiled now (this vocabulary has no digits)
    assert r.status_code == 400 and "admits no output" in r.text, r.text


def test_tool_choice_naming_an_unoffered_function_or_with_a_json_format_is_refused(
    tmp_path: Path, served
) -> None:
    client, state, _ = served
    state.config = state.config.model_copy(update={"toolCallParser": "deepseek_v3"})
    body = {"messages": [{"role": "user", "content": "w1"}], "max_tokens": 1,
            "tools": [WEATHER_TOOL]}  # fmt: skip
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.post("/v1/chat/completions", json=body | {"tool_choice": named})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
    assert "'get_time', which is not among the tools ('get_weather')" in r.text
    both = {"tool_choice": "required", "response_format": {"type": "json_object"}}
    r = client.post("/v1/chat/completions", json=body | both)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    bad = {"type": "function", "function": {"name": "get_weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "nope"}}}}}  # fmt: skip
    r = client.post("/v1/chat/completions", json=body | {"tools": [bad], "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
    assert 'Unsupported type "nope"' in r.json()["error"]["message"]


def test_nulls_are_defaults_and_vllm_values_are_taken(served) -> None:
    """SDKs send null for "not set"; vLLM clients send top_k -1 for "off" and any int64 seed."""
    client, _, _ = served
    body = {"prompt": "w1", "max_tokens": 2, "temperature": 0, "top_p": None, "n": None,
            "stream": None, "echo": None, "presence_penalty": None, "logit_bias": {},
            "top_k": -1, "seed": -5}  # fmt: skip
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == " w2 w3"
    chat = {"messages": [{"role": "user", "content": "w1"}], "max_tokens": 1, "logprobs": None,
            "tools": None, "tool_choice": "none", "response_format": {"type": "text"}}  # fmt: skip
    assert client.post("/v1/chat/completions", json=chat).status_code == 200


def test_a_handler_bug_is_an_openai_shaped_counted_500(served) -> None:
    """What no validation foresaw (here a tokenizer that breaks) still answers in OpenAI's shape."""
    client, state, _ = served

    def broken(text: str, add_bos: bool = True) -> list[int]:
        raise RuntimeError("tokenizer blew up")

    state.tokenizer.encode = broken
    r = client.post("/v1/completions", json={"prompt": "w1", "max_tokens": 1})
    assert r.status_code == 500
    assert r.json()["error"] == {
        "message": "internal server error", "type": "server_error", "param": None, "code": None
    }  # fmt: skip
    assert 'dsworker_requests_total{endpoint="/v1/completions",status="500"} 1.0' in (
        client.get("/metrics").text
    )


def test_malformed_json_and_oversized_bodies(served) -> None:
    client, state, _ = served
    r = client.post(
        "/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # Valid JSON that is no request text: a lone surrogate (the tokenizer could not take it).
    r = client.post("/v1/completions", content=b'{"prompt": "w1 \\ud800"}')
    assert r.status_code == 400 and "not valid JSON text" in r.json()["error"]["message"]
    # Nesting past the parser's depth, an int past 4300 digits: bodies larger than this fixture's.
    deep = sys.getrecursionlimit() + 100
    for raw in (b'{"x": ' + b"[" * deep + b"]" * deep + b"}", b'{"n": ' + b"1" * 5000 + b"}"):
        with pytest.raises(oa.ApiError, match="not valid JSON text"):
            oa.parse_request(oa.CompletionRequest, raw)
    r = client.post("/v1/completions", content=b"x" * 5000)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = client.get("/nowhere")
    assert r.status_code == 404 and "error" in r.json()


def test_long_prompts_refused_or_truncated(served) -> None:
    client, state, _ = served
    long_prompt = list(range(4, 30))  # 26 tokens > maxInputTokenLen 20
    r = client.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 1})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    state.config = state.config.model_copy(update={"truncation": True})
    r = client.post(
        "/v1/completions", json={"prompt": long_prompt, "max_tokens": 1, "temperature": 0}
    )
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 20


def test_metrics_count_requests_and_tokens(served) -> None:
    client, _, _ = served
    client.post("/v1/completions", json={"prompt": "w1", "max_tokens": 2, "temperature": 0})
    client.post("/v1/completions", json={"prompt": "w1", "n": 17})
    text = client.get("/metrics").text
    assert 'dsworker_requests_total{endpoint="/v1/completions",status="200"} 1.0' in text
    assert 'dsworker_requests_total{endpoint="/v1/completions",status="400"} 1.0' in text
    assert "dsworker_generation_tokens_total 2.0" in text
    assert "dsworker_prompt_tokens_total 2.0" in text
    assert "dsworker_time_to_first_token_seconds_count 1.0" in text
    assert "dsworker_inter_token_latency_seconds_count 1.0" in text
    assert "dsworker_request_queue_seconds_count 1.0" in text
    assert "dsworker_kv_cache_usage_ratio 0.0" in text  # both ended: nothing held
    for name in ("dsworker_running_batch_size", "dsworker_load_gigabytes_per_second",
                 "dsworker_dropped_routed_rows_total"):  # fmt: skip
        assert name in text


def test_concurrent_requests_batch_together(served) -> None:
    _, state, runner = served
    import threading

    results: dict[int, list[int]] = {}
    done = threading.Event()
    pending = {0, 1}

    def sink_for(i: int):
        def sink(out) -> None:
            results.setdefault(i, []).extend(out.token_ids)
            if out.finish_reason:
                pending.discard(i)
                if not pending:
                    done.set()

        return sink

    greedy = SamplingParams(temperature=0.0)
    for i, start in enumerate((20, 30)):
        state.engine.submit(GenRequest([start], greedy, 5), sink_for(i))
    assert done.wait(10)
    assert results == {0: [21, 22, 23, 24, 25], 1: [31, 32, 33, 34, 35]}
    assert max(len(s.items) for s in runner.steps) == 2


def test_refused_step_fails_its_requests_and_serving_goes_on(served) -> None:
    client, state, runner = served
    runner.fail = StepError("AllToAll buffer too small")
    r = client.post("/v1/completions", json={"prompt": "w1", "max_tokens": 2})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "buffer too small" in r.json()["error"]["message"]
    runner.fail = None
    r = client.post("/v1/completions", json={"prompt": "w1", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200
    assert "dsworker_rejected_steps_total 1.0" in client.get("/metrics").text
    assert state.fatal == []


def test_engine_failure_is_fatal_and_answers_500(served) -> None:
    client, state, runner = served
    runner.fail = RuntimeError("device lost")
    with client.stream(
        "POST", "/v1/completions", json={"prompt": "w1", "max_tokens": 2, "stream": True}
    ) as r:
        body = "".join(r.iter_lines())
    assert "device lost" in body and "server_error" in body and body.endswith("data: [DONE]")
    # the loop tells the sinks first, then calls on_fatal
    wait_until(lambda: state.fatal, 10, "the engine loop's on_fatal call")
    assert len(state.fatal) == 1
    r = client.post("/v1/completions", json={"prompt": "w1"})
    assert r.status_code == 500 and "engine failed" in r.json()["error"]["message"]


def contents_only(state: ServerState, tmp_path: Path, prefix: str, **config: str) -> None:
    """Serve with a chat template that renders only the messages' contents (after `prefix`),
    so the counting model continues from the last word; and these engine config keys."""
    bare = tmp_path / "bare"
    bare.mkdir()
    template = prefix + "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    state.tokenizer = TextTokenizer(write_model_dir(bare, chat_template=template))
    state.config = state.config.model_copy(update=config)


def test_r1_reasoning_apart_from_the_answer(tmp_path: Path, served) -> None:
    """reasoningParser deepseek_r1: chat text up to </think> is reasoning_content, streamed or
    not; the counting model says w58 w59 </think> a1 a2 after w57."""
    client, state, _ = served
    contents_only(state, tmp_path, "", reasoningParser="deepseek_r1")
    body = {"messages": [{"role": "user", "content": "w57"}], "max_tokens": 5, "temperature": 0}
    r = client.post("/v1/completions", json={"prompt": "w57", "max_tokens": 5, "temperature": 0})
    assert r.json()["choices"][0]["text"] == " w58 w59 </think> a1 a2"  # completions: untouched
    message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert message == {
        "role": "assistant", "reasoning_content": " w58 w59 ", "content": " a1 a2"
    }  # fmt: skip
    with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as stream:
        deltas = [
            json.loads(ln[6:])["choices"][0]["delta"]
            for ln in stream.iter_lines()
            if ln.startswith("data: {")
        ]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    assert "".join(d.get("content", "") for d in deltas) == message["content"]
    assert not any(
        "think>" in d.get("content", "") + d.get("reasoning_content", "") for d in deltas
    )
    thinking = client.post("/v1/chat/completions", json=body | {"max_tokens": 2}).json()
    assert thinking["choices"][0]["message"]["content"] == ""  # still thinking at the limit


def test_tool_calls_come_back_as_openai_tool_calls(tmp_path: Path, served) -> None:
    """toolCallParser deepseek_v3: the counting model's call markup after "go" is a tool call,
    streamed or not, with finish_reason tool_calls; tool_choice "none" leaves the text alone."""
    client, state, _ = served
    # reads `tools` (so they are not added to the prompt) but renders only the contents
    contents_only(state, tmp_path, "{% if tools %}{% endif %}", toolCallParser="deepseek_v3")
    body = {"messages": [{"role": "user", "content": "go"}], "tools": [WEATHER_TOOL],
            "max_tokens": 20, "temperature": 0}  # fmt: skip
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert choice["message"]["content"] is None

    with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as stream:
        chunks = [json.loads(ln[6:]) for ln in stream.iter_lines() if ln.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    [streamed] = [t for d in deltas for t in d.get("tool_calls", [])]
    assert streamed["index"] == 0 and streamed["function"] == call["function"]
    assert "".join(d.get("content", "") for d in deltas).strip() == ""  # no markup leaks
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "tool_calls"

    plain = client.post("/v1/chat/completions", json=body | {"tool_choice": "none"}).json()
    message = plain["choices"][0]["message"]
    assert "tool_calls" not in message and CALLS_BEGIN in message["content"]
    assert plain["choices"][0]["finish_reason"] == "stop"


def test_chat_top_logprobs_need_logprobs(served) -> None:
    client, _, _ = served
    body = {"messages": [{"role": "user", "content": "w3"}], "top_logprobs": 2}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and "top_logprobs needs logprobs: true" in r.text


def test_n_choices_each_a_sequence(served) -> None:
    client, _, runner = served
    r = client.post(
        "/v1/completions", json={"prompt": "w1", "max_tokens": 2, "temperature": 0, "n": 3}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert {c["text"] for c in body["choices"]} == {" w2 w3"}
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}
    # Three sequences: two batched (maxBatchSize 2), the third in the next free slot.
    assert max(len(step.items) for step in runner.steps) == 2

    req = {"messages": [{"role": "user", "content": "w3"}], "max_tokens": 2, "temperature": 0,
           "n": 2, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with client.stream("POST", "/v1/chat/completions", json=req) as stream:
        lines = [ln for ln in stream.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    for c in chunks[:-1]:
        [ch] = c["choices"]
        texts[ch["index"]] = texts.get(ch["index"], "") + ch["delta"].get("content", "")
        if ch["finish_reason"]:
            finished[ch["index"]] = ch["finish_reason"]
    assert {i: t.split() for i, t in texts.items()} == {0: ["w0", "w1"], 1: ["w0", "w1"]}
    assert finished == {0: "length", 1: "length"}
    assert chunks[-1]["usage"]["completion_tokens"] == 4


def test_a_batch_of_prompts_gets_n_choices_each_in_order(served) -> None:
    client, _, _ = served
    body = {"prompt": ["w1", "w5"], "max_tokens": 1, "temperature": 0, "n": 2}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert [(c["index"], c["text"]) for c in got["choices"]] == [
        (0, " w2"), (1, " w2"), (2, " w6"), (3, " w6"),
    ]  # fmt: skip
    # Each prompt is BOS and one word, counted once however many choices it has.
    assert got["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
    r = client.post("/v1/completions", json={"prompt": [[5, 6], [7]], "max_tokens": 1})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3
    r = client.post("/v1/completions", json={"prompt": ["w1"] * 9, "n": 2})
    assert r.status_code == 400 and "more than 16 choices" in r.json()["error"]["message"]


FATAL_SERVER = """
import sys, tempfile
from pathlib import Path
import uvicorn
from counting_model import CountingRunner
from tiny_vocab import WORDS, write_model_dir
from dsworker.engine.control import LocalChannel
from dsworker.contract.engine_config import EngineConfig
from dsworker.engine.loop import EngineLoop
from dsworker.engine.metrics import Metrics
from dsworker.engine.scheduler import Scheduler
from dsworker.serving.app import create_app
from dsworker.serving.state import ServerState
from dsworker.chat.tokenizer import TextTokenizer

cfg = EngineConfig(modelName="tiny", maxSeqLen=40, maxInputTokenLen=20, maxBatchSize=2)
tok = TextTokenizer(write_model_dir(Path(tempfile.mkdtemp())))
state = ServerState(config=cfg, metrics=Metrics())
runner = CountingRunner(len(WORDS))
runner.fail = RuntimeError("device lost")
loop = EngineLoop(runner, Scheduler(2, 40, 64), tok.decode, LocalChannel(), state.metrics)
loop.start()
state.tokenizer, state.engine, state.ready = tok, loop, True
uvicorn.run(create_app(state), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def test_a_fatal_step_answers_500_before_the_process_exits_70(tmp_path: Path) -> None:
    """The default fatal handler (os._exit) must not cut the in-flight response off."""
    import socket
    import subprocess
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    proc = subprocess.Popen([sys.executable, "-c", FATAL_SERVER, str(port)], env=env)
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert proc.poll() is None, f"the server exited {proc.returncode} before serving"
            return urllib.request.urlopen(f"{url}/health", timeout=5).status == 200

        wait_until(healthy, 120, f"{url}/health to answer 200", retry_on=(OSError,))
        req = urllib.request.Request(
            f"{url}/v1/completions",
            data=json.dumps({"prompt": "w1", "max_tokens": 2}).encode(),
            headers={"content-type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 500
        assert json.loads(err.value.read())["error"]["message"] == "engine failed: device lost"
        assert proc.wait(60) == 70
    finally:
        proc.kill()


def test_a_client_leaving_a_non_streamed_request_frees_its_sequence(tmp_path: Path) -> None:
    """Through a real uvicorn: closing the socket mid-request aborts the sequence at once."""
    import socket

    runner = SlowRunner(len(WORDS))
    with counting_state(tmp_path, runner) as state, live_server(state) as (_, port):
        body = json.dumps({"prompt": "w1", "max_tokens": 30, "ignore_eos": True}).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            head = "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            sock.sendall(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.2)  # a few steps in

        def aborted() -> float | None:
            return state.metrics.registry.get_sample_value(
                "dsworker_finished_sequences_total", {"reason": "abort"}
            )

        wait_until(aborted, 10, "the gone client's sequence to be aborted")
        assert aborted() == 1
        assert state.engine.scheduler.num_running == 0
        assert len(runner.steps) < 25  # not run to max_tokens
