"""The memory fit (planning/memory.py): with config.json known (the model-config annotation) and
the device memory known (spec.worker.accelerator.memory or .product), a plan that cannot fit
never starts (Validated False, InsufficientMemory, a Warning Event once), one with under 10%
headroom is warned about once, and the workers get the device memory the operator checked."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from fake_cluster import NOW, SUMMARY, FakeCluster, cond, container, merge

from deepseek_operator.planning import Observed, names, plan
from deepseek_operator.planning.memory import weights_config
from dsworker.contract.fit import MEMORY_ENV

# DeepSeek-V3 / R1's public config.json (FP8 block 128), and the same checkpoint in BF16.
R1_FP8: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[2] / "data" / "deepseek-v3-config.json").read_text()
)
R1_BF16 = {k: v for k, v in R1_FP8.items() if k != "quantization_config"}
R1_W8A8 = {**R1_BF16, "quantize": "w8a8_dynamic"}  # MindIE msModelSlim W8A8

# R1 on one server of 8 NPUs with 64 GiB each.
ONE_SERVER: dict[str, Any] = {
    "apiVersion": "llm.dsop.io/v1alpha1",
    "kind": "DeepSeekDeployment",
    "metadata": {"name": "r1", "namespace": "llm", "uid": "uid-r1", "generation": 1},
    "spec": {
        "model": {"source": {"pvc": {"claimName": "models", "path": "DeepSeek-R1"}}},
        "parallelism": {"nodes": 1, "devicesPerNode": 8, "tp": 8, "moeEp": 8},
        "sharding": {"store": {"pvc": {"claimName": "shards"}}},
        "serving": {"maxSeqLen": 2560, "maxInputTokenLen": 2048, "maxBatchSize": 16},
        "worker": {"image": "reg/dsworker:1", "accelerator": {"type": "npu", "memory": "64Gi"}},
    },
}
# R1 W8A8 on two servers of 8 NPUs (dp 2 x tp 8, moeEp 16), with MTP.
TWO_SERVERS = {
    "spec": {
        "model": {"mtp": True},
        "parallelism": {"nodes": 2, "dp": 2, "moeEp": 16},
    }
}


def deployment(config: dict[str, Any], *patches: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(ONE_SERVER)
    for patch in patches:
        merge(body, patch)
    body["metadata"]["annotations"] = {names.MODEL_CONFIG_ANNOTATION: json.dumps(config)}
    return body


def reasons(result: Any) -> list[tuple[str, str]]:
    return [(e.type, e.reason) for e in result.events]


def test_r1_bf16_on_eight_64g_npus_does_not_fit_and_starts_nothing() -> None:
    cluster = FakeCluster(deployment(R1_BF16))
    first = cluster.step()
    assert first.phase == "Failed" and not first.apply and not first.delete
    validated = cond(first, "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "InsufficientMemory")
    text = validated["message"]
    # The numbers (weights, KV, total against the device) and the fix.
    assert "the plan does not fit: per rank: weights 158.1 GiB + KV" in text
    assert "against 64.0 GiB of device memory" in text
    assert "use more ranks (tp / moeEp), a quantised format (fp8, w8a8, w8a16)" in text
    assert "spec.worker.accelerator.memory 64Gi" in text
    assert ("Warning", "InsufficientMemory") in reasons(first)
    assert cond(first, "Sharded")["status"] == "Unknown"
    again = cluster.step()
    assert again.phase == "Failed" and not again.apply and again.events == []


def test_r1_w8a8_on_two_servers_fits_and_the_workers_get_the_device_memory() -> None:
    cluster = FakeCluster(deployment(R1_W8A8, TWO_SERVERS))
    first = cluster.step()
    assert first.phase == "Sharding"
    validated = cond(first, "Validated")
    assert (validated["status"], validated["reason"]) == ("True", "Valid"), validated
    assert not [r for r in reasons(first) if r[1] in ("InsufficientMemory", "LowMemoryHeadroom")]
    cluster.finish_job(cluster.job(), message=json.dumps(SUMMARY))
    cluster.step()
    env = container(cluster.sts(), "engine")["env"]
    assert {"name": MEMORY_ENV, "value": "64"} in env


def test_a_quantised_plan_that_does_not_fit_is_told_ranks_not_a_format() -> None:
    result = plan(deployment(R1_W8A8), Observed(now=NOW))
    text = cond(result, "Validated")["message"]
    assert "weights 79.8 GiB" in text and "use more ranks (tp / moeEp), or a smaller" in text
    assert "quantised format" not in text


def test_under_ten_percent_headroom_is_a_warning_posted_once() -> None:
    # 96 sequences of 4096 positions over dp 2: 13 GiB of KV per rank beside 43 GiB of weights.
    serving = {"maxSeqLen": 4096, "maxInputTokenLen": 3072, "maxBatchSize": 96}
    cluster = FakeCluster(deployment(R1_W8A8, TWO_SERVERS, {"spec": {"serving": serving}}))
    first = cluster.step()
    assert first.phase == "Sharding"
    validated = cond(first, "Validated")
    assert (validated["status"], validated["reason"]) == ("True", "ValidWithWarnings")
    assert "under 10% of device memory is left over, fits: per rank" in validated["message"]
    assert "(4% headroom)" in validated["message"]
    warned = [e for e in first.events if e.reason == "LowMemoryHeadroom"]
    assert [e.type for e in warned] == ["Warning"] and "4% headroom" in warned[0].message
    assert [e for e in cluster.step().events if e.reason == "LowMemoryHeadroom"] == []


def test_the_product_gives_the_device_memory() -> None:
    patch = {"spec": {"worker": {"accelerator": {"memory": None, "product": "ascend-910b4"}}}}
    body = deployment(R1_W8A8, TWO_SERVERS, patch)
    result = plan(body, Observed(now=NOW))
    validated = cond(result, "Validated")
    assert validated["reason"] == "InsufficientMemory"
    assert "against 32.0 GiB" in validated["message"]
    assert "spec.worker.accelerator.product ascend-910b4" in validated["message"]


def test_without_device_memory_the_operator_leaves_the_check_to_the_worker() -> None:
    body = deployment(R1_BF16, {"spec": {"worker": {"accelerator": {"memory": None}}}})
    result = plan(body, Observed(now=NOW))
    assert result.phase == "Sharding" and cond(result, "Validated")["reason"] == "Valid"
    cluster = FakeCluster(body)
    cluster.step()
    cluster.finish_job(cluster.job(), message=json.dumps(SUMMARY))
    cluster.step()
    env = container(cluster.sts(), "engine")["env"]
    assert MEMORY_ENV not in [e["name"] for e in env]


def test_weights_are_counted_as_the_workers_hold_them() -> None:
    # dequantizeFp8 shards BF16; W8A8 named by the spec or a description file counts as 8-bit.
    assert "quantization_config" not in weights_config(R1_FP8, "fp8", dequantize_fp8=True)
    assert weights_config(R1_FP8, "fp8", dequantize_fp8=False) == R1_FP8
    assert weights_config(R1_BF16, "w8a8", dequantize_fp8=False)["quantize"] == "w8a8"
    assert weights_config(R1_BF16, "bf16", dequantize_fp8=False) == R1_BF16
    w8a16 = weights_config(R1_BF16, "w8a16", dequantize_fp8=False)
    assert w8a16["quantization_config"]["quant_method"] == "compressed-tensors"


def test_dequantized_fp8_is_refused_where_fp8_fits() -> None:
    acc = {"type": "gpu", "memory": None, "product": "nvidia-h100"}
    gpu = {"spec": {"worker": {"accelerator": acc}}}
    fp8 = plan(deployment(R1_FP8, TWO_SERVERS, gpu), Observed(now=NOW))
    assert cond(fp8, "Validated")["status"] == "True", cond(fp8, "Validated")
    dequantized = {"spec": {"model": {"dequantizeFp8": True}}}
    bf16 = plan(deployment(R1_FP8, TWO_SERVERS, gpu, dequantized), Observed(now=NOW))
    assert cond(bf16, "Validated")["reason"] == "InsufficientMemory"
    assert "against 80.0 GiB" in cond(bf16, "Validated")["message"]


def test_the_workers_read_the_device_memory_the_operator_checked() -> None:
    from deepseek_operator.api import parse_deployment
    from deepseek_operator.planning.objects.engine_config import device_memory_gib

    for memory, expected in (("64Gi", 64 * 2**30), ("80G", 80 * 10**9), ("1.5Ti", 1536 * 2**30)):
        body = deployment(R1_W8A8, {"spec": {"worker": {"accelerator": {"memory": memory}}}})
        gib = device_memory_gib(parse_deployment(body).deployment.spec)
        assert gib is not None and abs(float(gib) * 2**30 - expected) < 2**10, (memory, gib)
