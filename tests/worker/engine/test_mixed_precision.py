"""Quantised checkpoints that keep some linear layers in BF16 load, hold the bytes the memory model
says, and compute what transformers computes on the dequantised weights (fp32, atol 1e-4; the same
16 greedy tokens), at world 1 and in a spawned world of 2 ranks.

Each format declares its BF16 modules as its own tools do (quant_reference.KEEP_FLOAT): FP8 in
modules_to_not_convert (a module, a parent module, a suffix), compressed-tensors W8A16 in `ignore`
(names, `re:` regexes), msModelSlim W8A8 as "FLOAT" in its description file. Before per-module
precision these were refused ("... is stored as bf16 but config.json declares fp8 for it").
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from engine_helpers import (
    Outcome,
    Reference,
    assert_matches,
    dequantized_copy,
    hf_reference,
    job,
    run_local,
    spawn_world,
)
from quant_reference import KEEP_FLOAT, float_params

from dsworker.checkpoint.quant_description import read_quant_description
from dsworker.contract.layout import ParallelPlan
from dsworker.contract.memory import weight_bytes
from dsworker.tools.shard import shard

FORMATS = ("fp8", "w8a16", "w8a8")
P1 = ParallelPlan(1, 1, 1, 1, 1)
TP2 = ParallelPlan(2, 1, 2, 2, 1)
EP2 = ParallelPlan(2, 2, 1, 1, 2)
# world 2: which source (sharded layout or the checkpoint itself) and plan per format
WORLD2 = {"fp8": ("layout", TP2), "w8a8": ("layout", TP2), "w8a16": ("ckpt", EP2)}


def assert_holds_modelled_bytes(out: Outcome, model_dir: Path, p: ParallelPlan) -> None:
    """Each rank holds what the memory model says (fp32 compute: 4-byte float parts)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    desc = read_quant_description(model_dir)
    want = weight_bytes(cfg, p, dtype_bytes=4, description=desc).device
    assert out.weight_bytes == want, (out.weight_bytes, want)


@pytest.fixture(scope="module")
def ckpts(
    synth_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    out = {}
    for fmt in FORMATS:
        out[fmt] = synth_checkpoint("v3", "tiny", fmt, keep_float=KEEP_FLOAT[fmt])
        out[f"{fmt}_deq"] = dequantized_copy(out[fmt], tmp_path_factory.mktemp(f"deq-{fmt}"))
    for fmt, (kind, p) in WORLD2.items():
        if kind == "layout":
            dst = tmp_path_factory.mktemp(f"layout-{fmt}")
            shard(out[fmt], dst, p)
            out[f"{fmt}_layout"] = dst
    return out


@pytest.fixture(scope="module")
def refs(ckpts: dict[str, Path]) -> dict[str, Reference]:
    out = {}
    for fmt in FORMATS:
        w8a8 = fmt == "w8a8"
        keep = float_params(ckpts[fmt])
        out[fmt] = hf_reference(ckpts[f"{fmt}_deq"], int8_inputs=w8a8, also_float=keep)
        if w8a8:  # row-parallel inputs rounded per rank's slice at tp 2 / moeTp 2
            out["w8a8_tp2"] = hf_reference(
                ckpts["w8a8_deq"], int8_inputs=True, tp=2, moe_tp=2, also_float=keep
            )
    return out


def test_the_checkpoints_keep_what_they_declare(ckpts: dict[str, Path]) -> None:
    """The synthesized checkpoints really hold the BF16 modules the tests are about."""
    assert float_params(ckpts["fp8"]) == (
        "model.layers.0.self_attn.kv_b_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.mlp.shared_experts.down_proj",
        "model.layers.1.mlp.shared_experts.gate_proj",
        "model.layers.1.mlp.shared_experts.up_proj",
        "model.layers.1.self_attn.kv_b_proj",
        "model.layers.2.self_attn.kv_b_proj",
    )
    assert "model.layers.2.mlp.experts.down_proj" in float_params(ckpts["w8a16"])
    w8a8 = float_params(ckpts["w8a8"])
    assert {"model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_b_proj"} <= set(w8a8)
    assert "model.layers.0.mlp.gate_proj" not in w8a8


@pytest.mark.parametrize("fmt", FORMATS)
def test_world1_matches_transformers_and_holds_the_modelled_bytes(
    fmt: str, ckpts: dict[str, Path], refs: dict[str, Reference]
) -> None:
    out = run_local(job(ckpts[fmt], P1))
    assert_matches(out, refs[fmt], f"{fmt} mixed, world 1")
    assert_holds_modelled_bytes(out, ckpts[fmt], P1)


def test_world2_plans(ckpts: dict[str, Path], refs: dict[str, Reference], tmp_path: Path) -> None:
    jobs = {}
    for fmt, (kind, p) in WORLD2.items():
        src = ckpts[f"{fmt}_layout"] if kind == "layout" else ckpts[fmt]
        jobs[fmt] = job(src, p, grouped_matmul=fmt == "w8a16")
    out = spawn_world(2, jobs, tmp_path)
    for fmt, (kind, p) in WORLD2.items():
        ref = refs["w8a8_tp2"] if fmt == "w8a8" else refs[fmt]
        assert_matches(out[fmt], ref, f"{fmt} mixed, world 2 ({kind})")
        assert_holds_modelled_bytes(out[fmt], Path(jobs[fmt].model), p)
