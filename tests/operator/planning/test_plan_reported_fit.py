"""The memory fit from the sharding Job's report (issue 17): without the model-config annotation,
the config.json the sharder read (status.shards.modelConfig) is checked before any worker starts:
a plan that does not fit is Validated False InsufficientMemory, with no StatefulSet."""

from __future__ import annotations

import copy
import json
from typing import Any

from fake_cluster import SUMMARY, FakeCluster, cond, merge
from test_plan_memory import ONE_SERVER, R1_BF16, R1_W8A8, TWO_SERVERS, reasons

from dsworker.contract.fit import check_fit
from dsworker.contract.layout import ParallelPlan
from dsworker.contract.memory import fit_inputs


def unannotated(*patches: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(ONE_SERVER)
    for patch in patches:
        merge(body, patch)
    return body


def sharded(cluster: FakeCluster, config: dict[str, Any], quantization: str) -> Any:
    cluster.step()
    report = SUMMARY | {"modelConfig": fit_inputs(config), "quantization": quantization}
    cluster.finish_job(cluster.job(), message=json.dumps(report))
    return cluster.step()


def test_a_reported_model_that_does_not_fit_starts_no_worker() -> None:
    cluster = FakeCluster(unannotated())
    first = cluster.step()
    assert cond(first, "Validated")["status"] == "True"  # nothing known yet: it shards
    result = sharded(cluster, R1_BF16, "bf16")
    validated = cond(result, "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "InsufficientMemory")
    assert "the plan does not fit: per rank: weights 158.1 GiB + KV" in validated["message"]
    assert "config.json as the sharding Job read it" in validated["message"]
    assert result.phase == "Failed" and result.status.message == validated["message"]
    assert cond(result, "Sharded")["reason"] == "ShardsComplete"
    assert not any(k == "StatefulSet" for k, _ in cluster.objects)
    assert ("Warning", "InsufficientMemory") in reasons(result)
    assert result.status.shards is not None and result.status.shards.quantization == "bf16"
    # The sharder's pod garbage-collected: the status remembers the model, and says it once.
    cluster.pods.clear()
    again = cluster.step()
    assert cond(again, "Validated")["reason"] == "InsufficientMemory"
    assert ("Warning", "InsufficientMemory") not in reasons(again)
    assert not any(k == "StatefulSet" for k, _ in cluster.objects)
    # Devices that hold it: the workers start on the same shards.
    cluster.change_spec({"worker": {"accelerator": {"memory": "192Gi"}}})
    cluster.step()
    assert any(k == "StatefulSet" for k, _ in cluster.objects)


def test_node_local_shards_report_the_model_too() -> None:
    store = {"hostPath": {"path": "/dev/shm/dsd", "nodes": ["npu-a", "npu-b"]}}
    body = unannotated({"spec": {"parallelism": {"nodes": 2, "dp": 2, "moeEp": 16}}})
    body["spec"]["sharding"] = {"store": store}
    cluster = FakeCluster(body)
    cluster.step()
    report = SUMMARY | {"modelConfig": fit_inputs(R1_BF16), "quantization": "bf16"}
    for (kind, _), job in list(cluster.objects.items()):
        if kind == "Job":
            cluster.finish_job(job, message=json.dumps(report))
    result = cluster.step()
    validated = cond(result, "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "InsufficientMemory")
    assert not any(k == "StatefulSet" for k, _ in cluster.objects)


def test_a_reported_model_that_fits_starts_the_workers() -> None:
    cluster = FakeCluster(unannotated(TWO_SERVERS))
    result = sharded(cluster, R1_W8A8, "w8a8")
    assert cond(result, "Validated")["status"] == "True", cond(result, "Validated")
    assert any(k == "StatefulSet" for k, _ in cluster.objects)


def test_the_report_gives_the_same_fit_as_the_whole_config_and_is_small() -> None:
    plan = ParallelPlan(16, 2, 8, 1, 16)
    kw = {"max_seq_len": 2560, "max_batch_size": 16}
    fp8 = {**R1_BF16, "quantization_config": _FP8}
    for cfg in (R1_BF16, R1_W8A8, fp8, _FP8_MIXED):
        assert check_fit(fit_inputs(cfg), plan, 1 << 36, **kw) == check_fit(
            cfg, plan, 1 << 36, **kw
        )
        assert len(json.dumps(fit_inputs(cfg), separators=(",", ":"))) < 1024
    # the modules config.json keeps in BF16 count: more weights than all-FP8
    assert (
        check_fit(_FP8_MIXED, plan, 1 << 36, **kw).weights
        > check_fit(fp8, plan, 1 << 36, **kw).weights
    )


_FP8 = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
_FP8_MIXED = {
    **R1_BF16,
    "quantization_config": _FP8
    | {"modules_to_not_convert": ["model.layers.3.mlp.shared_experts", "kv_b_proj", "o_proj"]},
}
