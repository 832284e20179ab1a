"""The memory model against real shards and real loaded models, and the fit verdicts it gives.

Weights: `weight_bytes(...).shard` must equal, exactly and per rank, the tensor bytes `dsworker shard`
writes into the directories that rank reads (file sizes less their safetensors headers), for every
format (also checkpoints that keep some modules in BF16), plans of 1, 2 and 4 ranks, with and
without MTP. `.device` must equal what the loaded
model holds (bf16), which stays within 5% of the shard bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from quant_reference import KEEP_FLOAT

from dsworker.checkpoint.quant_description import read_quant_description
from dsworker.contract.fit import ACCELERATORS, check_fit
from dsworker.contract.kv_budget import GIB
from dsworker.contract.layout import ParallelPlan
from dsworker.contract.memory import weight_bytes
from dsworker.contract.quant import QuantFormat, quant_format
from dsworker.tools.shard import shard

PLANS = {
    "w1": ParallelPlan(1, 1, 1, 1, 1),
    "w2_tp2_moetp2": ParallelPlan(2, 1, 2, 2, 1),
    "w4_dp2_tp2_moetp2_ep2": ParallelPlan(4, 2, 2, 2, 2),
}
FORMATS = ("bf16", "fp8", "w8a8", "w8a16")
MIXED = ("fp8-mixed", "w8a8-mixed", "w8a16-mixed")  # some linear modules kept in BF16
STATIC = ("w8a8-static",)  # msModelSlim's mix: attention static W8A8, MLPs dynamic
STATIC_ATTN = (r"re:.*self_attn\..*",)
TINY_FP8_DIMS = {  # synth's tiny FP8 dims (whole 128-blocks), for every format
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 256,
    "q_lora_rank": 96,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 64,
    "v_head_dim": 64,
}


def synth_args(fmt: str) -> tuple[str, dict[str, tuple[str, ...]]]:
    """'w8a8-static' -> ('w8a8', {'static': ...}); 'fp8-mixed' -> ('fp8', {'keep_float': ...})."""
    base, _, variant = fmt.partition("-")
    if variant == "static":
        return base, {"static": STATIC_ATTN}
    return base, {"keep_float": KEEP_FLOAT[base] if variant else ()}


def data_bytes(path: Path) -> int:
    """A safetensors file's tensor bytes: its size less the 8-byte length and the JSON header."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - n


def shard_bytes(layout: Path, plan: ParallelPlan, rank: int) -> int:
    return sum(
        data_bytes(f)
        for d in plan.rank_dirs(rank)
        for f in sorted((layout / d).glob("*.safetensors"))
    )


@pytest.fixture(scope="module")
def layouts(
    synth_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str, bool], Path]:
    root = tmp_path_factory.mktemp("mem-layouts")
    out = {}
    for fmt in FORMATS + MIXED + STATIC:
        base, extra = synth_args(fmt)
        ck = synth_checkpoint("v3", "tiny", base, mtp=True, **extra)
        for pname, plan in PLANS.items():
            for mtp in (False, True):
                dst = root / f"{fmt}-{pname}-{int(mtp)}"
                shard(ck, dst, plan, mtp=mtp)
                out[(fmt, pname, mtp)] = dst
    return out


@pytest.mark.parametrize("fmt", FORMATS + MIXED + STATIC)
def test_weight_bytes_equal_the_sharders_per_rank(
    fmt: str, layouts: dict[tuple[str, str, bool], Path]
) -> None:
    for pname, plan in PLANS.items():
        for mtp in (False, True):
            layout = layouts[(fmt, pname, mtp)]
            cfg = json.loads((layout / "config.json").read_text())
            desc = read_quant_description(layout)  # msModelSlim's FLOAT modules (w8a8)
            model = weight_bytes(cfg, plan, mtp, description=desc).shard
            real = [shard_bytes(layout, plan, r) for r in range(plan.world_size)]
            assert model == real, f"{fmt} {pname} mtp={mtp}: model {model} != sharder {real}"


@pytest.mark.parametrize("fmt", ["fp8", "w8a8", "w8a16", *MIXED, *STATIC])
def test_loaded_model_holds_the_modelled_bytes(
    fmt: str, synth_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    """bf16 model, 8-bit weights kept: held bytes == memory model, within 5% of the shard bytes.

    All formats at the tiny FP8 dims (hidden 256): at hidden 64 the bf16 kv_b_proj and fp32
    router are 6% of a w8a16 rank; at R1's dims they are under 1%. `-mixed`: the checkpoint keeps
    the modules of quant_reference.KEEP_FLOAT in BF16.
    """
    mixed = "mixed" in fmt
    fmt, extra = synth_args(fmt)
    from dsworker.engine.loader import load_weights
    from dsworker.model import DeepseekModel, EngineOptions, ModelArgs
    from dsworker.model.quant_weights import held_bytes
    from dsworker.parallel.device import Device
    from dsworker.parallel.groups import build_groups

    plan = PLANS["w1"]
    shard(
        synth_checkpoint("v3", "tiny", fmt, mtp=True, overrides=TINY_FP8_DIMS, **extra),
        tmp_path,
        plan,
        mtp=True,
    )
    args = ModelArgs.from_dir(tmp_path)
    model = DeepseekModel(args, build_groups(plan, 0, "gloo"), EngineOptions(mtp=True))
    load_weights(model.targets(), tmp_path, plan, 0, Device.create("cpu"), mtp=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    want = weight_bytes(cfg, plan, mtp=True, description=read_quant_description(tmp_path))
    held = held_bytes(model)
    assert held == want.device[0]
    assert want.shard[0] == shard_bytes(tmp_path, plan, 0)
    assert abs(held - want.shard[0]) <= 0.05 * want.shard[0], (held, want.shard[0])
    bf16 = {**cfg, "quantization_config": None, "quantize": None}
    assert held < (0.7 if mixed else 0.6) * weight_bytes(bf16, plan, mtp=True).device[0]


def test_quant_format_from_config(synth_checkpoint: Callable[..., Path]) -> None:
    read = {
        f: json.loads((synth_checkpoint("v3", "tiny", f) / "config.json").read_text())
        for f in FORMATS
    }
    assert quant_format(read["bf16"]) is None
    assert quant_format(read["fp8"]) == QuantFormat("fp8", 0, (128, 128))
    assert quant_format(read["w8a8"]) == QuantFormat("w8a8")
    assert quant_format(read["w8a16"]) == QuantFormat("w8a16", 0)


# DeepSeek-V3/R1's public config.json (the fields the memory model reads).
R1 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "num_attention_heads": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "topk_method": "noaux_tc",
}
FP8_QC = {"quant_method": "fp8", "weight_block_size": [128, 128]}


def r1(fmt: str) -> dict:
    if fmt == "fp8":
        return {**R1, "quantization_config": FP8_QC}
    return {**R1, "quantize": "w8a8_dynamic"} if fmt == "w8a8" else dict(R1)


def test_r1_totals_are_the_known_sizes() -> None:
    """The whole model (one rank holding all) is DeepSeek-V3's published 671B + 14B MTP params."""
    one = ParallelPlan(1, 1, 1, 1, 1)
    fp8 = weight_bytes(r1("fp8"), one, mtp=True).shard[0]
    assert 680e9 < fp8 < 700e9, fp8  # ~685B parameters at ~1 byte, plus scales and bf16 parts
    bf16 = weight_bytes(r1("bf16"), one, mtp=True).shard[0]
    assert 1.36e12 < bf16 < 1.38e12, bf16
    assert fp8 < 0.55 * bf16  # the goal for FP8 against BF16 bytes


def test_r1_bf16_on_eight_64gb_npus_is_refused_w8a8_on_sixteen_fits() -> None:
    npu = ACCELERATORS["ascend-910b3"]
    kw = {"max_seq_len": 4096, "max_batch_size": 16}
    bf16 = check_fit(r1("bf16"), ParallelPlan(8, 1, 8, 1, 8), npu, **kw)
    assert not bf16.fits and bf16.weights > 150 * GIB
    msg = bf16.message()
    assert "does not fit" in msg and "more ranks" in msg and "quantised format" in msg, msg
    w8a8 = check_fit(r1("w8a8"), ParallelPlan(16, 2, 8, 1, 16), npu, **kw)
    assert w8a8.fits and w8a8.weights < 48 * GIB, w8a8.message()
    fp8 = check_fit(r1("fp8"), ParallelPlan(8, 1, 8, 1, 8), ACCELERATORS["nvidia-h200"], **kw)
    assert fp8.fits, fp8.message()
    assert torch.float8_e4m3fn.itemsize == 1  # the device format the FP8 figures assume
