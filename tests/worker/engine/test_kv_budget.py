"""npuMemSize sizes the KV cache: the pure budget arithmetic, and build_runner honouring it on CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from dsworker.contract import kv_budget
from dsworker.contract.engine_config import EngineConfig
from dsworker.contract.kv_budget import (
    GIB,
    KVBudgetError,
    KVPages,
    auto_reserve,
    kv_bytes,
    plan_kv_pages,
    wanted_slots,
)
from dsworker.engine.rank_setup import agree_kv_pages, build_runner
from dsworker.model import ModelArgs
from dsworker.parallel.groups import Group, spawn_local

V3_PAGE = kv_bytes(61, 128, 512, 64, 2)  # 8.6 MiB: 128 bf16 V3 positions over 61 layers
PER_SEQ = 20  # pages of one 2560-position sequence


def test_kv_bytes_and_wanted_slots() -> None:
    assert V3_PAGE == 61 * 128 * 576 * 2
    assert wanted_slots(200, 1) == 200
    assert wanted_slots(200, 3) == 67  # ceil: group 0 holds slots 0, 3, ..., 198


def test_explicit_budget_that_fits_gives_every_wanted_page() -> None:
    b = plan_kv_pages(V3_PAGE, PER_SEQ, 16, 60, None)
    assert (b.pages, b.wanted) == (16 * PER_SEQ, 16 * PER_SEQ)
    assert "npuMemSize 60 GiB" in b.reason


def test_explicit_budget_caps_the_pages_and_says_so() -> None:
    b = plan_kv_pages(V3_PAGE, PER_SEQ, 200, 10, None)
    assert b.pages == 10 * GIB // V3_PAGE == 1193
    assert f"1193 of the {200 * PER_SEQ} pages" in b.reason


def test_budget_below_one_sequence_names_npumemsize_the_need_and_the_fix() -> None:
    with pytest.raises(KVBudgetError) as err:
        plan_kv_pages(V3_PAGE, PER_SEQ, 4, 0, None)
    msg = str(err.value)
    assert "npuMemSize 0 GiB holds 0 pages" in msg
    assert f"({PER_SEQ} pages, 0.17 GiB)" in msg
    assert "raise npuMemSize" in msg and "lower maxSeqLen" in msg
    assert isinstance(err.value, ValueError)


def test_auto_uses_free_memory_less_the_reserve() -> None:
    free = 40 * GIB
    assert auto_reserve(free) == 4 * GIB
    assert auto_reserve(2 * GIB) == GIB  # the 1 GiB floor
    b = plan_kv_pages(V3_PAGE, PER_SEQ, 1000, -1, free)
    assert b.pages == 36 * GIB // V3_PAGE
    assert "auto" in b.reason and "40.00 GiB free" in b.reason


def test_auto_with_too_little_free_memory_names_the_free_memory() -> None:
    with pytest.raises(KVBudgetError, match=r"npuMemSize -1 \(auto\): 1\.00 GiB free") as err:
        plan_kv_pages(V3_PAGE, PER_SEQ, 4, -1, GIB)
    assert "lower maxSeqLen" in str(err.value)


def test_cpu_auto_has_no_limit_but_an_explicit_value_still_applies() -> None:
    assert plan_kv_pages(V3_PAGE, PER_SEQ, 200, -1, None).pages == 200 * PER_SEQ
    assert plan_kv_pages(V3_PAGE, PER_SEQ, 200, 1, None).pages == GIB // V3_PAGE == 119


def test_explicit_budget_above_the_free_memory_is_refused_now_not_at_allocation() -> None:
    assert plan_kv_pages(V3_PAGE, PER_SEQ, 16, 10, 20 * GIB).pages == 16 * PER_SEQ
    with pytest.raises(KVBudgetError) as err:
        plan_kv_pages(V3_PAGE, PER_SEQ, 200, 10, 4 * GIB)  # 1193 pages = 10 GiB, 4 GiB free
    msg = str(err.value)
    assert "npuMemSize 10 GiB gives 1193 pages" in msg and "4.00 GiB" in msg
    assert "lower npuMemSize" in msg and "-1 (auto)" in msg


def _min_of_ranks(rank: int, nproc: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=nproc)
    got = Group(list(range(nproc)), rank, dist.group.WORLD).all_min(torch.tensor([7 - 4 * rank]))
    assert got.item() == 3


def test_all_min_gives_every_rank_the_smallest_offer() -> None:
    spawn_local(2, _min_of_ranks)


def _config(**kw: object) -> EngineConfig:
    base = {"device": "cpu", "dtype": "float32", "maxSeqLen": 64, "maxInputTokenLen": 32}
    return EngineConfig.model_validate({**base, **kw})


def _build(ckpt: Path, cfg: EngineConfig):  # noqa: ANN202
    return build_runner(ckpt, cfg, rank=0, world_size=1, local_rank=0)


def test_build_runner_refuses_npumemsize_zero(synth_checkpoint) -> None:
    with pytest.raises(KVBudgetError, match="npuMemSize 0 GiB"):
        _build(synth_checkpoint(), _config(npuMemSize=0, maxBatchSize=4))


def test_build_runner_caps_the_pages_to_npumemsize_not_the_batch(
    synth_checkpoint, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = synth_checkpoint()
    a = ModelArgs.from_dir(ckpt)
    page = kv_bytes(a.num_layers, 16, a.kv_lora_rank, a.qk_rope_dim, 4)
    # A tiny model's page is KiB, so shrink the GiB unit: npuMemSize 1 then holds 10 pages of 16
    # positions, two and a half sequences of maxSeqLen 64.
    monkeypatch.setattr(kv_budget, "GIB", page * 10)
    cfg = _config(npuMemSize=1, maxBatchSize=8, cacheBlockSize=16)
    with caplog.at_level(logging.WARNING, "dsworker.engine.rank_setup"):
        loaded = _build(ckpt, cfg)
    try:
        cache = loaded.runner.cache
        assert (cache.num_pages, cache.page_size, cache.num_slots) == (10, 16, 8)
        assert loaded.max_batch_size == 8  # short requests still run 8 at once
        assert "10 pages agreed over the ranks: 2 sequences of maxSeqLen (64)" in caplog.text
        scheduler = loaded.scheduler(cfg)
        assert scheduler.paging is not None and scheduler.paging.pages == 10
    finally:
        loaded.close()
    unlimited = _build(ckpt, _config(npuMemSize=-1, maxBatchSize=8, cacheBlockSize=16))
    assert (unlimited.runner.cache.num_pages, unlimited.max_batch_size) == (8 * 4, 8)


def _agree_with_less_free_memory_on_rank_1(rank: int, nproc: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=nproc)
    group = Group(list(range(nproc)), rank, dist.group.WORLD)

    def offer(free: int) -> KVPages | KVBudgetError:
        try:
            return plan_kv_pages(V3_PAGE, PER_SEQ, 200, -1, free)
        except KVBudgetError as exc:
            return exc

    # Both fit: each allocates what the smaller one can.
    agreed = agree_kv_pages(offer((40 - 20 * rank) * GIB), group)
    assert agreed == offer(20 * GIB).pages < offer(40 * GIB).pages
    # Rank 1's free memory holds no sequence: it raises its own reason, rank 0 points at it.
    refusal = ""
    try:
        agree_kv_pages(offer(GIB if rank else 40 * GIB), group)
    except KVBudgetError as exc:
        refusal = str(exc)
    if rank:
        assert "1.00 GiB free" in refusal
    else:
        assert "another rank's npuMemSize budget holds no maxSeqLen sequence" in refusal


def test_ranks_agree_on_the_smallest_budget_and_all_refuse_together() -> None:
    spawn_local(2, _agree_with_less_free_memory_on_rank_1)
