"""The operator as a real process on a real control plane (kwok plays the kubelets: Job pods
complete, worker pods turn Ready; nothing runs inside them).

Each test applies DeepSeekDeployments in a fresh namespace and watches what the operator does:
the sharding Job, the StatefulSet after it, status and Events, re-sharding, group restarts, a
sharder failure, an operator killed mid-way, deletion.
"""

from __future__ import annotations

import copy
import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from ascend_plugin import annotate
from kubernetes import client

from conftest import Dsd, OperatorProcess, _get, bind, bound_claim
from deepseek_operator.planning import names

pytestmark = pytest.mark.integration

NPU = "huawei.com/Ascend910"
MANAGED = "app.kubernetes.io/managed-by=deepseek-operator"


def deployment(name: str, **spec: Any) -> dict[str, Any]:
    """Two CPU pods of two ranks, checkpoint and shards on the namespace's claims."""
    body: dict[str, Any] = {
        "apiVersion": "llm.dsop.io/v1alpha1",
        "kind": "DeepSeekDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": {"pvc": {"claimName": "models", "path": "DeepSeek-V3"}}},
            "parallelism": {"nodes": 2, "devicesPerNode": 2},
            "sharding": {"store": {"pvc": {"claimName": "shards"}}},
            "worker": {"image": "dsworker:test", "accelerator": {"type": "cpu"}},
        },
    }
    for key, value in spec.items():
        if isinstance(value, dict):
            body["spec"].setdefault(key, {}).update(value)
        else:
            body["spec"][key] = value
    return body


def shard_job(dsd: Dsd, name: str) -> Any:
    fp = dsd.wait(f"{name} fingerprint", lambda: dsd.status(name).get("fingerprint"))
    job_name = names.shard_job(name, fp)
    return dsd.wait(
        f"Job {job_name}",
        lambda: next((j for j in dsd.jobs("sharder") if j.metadata.name == job_name), None),
    )


def sts_of(dsd: Dsd, name: str) -> Any:
    return dsd.wait(
        "worker StatefulSet",
        lambda: next(
            iter(
                dsd.apps.list_namespaced_stateful_set(
                    dsd.namespace, label_selector=f"{MANAGED},app.kubernetes.io/instance={name}"
                ).items
            ),
            None,
        ),
    )


def worker_pods(dsd: Dsd, name: str) -> list[Any]:
    pods = dsd.pods(
        f"{MANAGED},app.kubernetes.io/instance={name},app.kubernetes.io/component=worker"
    )
    return [p for p in pods if p.metadata.deletion_timestamp is None]


def _with_ips(pods: list[Any], n: int) -> list[Any] | None:
    """The pods, once there are n of them with an IP each."""
    return pods if len(pods) == n and all(p.status.pod_ip for p in pods) else None


def pod_status_patch(pod: Any, restarts: int) -> dict[str, Any]:
    """A worker container that crashed and was restarted by the kubelet."""
    image = pod.spec.containers[0].image
    return {
        "status": {
            "containerStatuses": [
                {
                    "name": "engine",
                    "image": image,
                    "imageID": "",
                    "ready": False,
                    "restartCount": restarts,
                    "state": {"running": {"startedAt": "2026-01-01T00:00:10Z"}},
                    "lastState": {
                        "terminated": {
                            "exitCode": 134,
                            "reason": "Error",
                            "message": "rank 3: HCCL timeout",
                            "startedAt": "2026-01-01T00:00:00Z",
                            "finishedAt": "2026-01-01T00:00:09Z",
                        }
                    },
                }
            ]
        }
    }


def finish_pending_pod(dsd: Dsd, pod: Any, exit_code: int, message: str) -> None:
    """Make a (deliberately unschedulable) Job pod end as if its container had run."""
    phase = "Succeeded" if exit_code == 0 else "Failed"
    body = {
        "status": {
            "phase": phase,
            "containerStatuses": [
                {
                    "name": pod.spec.containers[0].name,
                    "image": pod.spec.containers[0].image,
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": exit_code,
                            "reason": "Completed" if exit_code == 0 else "Error",
                            "message": message,
                            "startedAt": "2026-01-01T00:00:00Z",
                            "finishedAt": "2026-01-01T00:01:00Z",
                        }
                    },
                }
            ],
        }
    }
    dsd.core.patch_namespaced_pod_status(pod.metadata.name, dsd.namespace, body)


def job_pod(dsd: Dsd, job_name: str) -> Any:
    return dsd.wait(
        f"pod of {job_name}",
        lambda: next(iter(dsd.pods(f"batch.kubernetes.io/job-name={job_name}")), None),
    )


UNSCHEDULABLE = {"requests": {"cpu": "5000"}}  # more than any kwok node: the pod stays Pending


# ------------------------------------------------------------------------------ lifecycle


def test_lifecycle_to_ready_on_npu_nodes(
    running_operator: OperatorProcess, dsd: Dsd, kube_cluster: Any
) -> None:
    ns = dsd.namespace
    bound_claim(dsd.core, ns, "r1-shards", "manual")  # for the claim the operator creates
    body = deployment(
        "r1",
        model={
            "name": "DeepSeek-R1",
            "source": {"pvc": {"claimName": "models", "path": "DeepSeek-R1"}},
            "mtp": True,
        },
        parallelism={"nodes": 2, "devicesPerNode": 8, "dp": 2, "tp": 8, "moeTp": 4},
        sharding={"store": {"pvc": {"storageClassName": "manual", "size": "10Gi"}}, "processes": 4},
        worker={
            "image": "dsworker:test",
            "accelerator": {"type": "npu"},
            "env": [{"name": "HCCL_CONNECT_TIMEOUT", "value": "1200"}],
        },
    )
    started = time.monotonic()
    dsd.create(body)
    job = shard_job(dsd, "r1")
    fp = dsd.status("r1")["fingerprint"]
    args = job.spec.template.spec.containers[0].args
    assert args[:2] == ["shard", "--model-path"] and "/source/DeepSeek-R1" in args
    for flag, value in {
        "--save-directory": f"/store/{fp[:16]}",
        "--world-size": "16",
        "--dp": "2",
        "--tp": "8",
        "--moe-tp": "4",
        "--moe-ep": "4",
        "--processes": "4",
        "--fingerprint": fp,
    }.items():
        assert args[args.index(flag) + 1] == value, flag
    assert "--mtp" in args
    assert job.spec.template.spec.containers[0].termination_message_policy == (
        "FallbackToLogsOnError"
    )
    claim = dsd.core.read_namespaced_persistent_volume_claim("r1-shards", ns)
    assert claim.spec.storage_class_name == "manual"
    assert claim.spec.access_modes == ["ReadWriteMany"]
    assert claim.metadata.owner_references[0].name == "r1"
    bind(dsd.core, ns, "r1-shards")

    # The group waits for the HCCL rank table, until the device plugin annotates the pods.
    dsd.wait(
        "WorkersReady RankTableIncomplete",
        lambda: dsd.condition("r1", "WorkersReady").get("reason") == "RankTableIncomplete",
        timeout=90,
    )
    pods = dsd.wait("2 worker pods with IPs", lambda: _with_ips(worker_pods(dsd, "r1"), 2))
    annotate(dsd.core, ns, pods, 8)
    status = dsd.wait_phase("r1", "Ready", timeout=90)
    elapsed = time.monotonic() - started
    sts = sts_of(dsd, "r1")
    pod = sts.spec.template.spec
    engine = pod.containers[0]
    assert sts.spec.pod_management_policy == "Parallel"
    assert sts.spec.update_strategy.type == "OnDelete"
    assert engine.resources.limits[NPU] == "8" and engine.resources.requests[NPU] == "8"
    env = {e.name: e.value for e in engine.env}
    assert env["DEEPSEEK_MTP"] == "1" and env["HCCL_CONNECT_TIMEOUT"] == "1200"
    assert env["MASTER_ADDR"] == f"r1-worker-0.r1-ranks.{ns}.svc"
    assert engine.args[engine.args.index("--model") + 1] == "/model"
    assert pod.init_containers[0].args[:3] == ["stage", "--store", f"/store/{fp[:16]}"]
    volumes = {v.name: v for v in pod.volumes}
    assert volumes["model"].empty_dir.medium == "Memory"
    assert volumes["store"].persistent_volume_claim.claim_name == "r1-shards"
    assert volumes["store"].persistent_volume_claim.read_only is True
    for probe in (engine.startup_probe, engine.readiness_probe, engine.liveness_probe):
        assert probe is not None and "/health" in probe._exec.command[2]
    assert engine.security_context.read_only_root_filesystem is True
    assert pod.security_context.run_as_non_root is True

    pods = worker_pods(dsd, "r1")
    assert sorted(p.spec.node_name for p in pods) == ["kwok-npu-0", "kwok-npu-1"]
    assert status["readyWorkers"] == "2/2" and status["worldSize"] == 16
    assert status["endpoint"] == f"http://r1.{ns}.svc:1025/v1"
    assert status["groupRestarts"] == 0
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Validated": "True",
        "Sharded": "True",
        "WorkersReady": "True",
        "Ready": "True",
    }
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])
    assert elapsed < 60

    table = kube_cluster.kubectl("get", "dsd", "r1", "-n", ns, "--no-headers").stdout.split()
    assert table[:6] == ["r1", "Ready", "2/2", "DeepSeek-R1", "dsworker", "16"], table
    reasons = dsd.event_reasons("r1")
    assert "Sharding" in reasons and "Ready" in reasons

    client_svc = dsd.core.read_namespaced_service("r1", ns)
    assert client_svc.spec.selector[names.POD_NAME_LABEL] == "r1-worker-0"
    headless = dsd.core.read_namespaced_service("r1-ranks", ns)
    assert headless.spec.cluster_ip == "None" and headless.spec.publish_not_ready_addresses
    pdb = client.PolicyV1Api(dsd.api).read_namespaced_pod_disruption_budget("r1-workers", ns)
    assert pdb.spec.min_available == 2
    cm = dsd.core.read_namespaced_config_map("r1-engine", ns)
    engine_cfg = json.loads(cm.data["engine.json"])
    assert (engine_cfg["worldSize"], engine_cfg["tp"], engine_cfg["moe_ep"]) == (16, 8, 4)

    # Level-triggered and idempotent: more reconciles change nothing.
    generation = sts.metadata.generation
    dsd.patch_spec("r1", {"worker": {"restartBudget": 4}})  # no child depends on it
    dsd.wait_phase("r1", "Ready")
    time.sleep(2)
    assert sts_of(dsd, "r1").metadata.generation == generation
    assert [p.metadata.uid for p in worker_pods(dsd, "r1")] == [p.metadata.uid for p in pods]


def test_sharding_disabled_starts_the_workers_directly(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    dsd.create(
        deployment(
            "v2",
            model={"architecture": "DeepseekV2"},
            sharding={"enabled": False, "store": None},
        )
    )
    status = dsd.wait_phase("v2", "Ready")
    assert dsd.jobs() == []
    assert "shards" not in status
    sharded = dsd.condition("v2", "Sharded")
    assert (sharded["status"], sharded["reason"]) == ("True", "ShardingDisabled")
    engine = sts_of(dsd, "v2").spec.template.spec.containers[0]
    assert engine.args[engine.args.index("--model") + 1] == "/source/DeepSeek-V3"


def test_a_refused_statefulset_is_reported_then_the_fixed_spec_serves(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    """A toleration the API server refuses: ChildRejected in the status and an Event, not a
    reconcile retried in silence; the user's env replaces the operator's variable of that name."""
    dsd.create(
        deployment(
            "refused",
            model={"architecture": "DeepseekV2"},
            sharding={"enabled": False, "store": None},
            worker={
                "image": "dsworker:test",
                "accelerator": {"type": "cpu"},
                "env": [{"name": "MASTER_ADDR", "value": "10.0.0.9"}],
                "tolerations": [{"key": "k", "operator": "Sometimes"}],
            },
        )
    )
    status = dsd.wait_phase("refused", "Failed")
    validated = dsd.condition("refused", "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "ChildRejected")
    assert "StatefulSet refused-worker" in validated["message"]
    assert "tolerations[0].operator" in validated["message"], validated["message"]
    assert "tolerations[0].operator" in status["message"]
    dsd.wait("ChildRejected Event", lambda: "ChildRejected" in dsd.event_reasons("refused"))

    dsd.patch_spec("refused", {"worker": {"tolerations": [{"key": "k", "operator": "Exists"}]}})
    dsd.wait_phase("refused", "Ready")
    assert dsd.condition("refused", "Validated")["status"] == "True"
    env = sts_of(dsd, "refused").spec.template.spec.containers[0].env
    assert [e.value for e in env if e.name == "MASTER_ADDR"] == ["10.0.0.9"]


def test_children_deleted_by_hand_are_put_back(running_operator: OperatorProcess, dsd: Dsd) -> None:
    """The child watches: Services removed by hand are re-applied by the operator.

    The store claim (of a class nothing provisions) never binds, so the sharding Job's pod never
    schedules: no pod changes whose events would trigger a reconcile anyway.
    """
    store = {"pvc": {"storageClassName": "never-provisioned", "size": "1Gi"}}
    dsd.create(deployment("hand", sharding={"store": store}))
    dsd.wait(
        "StoreNotBound",
        lambda: dsd.condition("hand", "Sharded").get("reason") == "StoreNotBound",
    )
    ns = dsd.namespace
    services = [names.client_service("hand"), names.headless_service("hand")]
    old = {n: dsd.core.read_namespaced_service(n, ns).metadata.uid for n in services}
    for n in services:
        dsd.core.delete_namespaced_service(n, ns)

    def recreated() -> bool:
        try:
            now = {n: dsd.core.read_namespaced_service(n, ns).metadata.uid for n in services}
        except client.ApiException:
            return False
        return all(now[n] != old[n] for n in services)

    dsd.wait("both Services put back", recreated, timeout=30)


def _metric(text: str, name: str) -> float:
    """One unlabelled sample of the operator's /metrics text (0 when absent)."""
    return next(
        (float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} ")), 0
    )


def _versions(dsd: Dsd, name: str) -> dict[str, str]:
    """resourceVersion of the custom resource and of every child the operator applies (pods are
    left out: the operator never writes them, kwok does)."""
    ns, selector = dsd.namespace, f"{MANAGED},app.kubernetes.io/instance={name}"
    found = {"dsd": dsd.get(name)["metadata"]["resourceVersion"]}  # type: ignore[index]
    listers = {
        "svc": dsd.core.list_namespaced_service,
        "cm": dsd.core.list_namespaced_config_map,
        "pvc": dsd.core.list_namespaced_persistent_volume_claim,
        "sts": dsd.apps.list_namespaced_stateful_set,
        "job": dsd.batch.list_namespaced_job,
        "pdb": client.PolicyV1Api(dsd.api).list_namespaced_pod_disruption_budget,
    }
    for kind, lister in listers.items():
        for obj in lister(ns, label_selector=selector).items:
            found[f"{kind}/{obj.metadata.name}"] = obj.metadata.resource_version
    return found


def test_resync_repairs_drift_that_no_event_reports(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    """A Service stripped of the annotation that maps it to its deployment: its watch event names
    no owner, so only the periodic resync puts it back. An idle resync writes nothing."""
    ns = dsd.namespace
    store = {"pvc": {"storageClassName": "never-provisioned", "size": "1Gi"}}
    service = names.client_service("quiet")
    strip = {"metadata": {"annotations": {names.DEPLOYMENT_ANNOTATION: None}}}

    def owner_annotation() -> str | None:
        svc = dsd.core.read_namespaced_service(service, ns)
        return (svc.metadata.annotations or {}).get(names.DEPLOYMENT_ANNOTATION)

    operator = running_operator
    # Events alone (the test operator's resync is 300 s): the stripped annotation stays stripped.
    dsd.create(deployment("quiet", sharding={"store": store}))
    dsd.wait(
        "StoreNotBound",
        lambda: dsd.condition("quiet", "Sharded").get("reason") == "StoreNotBound",
    )
    dsd.create(deployment("idle"))
    dsd.wait_phase("idle", "Ready")
    dsd.core.patch_namespaced_service(service, ns, strip)
    time.sleep(5)
    assert owner_annotation() is None

    operator.stop()
    resyncing = OperatorProcess(env=operator.env, log_dir=operator.log_dir / "resync")
    resyncing.log_dir.mkdir(parents=True, exist_ok=True)
    try:
        resyncing.start("--standalone", "--resync-period", "2")
        dsd.wait("the start-up listing repairs it", owner_annotation, timeout=30)
        dsd.wait_phase("idle", "Ready")
        before = {n: _versions(dsd, n) for n in ("quiet", "idle")}
        started = time.monotonic()
        resyncs = _metric(_get(resyncing.metrics_url)[1], "dsop_resyncs_total")
        dsd.wait(
            "four resyncs",
            lambda: _metric(_get(resyncing.metrics_url)[1], "dsop_resyncs_total") >= resyncs + 4,
            timeout=30,
        )
        time.sleep(max(0.0, started + 4.5 - time.monotonic()))  # two periods of each object
        assert {n: _versions(dsd, n) for n in ("quiet", "idle")} == before  # nothing written

        dsd.core.patch_namespaced_service(service, ns, strip)
        assert dsd.wait("the resync repairs it", owner_annotation, timeout=30) == "quiet"
    finally:
        resyncing.stop()
        operator.start()


def test_host_path_store_pins_the_job_to_the_workers_node(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    dsd.create(
        deployment(
            "tiny",
            parallelism={"nodes": 1, "devicesPerNode": 2},
            sharding={"store": {"hostPath": {"path": "/dev/shm/dsd"}}},
            worker={
                "image": "dsworker:test",
                "accelerator": {"type": "cpu"},
                "nodeSelector": {"kubernetes.io/hostname": "kwok-gpu-1"},
            },
        )
    )
    dsd.wait_phase("tiny", "Ready")
    [job] = dsd.jobs("sharder")
    assert job.spec.template.spec.node_selector == {"kubernetes.io/hostname": "kwok-gpu-1"}
    [pod] = dsd.pods(f"batch.kubernetes.io/job-name={job.metadata.name}")
    assert pod.spec.node_name == "kwok-gpu-1"
    spec = sts_of(dsd, "tiny").spec.template.spec
    assert not spec.init_containers
    fp = dsd.status("tiny")["fingerprint"]
    engine = spec.containers[0]
    assert engine.args[engine.args.index("--model") + 1] == f"/store/{fp[:16]}"


# ------------------------------------------------------------------------------ store size


def claim_request(dsd: Dsd, name: str) -> str:
    """The claim's storage request, "" while it does not exist."""
    try:
        claim = dsd.core.read_namespaced_persistent_volume_claim(name, dsd.namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return ""
        raise
    return str(claim.spec.resources.requests["storage"])


def test_store_claim_grows_with_the_spec_and_never_shrinks(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    """The claim the operator created follows a larger spec.sharding.store.pvc.size once it is
    Bound (Kubernetes refuses to resize an unbound claim); a smaller size is refused with a
    Warning and the Validated reason StoreSpecNotApplied; so is a resize the API server refuses."""
    ns = dsd.namespace
    storage = client.StorageV1Api(dsd.api)
    expandable = f"expandable-{ns}"
    storage.create_storage_class(
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": expandable},
            "provisioner": "example.com/none",
            "allowVolumeExpansion": True,
        }
    )
    try:
        dsd.create(
            deployment(
                "grow", sharding={"store": {"pvc": {"storageClassName": expandable, "size": "1Gi"}}}
            )
        )
        dsd.wait(
            "StoreNotBound",
            lambda: dsd.condition("grow", "Sharded").get("reason") == ("StoreNotBound"),
        )
        # Unbound: the larger size waits, and says so.
        dsd.patch_spec("grow", {"sharding": {"store": {"pvc": {"size": "2Gi"}}}})
        dsd.wait(
            "the resize waiting for the claim to bind",
            lambda: (
                "2Gi is applied once the claim is bound"
                in dsd.condition("grow", "Sharded").get("message", "")
            ),
        )
        assert claim_request(dsd, "grow-shards") == "1Gi"
        bound_claim(dsd.core, ns, "grow-shards", expandable)  # a volume for it, only now
        bind(dsd.core, ns, "grow-shards")
        dsd.wait("the claim asks 2Gi", lambda: claim_request(dsd, "grow-shards") == "2Gi")
        resized = dsd.wait(
            "ResizingStore event",
            lambda: [e for e in dsd.events("grow") if e.reason == "ResizingStore"],
        )
        assert resized[0].type == "Normal" and "from 1Gi to 2Gi" in resized[0].message
        dsd.wait_phase("grow", "Ready")
        claim = dsd.core.read_namespaced_persistent_volume_claim("grow-shards", ns)
        assert claim.spec.storage_class_name == expandable and claim.status.phase == "Bound"

        # Smaller: refused, the claim keeps 2Gi, the deployment keeps serving.
        dsd.patch_spec("grow", {"sharding": {"store": {"pvc": {"size": "1Gi"}}}})
        status = dsd.wait_phase("grow", "Ready")
        validated = dsd.condition("grow", "Validated")
        assert (validated["status"], validated["reason"]) == ("True", "StoreSpecNotApplied")
        assert validated["message"].startswith("spec.sharding.store.pvc.size: 1Gi is less than")
        assert "set size to 2Gi or more" in validated["message"]
        assert claim_request(dsd, "grow-shards") == "2Gi"
        assert status["readyWorkers"] == "2/2"
        warned = dsd.wait(
            "StoreSpecNotApplied event",
            lambda: [e for e in dsd.events("grow") if e.reason == "StoreSpecNotApplied"],
        )
        assert warned[0].type == "Warning"

        # A class that does not allow expansion: the API server's refusal is reported.
        fixed_class = "manual"  # no StorageClass object at all
        bound_claim(dsd.core, ns, "fixed-shards", fixed_class)
        store = {"pvc": {"storageClassName": fixed_class, "size": "1Gi"}}
        dsd.create(deployment("fixed", sharding={"store": store}))
        dsd.wait("claim fixed-shards", lambda: claim_request(dsd, "fixed-shards"))
        bind(dsd.core, ns, "fixed-shards")
        dsd.wait_phase("fixed", "Ready")
        dsd.patch_spec("fixed", {"sharding": {"store": {"pvc": {"size": "2Gi"}}}})
        dsd.wait_phase("fixed", "Ready")
        validated = dsd.condition("fixed", "Validated")
        assert validated["reason"] == "StoreSpecNotApplied", validated
        assert "the API server refused" in validated["message"]
        assert "storageclass that provisions the pvc must support resize" in validated["message"]
        assert "allowVolumeExpansion: true" in validated["message"]
        assert claim_request(dsd, "fixed-shards") == "1Gi"
    finally:
        storage.delete_storage_class(expandable)


# ----------------------------------------------------------------------------- validation


def test_model_config_that_does_not_divide_is_refused_before_any_job(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "hidden_size": 256,
        "vocab_size": 1024,
        "num_attention_heads": 8,
        "num_hidden_layers": 2,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "n_routed_experts": 6,  # 6 experts over moeEp 4
    }
    body = deployment("cfg")
    body["metadata"]["annotations"] = {names.MODEL_CONFIG_ANNOTATION: json.dumps(config)}
    dsd.create(body)
    status = dsd.wait_phase("cfg", "Failed")
    validated = dsd.condition("cfg", "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "ConfigMismatch")
    assert "spec.parallelism.moeEp" in validated["message"]
    assert "n_routed_experts" in status["message"]
    time.sleep(1)
    assert dsd.jobs() == []
    # Fixed in the spec: the same object goes on to shard.
    dsd.patch_spec("cfg", {"parallelism": {"moeEp": 2, "moeTp": 2}})
    dsd.wait_phase("cfg", "Ready")


def test_spec_warning_becomes_an_event_and_a_condition_message(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    dsd.create(deployment("warn", expertParallel={"alltoallBufferScaleFactors": [[0, 8.0]]}))
    dsd.wait_phase("warn", "Ready")
    validated = dsd.condition("warn", "Validated")
    assert validated["reason"] == "ValidWithWarnings"
    assert "has no effect with level 1" in validated["message"]
    warnings = [e for e in dsd.events("warn") if e.reason == "SpecWarning"]
    assert len(warnings) == 1 and warnings[0].type == "Warning"


def test_sharder_failure_is_reported_and_a_spec_change_retries(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    # Retries left, but bad input (exit code 2) fails the Job at once (its podFailurePolicy).
    dsd.create(deployment("bad", sharding={"backoffLimit": 3, "resources": UNSCHEDULABLE}))
    job = shard_job(dsd, "bad")
    pod = job_pod(dsd, job.metadata.name)
    msg = (
        "the plan does not divide the model: spec.parallelism.tp: num_attention_heads 6 is not "
        "divisible by tp 4"
    )
    finish_pending_pod(dsd, pod, 2, json.dumps({"error": msg}))
    status = dsd.wait_phase("bad", "Failed")
    failed = dsd.batch.read_namespaced_job(job.metadata.name, dsd.namespace).status
    assert [c.reason for c in failed.conditions if c.type == "Failed"] == ["PodFailurePolicy"]
    assert len(dsd.pods(f"batch.kubernetes.io/job-name={job.metadata.name}")) == 1
    assert status["message"] == msg
    validated = dsd.condition("bad", "Validated")
    assert (validated["status"], validated["reason"], validated["message"]) == (
        "False",
        "ConfigMismatch",
        msg,
    )
    assert dsd.condition("bad", "Sharded")["reason"] == "ShardingFailed"
    assert "Failed" in dsd.event_reasons("bad")
    first_uid = job.metadata.uid

    # A new generation retries: the failed Job is replaced, and this time it completes.
    dsd.patch_spec("bad", {"sharding": {"backoffLimit": 1, "resources": None}})
    dsd.wait_phase("bad", "Ready")
    [job] = dsd.jobs("sharder")
    assert job.metadata.uid != first_uid
    assert "RetryingSharding" in dsd.event_reasons("bad")


# ------------------------------------------------------------------------------- reshard


def test_reshard_rolls_the_workers_only_when_the_new_shards_are_complete(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    dsd.create(deployment("rs", parallelism={"nodes": 2, "devicesPerNode": 2, "tp": 4}))
    dsd.wait_phase("rs", "Ready")
    old_fp = dsd.status("rs")["fingerprint"]
    [old_job] = dsd.jobs("sharder")
    old_pods = {p.metadata.uid for p in worker_pods(dsd, "rs")}

    dsd.patch_spec(
        "rs",
        {"parallelism": {"tp": 2, "dp": 2}, "sharding": {"resources": UNSCHEDULABLE}},
    )
    new_fp = dsd.wait(
        "new fingerprint",
        lambda: (fp := dsd.status("rs").get("fingerprint")) != old_fp and fp,
    )
    new_job = shard_job(dsd, "rs")
    assert new_job.metadata.name == names.shard_job("rs", new_fp)
    args = new_job.spec.template.spec.containers[0].args
    assert args[args.index("--tp") + 1] == "2" and args[args.index("--dp") + 1] == "2"
    status = dsd.wait_phase("rs", "Sharding")
    ready = dsd.condition("rs", "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "ServingPreviousPlan")
    assert status["readyWorkers"] == "2/2"
    time.sleep(2)  # the new Job is stuck: the old group must keep running untouched
    sts = sts_of(dsd, "rs")
    assert sts.metadata.annotations[names.FINGERPRINT_ANNOTATION] == old_fp
    assert {p.metadata.uid for p in worker_pods(dsd, "rs")} == old_pods

    summary = {"bytes": 3 * 10**9, "files": 40, "seconds": 12.5, "throughputMBps": 240.0}
    finish_pending_pod(dsd, job_pod(dsd, new_job.metadata.name), 0, json.dumps(summary))
    status = dsd.wait_phase("rs", "Ready")
    sts = sts_of(dsd, "rs")
    assert sts.metadata.annotations[names.FINGERPRINT_ANNOTATION] == new_fp
    stage = sts.spec.template.spec.init_containers[0]
    assert stage.args[stage.args.index("--store") + 1] == f"/store/{new_fp[:16]}"
    model = next(v for v in sts.spec.template.spec.volumes if v.name == "model")
    assert model.empty_dir.size_limit  # sized from the shard bytes of the summary
    assert not old_pods & {p.metadata.uid for p in worker_pods(dsd, "rs")}
    assert status["shards"] == {**summary, "job": new_job.metadata.name}

    # The old plan's shards are removed by a Job on the store, then its sharding Job goes.
    cleanup_name = names.cleanup_job("rs", old_fp)
    cleanup = dsd.wait(
        "cleanup Job",
        lambda: next(
            (j for j in dsd.jobs("shard-cleanup") if j.metadata.name == cleanup_name), None
        ),
    )
    assert cleanup.spec.template.spec.containers[0].args == ["-rf", "--", f"/store/{old_fp[:16]}"]
    dsd.wait(
        "old sharding Job deleted",
        lambda: old_job.metadata.name not in {j.metadata.name for j in dsd.jobs("sharder")},
    )
    assert "OldShardsRemoved" in dsd.wait(
        "OldShardsRemoved event",
        lambda: (r := dsd.event_reasons("rs")) and "OldShardsRemoved" in r and r,
    )


# ------------------------------------------------------------------------ group restarts


def test_group_restart_budget_and_retry(running_operator: OperatorProcess, dsd: Dsd) -> None:
    dsd.create(deployment("gr", worker={"restartBudget": 1, "accelerator": {"type": "cpu"}}))
    dsd.wait_phase("gr", "Ready")
    pods = worker_pods(dsd, "gr")
    before = {p.metadata.uid for p in pods}
    victim = next(p for p in pods if p.metadata.name.endswith("-1"))
    dsd.core.patch_namespaced_pod_status(
        victim.metadata.name, dsd.namespace, pod_status_patch(victim, 1)
    )

    # Both pods are replaced together and the restart is counted.
    dsd.wait(
        "all worker pods replaced",
        lambda: (
            (now := worker_pods(dsd, "gr"))
            and len(now) == 2
            and not before & {p.metadata.uid for p in now}
        ),
    )
    status = dsd.wait_phase("gr", "Ready")
    assert status["groupRestarts"] == 1
    restart = next(e for e in dsd.events("gr") if e.reason == "GroupRestart")
    assert restart.type == "Warning" and "HCCL timeout" in restart.message

    # The budget (1) is spent: the next failure is terminal.
    pods = worker_pods(dsd, "gr")
    victim = next(p for p in pods if p.metadata.name.endswith("-0"))
    dsd.core.patch_namespaced_pod_status(
        victim.metadata.name, dsd.namespace, pod_status_patch(victim, 1)
    )
    status = dsd.wait_phase("gr", "Failed")
    assert dsd.condition("gr", "WorkersReady")["reason"] == "RestartBudgetExhausted"
    assert "restart budget" in status["message"]
    time.sleep(2)
    assert {p.metadata.uid for p in worker_pods(dsd, "gr")} == {p.metadata.uid for p in pods}

    # A spec change retries: a fresh budget, one group restart, Ready again.
    dsd.patch_spec("gr", {"worker": {"restartBudget": 3}})
    status = dsd.wait_phase("gr", "Ready")
    assert status["groupRestarts"] == 1
    assert not {p.metadata.uid for p in pods} & {p.metadata.uid for p in worker_pods(dsd, "gr")}


# ------------------------------------------------------------------- operator restarts


def test_operator_killed_mid_way_resumes_without_duplicates(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    running_operator.kill()
    dsd.create(deployment("crash"))
    running_operator.start()
    shard_job(dsd, "crash")
    running_operator.kill()  # after the Job, before (or while) the workers come
    time.sleep(1)
    running_operator.start()
    dsd.wait_phase("crash", "Ready")
    ns = dsd.namespace
    selector = f"{MANAGED},app.kubernetes.io/instance=crash"
    assert len(dsd.jobs("sharder")) == 1
    assert len(dsd.apps.list_namespaced_stateful_set(ns, label_selector=selector).items) == 1
    assert len(dsd.core.list_namespaced_service(ns, label_selector=selector).items) == 2
    assert len(dsd.core.list_namespaced_config_map(ns, label_selector=selector).items) == 1
    assert sts_of(dsd, "crash").metadata.generation == 1
    assert len(worker_pods(dsd, "crash")) == 2


# ------------------------------------------------------------------------------ deletion


def test_deleting_the_deployment_removes_every_child_and_keeps_the_weights(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    dsd.create(deployment("gone"))
    dsd.wait_phase("gone", "Ready")
    dsd.delete("gone")
    ns = dsd.namespace
    selector = f"{MANAGED},app.kubernetes.io/instance=gone"

    def children() -> list[str]:
        found = [j.metadata.name for j in dsd.jobs()]
        found += [
            s.metadata.name
            for s in dsd.apps.list_namespaced_stateful_set(ns, label_selector=selector).items
        ]
        found += [
            s.metadata.name
            for s in dsd.core.list_namespaced_service(ns, label_selector=selector).items
        ]
        found += [
            c.metadata.name
            for c in dsd.core.list_namespaced_config_map(ns, label_selector=selector).items
        ]
        found += [p.metadata.name for p in dsd.pods(selector)]
        return found

    dsd.wait("every child garbage-collected", lambda: not children() or None, timeout=90)
    assert dsd.get("gone") is None
    assert dsd.core.read_namespaced_persistent_volume_claim("models", ns).status.phase == "Bound"
    assert dsd.core.read_namespaced_persistent_volume_claim("shards", ns).status.phase == "Bound"


# ---------------------------------------------------------------------- metrics, probes


def test_liveness_and_metrics(running_operator: OperatorProcess, dsd: Dsd) -> None:
    dsd.create(deployment("m"))
    dsd.wait_phase("m", "Ready")
    code, _ = _get(running_operator.liveness_url)
    assert code == 200
    code, text = _get(running_operator.metrics_url)
    assert code == 200
    assert 'dsop_reconciles_total{result="ok"}' in text
    assert "dsop_reconcile_duration_seconds_bucket" in text
    ready = [
        line for line in text.splitlines() if line.startswith('dsop_deployments{phase="Ready"}')
    ]
    assert ready and float(ready[0].split()[-1]) >= 1


def test_leader_election_by_peering(operator: OperatorProcess, dsd: Dsd) -> None:
    """Two operators of one peering name: the higher priority acts, the other waits, and takes
    over when the first one stops."""
    operator.stop()
    peerings = client.CustomObjectsApi(dsd.api)
    peering = f"dsop-{dsd.namespace}"
    peerings.create_cluster_custom_object(
        "kopf.dev",
        "v1",
        "clusterkopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": peering}},
    )
    leader = OperatorProcess(env=operator.env, log_dir=operator.log_dir / "leader")
    follower = OperatorProcess(env=operator.env, log_dir=operator.log_dir / "follower")
    for handle in (leader, follower):
        handle.log_dir.mkdir(parents=True, exist_ok=True)
    try:
        leader.start("--peering", peering, "--priority", "100")
        follower.start("--peering", peering, "--priority", "10")
        dsd.create(deployment("first"))
        dsd.wait_phase("first", "Ready")
        _, metrics = _get(follower.metrics_url)
        assert 'dsop_reconciles_total{result="ok"}' not in metrics, follower.tail()
        _, metrics = _get(leader.metrics_url)
        assert 'dsop_reconciles_total{result="ok"}' in metrics

        leader.stop()  # a clean stop removes its keep-alive: the follower resumes at once
        dsd.wait(
            "the follower resumes",
            lambda: "Resuming operations" in follower.tail(200),
            timeout=30,
        )
        dsd.create(deployment("second"))
        dsd.wait_phase("second", "Ready")
        _, metrics = _get(follower.metrics_url)
        assert 'dsop_reconciles_total{result="ok"}' in metrics
    finally:
        follower.stop()
        leader.stop()
        peerings.delete_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", peering)
        operator.start()


def test_an_outranked_replica_keeps_its_timers_quiet(operator: OperatorProcess, dsd: Dsd) -> None:
    """kopf pauses only its watches: once a live peer outranks a replica that led, that replica's
    own resync timers must not reconcile, and must again once the peer is gone."""
    operator.stop()
    ns, peering = dsd.namespace, "dsop-timers"
    peerings = client.CustomObjectsApi(dsd.api)
    peerings.create_namespaced_custom_object(
        "kopf.dev",
        "v1",
        ns,
        "kopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": peering}},
    )
    replica = OperatorProcess(env=operator.env, log_dir=operator.log_dir / "outranked")
    replica.log_dir.mkdir(parents=True, exist_ok=True)

    def sample(name: str) -> float:
        return _metric(_get(replica.metrics_url)[1], name)

    def keepalive(entry: dict[str, object] | None) -> None:
        body = {"status": {"newer-leader": entry}}
        peerings.patch_namespaced_custom_object("kopf.dev", "v1", ns, "kopfpeerings", peering, body)

    ok = 'dsop_reconciles_total{result="ok"}'
    try:
        replica.start("--namespace", ns, "--peering", peering, "--priority", "10",
                      "--resync-period", "1")  # fmt: skip
        dsd.create(deployment("timed"))  # reconciled is enough: Ready is not the point here
        dsd.wait("reconciled", lambda: dsd.status("timed").get("observedGeneration") == 1)
        dsd.wait("resyncs", lambda: sample("dsop_resyncs_total") >= 2, timeout=30)
        seen = datetime.now(UTC).isoformat()
        keepalive({"priority": 100, "lifetime": 120, "lastseen": seen})
        dsd.wait("kopf pauses", lambda: "Pausing operations" in replica.tail(200), timeout=30)
        dsd.wait("a skipped timer", lambda: sample("dsop_paused_timer_skips_total") >= 1)
        time.sleep(1)  # a reconcile an event started before the pause may still be finishing
        before, skips = sample(ok), sample("dsop_paused_timer_skips_total")
        dsd.wait(
            "more skipped timers",
            lambda: sample("dsop_paused_timer_skips_total") >= skips + 2,
            timeout=30,
        )
        assert sample(ok) == before, replica.tail()
        keepalive(None)
        dsd.wait("reconciles resume", lambda: sample(ok) > before, timeout=30)
    finally:
        replica.stop()
        peerings.delete_namespaced_custom_object("kopf.dev", "v1", ns, "kopfpeerings", peering)
        operator.start()


def test_many_deployments_do_not_share_children(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    for i in range(3):
        dsd.create(deployment(f"m{i}"))
    for i in range(3):
        dsd.wait_phase(f"m{i}", "Ready")
    # Same spec and store, yet never the same shard directory: one deployment's cleanup can
    # never delete what another one serves from.
    fps = {dsd.status(f"m{i}")["fingerprint"] for i in range(3)}
    assert len(fps) == 3
    assert len(dsd.jobs("sharder")) == 3
    body = copy.deepcopy(dsd.get("m0"))
    assert body["metadata"].get("finalizers") in (None, [])  # kopf added nothing to the object
    assert not any(k.startswith("kopf.") for k in body["metadata"].get("annotations") or {})
