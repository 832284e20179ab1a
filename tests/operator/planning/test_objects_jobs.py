"""The sharding Job the planner builds (planning/objects/jobs.py): `dsworker shard` with the
exact plan, and its placement with hostPath stores and checkpoints."""

from __future__ import annotations

import copy

from fake_cluster import (
    HOST_STORE,
    TWO_NODES,
    FakeCluster,
    arg,
    container,
)

from deepseek_operator.api import parse_deployment
from deepseek_operator.planning import fingerprint, names

NODE_AFFINITY = {
    "nodeAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 10, "preference": {"matchExpressions": [{"key": "a", "operator": "Exists"}]}}
        ]
    }
}


def test_sharding_job_runs_the_plan() -> None:
    result = FakeCluster(TWO_NODES).step()
    fp = result.status.fingerprint
    job = next(o for o in result.apply if o["kind"] == "Job")
    shard = container(job, "shard")
    assert shard["command"] == ["dsworker"]
    assert shard["args"] == [
        "shard",
        "--model-path",
        "/source/DeepSeek-R1",
        "--save-directory",
        f"/store/{fp[:16]}",
        "--world-size",
        "16",
        "--dp",
        "2",
        "--tp",
        "8",
        "--moe-tp",
        "4",
        "--moe-ep",
        "4",
        "--mtp",
        "--processes",
        "8",
        "--fingerprint",
        fp,
        "--expect-architecture",
        "DeepseekV3",
        "--expect-quantization",
        "auto",
        "--max-seq-len",
        "2560",
    ]
    assert shard["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert shard["image"] == "reg/dsworker:1"
    spec = job["spec"]
    assert spec["backoffLimit"] == 2 and spec["activeDeadlineSeconds"] == 21600
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["source"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert volumes["store"]["persistentVolumeClaim"] == {"claimName": "shards"}
    assert "nodeSelector" not in pod  # a pvc store: the Job may run anywhere
    assert job["metadata"]["annotations"][names.GENERATION_ANNOTATION] == "1"


def test_host_path_store_pins_the_job_and_loads_in_place() -> None:
    cluster = FakeCluster(HOST_STORE)
    ready = cluster.until_ready()
    # No spec.model.name: the served name (and the Model column) falls back to metadata.name.
    assert ready.status.model_name == "tiny"
    fp = cluster.fp()
    job = cluster.job("tiny-shard")
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/hostname": "n1"}
    assert pod["tolerations"] == [{"key": "k", "operator": "Exists"}]
    store = next(v for v in pod["volumes"] if v["name"] == "store")
    assert store["hostPath"] == {"path": "/dev/shm/dsd", "type": "DirectoryOrCreate"}
    sts = cluster.sts()
    spec = sts["spec"]["template"]["spec"]
    assert "initContainers" not in spec
    engine = container(sts, "engine")
    assert arg(engine["args"], "--model") == f"/store/{fp[:16]}"
    assert spec["nodeSelector"] == {"kubernetes.io/hostname": "n1"}
    # cpu: no device request at all
    assert "resources" not in engine
    assert cluster.body["status"]["phase"] == "Ready"


def test_host_path_checkpoint_places_the_job_like_the_workers() -> None:
    """The checkpoint is on the workers' nodes, perhaps on no other: a pvc store does not matter."""
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["model"]["source"] = {"hostPath": {"path": "/models/r1"}}
    body["spec"]["worker"].update(
        nodeSelector={"dsop.io/accelerator": "npu"},
        tolerations=[{"key": "npu", "operator": "Exists"}],
        affinity=NODE_AFFINITY,
    )
    cluster = FakeCluster(body)
    cluster.step()
    pod = cluster.job()["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"dsop.io/accelerator": "npu"}
    assert pod["tolerations"] == [{"key": "npu", "operator": "Exists"}]
    assert pod["affinity"] == NODE_AFFINITY
    source = next(v for v in pod["volumes"] if v["name"] == "source")
    assert source["hostPath"]["path"] == "/models/r1"
    # A pvc checkpoint and a pvc store: the Job may run anywhere.
    plain = FakeCluster(TWO_NODES)
    plain.step()
    assert "nodeSelector" not in plain.job()["spec"]["template"]["spec"]


def test_fingerprint_is_what_the_job_is_named_after() -> None:
    spec = parse_deployment(TWO_NODES).deployment.spec
    fp = fingerprint(spec, owner="llm/r1")
    result = FakeCluster(TWO_NODES).step()
    assert result.status.fingerprint == fp
