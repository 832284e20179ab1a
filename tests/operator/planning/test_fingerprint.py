"""The fingerprint changes exactly when the shards on disk would."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from deepseek_operator.api import parse_deployment
from deepseek_operator.planning import fingerprint, fingerprint_inputs, names
from deepseek_operator.planning.fingerprint import config_hash
from dsworker.contract.layout import FORMAT

BASE: dict[str, Any] = {
    "apiVersion": "llm.dsop.io/v1alpha1",
    "kind": "DeepSeekDeployment",
    "metadata": {"name": "r1", "namespace": "llm"},
    "spec": {
        "model": {"source": {"pvc": {"claimName": "models", "path": "DeepSeek-R1"}}},
        "parallelism": {"nodes": 2, "devicesPerNode": 8},
        "sharding": {"store": {"pvc": {"storageClassName": "nfs", "size": "2Ti"}}},
    },
}


def fp(patch: dict[str, Any] | None = None, config: dict[str, Any] | None = None) -> str:
    body = copy.deepcopy(BASE)
    for path, value in (patch or {}).items():
        node = body["spec"]
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    result = parse_deployment(body)
    assert result.ok, result.errors
    assert result.deployment is not None
    return fingerprint(result.deployment.spec, config)


def test_stable_hex_and_covers_the_format() -> None:
    assert fp() == fp() and len(fp()) == 64 and int(fp(), 16) >= 0
    spec = parse_deployment(BASE).deployment.spec  # type: ignore[union-attr]
    inputs = fingerprint_inputs(spec)
    assert inputs["format"] == FORMAT
    assert inputs["plan"] == {"world_size": 16, "dp": 1, "tp": 16, "moe_tp": 1, "moe_ep": 16}


@pytest.mark.parametrize(
    "patch",
    [
        {"parallelism.tp": 8},
        {"parallelism.moeTp": 2},
        {"parallelism.nodes": 1},
        {"model.mtp": True},
        {"model.quantization": "bf16"},
        {"model.dequantizeFp8": True},
        {"model.source": {"pvc": {"claimName": "models", "path": "DeepSeek-V3"}}},
        {"model.source": {"hostPath": {"path": "/models/r1"}}},
        {"sharding.store": {"pvc": {"claimName": "other"}}},
        {"sharding.enabled": False, "sharding.store": None, "features.expertMerge": False},
    ],
    ids=lambda p: ",".join(p),
)
def test_changes_that_change_the_shards(patch: dict[str, Any]) -> None:
    assert fp(patch) != fp()


@pytest.mark.parametrize(
    "patch",
    [
        {"model.name": "DeepSeek-R1-prod"},
        {"serving.maxBatchSize": 8},
        {"serving.maxSeqLen": 8192},
        {"expertParallel.level": 2},
        {"worker.image": "reg/dsworker:2"},
        {"worker.restartBudget": 1},
        {"sharding.store": {"pvc": {"storageClassName": "nfs", "size": "3Ti"}}},
        {"sharding.processes": 2},
        {"sharding.backoffLimit": 9},
    ],
    ids=lambda p: ",".join(p),
)
def test_changes_that_keep_the_shards(patch: dict[str, Any]) -> None:
    assert fp(patch) == fp()


def test_the_model_config_counts_when_known() -> None:
    config = {"architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168}
    assert fp(config=config) != fp()
    assert fp(config=config) == fp(config=dict(reversed(list(config.items()))))
    assert fp(config={**config, "hidden_size": 1}) != fp(config=config)
    assert config_hash(None) is None


def test_names_derived_from_the_fingerprint() -> None:
    value = fp()
    assert names.shard_dir(value) == value[:16]
    assert names.shard_job("r1", value) == f"r1-shard-{value[:10]}"


def test_two_deployments_never_share_a_directory() -> None:
    spec = parse_deployment(BASE).deployment.spec  # type: ignore[union-attr]
    assert fingerprint(spec, owner="llm/a") != fingerprint(spec, owner="llm/b")
    assert fingerprint(spec, owner="llm/a") == fingerprint(spec, owner="llm/a")
