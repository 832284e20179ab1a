"""The engine config contract between the operator's ConfigMap and `dsworker serve`."""

from __future__ import annotations

import json

import pytest

from dsworker.contract.engine_config import (
    DEFAULT_BUFFER_SCALE_FACTORS,
    EngineConfig,
    EngineConfigError,
    load_engine_config,
    parse_engine_config,
)


def test_defaults_are_documented_values() -> None:
    cfg = load_engine_config(None)
    assert (cfg.maxSeqLen, cfg.maxInputTokenLen, cfg.port, cfg.ep_level) == (2560, 2048, 1025, 1)
    assert cfg.alltoall_ep_buffer_scale_factors == DEFAULT_BUFFER_SCALE_FACTORS


def test_unknown_keys_are_named() -> None:
    with pytest.raises(EngineConfigError, match="maxSeqLenn: unknown key"):
        parse_engine_config({"maxSeqLenn": 10})


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"maxInputTokenLen": 4096}, "maxInputTokenLen must be < maxSeqLen"),
        ({"worldSize": 4, "dp": 1, "tp": 2, "moe_ep": 4}, "dp*tp"),
        ({"worldSize": 2, "tp": 2, "moe_ep": 1}, "moe_tp*moe_ep"),
        ({"ep_level": 2, "enable_init_routing_cutoff": True}, "requires ep_level 1"),
        ({"alltoall_ep_buffer_scale_factors": [[0, 1.0], [10, 2.0]]}, "strictly descending"),
        ({"alltoall_ep_buffer_scale_factors": [[10, 0.0]]}, "factors > 0"),
        ({"topk_scaling_factor": 1.5}, "topk_scaling_factor"),
        ({"ep_level": 3}, "ep_level"),
    ],
)
def test_bad_values_rejected(data: dict, fragment: str) -> None:
    with pytest.raises(EngineConfigError, match=fragment.replace("*", r"\*")):
        parse_engine_config(data)


def test_buffer_factor_picks_first_threshold_not_above_seq_len() -> None:
    cfg = EngineConfig(alltoall_ep_buffer_scale_factors=[(8192, 5.2), (0, 8.0)])
    assert cfg.buffer_factor(9000) == 5.2
    assert cfg.buffer_factor(8192) == 5.2
    assert cfg.buffer_factor(100) == 8.0


def test_grouped_matmul_auto_above_32_experts_ranks() -> None:
    assert not EngineConfig(worldSize=32, tp=32, moe_ep=32).use_grouped_matmul
    assert EngineConfig(worldSize=64, tp=64, moe_ep=64).use_grouped_matmul
    assert EngineConfig(grouped_matmul="on").use_grouped_matmul


def test_file_round_trip(tmp_path) -> None:
    cfg = EngineConfig(worldSize=2, tp=2, moe_ep=2, ep_level=2, modelName="r1")
    path = tmp_path / "engine.json"
    path.write_text(cfg.to_json())
    assert load_engine_config(path) == cfg
    path.write_text("{not json")
    with pytest.raises(EngineConfigError, match="not valid JSON"):
        load_engine_config(path)
    with pytest.raises(EngineConfigError, match="not found"):
        load_engine_config(tmp_path / "missing.json")
    assert json.loads(cfg.to_json())["ep_level"] == 2
