"""Prompt logprobs (completions' `echo` with `logprobs`): the engine scores every prompt token
after the first, through prompt chunks, dp groups and the MTP path, never from pages another
prompt left behind; the values are transformers' own, and generation is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_helpers import PROMPTS, Reference, hf_reference
from serving_helpers import engine_config, generate, serve

from dsworker.contract.engine_config import EngineConfig
from dsworker.engine.control import DistChannel
from dsworker.engine.loop import follow
from dsworker.engine.rank_setup import build_runner
from dsworker.engine.requests import GenRequest, SamplingParams
from dsworker.parallel.groups import spawn_local


@pytest.fixture(scope="module")
def ref(tiny_v3: Path) -> Reference:
    return hf_reference(tiny_v3)


def scores(ref: Reference, i: int) -> list[float]:
    """transformers' log-probability of each prompt token after the first."""
    lp = torch.log_softmax(ref.logits[i], dim=-1)[:-1]
    return lp.gather(1, torch.tensor(PROMPTS[i][1:])[:, None])[:, 0].tolist()


@pytest.mark.parametrize(
    "kw",
    [{}, {"maxPrefillTokens": 4}, {"mtp": True, "maxPrefillTokens": 8}],
    ids=["one-step", "chunks-of-4", "mtp-chunks-of-8"],
)
def test_prompt_logprobs_equal_transformers(tiny_v3: Path, ref: Reference, kw: dict) -> None:
    got: dict[int, list[float]] = {}
    tokens, _, _ = generate(tiny_v3, engine_config(**kw), prompt_logprobs=got)
    assert tokens == ref.tokens
    for i in range(len(PROMPTS)):
        assert got[i] == pytest.approx(scores(ref, i), abs=1e-4), i


def _world_rank(rank: int, nproc: int, ckpt: str, cfg_json: str, out: str) -> None:
    cfg = EngineConfig.model_validate_json(cfg_json)
    if rank == 0:
        got: dict[int, list[float]] = {}
        tokens, _, _ = generate(Path(ckpt), cfg, rank=0, world=nproc, prompt_logprobs=got)
        Path(out).write_text(json.dumps({"tokens": tokens, "scores": got}))
        return
    loaded = build_runner(Path(ckpt), cfg, rank=rank, world_size=nproc, local_rank=rank)
    assert isinstance(loaded.channel, DistChannel)
    follow(loaded.runner, loaded.channel)


def test_dp_groups_gather_their_prompt_rows(tiny_v3: Path, ref: Reference, tmp_path: Path) -> None:
    cfg = engine_config(worldSize=2, dp=2, tp=1, moe_tp=1, moe_ep=2, maxPrefillTokens=4)
    out = tmp_path / "result.json"
    spawn_local(2, _world_rank, str(tiny_v3), cfg.model_dump_json(), str(out))
    record = json.loads(out.read_text())
    assert record["tokens"] == ref.tokens
    for i in range(len(PROMPTS)):
        assert record["scores"][str(i)] == pytest.approx(scores(ref, i), abs=1e-4), i


def test_a_scored_prompt_computes_what_a_cached_prefix_would_skip(
    tiny_v3: Path, ref: Reference
) -> None:
    """Pages of 8: the 11-token prompt leaves one full page behind; the same prompt again reuses
    it, unless its prompt is scored, which needs the logits of those 8 positions too."""
    cfg = engine_config()
    loaded = build_runner(tiny_v3, cfg, rank=0, world_size=1, local_rank=0)
    prompt, greedy = PROMPTS[2], SamplingParams(temperature=0.0)
    plain = GenRequest(prompt, greedy, 4)
    scored = GenRequest(prompt, greedy, 4, prompt_logprobs=2)
    outs, metrics, _ = serve(loaded, cfg, [plain, scored, plain], one_by_one=True)
    # Only the third (unscored) prompt reuses the page the first left.
    assert metrics.registry.get_sample_value("dsworker_prefix_cache_hit_tokens_total") == 8
    entries = [e for o in outs[1] for e in o.prompt_logprobs]
    assert [e.logprob for e in entries] == pytest.approx(scores(ref, 2), abs=1e-4)
    assert [e.token for e in entries] == prompt[1:] and all(len(e.top) == 2 for e in entries)
    assert [o.prompt_logprobs != () for o in outs[1]] == [True, False, False, False]
    assert [t for o in outs[2] for t in o.token_ids] == ref.tokens[2][:4]
