"""Guided decoding with the real xgrammar over a synthesized checkpoint's byte-level tokenizer:
the vocabulary it sees, masks on logits wider than the vocabulary, walks that end in valid JSON
or in a call the tool-call parser reads, the cache, and the sampler under a mask."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch
import xgrammar as xgr

from dsworker.chat import grammar_spec as gs
from dsworker.chat.byte_level import BOS_ID, EOS_ID, SPECIALS, write_tokenizer
from dsworker.chat.grammars import Grammars, grammars_for
from dsworker.chat.reasoning import split_reasoning
from dsworker.chat.tokenizer import TextTokenizer
from dsworker.chat.tool_calls import split_tool_calls
from dsworker.engine.grammar_masks import Matcher, unpack
from dsworker.engine.requests import SamplingParams
from dsworker.engine.sampling import token_logprobs, verify

VOCAB = 300  # the tokenizer's 261 ids and 39 ids of lm_head padding
SCHEMA = json.loads((Path(__file__).parents[2] / "data/pick_schema.json").read_text())
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
    "required": ["city"]}}}  # fmt: skip


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    d = tmp_path_factory.mktemp("bytes")
    write_tokenizer(d, VOCAB)
    (d / "config.json").write_text(json.dumps({"vocab_size": VOCAB, "eos_token_id": EOS_ID}))
    return TextTokenizer(d)


@pytest.fixture(scope="module")
def grammars(tok: TextTokenizer) -> Grammars:
    return grammars_for(tok)


def allowed(m: Matcher, width: int = VOCAB) -> list[int]:
    m.fill()
    return torch.isfinite(m.mask(torch.zeros(1, width))[0]).nonzero().flatten().tolist()


def test_the_vocabulary_is_token_bytes_with_specials_and_padding_never_allowed(
    tok: TextTokenizer, grammars: Grammars
) -> None:
    assert grammars_for(tok) is grammars  # once per tokenizer
    info = grammars.info
    assert info.vocab_size == VOCAB and info.stop_token_ids == [EOS_ID]
    never = set(range(len(SPECIALS))) - {EOS_ID} | set(range(len(SPECIALS) + 256, VOCAB))
    assert set(info.special_token_ids) == never
    assert info.decoded_vocab[len(SPECIALS) + ord("{")] == b"{"
    m = Matcher(grammars.compile(gs.json_object()))
    brace = tok.encode("{", add_bos=False)
    assert allowed(m, VOCAB + 20) == brace  # columns past the vocabulary are masked too
    assert BOS_ID not in allowed(m)


def test_unpacking_reads_the_bitmask_as_xgrammars_own_kernel_does() -> None:
    g = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (1, 10), dtype=torch.int32, generator=g)
    logits = torch.randn(1, 310, generator=g)
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(want, bitmask, vocab_size=310)
    assert torch.equal(torch.isfinite(want[0]), unpack(bitmask, 310))


def walk(
    grammars: Grammars,
    spec: gs.GrammarSpec,
    seed: int,
    limit: int = 400,
    prefix: tuple[int, ...] = (),
) -> list[int]:
    """Sample tokens from random logits under the grammar until it terminates (after taking
    `prefix`, which the grammar must accept)."""
    m = Matcher(grammars.compile(spec))
    assert all(m.accept(t) for t in prefix)
    g = torch.Generator().manual_seed(seed)
    out: list[int] = list(prefix)
    while not m.terminated:
        assert len(out) < limit, "the grammar did not end"
        m.fill()
        logits = m.mask(torch.randn(1, VOCAB, generator=g) * 3)
        token = int(torch.multinomial(torch.softmax(logits[0], -1), 1, generator=g))
        assert m.accept(token)
        out.append(token)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_random_walks_under_a_schema_give_valid_compact_json(
    tok: TextTokenizer, grammars: Grammars, seed: int
) -> None:
    tokens = walk(grammars, gs.json_schema(SCHEMA), seed)
    assert tokens[-1] == EOS_ID and EOS_ID not in tokens[:-1]  # EOS only once complete
    text = tok.decode(tokens)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert text == json.dumps(json.loads(text))  # no whitespace but the separators'


@pytest.mark.parametrize("seed", range(4))
def test_forced_tool_calls_are_read_back_as_calls(
    tok: TextTokenizer, grammars: Grammars, seed: int
) -> None:
    clock = {"type": "function", "function": {"name": "get_time"}}
    spec = gs.forced_tool_calls([WEATHER, clock], None, parallel=seed % 2 == 0)
    text = tok.decode(walk(grammars, spec, seed, limit=2000))
    content, calls = split_tool_calls(text)
    assert content == "" and calls, text
    assert seed % 2 == 0 or len(calls) == 1
    for call in calls:
        args = json.loads(call.arguments)
        if call.name == "get_weather":
            jsonschema.validate(args, WEATHER["function"]["parameters"])
        else:
            assert call.name == "get_time" and isinstance(args, dict)


def test_with_r1_reasoning_the_json_is_the_answer_after_the_thinking(
    tok: TextTokenizer, grammars: Grammars
) -> None:
    """R1 writes its thinking first: the schema binds the text after </think>, not all of it."""
    spec = gs.json_schema(SCHEMA, reasoning=True)
    answer = '{"color": "red", "count": 7}'
    for text, ok in (
        (f"Red, I think.</think>\n\n{answer}", True),
        (f"</think>{answer}", True),
        (answer, False),  # JSON first is still the thinking: no end yet
        ('Hmm.</think>{"color": "pink", "count": 7}', False),
    ):
        m = Matcher(grammars.compile(spec))
        accepted = all(m.accept(t) for t in tok.encode(text, add_bos=False))
        complete = accepted and EOS_ID in allowed(m) and m.accept(EOS_ID) and m.terminated
        assert complete == ok, text
    # random thinking would seldom write </think>: the walk starts after it
    thinking = tuple(tok.encode("Fine.</think>", add_bos=False))
    text = tok.decode(walk(grammars, spec, 1, prefix=thinking))
    thought, said = split_reasoning(text)
    jsonschema.validate(json.loads(said), SCHEMA)
    assert "</think>" not in thought


def test_a_complete_text_is_accepted_and_a_wrong_name_is_not(
    tok: TextTokenizer, grammars: Grammars
) -> None:
    spec = gs.forced_tool_calls([WEATHER], "get_weather", reasoning=True)
    call = ('Paris it is.</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function'
            '<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜>'
            '<｜tool▁calls▁end｜>')  # fmt: skip
    for text, ok in ((call, True), (call.replace("get_weather", "get_time"), False)):
        m = Matcher(grammars.compile(spec))
        accepted = all(m.accept(t) for t in tok.encode(text, add_bos=False))
        assert accepted == ok
        if ok:
            assert allowed(m) == [EOS_ID] and m.accept(EOS_ID) and m.terminated


def test_compiled_grammars_are_cached_least_recently_used_first_out(tok: TextTokenizer) -> None:
    small = Grammars(tok, cache_size=2)
    specs = [gs.json_schema({"enum": [i]}) for i in range(3)]
    first = small.compile(specs[0])
    small.compile(specs[1])
    assert small.compile(specs[0]) is first  # a hit, and now the most recent
    small.compile(specs[2])  # evicts specs[1]
    assert len(small) == 2 and small.compile(specs[0]) is first
    assert small.compile(specs[1]) is not None and len(small) == 2


def test_refused_schemas_name_their_field(grammars: Grammars) -> None:
    with pytest.raises(gs.GrammarError) as err:
        grammars.compile(gs.json_schema({"type": "object", "properties": {"a": {"$ref": "#/x"}}}))
    assert err.value.param == "response_format"
    assert err.value.message.startswith("response_format: cannot be compiled: ")
    assert "json_schema_converter.cc" not in err.value.message


def test_a_schema_that_admits_no_output_is_refused(grammars: Grammars) -> None:
    with pytest.raises(gs.GrammarError, match="admits no output at all") as err:
        grammars.compile(gs.json_schema({"$ref": "#"}))
    assert err.value.param == "response_format"


def test_the_mask_wins_over_logit_bias_and_min_tokens_yields_to_it(
    tok: TextTokenizer, grammars: Grammars
) -> None:
    m = Matcher(grammars.compile(gs.json_object()))
    for t in tok.encode("{}", add_bos=False):
        assert m.accept(t)
    m.fill()
    x = tok.encode("x", add_bos=False)[0]
    logits = torch.randn(1, VOCAB)
    biased = SamplingParams(temperature=0.0, logit_bias=((x, 100.0),))
    assert verify(logits, [()], [biased], [None], [[]], [m.mask]) == [[EOS_ID]]
    # min_tokens rules out EOS, the only token the complete grammar allows: the grammar wins
    early = SamplingParams(temperature=0.7, min_tokens=5, stops=frozenset({EOS_ID}))
    gen = torch.Generator().manual_seed(0)
    assert verify(logits, [()], [early], [gen], [[1, 2]], [m.mask]) == [[EOS_ID]]
    # logprobs of a guided token come from the masked distribution: EOS is certain
    [lp] = token_logprobs(m.mask(logits), [EOS_ID], 2)
    assert lp.logprob == 0.0 and lp.top[0] == (EOS_ID, 0.0)


def test_a_grammar_the_vocabulary_cannot_continue_samples_unmasked(grammars: Grammars) -> None:
    """Nothing allowed (a tokenizer that cannot spell the grammar): the sampler must not fail;
    the engine then ends the sequence on the token the grammar refuses."""

    def nothing(rows: torch.Tensor) -> torch.Tensor:
        return torch.full_like(rows.float(), float("-inf"))

    logits = torch.randn(2, VOCAB)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=3)]
    gens = [None, torch.Generator().manual_seed(3)]
    out = verify(logits, [(), ()], params, gens, None, [nothing, nothing])
    assert out[0] == [int(logits[0].argmax())] and 0 <= out[1][0] < VOCAB


def test_verify_without_masks_is_unchanged() -> None:
    logits = torch.randn(3, VOCAB)
    params = [SamplingParams(temperature=0.0)] * 3
    assert verify(logits, [(), (), ()], params, [None] * 3, None, [None] * 3) == [
        [int(t)] for t in logits.argmax(-1)
    ]


def test_a_fresh_tokenizer_dir_gets_its_own_grammars(tmp_path: Path, grammars: Grammars) -> None:
    write_tokenizer(tmp_path, VOCAB)
    assert grammars_for(TextTokenizer(tmp_path)) is not grammars
