"""The serving room's pieces on their own, without torch: body reading, engine requests from a
validated request, completion chunks, throttled logs, and the room importing no torch."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from starlette.requests import Request
from tiny_vocab import EOS_ID, WORDS, write_model_dir

from dsworker.chat.tokenizer import TextTokenizer
from dsworker.contract.engine_config import EngineConfig
from dsworker.engine.requests import GenRequest, Output, SamplingParams, TokenLogprob
from dsworker.serving.body import READ_TIMED_OUT, read_body
from dsworker.serving.http_server import Throttled
from dsworker.serving.prompts import gen_requests
from dsworker.serving.protocol import ApiError, CompletionRequest, Reply, parse_request
from dsworker.serving.routers.completions import Choices, Chunks
from dsworker.serving.state import ServerState


def request(chunks: list[bytes], declared: int | None = None, gone: bool = False) -> Request:
    """A Starlette request whose client sends `chunks` (then leaves, with `gone`)."""
    headers = [] if declared is None else [(b"content-length", str(declared).encode())]
    messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    messages.append({"type": "http.disconnect"} if gone else {"type": "http.request", "body": b""})

    async def receive() -> dict:
        return messages.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers,
             "query_string": b"", "client": ("10.0.0.1", 5)}  # fmt: skip
    return Request(scope, receive)


@pytest.mark.anyio
async def test_read_body_bounds_and_departures() -> None:
    assert await read_body(request([b"ab", b"cd"]), 4) == b"abcd"
    for req in (request([], declared=5), request([b"abc", b"de"])):  # declared, or as it comes
        with pytest.raises(ApiError) as err:
            await read_body(req, 4)
        assert err.value.status == 413 and err.value.code == "request_too_large"
    with pytest.raises(ApiError) as err:
        await read_body(request([b"ab"], gone=True), 4)
    assert (err.value.status, err.value.code) == (499, "client_closed")
    cut = request([b"ab"], gone=True)
    cut.scope[READ_TIMED_OUT] = True  # the server cut the connection (http_server)
    with pytest.raises(ApiError) as err:
        await read_body(cut, 4)
    assert (err.value.status, err.value.code) == (408, "request_timeout")


@pytest.fixture()
def state(tmp_path: Path) -> ServerState:
    cfg = EngineConfig(maxSeqLen=40, maxInputTokenLen=20, maxNewTokens=30)
    return ServerState(config=cfg, tokenizer=TextTokenizer(write_model_dir(tmp_path)))


def completion(**body: object) -> CompletionRequest:
    return parse_request(CompletionRequest, json.dumps({"prompt": "w1"} | body).encode())


def test_gen_requests_one_per_choice_seeded_apart_within_the_limits(state: ServerState) -> None:
    gens = gen_requests(state, completion(n=3, seed=7, max_tokens=100 - 90), [5, 6], 16)
    assert [g.params.seed for g in gens] == [7, 8, 9]
    assert {g.max_tokens for g in gens} == {10}
    assert all(EOS_ID in g.stop_token_ids for g in gens)
    [unseeded] = gen_requests(state, completion(ignore_eos=True, stop_token_ids=[9]), [5], 16)
    assert unseeded.stop_token_ids == frozenset({9}) and unseeded.max_tokens == 16
    [long] = gen_requests(state, completion(), list(range(4, 19)), 30)  # 15 of 40 positions
    assert long.max_tokens == 25  # clipped to the room under maxSeqLen
    with pytest.raises(ApiError, match="outside the vocabulary") as err:
        gen_requests(state, completion(logit_bias={str(len(WORDS)): 1}), [5], 16)
    assert err.value.param == "logit_bias"


def test_streamed_completion_chunks_echo_once_and_count_offsets_on(state: ServerState) -> None:
    gen = GenRequest([0, 5], SamplingParams(), 4, logprobs=0)
    choices = Choices([gen], ["w1"], echo=True)
    text_of = {5: "w1", 6: "w2", 7: "w3", 0: "<s>"}.__getitem__
    chunks = Chunks(Reply.new("cmpl", "text_completion", "m"), choices, text_of, True, True)
    lp = TokenLogprob
    [first] = chunks(0, Output(" w2", [6], logprobs=(lp(6, -0.5),), prompt_logprobs=(lp(5, -1),)))
    [second] = chunks(0, Output(" w3", [7], "length", logprobs=(lp(7, -0.25),)))
    [c1], [c2] = first["choices"], second["choices"]
    assert (c1["text"], c2["text"]) == ("w1 w2", " w3")
    assert c1["logprobs"]["tokens"] == ["<s>", "w1", "w2"]
    assert c1["logprobs"]["text_offset"] == [0, 3, 5]
    assert c2["logprobs"]["text_offset"] == [7] and c2["finish_reason"] == "length"
    assert c2["token_ids"] == [7]


def test_throttled_logs_fold_a_flood_into_one_line(caplog: pytest.LogCaptureFixture) -> None:
    throttled = Throttled(logging.WARNING, every_s=3600)
    with caplog.at_level(logging.INFO):
        for _ in range(1000):
            throttled.log("refused a connection")
        throttled._last -= 3600  # an hour on
        throttled.log("refused a connection")
    assert [r.getMessage() for r in caplog.records] == [
        "refused a connection",
        "refused a connection (999 more like it since the last report)",
    ]


def test_the_serving_room_imports_no_torch() -> None:
    code = (
        "import sys; from dsworker.contract.engine_config import EngineConfig; "
        "from dsworker.serving.app import create_app; from dsworker.serving.state import "
        "ServerState; import dsworker.serving.http_server; "
        "create_app(ServerState(config=EngineConfig())); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
