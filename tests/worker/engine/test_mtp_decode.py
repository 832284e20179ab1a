"""Speculative decoding with the MTP layer, through the serving loop on real weights (CPU, fp32).

Greedy output must be exactly transformers' (which ignores the MTP layer) whatever the drafts
were; an MTP layer built to agree with the main model must see every draft accepted and halve the
decode steps; 2-rank worlds (dp 2, and tp 2 with EP level 2) follow the draft messages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import NEW_TOKENS, PROMPTS, Reference, hf_penalized_greedy, hf_reference
from mtp_helpers import agreeing_mtp_copy, steps_when_all_drafts_hold
from serving_helpers import MAX_LEN, counter, engine_config, generate

from dsworker.contract.engine_config import EngineConfig
from dsworker.engine.control import DistChannel
from dsworker.engine.loop import follow
from dsworker.engine.metrics import Metrics
from dsworker.engine.rank_setup import build_runner
from dsworker.engine.requests import SamplingParams
from dsworker.model.decode_graphs import DecodeGraphs
from dsworker.parallel.groups import spawn_local


@torch.no_grad()
def assert_transformers_logprobs(
    model: Any, tokens: list[list[int]], lps: dict[int, list[float]]
) -> None:
    """A token's logprob comes from the row that verified it, drafted or not: transformers'."""
    for i, (prompt, toks) in enumerate(zip(PROMPTS, tokens, strict=True)):
        logits = model(torch.tensor([prompt + toks[:-1]])).logits[0, len(prompt) - 1 :]
        want = torch.log_softmax(logits.float(), -1)[torch.arange(len(toks)), toks]
        torch.testing.assert_close(torch.tensor(lps[i]), want, atol=1e-4, rtol=0)


def drafted_like_transformers(ckpt: Path, ref: Reference, drafts: int) -> tuple[Metrics, int]:
    """Greedy MTP decoding with `drafts` drafts a step; its tokens and each token's logprob are
    transformers'. Returns the metrics and the steps taken."""
    lps: dict[int, list[float]] = {}
    cfg = engine_config(mtp=True, num_speculative_tokens=drafts)
    tokens, metrics, steps = generate(ckpt, cfg, logprobs=lps)
    assert tokens == ref.tokens
    assert_transformers_logprobs(ref.model, tokens, lps)
    return metrics, steps


@pytest.fixture(scope="module")
def ref(tiny_v3: Path) -> Reference:
    return hf_reference(tiny_v3)


@pytest.mark.parametrize("drafts", [1, 3])
def test_greedy_tokens_equal_transformers_whatever_the_drafts(
    tiny_v3: Path, ref: Reference, drafts: int
) -> None:
    metrics, steps = drafted_like_transformers(tiny_v3, ref, drafts)
    drafted = counter(metrics, "dsworker_spec_draft_tokens_total")
    accepted = counter(metrics, "dsworker_spec_accepted_tokens_total")
    # Every decode step after the first token carries the drafts of each running sequence.
    assert drafted >= drafts * (NEW_TOKENS - 1) / (1 + drafts)
    assert accepted <= drafted
    assert counter(metrics, "dsworker_generation_tokens_total") == len(PROMPTS) * NEW_TOKENS
    plain, plain_metrics, plain_steps = generate(tiny_v3, engine_config(mtp=False))
    assert plain == ref.tokens
    assert counter(plain_metrics, "dsworker_spec_draft_tokens_total") == 0
    assert steps <= plain_steps


def test_penalties_with_drafts_equal_transformers(tiny_v3: Path, ref: Reference) -> None:
    """A draft's row is penalised for the draft too: greedy output stays transformers'."""
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=1.5)
    want = [hf_penalized_greedy(ref.model, p, NEW_TOKENS, 0.5, 1.5) for p in PROMPTS]
    for ckpt_cfg in (engine_config(mtp=True), engine_config(mtp=False)):
        tokens, _, _ = generate(tiny_v3, ckpt_cfg, params)
        assert tokens == want
    assert want != ref.tokens


def test_seeded_sampling_with_drafts_repeats(tiny_v3: Path) -> None:
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=7)
    first, metrics, _ = generate(tiny_v3, engine_config(mtp=True), params)
    again, _, _ = generate(tiny_v3, engine_config(mtp=True), params)
    assert first == again
    assert all(len(t) == NEW_TOKENS for t in first)
    assert counter(metrics, "dsworker_spec_draft_tokens_total") > 0


@pytest.mark.parametrize("drafts", [1, 3])
def test_an_agreeing_mtp_layer_has_every_draft_accepted(
    tiny_v3: Path, tmp_path: Path, drafts: int
) -> None:
    """Chained drafts too: the agreeing layer ignores its hidden input, so each draft holds."""
    ckpt = agreeing_mtp_copy(tiny_v3, tmp_path / "agreeing")
    metrics, steps = drafted_like_transformers(ckpt, hf_reference(ckpt), drafts)
    drafted = counter(metrics, "dsworker_spec_draft_tokens_total")
    assert drafted > 0
    assert counter(metrics, "dsworker_spec_accepted_tokens_total") == drafted
    _, _, plain_steps = generate(ckpt, engine_config(mtp=False))
    # Prefill plus one step per token without drafts; 1 + drafts tokens per step with them.
    assert plain_steps == NEW_TOKENS
    assert steps == steps_when_all_drafts_hold(drafts)


def _world_rank(rank: int, nproc: int, ckpt: str, cfg_json: str, out: str) -> None:
    cfg = EngineConfig.model_validate_json(cfg_json)
    if rank == 0:
        tokens, metrics, _ = generate(Path(ckpt), cfg, rank=0, world=nproc)
        record = {
            "tokens": tokens,
            "drafted": counter(metrics, "dsworker_spec_draft_tokens_total"),
        }
        Path(out).write_text(json.dumps(record))
        return
    loaded = build_runner(Path(ckpt), cfg, rank=rank, world_size=nproc, local_rank=rank)
    assert isinstance(loaded.channel, DistChannel)
    follow(loaded.runner, loaded.channel)


@pytest.mark.parametrize(
    "plan",
    [
        {"dp": 2, "tp": 1, "moe_tp": 1, "moe_ep": 2, "num_speculative_tokens": 2},
        {"dp": 1, "tp": 2, "moe_tp": 1, "moe_ep": 2, "ep_level": 2},
    ],
    ids=["dp2-ep2-2drafts", "tp2-ep2-level2"],
)
def test_two_rank_worlds_follow_the_draft_messages(
    tiny_v3: Path, ref: Reference, tmp_path: Path, plan: dict[str, int]
) -> None:
    cfg = engine_config(mtp=True, worldSize=2, **plan)
    out = tmp_path / "result.json"
    spawn_local(2, _world_rank, str(tiny_v3), cfg.model_dump_json(), str(out))
    record = json.loads(out.read_text())
    assert record["tokens"] == ref.tokens
    assert record["drafted"] >= (NEW_TOKENS - 1) / 2


@pytest.mark.parametrize("drafts", [1, 2])
@pytest.mark.parametrize("fixed", ["eager-step", "eager"], ids=["padded", "dynamo-fullgraph"])
def test_fixed_shape_decode_and_draft_steps(
    tiny_v3: Path, ref: Reference, tmp_path: Path, fixed: str, drafts: int
) -> None:
    """The graphs' decode step (last token and drafts) and their draft step (the MTP pass and
    its chain): same tokens, same acceptance as eager steps.

    Dynamo's fullgraph tracing of both steps is what CUDA graph capture needs (no host sync).
    """
    calls: dict[str, int] = {}
    cfg = engine_config(mtp=True, num_speculative_tokens=drafts)
    tokens, metrics, _ = generate(tiny_v3, cfg, fixed=fixed, calls=calls)
    assert tokens == ref.tokens
    # Every graphed step but the last (where every sequence ends) is followed by its draft step.
    assert calls["run"] >= NEW_TOKENS - 1 and calls["draft"] == calls["run"] - 1
    eager_metrics = generate(tiny_v3, cfg)[1]
    for name in ("dsworker_spec_draft_tokens_total", "dsworker_spec_accepted_tokens_total"):
        assert counter(metrics, name) == counter(eager_metrics, name)
    ckpt = agreeing_mtp_copy(tiny_v3, tmp_path / "agreeing")
    _, metrics, steps = generate(ckpt, cfg, fixed=fixed)
    drafted = counter(metrics, "dsworker_spec_draft_tokens_total")
    assert drafted > 0 and counter(metrics, "dsworker_spec_accepted_tokens_total") == drafted
    assert steps == steps_when_all_drafts_hold(drafts)


def test_draft_step_refuses_rows_it_cannot_hold(tiny_v3: Path) -> None:
    loaded = build_runner(tiny_v3, engine_config(mtp=True), rank=0, world_size=1, local_rank=0)
    cache = loaded.runner.cache
    for slot in (0, 1):  # what the scheduler does for a new sequence: a full run of 8 pages
        cache.assign(slot, range(slot * 8, slot * 8 + 8))
    assert cache.capacity[:2] == [MAX_LEN, MAX_LEN]
    with pytest.raises(ValueError, match="do not fit this cache"):
        cache.assign(2, range(cache.num_pages, cache.num_pages + 1))  # the scratch page
    with pytest.raises(ValueError, match="do not fit this cache"):
        cache.assign(2, range(9))  # more pages than maxSeqLen needs
    graphs = DecodeGraphs(loaded.runner.model, cache, 4, capture=False)
    assert graphs.width == 2
    with pytest.raises(ValueError, match="2 tokens per sequence"):
        graphs.run([0], [3], [[5]])
    with pytest.raises(ValueError, match="follows a run"):
        graphs.draft([[5]])
    logits = graphs.run([0, 1], [3, 4], [[5, 6], [7, 8]])
    assert logits.shape == (4, loaded.runner.model.args.vocab_size)
    with pytest.raises(ValueError, match="1 to 2 tokens, not 3"):
        graphs.draft([[1, 2, 3], None])
    drafts = graphs.draft([[6], None])
    assert drafts[1] == () and len(drafts[0]) == 1
    # Two drafts a step; near the cache's end (64 positions) a chained draft that would sit past
    # it is dropped: a row read up to position 63 keeps one draft, one read up to 61 keeps two.
    chained = DecodeGraphs(
        loaded.runner.model, loaded.runner.cache, 4, capture=False, draft_tokens=2
    )
    assert chained.width == 3
    chained.run([0, 1], [MAX_LEN - 3, MAX_LEN - 3], [[5, 6, 7], [7, 8, 9]])
    assert [len(d) for d in chained.draft([[6, 7, 8], [8]])] == [1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: capture needs one")
def test_captured_draft_steps_equal_the_eager_ones(tiny_v3: Path) -> None:
    cfg = engine_config(mtp=True, device="cuda", dtype="bfloat16", cudaGraphs=False)
    calls: dict[str, int] = {}
    runs = [generate(tiny_v3, cfg, fixed=f, calls=calls)[0] for f in ("eager-step", "capture")]
    assert runs[0] == runs[1]
    assert calls["draft"] > 0
