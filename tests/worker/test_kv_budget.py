"""npuMemSize sizes the KV cache: the pure budget arithmetic, and build_runner honouring it on CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from dsworker import kv_budget
from dsworker.dist import Group, spawn_local
from dsworker.engine_config import EngineConfig
from dsworker.kv_budget import (
    GIB,
    KVBudgetError,
    auto_reserve,
    bytes_per_slot,
    plan_kv_cache,
    wanted_slots,
)
from dsworker.model import ModelArgs
from dsworker.runner import build_runner

V3_SLOT = bytes_per_slot(61, 2560, 512, 64, 2)  # 171.6 MiB: one bf16 V3 sequence of 2560 tokens


def test_bytes_per_slot_and_wanted_slots() -> None:
    assert V3_SLOT == 61 * 2560 * 576 * 2
    assert wanted_slots(200, 1) == 200
    assert wanted_slots(200, 3) == 67  # ceil: group 0 holds slots 0, 3, ..., 198


def test_explicit_budget_that_fits_gives_every_wanted_slot() -> None:
    b = plan_kv_cache(V3_SLOT, 16, 60, None)
    assert (b.slots, b.capped, b.budget_bytes) == (16, False, 60 * GIB)
    assert b.bytes == 16 * V3_SLOT
    assert "npuMemSize 60 GiB" in b.reason


def test_explicit_budget_caps_the_slots_and_says_so() -> None:
    b = plan_kv_cache(V3_SLOT, 200, 10, None)
    assert b.slots == 10 * GIB // V3_SLOT == 59
    assert b.capped
    assert "59 of the 200" in b.reason


def test_budget_below_one_sequence_names_npumemsize_the_need_and_the_fix() -> None:
    with pytest.raises(KVBudgetError) as err:
        plan_kv_cache(V3_SLOT, 4, 0, None)
    msg = str(err.value)
    assert "npuMemSize 0 GiB" in msg
    assert f"{V3_SLOT} bytes" in msg and "0.17 GiB" in msg
    assert "raise npuMemSize" in msg and "lower maxSeqLen" in msg
    assert isinstance(err.value, ValueError)


def test_auto_uses_free_memory_less_the_reserve() -> None:
    free = 40 * GIB
    assert auto_reserve(free) == 4 * GIB
    assert auto_reserve(2 * GIB) == GIB  # the 1 GiB floor
    b = plan_kv_cache(V3_SLOT, 1000, -1, free)
    assert b.slots == 36 * GIB // V3_SLOT
    assert b.budget_bytes == 36 * GIB
    assert "auto" in b.reason and "40.00 GiB free" in b.reason


def test_auto_with_too_little_free_memory_names_the_free_memory() -> None:
    with pytest.raises(KVBudgetError, match=r"npuMemSize -1 \(auto\): 1\.00 GiB free") as err:
        plan_kv_cache(V3_SLOT, 4, -1, GIB)
    assert "lower maxSeqLen" in str(err.value)


def test_cpu_auto_has_no_limit_but_an_explicit_value_still_applies() -> None:
    b = plan_kv_cache(V3_SLOT, 200, -1, None)
    assert (b.slots, b.budget_bytes, b.capped) == (200, None, False)
    assert plan_kv_cache(V3_SLOT, 200, 1, None).slots == GIB // V3_SLOT == 5


def test_explicit_budget_above_the_free_memory_is_refused_now_not_at_allocation() -> None:
    assert plan_kv_cache(V3_SLOT, 16, 10, 20 * GIB).slots == 16  # 2.7 GiB of 20 free: fine
    with pytest.raises(KVBudgetError) as err:
        plan_kv_cache(V3_SLOT, 200, 10, 4 * GIB)  # 59 slots = 9.9 GiB, 4 GiB free
    msg = str(err.value)
    assert "npuMemSize 10 GiB gives 59 sequences" in msg and "4.00 GiB" in msg
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


def test_build_runner_caps_the_cache_and_the_batch_to_npumemsize(
    synth_checkpoint, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = synth_checkpoint()
    a = ModelArgs.from_dir(ckpt)
    slot = bytes_per_slot(a.num_layers, 64, a.kv_lora_rank, a.qk_rope_dim, 4)
    # A tiny model's sequence is KiB, so shrink the GiB unit: npuMemSize 1 then holds 2.5 slots.
    monkeypatch.setattr(kv_budget, "GIB", slot * 5 // 2)
    with caplog.at_level(logging.WARNING, "dsworker.runner"):
        loaded = _build(ckpt, _config(npuMemSize=1, maxBatchSize=8))
    try:
        assert loaded.runner.cache.num_slots == 2
        assert loaded.max_batch_size == 2
        assert "effective maxBatchSize is 2 (not 8)" in caplog.text
    finally:
        loaded.close()
    unlimited = _build(ckpt, _config(npuMemSize=-1, maxBatchSize=8))
    assert (unlimited.runner.cache.num_slots, unlimited.max_batch_size) == (8, 8)
