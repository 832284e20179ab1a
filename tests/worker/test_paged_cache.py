"""The KV cache in pages: sequences reserve their prompt plus max_tokens as they start, so a budget
of one maxSeqLen sequence still runs several short ones, and a request that does not fit waits
for pages instead of failing; a prompt that starts like an ended one reuses its full pages
(prefix caching). Tokens stay transformers'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import NEW_TOKENS, PROMPTS, hf_reference, load_hf
from serving_helpers import MAX_LEN, engine_config, generate, serve

from dsworker import kv_budget
from dsworker.engine_loop import GenRequest, Output
from dsworker.kv_budget import kv_bytes
from dsworker.metrics import Metrics
from dsworker.model import ModelArgs
from dsworker.runner import build_runner
from dsworker.sampling import SamplingParams


def test_a_tight_page_budget_makes_requests_wait_not_fail(
    tiny_v3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = hf_reference(tiny_v3)
    a = ModelArgs.from_dir(tiny_v3)
    page = kv_bytes(a.num_layers + a.num_mtp_layers, 8, a.kv_lora_rank, a.qk_rope_dim, 4)
    # npuMemSize 1 "GiB" = 8 pages of 8 positions: one sequence of maxSeqLen 64. The prompts
    # reserve 3, 3 and 4 pages (prompt + 16 tokens), so the third waits for the first to end.
    monkeypatch.setattr(kv_budget, "GIB", page * (MAX_LEN // 8))
    tight = engine_config(npuMemSize=1, mtp=True)
    tokens, _, steps = generate(tiny_v3, tight)
    assert tokens == ref.tokens
    _, _, free_steps = generate(tiny_v3, engine_config(mtp=True))
    assert steps > free_steps  # the third sequence ran after the others, not beside them
    assert [len(p) for p in PROMPTS] == [5, 2, 11] and NEW_TOKENS == 16


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
