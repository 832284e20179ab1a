"""Fixed-shape MTP decode and draft steps on worlds of 2 and 4 gloo ranks equal the eager steps.

Every prompt goes through the serving loop (rank 0 schedules, the other ranks follow its messages)
twice: with ordinary eager steps, and with the padded fixed-shape steps a captured graph replays
(the decode step of the last token and its drafts, then the MTP draft step and its chain), whose
MoE exchanges are the static EP level 1 collectives or the fixed-capacity EP level 2 buffers.
Both runs must give the same tokens, logits, drafts and acceptances; a dp group with no sequences
runs the padded steps; a full buffer refuses the step on every rank, the decode step's or the
draft step's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import PROMPTS, Reference, hf_reference
from mtp_helpers import agreeing_mtp_copy, compare_mtp_runs, steps_when_all_drafts_hold
from safetensors.torch import load_file
from serving_helpers import engine_config

from dsworker.contract.layout import ParallelPlan
from dsworker.engine.loader import load_weights
from dsworker.model import Batch, DeepseekModel, EngineOptions, ModelArgs
from dsworker.model.decode_graphs import DecodeGraphs
from dsworker.model.moe import MoE, MoEOptions
from dsworker.parallel.device import Device
from dsworker.parallel.groups import build_groups, spawn_local

EP2 = {"ep_level": 2}
# Prefill (9 tokens per rank) gets room for every row; a decode step of 3 or 4 tokens per rank
# gets two rows per destination, and 3 or 4 tokens of top-2 routing cannot fit in two ranks' rows.
TIGHT = {"ep_level": 2, "alltoall_ep_buffer_scale_factors": [[8, 4.0], [0, 0.5]]}
AGREEING = "agreeing"  # scenarios on the checkpoint whose MTP layer agrees with the main model

WORLDS: dict[int, dict[str, dict[str, Any]]] = {
    2: {
        "dp2-ep1-2drafts": {"dp": 2, "moe_ep": 2, "num_speculative_tokens": 2},
        "tp2-ep2": {"tp": 2, "moe_ep": 2, **EP2},
        "dp2-ep2-agreeing-2drafts": {"dp": 2, "moe_ep": 2, "num_speculative_tokens": 2, **EP2},
        "tp2-ep2-overflow": {"tp": 2, "moe_ep": 2, **TIGHT},
        "dp2-ep1-2drafts-compiled": {
            "dp": 2,
            "moe_ep": 2,
            "num_speculative_tokens": 2,
            "torchCompile": True,
        },  # fmt: skip
    },
    4: {
        "dp2-tp2-moetp2-ep1": {"dp": 2, "tp": 2, "moe_tp": 2, "moe_ep": 2},
        "dp2-tp2-moetp2-ep2-2drafts": {
            "dp": 2,
            "tp": 2,
            "moe_tp": 2,
            "moe_ep": 2,
            "num_speculative_tokens": 2,
            **EP2,
        },  # fmt: skip
        "dp4-ep2-agreeing-one-idle": {"dp": 4, "moe_ep": 4, **EP2},
    },
}


# Two drafts on dp 2 (batch bucket 2): the decode step and the first MTP pass (6 tokens per rank)
# fit; the chained pass (2 tokens per rank) gets one row per destination, and 2 tokens of top-2
# routing cannot fit in two ranks' rows.
DRAFT_OVERFLOW = {"dp": 2, "moe_ep": 2, "num_speculative_tokens": 2, "ep_level": 2,
                  "alltoall_ep_buffer_scale_factors": [[6, 4.0], [0, 0.5]]}  # fmt: skip


@pytest.fixture(scope="module")
def ref(tiny_v3: Path) -> Reference:
    return hf_reference(tiny_v3)


@pytest.fixture(scope="module")
def agreeing(tiny_v3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return agreeing_mtp_copy(tiny_v3, tmp_path_factory.mktemp("mtp") / "agreeing")


def config_json(nproc: int, plan: dict[str, Any]) -> str:
    return engine_config(mtp=True, worldSize=nproc, **plan).model_dump_json()


def spawn(nproc: int, ckpt: Path, agreeing: Path, out: Path) -> Path:
    """Every scenario of the world (and on 2 ranks the draft step's overflow) in one spawn."""
    worlds = WORLDS[nproc]
    ckpts = {name: str(agreeing if AGREEING in name else ckpt) for name in worlds}
    configs = {name: config_json(nproc, plan) for name, plan in worlds.items()}
    overflow = (str(ckpt), config_json(2, DRAFT_OVERFLOW)) if nproc == 2 else None
    with pytest.MonkeyPatch.context() as mp:  # the compiled scenario compiles afresh
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(out / "inductor"))
        spawn_local(nproc, compare_mtp_runs, ckpts, configs, str(out), overflow)
    return out


@pytest.fixture(scope="module")
def world2(tiny_v3: Path, agreeing: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return spawn(2, tiny_v3, agreeing, tmp_path_factory.mktemp("world2"))


def test_fixed_shape_mtp_steps_equal_eager_steps_on_2_ranks(world2: Path, ref: Reference) -> None:
    check(world2, 2, ref)


def test_fixed_shape_mtp_steps_equal_eager_steps_on_4_ranks(
    tiny_v3: Path, agreeing: Path, ref: Reference, tmp_path: Path
) -> None:
    check(spawn(4, tiny_v3, agreeing, tmp_path), 4, ref)


def check(out: Path, nproc: int, ref: Reference) -> None:
    """Per scenario: every rank took the same fixed-shape steps; rank 0 saw the eager run's
    tokens, logits, drafts and acceptances (or the same refusal)."""
    for name, plan in WORLDS[nproc].items():
        ranks = [json.loads((out / f"{name}.{r}.json").read_text()) for r in range(nproc)]
        refused = name.endswith("overflow")  # at its first decode step: no draft step follows
        for r, rec in enumerate(ranks):
            calls = rec["fixed_calls"]
            assert calls.get("run", 0) >= 1 and calls.get("draft", 0) >= int(not refused), (
                name, r, calls,
            )  # fmt: skip
            assert not rec["eager_calls"], (name, r)
            launches = rec["fixed_steps"]["launches"]  # the same buckets, so graphs would match
            assert launches == ranks[0]["fixed_steps"]["launches"], (name, r)
        eager, fixed = ranks[0]["eager"], ranks[0]["fixed"]
        if refused:
            check_refused(name, eager, fixed)
            continue
        assert eager["errors"] == fixed["errors"] == [], name
        assert fixed["tokens"] == eager["tokens"], name
        if AGREEING not in name:
            assert eager["tokens"] == ref.tokens, name
        for key in ("drafted", "accepted", "steps"):
            assert fixed[key] == eager[key], (name, key)
        assert eager["drafted"] > 0, name
        if AGREEING in name:  # every draft accepted, chained ones too
            assert fixed["accepted"] == fixed["drafted"], name
            d = plan.get("num_speculative_tokens", 1)
            assert fixed["steps"] == steps_when_all_drafts_hold(d), name
        check_logits(name, load_file(out / f"{name}.safetensors"))
        if name.endswith("one-idle"):
            idle, busy = ranks[-1]["fixed_steps"]["seqs"], ranks[0]["fixed_steps"]["seqs"]
            assert idle and not any(idle) and any(busy), name


def check_refused(name: str, eager: dict[str, Any], fixed: dict[str, Any]) -> None:
    """Both runs refused a decode step (the fixed one after it ran, on every rank alike)."""
    assert eager["errors"] and all("AllToAll buffer" in e for e in eager["errors"]), name
    assert fixed["errors"] and all("fixed-shape decode step" in e for e in fixed["errors"]), name
    assert fixed["tokens"] == eager["tokens"], name  # the first token each, from the prefill


def check_logits(name: str, logits: dict[str, torch.Tensor], tol: float = 1e-4) -> None:
    eager = [logits[f"eager.{i}"] for i in range(len(logits) // 2)]
    fixed = [logits[f"fixed.{i}"] for i in range(len(logits) // 2)]
    assert len(logits) == 2 * len(eager) and eager, name
    for s, (got, want) in enumerate(zip(fixed, eager, strict=True)):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol,
                                   msg=lambda m, s=s: f"{name}, step {s}: {m}")  # fmt: skip


def test_a_full_buffer_refuses_the_draft_step_on_every_rank(world2: Path) -> None:
    """Mid-sequence rank 0's chained rows overflow: refused on both ranks (rank 1 sent nothing),
    naming the chain's buffers. At the cache's end no chained draft fits, its rows are padding
    and send nothing: the same step runs and keeps one draft per sequence."""
    for r in range(2):
        rec = json.loads((world2 / f"draft-overflow.{r}.json").read_text())
        assert rec["mid"] and "EP level 2 (fixed-shape draft step)" in rec["mid"], (r, rec)
        assert "1 rows for 2 tokens per rank (factor 0.5)" in rec["mid"], rec["mid"]
        assert rec["end"] is None and rec["end_drafts"] == [1] * len(PROMPTS[r::2]), (r, rec)


def test_the_draft_step_keeps_the_decode_steps_key_bucket(tiny_v3: Path) -> None:
    """The caller's `reach` (the furthest key over the world) picks the decode step's key bucket;
    the draft step after it must pick from it too, not from this rank's own positions, or ranks
    would launch (and capture) different graphs."""
    plan = ParallelPlan(1, 1, 1, 1, 1)
    model = DeepseekModel(ModelArgs.from_dir(tiny_v3), build_groups(plan, 0, "gloo"),
                          EngineOptions(mtp=True), torch.float32)  # fmt: skip
    load_weights(model.targets(), tiny_v3, plan, 0, Device.create("cpu"))
    graphs = DecodeGraphs(model, model.new_cache(2, 1024), 2, capture=False, draft_tokens=2)
    assert graphs.key_lens == [256, 512, 1024]
    launches: list[tuple[str, int, int]] = []
    launch = graphs._launch

    def launched(kind: str, b: int, k: int) -> torch.Tensor:
        launches.append((kind, b, k))
        return launch(kind, b, k)

    graphs._launch = launched  # type: ignore[method-assign]
    graphs.run([0], [5], [[7, 8, 9]], rows=2, reach=300)  # another rank reads 300 keys
    graphs.draft([[8, 9, 10]])
    graphs.run([0], [5], [[7, 8, 9]])  # alone: 8 keys, then 5 + 2 + 2 for the chain
    graphs.draft([[8]])
    assert launches == [
        ("decode", 2, 512),
        ("draft", 2, 512),
        ("decode", 1, 256),
        ("draft", 1, 256),
    ]


def exchanged_drafts(ckpt: Path, kind: str, capture: bool, ep_level: int) -> list[Any]:
    """A world of one rank told to exchange (its collectives are no-ops), two drafts a step:
    each step's logits and drafts, every sequence moving on by its first row's argmax."""
    plan, dev = ParallelPlan(1, 1, 1, 1, 1), Device.create(kind)
    model = DeepseekModel(ModelArgs.from_dir(ckpt), build_groups(plan, 0, dev.backend),
                          EngineOptions(MoEOptions(ep_level=ep_level), mtp=True), torch.float32,
                          dev.torch)  # fmt: skip
    load_weights(model.targets(), ckpt, plan, 0, dev)
    for m in model.modules():
        if isinstance(m, MoE):
            m.local_only = False
    graphs = DecodeGraphs(model, model.new_cache(4, 64), 4, capture=capture, draft_tokens=2)
    out = model.forward(Batch.build([(i, 0, p) for i, p in enumerate(PROMPTS)], dev.torch),
                        graphs.cache)  # fmt: skip
    last = out.logits.argmax(-1).tolist()
    drafts = [(0, 0)] * len(PROMPTS)
    seen: list[Any] = []
    for s in range(4):
        pos = [len(p) + s for p in PROMPTS]
        tokens = [[t, *d] for t, d in zip(last, drafts, strict=True)]
        logits = graphs.run(list(range(len(PROMPTS))), pos, tokens)
        last = logits.view(len(PROMPTS), 3, -1)[:, 0].argmax(-1).tolist()
        drafts = graphs.draft([[t] for t in last])
        seen += [logits.cpu(), drafts]
    assert bool(graphs.graphs) == capture
    return seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: capture needs one")
@pytest.mark.parametrize("ep_level", [1, 2])
def test_captured_mtp_steps_with_fixed_exchanges_on_one_gpu(tiny_v3: Path, ep_level: int) -> None:
    """The decode and draft steps' fixed exchanges (the chain's padding rows masked) captured."""
    eager = exchanged_drafts(tiny_v3, "cuda", False, ep_level)
    replay = exchanged_drafts(tiny_v3, "cuda", True, ep_level)
    for want, got in zip(eager, replay, strict=True):
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:
            assert got == want
