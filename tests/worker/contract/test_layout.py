"""The pure split rules of dsworker.contract.layout: rank arithmetic, placement, slices, plan checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsworker.contract.layout import (
    ATTN,
    DENSE,
    MOE,
    NORM,
    VOCAB,
    ModelDims,
    ParallelPlan,
    PlanError,
    Slice,
    check_plan,
    fp8_shard_ok,
    is_mtp,
    local_shape,
    owner_dirs,
    parts_for,
    place,
    split_name,
    tensor_slice,
)

# The public DeepSeek-V3/R1 config.json (FP8 block-quantised).
V3 = json.loads(
    (Path(__file__).resolve().parents[2] / "data" / "deepseek-v3-config.json").read_text()
)
DIMS = ModelDims.from_config(V3)


def test_rank_arithmetic_matches_mindie_example() -> None:
    plan = ParallelPlan(16, 2, 8, 4, 4)  # MindIE's A3 example: --dp 2 --tp 8 --moe_tp 4 --moe_ep 4
    for r in range(16):
        c = plan.coords(r)
        assert (c.dp_rank, c.tp_rank, c.moe_ep_rank, c.moe_tp_rank) == (
            r // 8,
            r % 8,
            r // 4,
            r % 4,
        )
    assert plan.rank_dirs(13) == [
        "model-013",
        "model-norm",
        "model-attn-tp-005",
        "model-dense-tp-005",
        "model-moe-tp-001-ep-003",
    ]
    dirs = plan.all_dirs()
    assert len(dirs) == 16 + 1 + 8 + 8 + 16 and len(set(dirs)) == len(dirs)
    with pytest.raises(PlanError):
        plan.coords(16)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((4, 2, 1, 4, 1), "dp*tp must equal world_size"),
        ((4, 4, 1, 2, 1), "moe_tp*moe_ep must equal world_size"),
        ((0, 1, 1, 1, 1), "world_size must be a positive integer"),
        ((2, 1, 2, 2, 1.0), "moe_ep must be a positive integer"),
    ],
)
def test_plan_validation(args, needle: str) -> None:
    with pytest.raises(PlanError, match=needle.replace("*", r"\*")):
        ParallelPlan(*args)


def test_model_dims_v2_v3_and_errors() -> None:
    assert DIMS.architecture == "DeepseekV3" and DIMS.fp8_block == (128, 128)
    assert (DIMS.qk_nope_head_dim, DIMS.qk_rope_head_dim, DIMS.v_head_dim) == (128, 64, 128)
    v2 = dict(V3, architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2")
    v2.pop("quantization_config")
    d2 = ModelDims.from_config(v2)
    assert d2.architecture == "DeepseekV2" and d2.fp8_block is None
    with pytest.raises(PlanError, match="neither DeepseekV2 nor DeepseekV3"):
        ModelDims.from_config({"architectures": ["LlamaForCausalLM"]})
    with pytest.raises(PlanError, match="missing or non-integer hidden_size"):
        ModelDims.from_config({k: v for k, v in V3.items() if k != "hidden_size"})


@pytest.mark.parametrize(
    ("name", "group", "dim", "expert"),
    [
        ("model.embed_tokens.weight", VOCAB, 0, None),
        ("lm_head.weight", VOCAB, 0, None),
        ("model.norm.weight", NORM, None, None),
        ("model.layers.0.input_layernorm.weight", NORM, None, None),
        ("model.layers.0.self_attn.q_a_proj.weight", NORM, None, None),
        ("model.layers.0.self_attn.q_a_proj.weight_scale_inv", NORM, None, None),
        ("model.layers.0.self_attn.q_a_layernorm.weight", NORM, None, None),
        ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", NORM, None, None),
        ("model.layers.0.self_attn.q_b_proj.weight", ATTN, 0, None),
        ("model.layers.0.self_attn.q_proj.weight", ATTN, 0, None),
        ("model.layers.0.self_attn.kv_b_proj.weight_scale_inv", ATTN, 0, None),
        ("model.layers.0.self_attn.o_proj.weight", ATTN, 1, None),
        ("model.layers.2.mlp.gate_proj.weight", DENSE, 0, None),
        ("model.layers.2.mlp.down_proj.weight", DENSE, 1, None),
        ("model.layers.5.mlp.shared_experts.up_proj.weight_packed", DENSE, 0, None),
        ("model.layers.5.mlp.shared_experts.down_proj.weight", DENSE, 1, None),
        ("model.layers.5.mlp.gate.weight", NORM, None, None),
        ("model.layers.5.mlp.gate.e_score_correction_bias", NORM, None, None),
        ("model.layers.5.mlp.experts.17.gate_proj.weight", MOE, 0, 17),
        ("model.layers.5.mlp.experts.17.down_proj.weight_scale", MOE, 1, 17),
        ("model.layers.61.embed_tokens.weight", VOCAB, 0, None),
        ("model.layers.61.shared_head.head.weight", VOCAB, 0, None),
        ("model.layers.61.shared_head.norm.weight", NORM, None, None),
        ("model.layers.61.eh_proj.weight", NORM, None, None),
        ("model.layers.61.enorm.weight", NORM, None, None),
        ("model.layers.61.mlp.experts.3.up_proj.weight", MOE, 0, 3),
    ],
)
def test_place(name: str, group: str, dim, expert) -> None:
    p = place(name, DIMS)
    assert (p.group, p.dim, p.expert) == (group, dim, expert)


def test_split_name_and_mtp() -> None:
    assert split_name("a.b.weight_scale_inv") == ("a.b", "weight_scale_inv")
    assert split_name("a.b.weight_packed") == ("a.b", "weight_packed")
    assert split_name("a.b.weight") == ("a.b", "weight")
    assert split_name("a.gate.e_score_correction_bias") == ("a.gate.e_score_correction_bias", "")
    assert is_mtp("model.layers.61.enorm.weight", DIMS) and not is_mtp("model.layers.60.x", DIMS)
    assert not is_mtp("lm_head.weight", DIMS)


def test_owner_dirs() -> None:
    plan = ParallelPlan(16, 2, 8, 4, 4)
    emb = owner_dirs(place("model.embed_tokens.weight", DIMS), DIMS, plan)
    assert emb == [(f"model-{r:03d}", r % 8) for r in range(16)]
    assert owner_dirs(place("model.norm.weight", DIMS), DIMS, plan) == [("model-norm", 0)]
    attn = owner_dirs(place("model.layers.0.self_attn.o_proj.weight", DIMS), DIMS, plan)
    assert attn == [(f"model-attn-tp-{t:03d}", t) for t in range(8)]
    dense = owner_dirs(place("model.layers.0.mlp.up_proj.weight", DIMS), DIMS, plan)
    assert dense[3] == ("model-dense-tp-003", 3)
    moe = owner_dirs(place("model.layers.9.mlp.experts.200.down_proj.weight", DIMS), DIMS, plan)
    assert moe == [(f"model-moe-tp-{t:03d}-ep-003", t) for t in range(4)]  # 64 experts per ep rank
    assert parts_for(MOE, plan) == 4 and parts_for(ATTN, plan) == 8 and parts_for(NORM, plan) == 1


def test_tensor_slice_weights_and_companions() -> None:
    attn_o = place("model.layers.0.self_attn.o_proj.weight", DIMS)
    assert tensor_slice("x.o_proj.weight", (7168, 16384), attn_o, 3, 8) == Slice(1, 6144, 8192)
    # FP8 scale_inv [56, 128] follows on dim 1 in whole blocks
    assert tensor_slice("x.o_proj.weight_scale_inv", (56, 128), attn_o, 3, 8) == Slice(1, 48, 64)
    q_b = place("model.layers.0.self_attn.q_b_proj.weight", DIMS)
    sl = tensor_slice("x.q_b_proj.weight", (24576, 1536), q_b, 1, 8)
    assert sl == Slice(0, 3072, 6144) and local_shape((24576, 1536), sl) == (3072, 1536)
    # W8A8 per-channel scale [out, 1]: split with a dim-0 split, whole with a dim-1 split
    assert tensor_slice("x.q_b_proj.weight_scale", (24576, 1), q_b, 1, 8) == Slice(0, 3072, 6144)
    s = tensor_slice("x.o_proj.weight_offset", (7168, 1), attn_o, 3, 8)
    assert s.dim is None and local_shape((7168, 1), s) == (7168, 1)
    # W8A16 packed int32 columns (in/4) and weight_shape (replicated, rewritten by the sharder)
    assert tensor_slice("x.o_proj.weight_packed", (7168, 4096), attn_o, 1, 8) == Slice(1, 512, 1024)
    assert tensor_slice("x.o_proj.weight_shape", (2,), attn_o, 1, 8).dim is None
    # parts == 1 and replicated tensors are whole
    assert tensor_slice("x", (10, 10), attn_o, 0, 1).dim is None
    assert (
        tensor_slice("model.norm.weight", (7168,), place("model.norm.weight", DIMS), 0, 1).dim
        is None
    )


def test_tensor_slice_names_tensor_and_dim() -> None:
    emb = place("model.embed_tokens.weight", DIMS)
    with pytest.raises(
        PlanError, match=r"tensor model.embed_tokens.weight: dim 0 of size 129280 .* 3 parts"
    ):
        tensor_slice("model.embed_tokens.weight", (129280, 7168), emb, 0, 3)


def test_check_plan_messages() -> None:
    assert check_plan(DIMS, ParallelPlan(16, 2, 8, 4, 4)) == []
    assert check_plan(DIMS, ParallelPlan(16, 1, 16, 4, 4)) == []
    assert any(
        "intermediate_size/tp = 576" in e for e in check_plan(DIMS, ParallelPlan(32, 1, 32, 8, 4))
    )
    errs = check_plan(DIMS, ParallelPlan(6, 2, 3, 6, 1))
    text = "\n".join(errs)
    assert "num_attention_heads (128) is not divisible by tp (3)" in text
    assert "vocab_size (129280) is not divisible by tp (3)" in text
    assert "moe_intermediate_size (routed experts) (2048) is not divisible by moeTp (6)" in text
    errs = check_plan(DIMS, ParallelPlan(32, 1, 32, 32, 1))
    assert any("FP8 block quantisation: moe_intermediate_size/moeTp = 64" in e for e in errs)
    errs = check_plan(DIMS, ParallelPlan(128, 1, 128, 1, 128))
    assert any("q_b_proj rows num_attention_heads*(qk_nope+qk_rope)/tp = 192" in e for e in errs)
    no_fp8 = ModelDims.from_config({k: v for k, v in V3.items() if k != "quantization_config"})
    assert check_plan(no_fp8, ParallelPlan(32, 1, 32, 32, 1)) == []
    assert fp8_shard_ok((2048, 7168), 0, 16) and not fp8_shard_ok((2048, 7168), 0, 32)
