"""The engine config ConfigMap (planning/objects/engine_config.py): the plan and the decode-step
switches, in the names the worker reads."""

from __future__ import annotations

import copy
from typing import Any

from fake_cluster import (
    TWO_NODES,
    FakeCluster,
)

from deepseek_operator.api import parse_deployment
from deepseek_operator.planning import names, objects
from dsworker.contract.engine_config import EngineConfig


def test_engine_config_map_holds_the_plan() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    cm = cluster.objects[("ConfigMap", "r1-engine")]
    cfg = EngineConfig.model_validate_json(cm["data"]["engine.json"])
    assert (cfg.worldSize, cfg.dp, cfg.tp, cfg.moe_tp, cfg.moe_ep) == (16, 2, 8, 4, 4)
    assert cfg.modelName == "DeepSeek-R1" and cfg.mtp and cfg.device == "npu"
    assert cfg.grouped_matmul == "off" and cfg.ep_level == 1
    digest = cm["metadata"]["annotations"][names.ENGINE_CONFIG_ANNOTATION]
    template = cluster.sts()["spec"]["template"]["metadata"]["annotations"]
    assert template[names.ENGINE_CONFIG_ANNOTATION] == digest


def test_engine_config_map_carries_the_decode_step_switches() -> None:
    def config(body: dict[str, Any]) -> EngineConfig:
        dep = parse_deployment(body).deployment
        assert dep is not None
        return objects.engine_config(dep.spec)

    assert (config(TWO_NODES).cudaGraphs, config(TWO_NODES).torchCompile) == (True, False)
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["serving"] = {"cudaGraphs": False, "torchCompile": True}
    assert (config(body).cudaGraphs, config(body).torchCompile) == (False, True)
    assert (config(body).mtp, config(body).num_speculative_tokens) == (True, 1)
    body["spec"]["serving"]["speculativeTokens"] = 3
    assert (config(body).mtp, config(body).num_speculative_tokens) == (True, 3)
    assert config(body).cacheBlockSize == 128
    body["spec"]["serving"]["cacheBlockSize"] = 64
    assert config(body).cacheBlockSize == 64
    assert config(body).prefixCaching
    body["spec"]["serving"]["prefixCaching"] = False
    assert not config(body).prefixCaching
    assert config(body).reasoningParser is None
    body["spec"]["serving"]["reasoningParser"] = "deepseek_r1"
    assert config(body).reasoningParser == "deepseek_r1"
    assert config(body).toolCallParser is None
    body["spec"]["serving"]["toolCallParser"] = "deepseek_v3"
    assert config(body).toolCallParser == "deepseek_v3"
