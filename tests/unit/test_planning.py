"""The pure planner, driven through whole lifecycles against a small in-memory cluster.

FakeCluster plays the API server and the controllers just enough for the planner: applied objects
are stored (a changed spec bumps generation), Jobs complete or fail when a test says so, and the
StatefulSet's pods appear with the current revision. No kopf, no kubernetes client.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from deepseek_operator.api import parse_deployment
from deepseek_operator.planning import Observed, fingerprint, names, objects, plan
from deepseek_operator.planning.plan import Plan
from dsworker.contract.engine_config import EngineConfig

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
NPU = "huawei.com/Ascend910"

TWO_NODES: dict[str, Any] = {
    "apiVersion": "llm.dsop.io/v1alpha1",
    "kind": "DeepSeekDeployment",
    "metadata": {"name": "r1", "namespace": "llm", "uid": "uid-r1", "generation": 1},
    "spec": {
        "model": {
            "name": "DeepSeek-R1",
            "source": {"pvc": {"claimName": "models", "path": "DeepSeek-R1/"}},
            "mtp": True,
        },
        "parallelism": {"nodes": 2, "devicesPerNode": 8, "dp": 2, "tp": 8, "moeTp": 4},
        "sharding": {"store": {"pvc": {"claimName": "shards"}}, "backoffLimit": 2},
        "worker": {
            "image": "reg/dsworker:1",
            "resources": {"requests": {"memory": "900Gi"}},
            "env": [{"name": "HCCL_CONNECT_TIMEOUT", "value": "1200"}],
            "restartBudget": 2,
        },
    },
}
NODE_AFFINITY: dict[str, Any] = {
    "nodeAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 10, "preference": {"matchExpressions": [{"key": "a", "operator": "Exists"}]}}
        ]
    }
}
HOST_STORE: dict[str, Any] = {
    "apiVersion": "llm.dsop.io/v1alpha1",
    "kind": "DeepSeekDeployment",
    "metadata": {"name": "tiny", "namespace": "t", "uid": "uid-tiny", "generation": 1},
    "spec": {
        "model": {"source": {"hostPath": {"path": "/models/tiny"}}},
        "parallelism": {"devicesPerNode": 2},
        "sharding": {"store": {"hostPath": {"path": "/dev/shm/dsd"}}},
        "worker": {
            "accelerator": {"type": "cpu"},
            "nodeSelector": {"kubernetes.io/hostname": "n1"},
            "tolerations": [{"key": "k", "operator": "Exists"}],
        },
    },
}
SUMMARY = {"bytes": 64 * 10**9, "files": 300, "seconds": 100.0, "throughputMBps": 640.0}


def _rev(template: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


class FakeCluster:
    """Just enough API server and controllers for the planner."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = copy.deepcopy(body)
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.now = NOW
        self.uids = 0
        self.plans: list[Plan] = []

    # -- the API server
    def observed(self, **extra: Any) -> Observed:
        by_kind = lambda kind: [o for (k, _), o in self.objects.items() if k == kind]  # noqa: E731
        return Observed(
            jobs=by_kind("Job"),
            statefulsets=by_kind("StatefulSet"),
            pods=list(self.pods.values()),
            claims=by_kind("PersistentVolumeClaim"),
            now=self.now,
            **extra,
        )

    def step(self, **extra: Any) -> Plan:
        self.now += timedelta(seconds=1)
        result = plan(self.body, self.observed(**extra))
        for obj in result.apply:
            key = (obj["kind"], obj["metadata"]["name"])
            old = self.objects.get(key)
            new = copy.deepcopy(obj)
            gen = 1
            if old is not None:
                gen = old["metadata"]["generation"]
                if old.get("spec") != new.get("spec"):
                    gen += 1
                new["status"] = old.get("status", {})
            new["metadata"]["generation"] = gen
            new["metadata"].setdefault("uid", f"uid-{len(self.objects)}")
            self.objects[key] = new
        for gone in result.delete:
            if gone.kind == "Pod":
                self.pods.pop(gone.name, None)
            else:
                self.objects.pop((gone.kind, gone.name), None)
                for pod in [p for p in self.pods.values() if _job_of(p) == gone.name]:
                    del self.pods[pod["metadata"]["name"]]
        self.body["status"] = result.status.to_dict()
        self.plans.append(result)
        return result

    def change_spec(self, patch: dict[str, Any]) -> None:
        _merge(self.body["spec"], patch)
        self.body["metadata"]["generation"] += 1

    # -- the Job controller and a kubelet
    def job(self, prefix: str = "") -> dict[str, Any]:
        jobs = [o for (k, n), o in self.objects.items() if k == "Job" and n.startswith(prefix)]
        assert len(jobs) == 1, [j["metadata"]["name"] for j in jobs]
        return jobs[0]

    def finish_job(
        self, job: dict[str, Any], ok: bool = True, message: str = "", code: int = 0
    ) -> None:
        name = job["metadata"]["name"]
        job["status"] = {
            "conditions": [
                {"type": "Complete" if ok else "Failed", "status": "True", "reason": "X"}
            ]
        }
        self.uids += 1
        pod = {
            "metadata": {
                "name": f"{name}-pod",
                "uid": f"pod-{self.uids}",
                "labels": {
                    **job["spec"]["template"]["metadata"]["labels"],
                    names.JOB_NAME_LABEL: name,
                },
            },
            "status": {
                "phase": "Succeeded" if ok else "Failed",
                "containerStatuses": [
                    {
                        "name": "shard",
                        "restartCount": 0,
                        "state": {
                            "terminated": {
                                "exitCode": 0 if ok else (code or 1),
                                "message": message,
                                "finishedAt": "2026-01-02T03:04:05Z",
                            }
                        },
                    }
                ],
            },
        }
        self.pods[pod["metadata"]["name"]] = pod

    # -- the StatefulSet controller and kwok
    def run_workers(self, ready: bool = True) -> None:
        sts = self.sts()
        rev = _rev(sts["spec"]["template"])
        sts["status"] = {
            "observedGeneration": sts["metadata"]["generation"],
            "updateRevision": rev,
            "currentRevision": rev,
        }
        for i in range(sts["spec"]["replicas"]):
            name = f"{sts['metadata']['name']}-{i}"
            if name in self.pods:
                continue
            self.uids += 1
            self.pods[name] = {
                "metadata": {
                    "name": name,
                    "uid": f"pod-{self.uids}",
                    "labels": {
                        **sts["spec"]["template"]["metadata"]["labels"],
                        names.REVISION_LABEL: rev,
                    },
                },
                "status": _pod_status(ready),
            }

    def sts(self) -> dict[str, Any]:
        return self.objects[("StatefulSet", names.statefulset(self.body["metadata"]["name"]))]

    def worker_pods(self) -> list[dict[str, Any]]:
        return [
            p
            for p in self.pods.values()
            if p["metadata"]["name"].startswith(self.sts()["metadata"]["name"])
        ]

    def until_ready(self, summary: dict[str, Any] | None = None) -> Plan:
        self.step()
        job = self.job(names.shard_job(self.body["metadata"]["name"], self.fp()))
        self.finish_job(job, message=json.dumps(summary or SUMMARY))
        self.step()
        self.run_workers()
        return self.step()

    def fp(self) -> str:
        return self.body.get("status", {}).get("fingerprint") or ""


def _job_of(pod: dict[str, Any]) -> str | None:
    return pod["metadata"]["labels"].get(names.JOB_NAME_LABEL)


def _pod_status(ready: bool, restarts: int = 0) -> dict[str, Any]:
    return {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        "containerStatuses": [{"name": "engine", "restartCount": restarts, "ready": ready}],
    }


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def kinds(result: Plan) -> list[tuple[str, str]]:
    return [(o["kind"], o["metadata"]["name"]) for o in result.apply]


def cond(result: Plan | dict[str, Any], kind: str) -> dict[str, Any]:
    status = result.status.to_dict() if isinstance(result, Plan) else result
    return next(c for c in status["conditions"] if c["type"] == kind)


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    spec = obj["spec"]["template"]["spec"]
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name)


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


# ------------------------------------------------------------------------------- first pass


def test_first_pass_creates_services_and_the_sharding_job_only() -> None:
    cluster = FakeCluster(TWO_NODES)
    result = cluster.step()
    fp = result.status.fingerprint
    assert fp and len(fp) == 64
    assert kinds(result) == [
        ("Service", "r1-ranks"),
        ("Service", "r1"),
        ("Job", f"r1-shard-{fp[:10]}"),
    ]
    assert result.phase == "Sharding"
    assert cond(result, "Validated")["status"] == "True"
    assert cond(result, "Sharded")["reason"] == "ShardingPending"
    assert cond(result, "WorkersReady")["reason"] == "WaitingForShards"
    status = result.status.to_dict()
    assert status["worldSize"] == 16 and status["readyWorkers"] == "0/2"
    # Printed as EP: moeEp computed from worldSize / moeTp (the EP level is 1).
    assert status["moeEp"] == 4
    assert status["endpoint"] == "http://r1.llm.svc:1025/v1"
    assert status["modelName"] == "DeepSeek-R1"  # printed as the Model column
    assert [e.reason for e in result.events] == ["Sharding"]


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


def test_every_child_is_owned_labelled_and_fingerprinted() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    children = list(cluster.objects.values())
    assert {o["kind"] for o in children} == {
        "Service",
        "Job",
        "ConfigMap",
        "StatefulSet",
        "PodDisruptionBudget",
    }
    for obj in children:
        md = obj["metadata"]
        assert md["ownerReferences"] == [
            {
                "apiVersion": "llm.dsop.io/v1alpha1",
                "kind": "DeepSeekDeployment",
                "name": "r1",
                "uid": "uid-r1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        labels = md["labels"]
        for key in ("name", "instance", "component", "managed-by", "part-of"):
            assert labels[f"app.kubernetes.io/{key}"], (md["name"], key)
        assert labels["app.kubernetes.io/managed-by"] == "deepseek-operator"
        assert labels["app.kubernetes.io/instance"] == "r1"
        assert md["annotations"][names.FINGERPRINT_ANNOTATION] == cluster.fp()
        assert md["annotations"][names.DEPLOYMENT_ANNOTATION] == "r1"
        assert md["namespace"] == "llm"


def test_operator_created_store_claim() -> None:
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["sharding"]["store"] = {"pvc": {"storageClassName": "nfs", "size": "2Ti"}}
    cluster = FakeCluster(body)
    result = cluster.step()
    claim = next(o for o in result.apply if o["kind"] == "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "r1-shards"
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "storageClassName": "nfs",
        "resources": {"requests": {"storage": "2Ti"}},
    }
    job = next(o for o in result.apply if o["kind"] == "Job")
    store = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "store")
    assert store["persistentVolumeClaim"]["claimName"] == "r1-shards"
    # Not bound yet: Pending, with the claim named; the claim is created once only.
    assert result.phase == "Pending"
    assert cond(result, "Sharded")["reason"] == "StoreNotBound"
    assert "r1-shards" in result.status.message
    again = cluster.step()
    assert "PersistentVolumeClaim" not in {o["kind"] for o in again.apply}
    cluster.objects[("PersistentVolumeClaim", "r1-shards")]["status"] = {"phase": "Bound"}
    assert cluster.step().phase == "Sharding"


def store_cluster(size: str) -> FakeCluster:
    """A Ready deployment on a store claim the operator created, Bound at that size."""
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["sharding"]["store"] = {"pvc": {"storageClassName": "nfs", "size": size}}
    cluster = FakeCluster(body)
    cluster.step()
    claim = cluster.objects[("PersistentVolumeClaim", "r1-shards")]
    claim["status"] = {"phase": "Bound", "capacity": {"storage": size}}
    cluster.until_ready()
    assert cluster.plans[-1].phase == "Ready"
    return cluster


def apply_resize(cluster: FakeCluster, result: Plan) -> None:
    """What the API server does with the resize: only the request changes."""
    assert result.resize is not None
    claim = cluster.objects[("PersistentVolumeClaim", "r1-shards")]
    claim["spec"] = copy.deepcopy(result.resize["spec"])


def test_store_claim_grows_with_the_spec_and_nothing_else_moves() -> None:
    cluster = store_cluster("1Gi")
    created = copy.deepcopy(cluster.objects[("PersistentVolumeClaim", "r1-shards")])
    sts_generation = cluster.sts()["metadata"]["generation"]
    cluster.change_spec({"sharding": {"store": {"pvc": {"size": "2Gi"}}}})
    result = cluster.step()
    assert result.resize is not None
    assert result.resize["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "storageClassName": "nfs",
        "resources": {"requests": {"storage": "2Gi"}},
    }
    # Every other field the operator owns is applied with the value the claim has.
    for key in ("name", "namespace", "labels", "annotations", "ownerReferences"):
        assert result.resize["metadata"][key] == created["metadata"][key], key
    assert "PersistentVolumeClaim" not in {o["kind"] for o in result.apply}
    resized = [e for e in result.events if e.reason == "ResizingStore"]
    assert [e.type for e in resized] == ["Normal"] and "from 1Gi to 2Gi" in resized[0].message
    assert result.phase == "Ready" and cond(result, "Validated")["reason"] == "Valid"
    assert result.status.fingerprint == cluster.plans[-2].status.fingerprint  # no re-shard
    apply_resize(cluster, result)
    again = cluster.step()
    assert again.resize is None and again.events == []
    assert cluster.sts()["metadata"]["generation"] == sts_generation
    # The same size written another way is no change.
    cluster.change_spec({"sharding": {"store": {"pvc": {"size": "2048Mi"}}}})
    assert cluster.step().resize is None


def test_store_claim_never_shrinks_and_says_why() -> None:
    cluster = store_cluster("2Gi")
    cluster.change_spec({"sharding": {"store": {"pvc": {"size": "1Gi"}}}})
    result = cluster.step()
    assert result.resize is None
    validated = cond(result, "Validated")
    assert (validated["status"], validated["reason"]) == ("True", "StoreSpecNotApplied")
    assert validated["message"].startswith("spec.sharding.store.pvc.size: 1Gi is less than")
    warned = [e for e in result.events if e.reason == "StoreSpecNotApplied"]
    assert [e.type for e in warned] == ["Warning"]
    assert result.phase == "Ready"  # the store keeps its size; serving goes on
    assert [e.reason for e in cluster.step().events] == []  # posted once
    cluster.change_spec({"sharding": {"store": {"pvc": {"size": "2Gi"}}}})
    assert cond(cluster.step(), "Validated")["reason"] == "Valid"


def test_store_resize_refused_by_the_api_server_is_reported() -> None:
    cluster = store_cluster("1Gi")
    cluster.change_spec({"sharding": {"store": {"pvc": {"size": "2Gi"}}}})
    refusal = "only dynamically provisioned pvc can be resized"
    result = cluster.step(store_resize_refused=refusal)
    assert result.resize is None
    assert "ResizingStore" not in [e.reason for e in result.events]
    validated = cond(result, "Validated")
    assert validated["reason"] == "StoreSpecNotApplied"
    assert refusal in validated["message"]
    assert "allowVolumeExpansion: true" in validated["message"]
    assert "set size back to 1Gi" in validated["message"]
    assert ("Warning", "StoreSpecNotApplied") in [(e.type, e.reason) for e in result.events]
    # Every pass tries again (the class may allow it by now); refused the same way, there is
    # nothing new to say.
    assert plan(cluster.body, cluster.observed()).resize is not None
    assert cluster.step(store_resize_refused=refusal).events == []


def test_store_lowering_refused_by_an_older_api_server_is_reported() -> None:
    """Lowering a request that is still above the volume's capacity is how Kubernetes 1.34
    retries an expansion that cannot finish; an API server without it refuses the change."""
    cluster = store_cluster("1Gi")
    claim = cluster.objects[("PersistentVolumeClaim", "r1-shards")]
    claim["spec"]["resources"]["requests"]["storage"] = "100Gi"  # asked, never reached
    cluster.change_spec({"sharding": {"store": {"pvc": {"size": "20Gi"}}}})
    assert plan(cluster.body, cluster.observed()).resize is not None
    refusal = (
        "spec.resources.requests.storage: Forbidden: field can not be less than previous value"
    )
    result = cluster.step(store_resize_refused=refusal)
    message = cond(result, "Validated")["message"]
    assert refusal in message and message.endswith("set size back to 100Gi")
    assert "allowVolumeExpansion" not in message


def test_store_expansion_the_storage_backend_could_not_finish_is_reported() -> None:
    cluster = store_cluster("1Gi")
    cluster.change_spec({"sharding": {"store": {"pvc": {"size": "2Gi"}}}})
    apply_resize(cluster, cluster.step())
    claim = cluster.objects[("PersistentVolumeClaim", "r1-shards")]
    claim["status"]["conditions"] = [{"type": "Resizing", "status": "True"}]
    assert cond(cluster.step(), "Validated")["reason"] == "Valid"  # still going: nothing to say
    claim["status"]["conditions"] = [
        {"type": "ControllerResizeError", "status": "True", "message": "quota exceeded"}
    ]
    result = cluster.step()
    validated = cond(result, "Validated")
    assert validated["reason"] == "StoreSpecNotApplied"
    assert (
        "did not grow from 1Gi to 2Gi (ControllerResizeError: quota exceeded)"
        in (validated["message"])
    )
    assert ("Warning", "StoreSpecNotApplied") in [(e.type, e.reason) for e in result.events]
    assert result.phase == "Ready"  # the shards fit the size they have
    del claim["status"]["conditions"]
    claim["status"]["allocatedResourceStatuses"] = {"storage": "NodeResizeInfeasible"}
    assert "(NodeResizeInfeasible)" in cond(cluster.step(), "Validated")["message"]
    claim["status"] = {"phase": "Bound", "capacity": {"storage": "2Gi"}}  # grown after all
    assert cond(cluster.step(), "Validated")["reason"] == "Valid"


def test_store_growth_waits_while_the_claim_is_unbound() -> None:
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["sharding"]["store"] = {"pvc": {"storageClassName": "nfs", "size": "1Gi"}}
    cluster = FakeCluster(body)
    cluster.step()
    cluster.change_spec({"sharding": {"store": {"pvc": {"size": "2Gi"}}}})
    result = cluster.step()
    assert result.resize is None
    assert cond(result, "Sharded")["reason"] == "StoreNotBound"
    assert "2Gi is applied once the claim is bound" in cond(result, "Sharded")["message"]
    cluster.objects[("PersistentVolumeClaim", "r1-shards")]["status"] = {
        "phase": "Bound",
        "capacity": {"storage": "1Gi"},
    }
    assert cluster.step().resize is not None


def test_store_warning_and_spec_warning_together() -> None:
    cluster = store_cluster("2Gi")
    cluster.change_spec(
        {
            "sharding": {"store": {"pvc": {"size": "1Gi"}}},
            "expertParallel": {"alltoallBufferScaleFactors": [[0, 8.0]]},
        }
    )
    warnings = {"SpecWarning", "StoreSpecNotApplied"}
    result = cluster.step()
    assert sorted(e.reason for e in result.events if e.reason in warnings) == sorted(warnings)
    message = cond(result, "Validated")["message"]
    assert "spec.sharding.store.pvc.size" in message and "has no effect with level 1" in message
    # The store fixed: the spec warning stays and is not posted again.
    cluster.change_spec({"sharding": {"store": {"pvc": {"size": "2Gi"}}}})
    result = cluster.step()
    assert cond(result, "Validated")["reason"] == "ValidWithWarnings"
    assert not [e for e in result.events if e.reason in warnings]


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


# ---------------------------------------------------------------------------- the workers


def test_statefulset_appears_only_after_the_job_completes() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.step()
    assert not any(k == "StatefulSet" for k, _ in cluster.objects)
    for _ in range(3):  # Job still running: nothing new
        result = cluster.step()
        assert result.phase == "Sharding"
        assert not any(k == "StatefulSet" for k, _ in cluster.objects)
    cluster.finish_job(cluster.job(), message=json.dumps(SUMMARY))
    result = cluster.step()
    assert [k for k, _ in kinds(result)] == [
        "Service",
        "Service",
        "ConfigMap",
        "StatefulSet",
        "PodDisruptionBudget",
    ]
    assert result.phase == "Staging"
    assert cond(result, "Sharded")["reason"] == "ShardsComplete"
    assert result.status.to_dict()["shards"] == {
        **SUMMARY,
        "job": cluster.job()["metadata"]["name"],
    }


def test_the_ports_admission_reserves_are_the_pods_own() -> None:
    """spec.serving.port is refused at admission when it is the rendezvous port: the one the
    worker pods open besides the HTTP port."""
    from deepseek_operator.api.names import RENDEZVOUS_PORT

    assert objects.MASTER_PORT == RENDEZVOUS_PORT
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


def test_services() -> None:
    result = FakeCluster(TWO_NODES).step()
    headless, client = (o for o in result.apply if o["kind"] == "Service")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert client["spec"]["selector"][names.POD_NAME_LABEL] == "r1-worker-0"
    assert client["spec"]["ports"] == [
        {"name": "http", "port": 1025, "targetPort": "http", "protocol": "TCP"}
    ]


def test_disruption_budget_blocks_drains_of_a_healthy_group_only() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    pdb = cluster.objects[("PodDisruptionBudget", names.disruption_budget("r1"))]["spec"]
    assert pdb["minAvailable"] == 2
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_ready_then_degraded_then_ready() -> None:
    cluster = FakeCluster(TWO_NODES)
    result = cluster.until_ready()
    assert result.phase == "Ready"
    assert result.status.to_dict()["readyWorkers"] == "2/2"
    for kind in ("Validated", "Sharded", "WorkersReady", "Ready"):
        assert cond(result, kind)["status"] == "True", kind
    assert result.status.message == "serving DeepSeek-R1 at http://r1.llm.svc:1025/v1"
    cluster.pods["r1-worker-1"]["status"] = _pod_status(ready=False)
    result = cluster.step()
    assert result.phase == "Degraded"
    assert [e.type for e in result.events] == ["Warning"]
    cluster.pods["r1-worker-1"]["status"] = _pod_status(ready=True)
    assert cluster.step().phase == "Ready"


def test_sharding_disabled_starts_workers_at_once() -> None:
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["model"]["mtp"] = False
    body["spec"]["model"]["architecture"] = "DeepseekV2"
    body["spec"]["sharding"] = {"enabled": False}
    cluster = FakeCluster(body)
    result = cluster.step()
    assert "Job" not in {k for k, _ in kinds(result)}
    assert cond(result, "Sharded")["reason"] == "ShardingDisabled"
    sts = cluster.sts()
    engine = container(sts, "engine")
    assert arg(engine["args"], "--model") == "/source/DeepSeek-R1"
    assert "initContainers" not in sts["spec"]["template"]["spec"]
    cluster.run_workers()
    result = cluster.step()
    assert result.phase == "Ready" and result.status.shards is None


# ------------------------------------------------------------------------ idempotence


def test_planning_again_changes_nothing() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    first = cluster.step()
    second = cluster.step()
    assert not first.status_changed and not second.status_changed
    assert first.apply == second.apply and not second.delete and not second.events
    gens = {k: o["metadata"]["generation"] for k, o in cluster.objects.items()}
    cluster.step()
    assert gens == {k: o["metadata"]["generation"] for k, o in cluster.objects.items()}


def test_last_transition_time_is_kept_while_status_holds() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.step()
    first = cond(cluster.body["status"], "Validated")["lastTransitionTime"]
    cluster.step()
    cluster.step()
    assert cond(cluster.body["status"], "Validated")["lastTransitionTime"] == first
    sharded = cond(cluster.body["status"], "Sharded")["lastTransitionTime"]
    cluster.finish_job(cluster.job())
    cluster.step()
    assert cond(cluster.body["status"], "Sharded")["lastTransitionTime"] > sharded


# --------------------------------------------------------------------------- validation


def test_invalid_spec_fails_without_touching_children() -> None:
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["parallelism"]["tp"] = 3
    result = plan(body, Observed(now=NOW))
    assert result.phase == "Failed" and not result.apply and not result.delete
    validated = cond(result, "Validated")
    assert validated["status"] == "False" and validated["reason"] == "InvalidSpec"
    assert "spec.parallelism.tp must divide worldSize" in validated["message"]
    assert cond(result, "Sharded")["status"] == "Unknown"
    assert [(e.type, e.reason) for e in result.events] == [("Warning", "Failed")]


TINY_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 256,
    "vocab_size": 1024,
    "num_attention_heads": 8,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "n_routed_experts": 6,
    "n_shared_experts": 1,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 4096,
}


def with_config(body: dict[str, Any], config: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    raw = config if isinstance(config, str) else json.dumps(config)
    out["metadata"]["annotations"] = {names.MODEL_CONFIG_ANNOTATION: raw}
    return out


def test_model_config_annotation_that_does_not_divide() -> None:
    # 6 routed experts over moeEp 4: the operator says so before any Job runs.
    result = plan(with_config(TWO_NODES, TINY_CONFIG), Observed(now=NOW))
    assert result.phase == "Failed" and not result.apply
    validated = cond(result, "Validated")
    assert validated["reason"] == "ConfigMismatch"
    assert "spec.parallelism.moeEp" in validated["message"]
    assert "n_routed_experts" in validated["message"]


def test_model_config_annotation_not_json() -> None:
    result = plan(with_config(TWO_NODES, "{nope"), Observed(now=NOW))
    assert cond(result, "Validated")["reason"] == "InvalidModelConfig"
    assert names.MODEL_CONFIG_ANNOTATION in result.status.message


def test_model_config_annotation_that_fits_is_part_of_the_fingerprint() -> None:
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["parallelism"] = {"nodes": 1, "devicesPerNode": 2}
    plain = plan(body, Observed(now=NOW))
    fitted = plan(with_config(body, TINY_CONFIG), Observed(now=NOW))
    assert fitted.phase == "Sharding" and cond(fitted, "Validated")["status"] == "True"
    assert fitted.status.fingerprint != plain.status.fingerprint
    # A warning from the config (FP8 on an NPU would be one) is an Event and a condition message.
    fp8 = {**TINY_CONFIG, "quantization_config": {"quant_method": "fp8"}}
    body["spec"]["parallelism"] = {"nodes": 1, "devicesPerNode": 1}
    warned = plan(with_config(body, fp8), Observed(now=NOW))
    assert cond(warned, "Validated")["reason"] == "ValidWithWarnings"
    assert "dequantizeFp8" in cond(warned, "Validated")["message"]
    assert ("Warning", "SpecWarning") in [(e.type, e.reason) for e in warned.events]


def test_spec_warning_is_posted_once() -> None:
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["expertParallel"] = {"alltoallBufferScaleFactors": [[0, 8.0]]}
    cluster = FakeCluster(body)
    first = cluster.step()
    assert [e.reason for e in first.events] == ["SpecWarning", "Sharding"]
    assert "has no effect with level 1" in cond(first, "Validated")["message"]
    assert cluster.step().events == []


# ---------------------------------------------------------------------- sharding failures


def test_sharder_rejecting_the_checkpoint_is_a_validation_failure() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.step()
    # Bad input is not retried backoffLimit times: the Job fails on the first exit code 2.
    assert cluster.job()["spec"]["podFailurePolicy"]["rules"] == [
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": "shard", "operator": "In", "values": [2]},
        }
    ]
    msg = "the plan does not divide the model: n_routed_experts 6 % moe_ep 4 != 0"
    cluster.finish_job(cluster.job(), ok=False, message=json.dumps({"error": msg}), code=2)
    result = cluster.step()
    assert result.phase == "Failed"
    assert result.status.message == msg
    validated = cond(result, "Validated")
    assert (validated["status"], validated["reason"], validated["message"]) == (
        "False",
        "ConfigMismatch",
        msg,
    )
    assert cond(result, "Sharded")["reason"] == "ShardingFailed"
    assert not any(k == "StatefulSet" for k, _ in cluster.objects)


def test_sharding_failure_past_backoff_then_retry_on_spec_change() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.step()
    job = cluster.job()
    cluster.finish_job(job, ok=False, message="OSError: No space left on device", code=1)
    result = cluster.step()
    assert result.phase == "Failed"
    assert "No space left on device" in result.status.message
    assert cond(result, "Sharded")["reason"] == "ShardingFailed"
    assert cond(result, "Validated")["status"] == "True"
    assert not cluster.step().delete  # terminal until the spec changes
    cluster.change_spec({"sharding": {"backoffLimit": 5}})  # same fingerprint
    result = cluster.step()
    assert [(d.kind, d.name) for d in result.delete] == [("Job", job["metadata"]["name"])]
    assert "RetryingSharding" in [e.reason for e in result.events]
    assert result.phase == "Sharding"
    result = cluster.step()
    new = cluster.job()
    assert new["spec"]["backoffLimit"] == 5
    assert new["metadata"]["annotations"][names.GENERATION_ANNOTATION] == "2"


# ----------------------------------------------------------------- containers that cannot start


def _waiting(name: str, reason: str, message: str) -> dict[str, Any]:
    return {
        "name": name,
        "restartCount": 0,
        "state": {"waiting": {"reason": reason, "message": message}},
    }


@pytest.mark.parametrize(
    "reason,condition",
    [
        ("ErrImagePull", "ImagePullFailed"),
        ("ImagePullBackOff", "ImagePullFailed"),
        ("InvalidImageName", "ImagePullFailed"),
        ("CreateContainerConfigError", "ContainerConfigError"),
        ("CreateContainerError", "ContainerConfigError"),
    ],
)
def test_a_sharder_that_cannot_start_says_why(reason: str, condition: str) -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.step()
    job = cluster.job()
    name = job["metadata"]["name"]
    cluster.pods["shard-pod"] = {
        "metadata": {
            "name": "shard-pod",
            "uid": "shard-pod",
            "labels": {**job["spec"]["template"]["metadata"]["labels"], names.JOB_NAME_LABEL: name},
        },
        "status": {
            "phase": "Pending",
            "containerStatuses": [_waiting("shard", reason, 'pull "reg/dsworker:1": not found')],
        },
    }
    result = cluster.step()
    sharded = cond(result, "Sharded")
    assert (sharded["status"], sharded["reason"]) == ("False", condition)
    assert f"container shard: {reason}" in sharded["message"]
    assert 'pull "reg/dsworker:1": not found' in sharded["message"]
    assert result.phase == "Pending" and reason in result.status.message


@pytest.mark.parametrize(
    "container_name,reason,condition",
    [
        ("engine", "ImagePullBackOff", "ImagePullFailed"),
        ("stage", "ErrImagePull", "ImagePullFailed"),
        ("engine", "CreateContainerConfigError", "ContainerConfigError"),
    ],
)
def test_a_worker_that_cannot_start_says_why(
    container_name: str, reason: str, condition: str
) -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.step()
    cluster.finish_job(cluster.job(), message=json.dumps(SUMMARY))
    cluster.step()
    cluster.run_workers(ready=False)
    message = 'secret "hf-token" not found'
    status = cluster.pods["r1-worker-1"]["status"]
    status["containerStatuses"] = []
    key = "initContainerStatuses" if container_name == "stage" else "containerStatuses"
    status[key] = [_waiting(container_name, reason, message)]
    result = cluster.step()
    workers = cond(result, "WorkersReady")
    assert (workers["status"], workers["reason"]) == ("False", condition)
    assert f"pod r1-worker-1 container {container_name}: {reason}: {message}" in workers["message"]
    assert result.phase == "Pending"


# ------------------------------------------------------------------------ refused children


def test_a_child_the_api_server_refuses_is_reported_once() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.step()
    cluster.finish_job(cluster.job(), message=json.dumps(SUMMARY))
    why = 'StatefulSet.apps "r1-worker" is invalid: spec.template.spec.tolerations[0].operator'
    refused = {"StatefulSet r1-worker": why}
    result = cluster.step(rejected=refused)
    assert result.phase == "Failed"
    validated = cond(result, "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "ChildRejected")
    assert "the API server refused StatefulSet r1-worker (fix spec.worker" in validated["message"]
    assert why in validated["message"] and why in result.status.message
    assert cond(result, "Ready")["status"] == "False"
    assert [e.type for e in result.events if e.reason == "ChildRejected"] == ["Warning"]
    again = cluster.step(rejected=refused)
    assert again.phase == "Failed" and not again.events  # reported once, not at every resync
    # The refusal gone (spec fixed, policy relaxed): the planner moves on.
    cluster.run_workers()
    assert cluster.step().phase == "Ready"
    assert cond(cluster.plans[-1], "Validated")["status"] == "True"


def test_a_refused_job_names_the_path_fields() -> None:
    """A hostPath the API server refuses in the sharding Job is spec.model.source's or
    spec.sharding.store's: the hint names them, not only spec.worker."""
    cluster = FakeCluster(TWO_NODES)
    job = names.shard_job("r1", cluster.step().status.fingerprint)
    why = f'Job.batch "{job}" is invalid: spec.template.spec.volumes[0].hostPath.path'
    result = cluster.step(rejected={f"Job {job}": why})
    message = cond(result, "Validated")["message"]
    assert f"the API server refused Job {job} (fix spec.sharding.resources, spec.model.source" in (
        message
    )


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


# ------------------------------------------------------------------------ group restarts


def test_a_restarted_worker_restarts_the_whole_group_within_the_budget() -> None:
    cluster = FakeCluster(TWO_NODES)  # restartBudget 2
    cluster.until_ready()
    for n in (1, 2):
        cluster.pods["r1-worker-1"]["status"] = _pod_status(ready=False, restarts=1)
        result = cluster.step()
        assert sorted(d.name for d in result.delete) == ["r1-worker-0", "r1-worker-1"]
        assert result.status.group_restarts == n
        assert result.phase == "Degraded"
        assert cond(result, "WorkersReady")["reason"] == "GroupRestarting"
        assert ("Warning", "GroupRestart") in [(e.type, e.reason) for e in result.events]
        assert f"group restart {n} of 2" in result.status.message
        cluster.run_workers()
        assert cluster.step().phase == "Ready"
    cluster.pods["r1-worker-0"]["status"] = {"phase": "Failed", "reason": "Evicted"}
    result = cluster.step()
    assert result.phase == "Failed" and not result.delete
    assert cond(result, "WorkersReady")["reason"] == "RestartBudgetExhausted"
    assert "Evicted" in result.status.message
    # Failed holds, even if the pods look fine again, until the spec changes.
    cluster.pods["r1-worker-0"]["status"] = _pod_status(ready=True)
    again = cluster.step()
    assert again.phase == "Failed" and not again.delete and not again.events
    cluster.change_spec({"worker": {"restartBudget": 3}})
    cluster.pods["r1-worker-0"]["status"] = {"phase": "Failed", "reason": "Evicted"}
    result = cluster.step()
    assert result.status.group_restarts == 1 and len(result.delete) == 2


def test_a_worker_that_exits_with_bad_input_fails_at_once_without_restarts() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    msg = "layer 3 expert 7: shard shape (64, 7168) does not match the plan"
    status = _pod_status(ready=False, restarts=1)
    status["containerStatuses"][0]["lastState"] = {
        "terminated": {"exitCode": 2, "reason": "Error", "message": json.dumps({"error": msg})}
    }
    cluster.pods["r1-worker-1"]["status"] = status
    result = cluster.step()
    assert result.phase == "Failed" and not result.delete
    assert result.status.group_restarts == 0
    validated = cond(result, "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "ConfigMismatch")
    assert msg in validated["message"] and "r1-worker-1" in validated["message"]
    assert cond(result, "WorkersReady")["reason"] == "ConfigMismatch"
    assert "GroupRestart" not in [e.reason for e in result.events]
    # It holds (the crash-looping pod may even look fine for a moment) until the spec changes.
    cluster.pods["r1-worker-1"]["status"] = _pod_status(ready=True)
    again = cluster.step()
    assert again.phase == "Failed" and not again.delete and not again.events
    assert cond(again, "Validated")["reason"] == "ConfigMismatch"
    # A spec change tries again: the group restarts with fresh pods.
    cluster.pods["r1-worker-1"]["status"] = status
    cluster.change_spec({"worker": {"restartBudget": 3}})
    result = cluster.step()
    assert sorted(d.name for d in result.delete) == ["r1-worker-0", "r1-worker-1"]
    assert result.status.group_restarts == 1
    for name in ("r1-worker-0", "r1-worker-1"):
        cluster.pods.pop(name, None)
    cluster.run_workers()
    assert cluster.step().phase == "Ready"


def test_a_stager_that_said_bad_input_is_rolled_away_by_a_spec_change() -> None:
    """The stager (an init container) exits 2: Failed at once. A new spec changes the template;
    the old pods are stale, not evidence against the new spec, so the group rolls."""
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    status = _pod_status(ready=False)
    status["phase"] = "Pending"
    status["initContainerStatuses"] = [
        {
            "name": "stage",
            "restartCount": 2,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 2, "message": "error: disk full"}},
        }
    ]
    cluster.pods["r1-worker-1"]["status"] = status
    result = cluster.step()
    assert result.phase == "Failed" and cond(result, "WorkersReady")["reason"] == "ConfigMismatch"
    cluster.change_spec({"worker": {"env": [{"name": "FOO", "value": "1"}]}})
    phases = []
    deleted: list[str] = []
    for settle in (False, False, True, False, False):  # the StatefulSet controller lags a pass
        if settle:
            cluster.run_workers()
        result = cluster.step()
        phases.append(result.phase)
        deleted += [d.name for d in result.delete]
    assert "Failed" not in phases and sorted(deleted) == ["r1-worker-0", "r1-worker-1"]


def test_the_restart_budget_comes_back_after_ten_minutes_of_serving() -> None:
    cluster = FakeCluster(TWO_NODES)  # restartBudget 2
    cluster.until_ready()
    for _ in range(2):
        cluster.pods["r1-worker-1"]["status"] = _pod_status(ready=False, restarts=1)
        assert cluster.step().phase == "Degraded"
        cluster.run_workers()
        assert cluster.step().phase == "Ready"
    assert cluster.body["status"]["groupRestarts"] == 2
    cluster.now += timedelta(minutes=9)
    result = cluster.step()
    assert result.status.group_restarts == 2 and not result.events
    cluster.now += timedelta(minutes=1)
    result = cluster.step()
    assert result.status.group_restarts == 0
    assert [e.reason for e in result.events] == ["RestartBudgetReset"]
    assert cluster.step().events == []
    # The whole budget again: two more group restarts before Failed.
    for n in (1, 2):
        cluster.pods["r1-worker-0"]["status"] = _pod_status(ready=False, restarts=1)
        assert cluster.step().status.group_restarts == n
        cluster.run_workers()
        assert cluster.step().phase == "Ready"


def test_a_failed_pod_seen_only_in_an_event_still_counts() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    gone = copy.deepcopy(cluster.pods.pop("r1-worker-1"))
    gone["status"] = {"phase": "Failed", "reason": "Evicted"}
    result = cluster.step(failed_pods=[gone])
    assert result.status.group_restarts == 1
    assert result.counted_failures == [gone["metadata"]["uid"]]
    assert [d.name for d in result.delete] == ["r1-worker-0"]


def test_new_template_replaces_all_pods_together_without_counting() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    cluster.change_spec({"serving": {"maxBatchSize": 64}})  # same shards, new engine config
    result = cluster.step()
    assert result.phase == "Degraded"  # was serving this plan
    sts = cluster.sts()
    assert sts["metadata"]["generation"] == 2
    sts["status"]["observedGeneration"] = 2
    sts["status"]["updateRevision"] = _rev(sts["spec"]["template"])
    result = cluster.step()
    assert sorted(d.name for d in result.delete) == ["r1-worker-0", "r1-worker-1"]
    assert "RollingOut" in [e.reason for e in result.events]
    assert result.status.group_restarts == 0
    cluster.run_workers()
    assert cluster.step().phase == "Ready"


# ------------------------------------------------------------------------------ reshard


def test_reshard_keeps_the_old_group_until_the_new_shards_are_complete() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    old_fp, old_job = cluster.fp(), cluster.job()["metadata"]["name"]
    old_template = copy.deepcopy(cluster.sts()["spec"])
    cluster.change_spec({"parallelism": {"dp": 1, "tp": 16}})
    result = cluster.step()
    new_fp = cluster.fp()
    assert new_fp != old_fp
    new_job = names.shard_job("r1", new_fp)
    assert ("Job", new_job) in kinds(result)
    assert result.phase == "Sharding"
    assert cond(result, "Ready")["status"] == "True"
    assert cond(result, "Ready")["reason"] == "ServingPreviousPlan"
    assert result.status.world_size == 16
    for _ in range(2):
        cluster.step()
        assert cluster.sts()["spec"] == old_template
    cluster.finish_job(cluster.objects[("Job", new_job)], message=json.dumps(SUMMARY))
    result = cluster.step()
    engine = container(cluster.sts(), "engine")
    assert arg(container(cluster.sts(), "stage")["args"], "--store") == f"/store/{new_fp[:16]}"
    assert {e["name"]: e.get("value") for e in engine["env"]}["DSOP_FINGERPRINT"] == new_fp
    # roll the group
    sts = cluster.sts()
    sts["status"] = {
        "observedGeneration": sts["metadata"]["generation"],
        "updateRevision": _rev(sts["spec"]["template"]),
    }
    result = cluster.step()
    assert len(result.delete) == 2
    cluster.run_workers()
    result = cluster.step()
    assert result.phase == "Ready"
    # Ready on the new plan: old shards go through a cleanup Job on the old Job's store.
    cleanup = next(o for o in result.apply if o["metadata"]["name"].startswith("r1-clean-"))
    assert cleanup["metadata"]["name"] == names.cleanup_job("r1", old_fp)
    rm = container(cleanup, "cleanup")
    assert rm["command"] == ["rm"] and rm["args"] == ["-rf", "--", f"/store/{old_fp[:16]}"]
    volumes = cleanup["spec"]["template"]["spec"]["volumes"]
    assert volumes == [{"name": "store", "persistentVolumeClaim": {"claimName": "shards"}}]
    assert ("Job", old_job) in cluster.objects  # until the cleanup is done
    cluster.finish_job(cluster.objects[("Job", cleanup["metadata"]["name"])])
    result = cluster.step()
    assert [(d.kind, d.name) for d in result.delete] == [("Job", old_job)]
    assert "OldShardsRemoved" in [e.reason for e in result.events]
    final = cluster.step()
    assert not final.delete and final.phase == "Ready"


def test_changes_that_keep_the_shards_keep_the_job() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    job = cluster.job()["metadata"]["name"]
    cluster.change_spec({"serving": {"maxSeqLen": 8192}, "worker": {"image": "reg/dsworker:2"}})
    cluster.step()
    assert [n for k, n in cluster.objects if k == "Job"] == [job]


# ------------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name",
    ["r1", "deepseek.r1.prod", "9lives", "a" * 253, "x" * 62 + ".y"],
)
def test_child_names_are_valid_dns_labels(name: str) -> None:
    fp = "f" * 64
    for child in (
        names.statefulset(name),
        names.headless_service(name),
        names.client_service(name),
        names.shard_job(name, fp),
        names.cleanup_job(name, fp),
        names.config_map(name),
    ):
        assert len(child) <= 63 and child[0].isalpha(), child
        assert all(c.isalnum() or c == "-" for c in child), child
    assert len(names.statefulset(name)) <= 52  # pod names and revision hashes stay valid
    assert len(names.instance(name)) <= 63
    assert names.base_name("a.b") != names.base_name("a-b")


def test_staged_bytes_is_the_pods_largest_share() -> None:
    body = copy.deepcopy(TWO_NODES)
    # dp 2 x tp 8: every pod holds a whole tensor-parallel group of attention.
    spec = parse_deployment(body).deployment.spec
    assert objects.staged_bytes(spec, 100 * 10**9) == int(100 * 10**9 * 1.05) + (1 << 30)
    # tp 16: attention, experts and vocabulary all split in two halves over the pods.
    body["spec"]["parallelism"].update(dp=1, tp=16)
    spec = parse_deployment(body).deployment.spec
    assert objects.staged_bytes(spec, 100 * 10**9) == int(100 * 10**9 * 0.5 * 1.05) + (1 << 30)


def test_sharder_pod_gone_keeps_the_staged_size_and_the_serving_group() -> None:
    cluster = FakeCluster(TWO_NODES)
    assert cluster.until_ready().phase == "Ready"
    before = copy.deepcopy(cluster.sts())
    # PodGC (or a node scaled away) removes the completed sharder's pod and its termination message.
    for name in [n for n, p in cluster.pods.items() if _job_of(p)]:
        del cluster.pods[name]
    for _ in range(2):
        result = cluster.step()
        assert result.phase == "Ready" and not result.delete
    assert cluster.sts()["spec"] == before["spec"]
    assert cluster.sts()["metadata"]["generation"] == before["metadata"]["generation"]
    assert result.status.shards is not None and result.status.shards.bytes == SUMMARY["bytes"]


def test_fingerprint_is_what_the_job_is_named_after() -> None:
    spec = parse_deployment(TWO_NODES).deployment.spec
    fp = fingerprint(spec, owner="llm/r1")
    result = FakeCluster(TWO_NODES).step()
    assert result.status.fingerprint == fp
