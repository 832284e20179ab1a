"""The KV cache in pages: sequences take pages as their tokens fill them, so a budget of one
maxSeqLen sequence still runs several short ones; when pages run out the newest sequence is
preempted and computed again later, its tokens unchanged; a prompt that starts like an ended one
reuses its full pages (prefix caching). Tokens stay transformers'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import NEW_TOKENS, PROMPTS, hf_reference, load_hf
from serving_helpers import MAX_LEN, counter, engine_config, generate, serve

from dsworker.contract import kv_budget
from dsworker.contract.kv_budget import kv_bytes
from dsworker.engine.metrics import Metrics
from dsworker.engine.rank_setup import build_runner
from dsworker.engine.requests import GenRequest, Output, SamplingParams
from dsworker.model import ModelArgs


def one_sequence_of_pages(ckpt: Path, monkeypatch: pytest.MonkeyPatch, mtp: bool) -> None:
    """npuMemSize 1 "GiB" becomes 8 pages of 8 positions: one sequence of maxSeqLen 64."""
    a = ModelArgs.from_dir(ckpt)
    layers = a.num_layers + (a.num_mtp_layers if mtp else 0)
    page = kv_bytes(layers, 8, a.kv_lora_rank, a.qk_rope_dim, 4)
    monkeypatch.setattr(kv_budget, "GIB", page * (MAX_LEN // 8))


@pytest.mark.parametrize("mtp", [False, True], ids=["plain", "mtp"])
def test_a_tight_page_budget_preempts_and_recomputes_without_changing_tokens(
    tiny_v3: Path, monkeypatch: pytest.MonkeyPatch, mtp: bool
) -> None:
    """The three prompts end with 3, 3 and 4 pages (prompt + 16 tokens), 10 of the 8 there
    are: all start, and the newest is preempted when the others' pages grow. Greedy tokens stay
    transformers'."""
    ref = hf_reference(tiny_v3)
    one_sequence_of_pages(tiny_v3, monkeypatch, mtp)
    tokens, metrics, steps = generate(tiny_v3, engine_config(npuMemSize=1, mtp=mtp))
    assert tokens == ref.tokens
    assert counter(metrics, "dsworker_preemptions_total") >= 1
    _, free, free_steps = generate(tiny_v3, engine_config(mtp=mtp))
    assert counter(free, "dsworker_preemptions_total") == 0
    assert steps > free_steps  # the preempted sequence ran again after the others
    assert [len(p) for p in PROMPTS] == [5, 2, 11] and NEW_TOKENS == 16


def test_a_preempted_sampled_sequence_goes_on_with_its_own_random_stream(
    tiny_v3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recompute samples nothing: a seeded sequence preempted halfway gives the tokens it gives
    with room to spare."""
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=11)
    free, _, _ = generate(tiny_v3, engine_config(), params)
    one_sequence_of_pages(tiny_v3, monkeypatch, False)
    tight, metrics, _ = generate(tiny_v3, engine_config(npuMemSize=1), params)
    assert counter(metrics, "dsworker_preemptions_total") >= 1
    assert tight == free


def hits(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("dsworker_prefix_cache_hit_tokens_total") or 0.0


def tokens(outs: list[Output]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


@pytest.mark.parametrize("mtp", [False, True], ids=["plain", "mtp"])
def test_a_prompt_sharing_a_finished_prompts_pages_reuses_them(tiny_v3: Path, mtp: bool) -> None:
    """Pages of 8: the second prompt starts with the first one's 9 tokens, so it reuses one page
    (8 positions) and computes from position 8; both give transformers' greedy tokens."""
    model = load_hf(tiny_v3)
    first = [250, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    second = [*first[:9], 99, 98, 97]
    cfg = engine_config(mtp=mtp)
    loaded = build_runner(tiny_v3, cfg, rank=0, world_size=1, local_rank=0)
    greedy = SamplingParams(temperature=0.0)
    requests = [GenRequest(p, greedy, NEW_TOKENS) for p in (first, second)]
    outs, metrics, _ = serve(loaded, cfg, requests, one_by_one=True)  # the first must end first
    assert hits(metrics) == 8
    with torch.no_grad():
        for i, prompt in enumerate((first, second)):
            ids = torch.tensor([prompt])
            want = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt) :]
            assert tokens(outs[i]) == want.tolist(), i


@pytest.mark.parametrize("mtp", [False, True], ids=["plain", "mtp"])
def test_choices_of_one_prompt_compute_it_once(tiny_v3: Path, mtp: bool) -> None:
    """Three sequences of one 11-token prompt submitted together (n = 3): the first computes
    it, the others wait a step and reuse its full page; all give transformers' tokens."""
    ref = hf_reference(tiny_v3)
    cfg = engine_config(mtp=mtp)
    loaded = build_runner(tiny_v3, cfg, rank=0, world_size=1, local_rank=0)
    request = GenRequest(PROMPTS[2], SamplingParams(temperature=0.0), NEW_TOKENS)
    outs, metrics, _ = serve(loaded, cfg, [request] * 3)
    assert hits(metrics) == 16
    assert [tokens(o) for o in outs] == [ref.tokens[2]] * 3
