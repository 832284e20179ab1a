"""The KV cache in pages: sequences reserve their prompt plus max_tokens as they start, so a budget
of one maxSeqLen sequence still runs several short ones, and a request that does not fit waits
for pages instead of failing; tokens stay transformers'."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_helpers import NEW_TOKENS, PROMPTS, hf_reference
from serving_helpers import MAX_LEN, engine_config, generate

from dsworker import kv_budget
from dsworker.kv_budget import kv_bytes
from dsworker.model import ModelArgs


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
