"""contract.precision: which linear modules a quantised checkpoint keeps in float.

The matching rules are checked against the cases recorded from the formats' own tools
(tests/data/formats/quant_precision.json); the rest covers what the engine adds on top: formats,
fused weights, malformed lists and descriptions, and the operator's view through fit_inputs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from dsworker.contract.errors import CheckpointError
from dsworker.contract.layout import ParallelPlan
from dsworker.contract.memory import MODULE_LISTS_MAX_CHARS, fit_inputs, weight_bytes
from dsworker.contract.model_config import ModelConfigError
from dsworker.contract.precision import QuantDescription, matching, module_precision
from dsworker.contract.quant import QuantFormat
from dsworker.tools.synth_presets import make_config, quant_config

RECORDED = json.loads(
    (Path(__file__).parents[2] / "data" / "formats" / "quant_precision.json").read_text()
)
FP8 = {"quant_method": "fp8", "weight_block_size": [128, 128]}


def _fp8(**qc: Any) -> dict[str, Any]:
    return {"quantization_config": FP8 | qc}


def _ct(**qc: Any) -> dict[str, Any]:
    base = quant_config("w8a16")
    assert base is not None
    return {"quantization_config": base | qc}


@pytest.mark.parametrize("case", RECORDED["compressed_tensors"]["cases"], ids=str)
def test_compressed_tensors_rule(case: dict[str, Any]) -> None:
    prec = module_precision(_ct(ignore=[case["pattern"]]))
    assert prec.quantised(case["module"]) is not case["matches"]
    assert (matching([case["pattern"]], [case["module"]]) == [case["module"]]) is case["matches"]


@pytest.mark.parametrize("case", RECORDED["fp8_modules_to_not_convert"]["cases"], ids=str)
@pytest.mark.parametrize("key", ["modules_to_not_convert", "ignored_layers"])
def test_transformers_rule(case: dict[str, Any], key: str) -> None:
    prec = module_precision(_fp8(**{key: [case["pattern"]]}))
    assert prec.quantised(case["module"]) is not case["matches"]
    if case["matches"]:
        assert f"quantization_config.{key}[0] {case['pattern']!r}" == prec.why_float(case["module"])


@pytest.mark.parametrize("case", RECORDED["msmodelslim_description"]["cases"], ids=str)
def test_msmodelslim_rule(case: dict[str, Any]) -> None:
    entries = RECORDED["msmodelslim_description"]["sample"] | case.get("entries", {})
    desc = QuantDescription("/m/quant_model_description_w8a8_dynamic.json", entries)
    prec = module_precision({"quantize": "w8a8_dynamic"}, desc)
    assert prec.quantised(case["module"]) is case["quantised"]
    if not case["quantised"]:
        assert "quant_model_description_w8a8_dynamic.json" in (prec.why_float(case["module"]) or "")


def test_recorded_samples_parse() -> None:
    ct = RECORDED["compressed_tensors"]["sample_quantization_config"]
    prec = module_precision({"quantization_config": ct})
    assert prec.fmt == QuantFormat("w8a16")
    assert not prec.quantised("model.layers.4.self_attn.q_b_proj")
    assert not prec.quantised("model.layers.4.mlp.shared_experts.up_proj")
    assert prec.quantised("model.layers.4.mlp.experts.7.up_proj")
    fp8 = RECORDED["fp8_modules_to_not_convert"]["sample_quantization_config"]
    prec = module_precision({"quantization_config": fp8})
    assert prec.fmt == QuantFormat("fp8")
    assert [prec.quantised(f"model.layers.{i}.self_attn.kv_b_proj") for i in (0, 61)] == [
        False,
        False,
    ]
    assert not prec.quantised("model.layers.1.mlp.shared_experts.gate_proj")
    assert prec.quantised("model.layers.2.mlp.shared_experts.gate_proj")
    assert prec.quantised("model.layers.1.self_attn.o_proj")


def test_weight_packed_entries_and_float_config() -> None:
    desc = QuantDescription("d.json", {"a.weight_packed": "W8A16", "b.weight_packed": "FLOAT"})
    prec = module_precision({"quantize": "w8a8"}, desc)
    assert prec.quantised("a") and not prec.quantised("b")
    bf16 = module_precision({}, desc)  # no format declared: everything float, file unused
    assert bf16.fmt is None and not bf16.quantised("a") and bf16.description is None


def test_targets_limit_the_quantised_modules() -> None:
    base = quant_config("w8a16")
    assert base is not None
    group = base["config_groups"]["group_0"] | {"targets": [r"re:.*mlp\.experts\..*"]}
    prec = module_precision({"quantization_config": base | {"config_groups": {"g": group}}})
    assert prec.quantised("model.layers.3.mlp.experts.0.down_proj")
    assert not prec.quantised("model.layers.3.self_attn.o_proj")
    assert "config_groups target" in (prec.why_float("model.layers.3.self_attn.o_proj") or "")


def test_fused_weights_take_one_precision() -> None:
    prec = module_precision(_ct(ignore=[r"re:model\.layers\.1\.mlp\.experts\.3\.gate_proj$"]))
    both = ["model.layers.1.mlp.experts.2.gate_proj", "model.layers.2.mlp.experts.3.gate_proj"]
    assert prec.stack_format(both, "x") == QuantFormat("w8a16")
    alone = ["model.layers.1.mlp.experts.3.gate_proj"]
    assert prec.stack_format(alone, "x") is None
    with pytest.raises(ModelConfigError, match=r"experts\.\*: 1 of 2 weights .*ignore\[0\]"):
        prec.stack_format([*alone, both[0]], "model.layers.1.mlp.experts.*")


def test_the_model_refuses_a_split_expert_stack() -> None:
    from dsworker.model import DeepseekModel, EngineOptions, ModelArgs
    from dsworker.parallel.groups import build_groups

    cfg = make_config("v3", "tiny", "w8a16", False, None)
    cfg["quantization_config"] = quant_config("w8a16") | {
        "ignore": ["model.layers.2.mlp.experts.5.down_proj"]
    }
    args = ModelArgs.from_config(cfg)
    assert args.linear_format("model.layers.2.mlp.experts.4.down_proj") == args.quant
    with pytest.raises(ModelConfigError, match=r"model\.layers\.2\.mlp\.experts\.\*\.down_proj"):
        DeepseekModel(args, build_groups(ParallelPlan(1, 1, 1, 1, 1), 0, "gloo"), EngineOptions())


@pytest.mark.parametrize(
    ("qc", "key"),
    [
        ({"ignore": "lm_head"}, "quantization_config.ignore"),
        ({"ignore": ["re:(unclosed"]}, "quantization_config.ignore[0]"),
        ({"modules_to_not_convert": ["a", "b[", "c"]}, "modules_to_not_convert[1]"),
        ({"ignored_layers": [1]}, "quantization_config.ignored_layers"),
    ],
)
def test_malformed_lists_are_refused_naming_the_key(qc: dict[str, Any], key: str) -> None:
    with pytest.raises(ModelConfigError) as e:
        module_precision(_ct(**qc), where="/m/config.json")
    assert e.value.key == key and "/m/config.json" in str(e.value)


def test_malformed_description_is_refused_naming_the_file() -> None:
    for entries in ({"x.weight": 8}, ["not", "an", "object"]):
        with pytest.raises(CheckpointError, match=r"/m/quant_model_description\.json"):
            module_precision({"quantize": "w8a8"}, QuantDescription("/m/quant_model_description.json", entries))  # type: ignore[arg-type]  # fmt: skip


def test_fit_inputs_carry_the_module_lists_the_operator_counts() -> None:
    """The sharder's report keeps config.json's lists: the fit from it equals the full config's,
    and differs from the fit without them."""
    cfg = make_config("v3", "tiny", "w8a16", False, None)
    cfg["quantization_config"] = quant_config("w8a16") | {"ignore": ["re:.*self_attn.*"]}
    plan = ParallelPlan(2, 1, 2, 2, 1)
    small = fit_inputs(cfg)
    assert small["quantization_config"]["ignore"] == ["re:.*self_attn.*"]
    full = weight_bytes(cfg, plan)
    assert weight_bytes(small, plan) == full
    plain = {**cfg, "quantization_config": quant_config("w8a16")}
    assert weight_bytes(plain, plan).shard[0] < full.shard[0]
    long = [f"model.layers.{i}.self_attn.o_proj.xxxxxxxxxxxxxxxxxx" for i in range(60)]
    cfg["quantization_config"]["ignore"] = long
    assert len(json.dumps(long)) > MODULE_LISTS_MAX_CHARS
    assert "ignore" not in fit_inputs(cfg)["quantization_config"]  # too long for the report


def test_description_types_pick_static_or_dynamic_per_module() -> None:
    """msModelSlim's DeepSeek mix: "W8A8" attention is static, "W8A8_DYNAMIC" MLPs dynamic."""
    desc = QuantDescription("/m/d.json", {
        "model.layers.0.self_attn.o_proj.weight": "W8A8",
        "model.layers.1.mlp.experts.0.up_proj.weight": "W8A8_DYNAMIC",
        "model.layers.1.mlp.experts.0.gate_proj.weight": "W8A8_DYNAMIC",
        "model.layers.0.self_attn.kv_b_proj.weight": "FLOAT",
    })  # fmt: skip
    prec = module_precision({"quantize": "w8a8_dynamic"}, desc)
    assert prec.format_of("model.layers.0.self_attn.o_proj") == QuantFormat("w8a8_static")
    up = "model.layers.1.mlp.experts.0.up_proj"
    assert prec.format_of(up) == QuantFormat("w8a8")
    assert prec.format_of("model.layers.0.self_attn.kv_b_proj") is None
    assert prec.stack_format([up, up.replace("up", "gate")], "x") == QuantFormat("w8a8")


def test_static_mlp_weights_are_refused_naming_the_module() -> None:
    desc = QuantDescription("/m/d.json", {
        "model.layers.0.mlp.gate_proj.weight": "W8A8",
        "model.layers.0.mlp.up_proj.weight": "W8A8",
        "model.layers.1.mlp.shared_experts.down_proj.weight": "W8A8",
    })  # fmt: skip
    prec = module_precision({"quantize": "w8a8_dynamic"}, desc)
    gate_up = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    with pytest.raises(ModelConfigError, match=r"model\.layers\.0\.mlp\.gate_proj is static"):
        prec.stack_format(gate_up, "model.layers.0.mlp")
    from dsworker.model import ModelArgs

    cfg = make_config("v3", "tiny", "w8a8", False, None) | {"quantize": "w8a8_dynamic"}
    args = ModelArgs.from_config(cfg)
    args = dataclasses.replace(args, precision=prec)
    with pytest.raises(ModelConfigError, match=r"shared_experts\.down_proj is static W8A8"):
        args.mlp_formats("model.layers.1.mlp.shared_experts")
