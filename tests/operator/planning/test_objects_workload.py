"""The worker StatefulSet (planning/objects/workload.py): its shape, the staged bytes in the
memory request, the user's env merged in by name."""

from __future__ import annotations

import copy
import math

from fake_cluster import (
    NPU,
    SUMMARY,
    TWO_NODES,
    FakeCluster,
    container,
)

from deepseek_operator.api import parse_deployment
from deepseek_operator.planning import names, objects


def test_the_ports_admission_reserves_are_the_pods_own() -> None:
    """spec.serving.port is refused at admission when it is the rendezvous port: the one the
    worker pods open besides the HTTP port."""
    from deepseek_operator.api.names import RENDEZVOUS_PORT
    from deepseek_operator.planning.objects.network import MASTER_PORT

    assert MASTER_PORT == RENDEZVOUS_PORT
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    (engine,) = cluster.sts()["spec"]["template"]["spec"]["containers"]
    assert {p["containerPort"] for p in engine["ports"]} == {1025, RENDEZVOUS_PORT}


def test_statefulset_shape() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    fp = cluster.fp()
    sts = cluster.sts()
    spec = sts["spec"]
    assert spec["replicas"] == 2
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["updateStrategy"] == {"type": "OnDelete"}
    assert spec["serviceName"] == "r1-ranks"
    assert spec["selector"]["matchLabels"] == {
        "app.kubernetes.io/instance": "r1",
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "deepseek-operator",
    }
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False

    stage = container(sts, "stage")
    assert stage["args"] == [
        "stage",
        "--store",
        f"/store/{fp[:16]}",
        "--dest",
        "/model",
        "--devices-per-node",
        "8",
    ]
    assert NPU not in stage["resources"].get("limits", {})
    engine = container(sts, "engine")
    assert engine["args"] == [
        "serve",
        "--model",
        "/model",
        "--config",
        "/etc/dsworker/engine.json",
        "--nproc-per-node",
        "8",
        "--nodes",
        "2",
        "--master-addr",
        "r1-worker-0.r1-ranks.llm.svc",
        "--master-port",
        "29500",
        "--port",
        "1025",
    ]
    # The staged shards live in memory too: added to the memory request (no limit is set).
    staged = objects.staged_bytes(parse_deployment(TWO_NODES).deployment.spec, SUMMARY["bytes"])
    memory = f"{math.ceil((900 * (1 << 30) + staged) / (1 << 20))}Mi"
    assert engine["resources"] == {
        "requests": {"memory": memory, NPU: "8"},
        "limits": {NPU: "8"},
    }
    for c in (stage, engine):
        ctx = c["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert ctx["runAsNonRoot"] is True
    env = {e["name"]: e for e in engine["env"]}
    assert env["DEEPSEEK_MTP"]["value"] == "1"
    assert env["HCCL_CONNECT_TIMEOUT"]["value"] == "1200"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = engine[probe]["exec"]["command"]
        assert command[:2] == ["python3", "-c"] and "/health" in command[2]
        assert command[4:] == ["r1-worker-0.r1-ranks.llm.svc", "1025"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    model = volumes["model"]["emptyDir"]
    assert model["medium"] == "Memory"
    # dp 2 x tp 8 on two 8-device pods: each pod holds a whole copy of attention (+5%, +1 GiB)
    expected = (64 * 10**9 * 1.05 + (1 << 30)) / (1 << 20)
    assert abs(int(model["sizeLimit"].removesuffix("Mi")) - expected) < 2
    assert volumes["store"]["persistentVolumeClaim"] == {"claimName": "shards", "readOnly": True}
    mounts = {m["name"]: m for m in engine["volumeMounts"]}
    assert mounts["tmp"]["mountPath"] == "/tmp" and "store" not in mounts
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations[names.FINGERPRINT_ANNOTATION] == fp


def test_staged_bytes_raise_the_memory_limit_the_user_set() -> None:
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["worker"]["resources"] = {"limits": {"memory": "1Ti"}}
    cluster = FakeCluster(body)
    cluster.until_ready()
    staged = objects.staged_bytes(parse_deployment(body).deployment.spec, SUMMARY["bytes"])
    size = container(cluster.sts(), "engine")["resources"]
    model = next(
        v for v in cluster.sts()["spec"]["template"]["spec"]["volumes"] if v["name"] == "model"
    )
    assert model["emptyDir"]["sizeLimit"] == f"{math.ceil(staged / (1 << 20))}Mi"
    both = f"{math.ceil(((1 << 40) + staged) / (1 << 20))}Mi"
    # The limit alone was also the request (Kubernetes' default): both grow by the staged bytes.
    assert size["limits"]["memory"] == both and size["requests"]["memory"] == both


def test_staged_bytes_is_the_pods_largest_share() -> None:
    body = copy.deepcopy(TWO_NODES)
    # dp 2 x tp 8: every pod holds a whole tensor-parallel group of attention.
    spec = parse_deployment(body).deployment.spec
    assert objects.staged_bytes(spec, 100 * 10**9) == int(100 * 10**9 * 1.05) + (1 << 30)
    # tp 16: attention, experts and vocabulary all split in two halves over the pods.
    body["spec"]["parallelism"].update(dp=1, tp=16)
    spec = parse_deployment(body).deployment.spec
    assert objects.staged_bytes(spec, 100 * 10**9) == int(100 * 10**9 * 0.5 * 1.05) + (1 << 30)


def test_user_env_replaces_the_operators_by_name() -> None:
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["worker"]["env"] = [
        {"name": "EXTRA", "value": "1"},
        {"name": "MASTER_ADDR", "value": "10.0.0.9"},
    ]
    cluster = FakeCluster(body)
    cluster.until_ready()
    env = container(cluster.sts(), "engine")["env"]
    names_ = [e["name"] for e in env]
    assert len(names_) == len(set(names_))
    assert {"name": "MASTER_ADDR", "value": "10.0.0.9"} in env
    assert names_[-1] == "EXTRA" and names_.index("MASTER_ADDR") < names_.index("NNODES")
