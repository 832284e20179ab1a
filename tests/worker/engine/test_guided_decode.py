"""Guided decoding in the real engine loop on CPU: a random tiny DeepSeek-V3 (one token per byte)
constrained by a JSON schema writes schema-valid JSON, greedy and seeded; json_object ends in a
parseable object; the mask beats logit_bias; the grammar's end stops a sequence even with
ignore_eos; guided sequences take no MTP drafts (others still do); a preempted guided sequence
is recomputed and goes on with the same tokens; its logprobs come from the masked logits."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from engine_helpers import PROMPTS
from serving_helpers import MAX_LEN, counter, engine_config, serve

from dsworker.chat import grammar_spec as gs
from dsworker.chat.grammars import grammars_for
from dsworker.chat.tokenizer import TextTokenizer
from dsworker.contract import kv_budget
from dsworker.contract.engine_config import EngineConfig
from dsworker.contract.kv_budget import kv_bytes
from dsworker.engine.metrics import Metrics
from dsworker.engine.rank_setup import build_runner
from dsworker.engine.requests import GenRequest, Output, SamplingParams
from dsworker.model import ModelArgs

SCHEMA = json.loads((Path(__file__).parents[2] / "data/pick_schema.json").read_text())
SCHEMA_SPEC = gs.json_schema(SCHEMA)
GREEDY = SamplingParams(temperature=0.0)
SEEDED = SamplingParams(temperature=1.0, top_p=0.95, seed=7)


@pytest.fixture(scope="module")
def tok(tiny_v3: Path) -> TextTokenizer:
    return TextTokenizer(tiny_v3)


def request(
    tok: TextTokenizer,
    prompt: list[int],
    params: SamplingParams,
    spec: gs.GrammarSpec | None = SCHEMA_SPEC,
    **kw: object,
) -> GenRequest:
    grammar = grammars_for(tok).compile(spec) if spec is not None else None
    fields = {"max_tokens": MAX_LEN - len(prompt) - 1, "stop_token_ids": tok.eos_token_ids} | kw
    return GenRequest(prompt, params, grammar=grammar, **fields)  # type: ignore[arg-type]


def run(
    ckpt: Path, cfg: EngineConfig, requests: list[GenRequest]
) -> tuple[list[list[Output]], Metrics]:
    loaded = build_runner(ckpt, cfg, rank=0, world_size=1, local_rank=0)
    outs, metrics, _ = serve(loaded, cfg, requests)
    return outs, metrics


def tokens(outs: list[Output]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def answer(tok: TextTokenizer, outs: list[Output]) -> str:
    """The text the server would return: the output before its EOS."""
    assert outs[-1].finish_reason == "stop", outs[-1]
    ids = tokens(outs)
    assert ids[-1] in tok.eos_token_ids and not set(ids[:-1]) & tok.eos_token_ids
    return tok.decode(ids[:-1])


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_random_model_under_a_schema_writes_valid_json(
    tiny_v3: Path, tok: TextTokenizer, params: SamplingParams
) -> None:
    requests = [request(tok, p, params) for p in PROMPTS]
    outs, _ = run(tiny_v3, engine_config(), requests)
    texts = [answer(tok, o) for o in outs]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
        assert text == json.dumps(json.loads(text))  # any_whitespace off: separators only
    again, _ = run(tiny_v3, engine_config(), requests)
    assert [tokens(o) for o in again] == [tokens(o) for o in outs]  # greedy and seeded repeat
    free, _ = run(tiny_v3, engine_config(), [request(tok, p, params, None) for p in PROMPTS])
    assert [tokens(o) for o in free] != [tokens(o) for o in outs]  # the grammar changed them


def test_json_object_and_a_bias_the_mask_overrules(tiny_v3: Path, tok: TextTokenizer) -> None:
    [close] = tok.encode("}", add_bos=False)
    [x] = tok.encode("x", add_bos=False)
    prompt = PROMPTS[0]
    requests = [
        request(tok, prompt, GREEDY, gs.json_object()),
        request(tok, prompt, SEEDED, gs.json_object()),
        # "}" whenever allowed, "x" never allowed: the shortest object
        request(
            tok,
            prompt,
            SamplingParams(temperature=0.0, logit_bias=((close, 50.0), (x, 100.0))),
            gs.json_object(),
        ),  # fmt: skip
    ]
    outs, _ = run(tiny_v3, engine_config(), requests)
    for o in outs:
        if o[-1].finish_reason == "stop":  # else cut off by max_tokens mid-object
            assert isinstance(json.loads(answer(tok, o)), dict)
    assert answer(tok, outs[2]) == "{}"


def test_the_grammars_end_stops_a_sequence_that_ignores_eos(
    tiny_v3: Path, tok: TextTokenizer
) -> None:
    greedy, _ = run(tiny_v3, engine_config(), [request(tok, PROMPTS[1], GREEDY)])
    ignoring, _ = run(
        tiny_v3, engine_config(), [request(tok, PROMPTS[1], GREEDY, stop_token_ids=frozenset())]
    )
    assert tokens(ignoring[0]) == tokens(greedy[0])
    assert ignoring[0][-1].finish_reason == "stop"
    assert "".join(o.text for o in ignoring[0]) == ""  # serve() decodes nothing; EOS is silent


def test_guided_sequences_take_no_mtp_drafts(tiny_v3: Path, tok: TextTokenizer) -> None:
    guided = [request(tok, p, GREEDY) for p in PROMPTS]
    plain, _ = run(tiny_v3, engine_config(), guided)
    outs, metrics = run(tiny_v3, engine_config(mtp=True), guided)
    assert [tokens(o) for o in outs] == [tokens(o) for o in plain]
    assert counter(metrics, "dsworker_spec_draft_tokens_total") == 0
    free = request(tok, PROMPTS[2], GREEDY, None, max_tokens=16)
    mixed, metrics = run(tiny_v3, engine_config(mtp=True), [guided[0], free])
    assert tokens(mixed[0]) == tokens(plain[0])
    assert counter(metrics, "dsworker_spec_draft_tokens_total") > 0  # the free one drafts


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_preempted_guided_sequence_goes_on_where_it_was(
    tiny_v3: Path, tok: TextTokenizer, monkeypatch: pytest.MonkeyPatch, params: SamplingParams
) -> None:
    """8 pages of 8 positions for three sequences of 38 to 44 tokens: the newest is preempted
    and recomputed without sampling, so its matcher accepts nothing twice; every output is the
    one it is with room to spare, and valid."""
    requests = [request(tok, p, params) for p in PROMPTS]
    roomy, _ = run(tiny_v3, engine_config(), requests)
    a = ModelArgs.from_dir(tiny_v3)
    page = kv_bytes(a.num_layers, 8, a.kv_lora_rank, a.qk_rope_dim, 4)
    monkeypatch.setattr(kv_budget, "GIB", page * (MAX_LEN // 8))
    tight, metrics = run(tiny_v3, engine_config(npuMemSize=1), requests)
    assert counter(metrics, "dsworker_preemptions_total") >= 1
    assert [tokens(o) for o in tight] == [tokens(o) for o in roomy]
    for o in tight:
        jsonschema.validate(json.loads(answer(tok, o)), SCHEMA)


def test_guided_logprobs_come_from_the_masked_logits(tiny_v3: Path, tok: TextTokenizer) -> None:
    outs, _ = run(tiny_v3, engine_config(), [request(tok, PROMPTS[0], GREEDY, logprobs=3)])
    entries = [e for o in outs[0] for e in o.logprobs]
    [brace] = tok.encode("{", add_bos=False)
    first = entries[0]
    assert first.token == brace and first.logprob == 0.0  # the only token allowed
    assert first.top[0] == (brace, 0.0) and all(lp == float("-inf") for _, lp in first.top[1:])
    assert entries[-1].token in tok.eos_token_ids and entries[-1].logprob == 0.0
