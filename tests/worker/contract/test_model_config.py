"""config.json parsed once (dsworker.contract.model_config): real configs pass, and every malformed
value, however nested, is a ModelConfigError naming the key, never a TypeError, a ZeroDivisionError
or a RecursionError."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dsworker.contract.errors import INVALID_MODEL_CONFIG, CheckpointError, PlanError
from dsworker.contract.layout import ModelDims, ParallelPlan, check_plan
from dsworker.contract.model_config import ModelConfigError, parse_model_config
from dsworker.tools.synth_presets import make_config

V3 = json.loads(
    (Path(__file__).resolve().parents[2] / "data" / "deepseek-v3-config.json").read_text()
)
TINY_V3 = make_config("v3", "tiny", "bf16", mtp=True)


def test_the_public_v3_config_parses() -> None:
    mc = parse_model_config(V3)
    assert mc.architecture == "DeepseekV3" and mc.fp8_block == (128, 128)
    assert (mc.n_group, mc.topk_group, mc.require("num_experts_per_tok")) == (8, 4, 8)
    assert mc.topk_method == "noaux_tc" and mc.scoring_func == "sigmoid"
    assert mc.dims == ModelDims.from_config(V3) and mc.dims.n_routed_experts == 256
    assert mc.raw == V3  # everything else passes through for hashing and copying


def _with(cfg: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of cfg with the dotted `path` set to value (intermediate objects created)."""
    out = json.loads(json.dumps(cfg))
    node = out
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {}) if isinstance(node.get(key), dict | None) else node
    node[last] = value
    return out


BAD_VALUES: list[tuple[str, Any]] = [
    ("hidden_size", "7168"),
    ("hidden_size", -4),
    ("hidden_size", 0),
    ("hidden_size", True),
    ("hidden_size", 7168.0),
    ("vocab_size", 1 << 40),
    ("num_attention_heads", None),
    ("architectures", 5),
    ("architectures", [1]),
    ("model_type", ["deepseek_v3"]),
    ("first_k_dense_replace", -1),
    ("num_nextn_predict_layers", "1"),
    ("moe_layer_freq", 0),
    ("n_group", 0),
    ("n_group", 3),  # does not divide the 256 experts
    ("topk_group", 16),  # more groups kept than there are
    ("num_experts_per_tok", 1000),
    ("topk_method", "top1"),
    ("scoring_func", 7),
    ("norm_topk_prob", "yes"),
    ("tie_word_embeddings", 1),
    ("rms_norm_eps", -1e-6),
    ("eos_token_id", "</s>"),
    ("eos_token_id", [1, "2"]),
    ("kv_lora_rank", [512]),
    ("quantization_config", [1]),
    ("quantization_config", "fp8"),
    ("quantization_config.weight_block_size", [0, 128]),  # a zero divisor
    ("quantization_config.weight_block_size", "128x128"),
    ("quantization_config.weight_block_size", [128]),
    ("quantization_config.quant_method", {"fp8": True}),
    ("quantization_config.modules_to_not_convert", "lm_head"),
    ("quantization_config.config_groups", [1]),
    ("quantization_config.config_groups.g.weights.num_bits", "8"),
    ("quantization_config.config_groups.g.weights.num_bits", None),
    ("quantization_config.config_groups.g.weights.group_size", "128"),
    ("rope_scaling", [1, 2]),
    ("rope_scaling.type", "linear"),
    ("rope_scaling.factor", "40"),
    ("rope_scaling.factor", float("nan")),
    ("rope_scaling.original_max_position_embeddings", -1),
    ("rope_scaling.mscale", {}),
    ("rope_theta", "1e4"),
    ("max_position_embeddings", 0),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES])
def test_a_malformed_value_is_refused_naming_its_key(key: str, value: Any) -> None:
    cfg = _with(V3, key, value)
    with pytest.raises(ModelConfigError) as ei:
        parse_model_config(cfg, "annotations[llm.dsop.io/model-config]")
    e = ei.value
    assert key in str(e) and e.key in (key, key.rsplit(".", 1)[0]), (e.key, str(e))
    assert str(e).startswith("annotations[llm.dsop.io/model-config]: ") and "\n" not in str(e)
    # what every caller already catches: the operator PlanError, the tools CheckpointError
    assert isinstance(e, PlanError) and isinstance(e, CheckpointError)
    assert e.reason == INVALID_MODEL_CONFIG and e.exit_code == 2
    with pytest.raises(PlanError, match=key.split(".")[0]):
        ModelDims.from_config(cfg)  # the operator's entry point


def test_the_engine_names_a_size_it_needs_and_the_split_rules_do_not() -> None:
    bare = {k: v for k, v in TINY_V3.items() if k != "kv_lora_rank"}
    assert check_plan(ModelDims.from_config(bare), ParallelPlan(1, 1, 1, 1, 1)) == []
    with pytest.raises(ModelConfigError, match="missing kv_lora_rank, which the engine needs"):
        parse_model_config(bare).require("kv_lora_rank")


def test_nesting_deep_enough_to_crash_a_recursive_reader_is_refused_naming_the_path() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(100_000):  # far past the interpreter's recursion limit
        node["x"] = {}
        node = node["x"]
    with pytest.raises(ModelConfigError, match=r"rope_scaling\.x\.x\.x.* nests deeper than 16"):
        parse_model_config({**V3, "rope_scaling": deep})
    text = '{"hidden_size": ' + "[" * 200_000 + "]" * 200_000 + "}"
    with pytest.raises(ModelConfigError, match="nested too deeply"):
        parse_model_config(text)


def test_text_with_a_key_given_twice_or_that_is_not_an_object_is_refused() -> None:
    text = json.dumps(V3)[:-1] + ', "hidden_size": 1}'
    with pytest.raises(ModelConfigError, match="duplicate key 'hidden_size'"):
        parse_model_config(text)
    with pytest.raises(ModelConfigError, match="not a JSON object"):
        parse_model_config("[1, 2]")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        parse_model_config("{nope")
    assert parse_model_config(json.dumps(V3)).dims == ModelDims.from_config(V3)


def test_plan_record_round_trips_and_names_a_missing_field() -> None:
    plan = ParallelPlan(16, 2, 8, 4, 4)
    rec = plan.record(mtp=True, quantization="fp8", dequantized=False)
    assert rec == {
        "worldSize": 16,
        "dp": 2,
        "tp": 8,
        "moeTp": 4,
        "moeEp": 4,
        "mtp": True,
        "quantization": "fp8",
        "dequantized": False,
    }
    assert ParallelPlan.from_record(rec) == plan and "mtp" not in plan.record()
    with pytest.raises(PlanError, match="moeEp"):
        ParallelPlan.from_record({k: v for k, v in rec.items() if k != "moeEp"})
