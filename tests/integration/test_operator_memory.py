"""The memory fit through a real API server and the operator (issue 17): DeepSeek-R1 in BF16 on
one server of 8 x 64 GB NPUs is refused before any Job (Validated False InsufficientMemory and a
Warning Event); the W8A8 plan on 2 x 8 fits and shards; serving limits that leave under 10%
headroom are a LowMemoryHeadroom Warning Event."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Dsd, OperatorProcess
from deepseek_operator.planning import names

pytestmark = pytest.mark.integration

R1_FP8: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[1] / "data" / "deepseek-v3-config.json").read_text()
)
R1_BF16 = {k: v for k, v in R1_FP8.items() if k != "quantization_config"}
R1_W8A8 = {**R1_BF16, "quantize": "w8a8_dynamic"}


def r1(name: str, config: dict[str, Any], parallelism: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "llm.dsop.io/v1alpha1",
        "kind": "DeepSeekDeployment",
        "metadata": {
            "name": name,
            "annotations": {names.MODEL_CONFIG_ANNOTATION: json.dumps(config)},
        },
        "spec": {
            "model": {"source": {"pvc": {"claimName": "models", "path": "DeepSeek-R1"}}},
            "parallelism": parallelism,
            "sharding": {"store": {"pvc": {"claimName": "shards"}}},
            "serving": {"maxSeqLen": 2560, "maxInputTokenLen": 2048, "maxBatchSize": 16},
            "worker": {"image": "dsworker:test", "accelerator": {"type": "npu", "memory": "64Gi"}},
        },
    }


def warnings(dsd: Dsd, name: str, reason: str) -> list[Any]:
    return [e for e in dsd.events(name) if e.reason == reason and e.type == "Warning"]


def test_r1_bf16_on_eight_64g_npus_is_refused_until_the_devices_hold_it(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    dsd.create(r1("bf16", R1_BF16, {"nodes": 1, "devicesPerNode": 8, "tp": 8, "moeEp": 8}))
    status = dsd.wait_phase("bf16", "Failed")
    validated = dsd.condition("bf16", "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "InsufficientMemory")
    for text in (
        "the plan does not fit: per rank: weights 158.1 GiB + KV",
        "against 64.0 GiB of device memory",
        "use more ranks (tp / moeEp), a quantised format (fp8, w8a8, w8a16)",
    ):
        assert text in validated["message"] and text in status["message"]
    event = dsd.wait(
        "InsufficientMemory event", lambda: warnings(dsd, "bf16", "InsufficientMemory")
    )
    assert "weights 158.1 GiB" in event[0].message
    time.sleep(1)
    assert dsd.jobs() == [] and dsd.apps.list_namespaced_stateful_set(dsd.namespace).items == []
    # Devices that hold it (say the spec was wrong about them): the same object goes on to shard.
    dsd.patch_spec("bf16", {"worker": {"accelerator": {"memory": "192Gi"}}})
    dsd.wait("the sharding Job", lambda: dsd.jobs("sharder"))
    dsd.wait("Validated True", lambda: dsd.condition("bf16", "Validated").get("status") == "True")


def test_r1_w8a8_on_two_servers_fits_and_tight_limits_warn(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    dsd.create(r1("w8a8", R1_W8A8, {"nodes": 2, "devicesPerNode": 8, "dp": 2, "moeEp": 16}))
    dsd.wait("the sharding Job", lambda: dsd.jobs("sharder"))
    validated = dsd.wait("Validated", lambda: dsd.condition("w8a8", "Validated"))
    assert (validated["status"], validated["reason"]) == ("True", "Valid"), validated
    assert warnings(dsd, "w8a8", "LowMemoryHeadroom") == []
    # 96 sequences of 4096 over dp 2: 13 GiB of KV beside 42 GiB of weights, 6% left over.
    serving = {"maxSeqLen": 4096, "maxInputTokenLen": 3072, "maxBatchSize": 96}
    dsd.patch_spec("w8a8", {"serving": serving})
    event = dsd.wait("LowMemoryHeadroom event", lambda: warnings(dsd, "w8a8", "LowMemoryHeadroom"))
    assert "(6% headroom)" in event[0].message
    validated = dsd.condition("w8a8", "Validated")
    assert validated["reason"] == "ValidWithWarnings" and "6% headroom" in validated["message"]
    assert dsd.status("w8a8")["phase"] != "Failed"
