"""A small in-memory cluster for driving the pure planner through whole lifecycles.

FakeCluster plays the API server and the controllers just enough for the planner: applied objects
are stored (a changed spec bumps generation), Jobs complete or fail when a test says so, and the
StatefulSet's pods appear with the current revision. No kopf, no kubernetes client.
"""

from __future__ import annotations

import copy
import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from deepseek_operator.planning import Observed, Plan, names, plan

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


def template_revision(template: dict[str, Any]) -> str:
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
                for pod in [p for p in self.pods.values() if job_of(p) == gone.name]:
                    del self.pods[pod["metadata"]["name"]]
        self.body["status"] = result.status.to_dict()
        self.plans.append(result)
        return result

    def change_spec(self, patch: dict[str, Any]) -> None:
        merge(self.body["spec"], patch)
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
    def run_workers(self, ready: bool = True, device_plugin: bool = True) -> None:
        """The group's pods, created and scheduled; on npu the Ascend device plugin annotates
        each with its NPUs (`device_plugin`), as it does when it allocates them."""
        sts = self.sts()
        rev = template_revision(sts["spec"]["template"])
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
                "status": {
                    **pod_status(ready),
                    "podIP": f"10.1.0.{i + 1}",
                    "hostIP": f"10.0.0.{i + 1}",
                },
            }
            accel = self.body["spec"]["worker"].get("accelerator", {}).get("type", "npu")
            if accel == "npu" and device_plugin:
                d = self.body["spec"]["parallelism"].get("devicesPerNode", 8)
                self.pods[name]["metadata"]["annotations"] = {
                    ASCEND_DEVICES: device_annotation(name, i, d)
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


ASCEND_DEVICES = "ascend.kubectl.kubernetes.io/ascend-910-configuration"


def device_annotation(pod: str, node: int, devices: int) -> str:
    """What the Ascend device plugin writes on a pod: its NPUs with their NIC IPs."""
    return json.dumps(
        {
            "pod_name": pod,
            "server_id": f"10.0.0.{node + 1}",
            "devices": [
                {"device_id": str(k), "device_ip": f"192.168.{node}.{k + 1}"}
                for k in range(devices)
            ],
        }
    )


def job_of(pod: dict[str, Any]) -> str | None:
    return pod["metadata"]["labels"].get(names.JOB_NAME_LABEL)


def pod_status(ready: bool, restarts: int = 0) -> dict[str, Any]:
    return {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        "containerStatuses": [{"name": "engine", "restartCount": restarts, "ready": ready}],
    }


def merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
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


def waiting_container(name: str, reason: str, message: str) -> dict[str, Any]:
    return {
        "name": name,
        "restartCount": 0,
        "state": {"waiting": {"reason": reason, "message": message}},
    }
