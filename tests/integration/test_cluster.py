"""The local control plane is a real Kubernetes: each test exercises a part the operator needs.

Admission (CEL), the scheduler with extended resources, the Job/StatefulSet/garbage-collector
controllers, kwok's fake kubelets, server-side apply and Helm. Every assertion here would fail
against a mock or a half-started cluster.
"""

from __future__ import annotations

import json
import secrets
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.integration

NPU = "huawei.com/Ascend910"
GPU = "nvidia.com/gpu"
APPLY = "application/apply-patch+yaml"


@pytest.fixture(scope="module")
def api(kube_cluster: Any) -> client.ApiClient:
    return kube_cluster.api_client()


@pytest.fixture
def namespace(kube_cluster: Any, api: client.ApiClient) -> Iterator[str]:
    """A fresh namespace per test, so tests never see each other's objects."""
    name = f"t-{secrets.token_hex(4)}"
    core = client.CoreV1Api(api)
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    # Pods need the namespace's default service account (the controller-manager creates it).
    kube_cluster.wait_for(
        f"service account default in {name}",
        lambda: _get_or_none(core.read_namespaced_service_account, "default", name),
    )
    yield name
    core.delete_namespace(name)


def _get_or_none(read: Any, *args: Any) -> Any:
    try:
        return read(*args)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _container(resources: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": "main", "image": "registry.invalid/none:0", "command": ["true"]}
    if resources:
        spec["resources"] = {"limits": resources, "requests": resources}
    return spec


def test_versions_are_stamped(kube_cluster: Any) -> None:
    """Helm's kubeVersion checks and `kubectl version` need a real version, not v0.0.0."""
    out = json.loads(kube_cluster.kubectl("version", "-o", "json").stdout)
    assert out["serverVersion"]["gitVersion"].startswith("v1.3"), out
    assert out["serverVersion"]["major"] == "1"
    assert out["clientVersion"]["gitVersion"] == out["serverVersion"]["gitVersion"]


def test_fake_nodes_advertise_accelerators(api: client.ApiClient) -> None:
    nodes = client.CoreV1Api(api).list_node().items
    by_kind: dict[str, list[Any]] = {"npu": [], "gpu": []}
    for node in nodes:
        by_kind[node.metadata.labels["dsop.io/accelerator"]].append(node)
        ready = [c for c in node.status.conditions if c.type == "Ready"]
        assert ready and ready[0].status == "True", node.metadata.name
    assert len(by_kind["npu"]) == 2 and len(by_kind["gpu"]) == 2
    assert all(n.status.allocatable[NPU] == "8" for n in by_kind["npu"])
    assert all(n.status.allocatable[GPU] == "8" for n in by_kind["gpu"])
    assert all(NPU not in n.status.allocatable for n in by_kind["gpu"])


def test_crd_cel_validation_rejects_and_accepts(kube_cluster: Any, api: client.ApiClient) -> None:
    """x-kubernetes-validations runs in the apiserver: a bad object is refused with our message."""
    group, plural = "test.dsop.io", f"widgets{secrets.token_hex(3)}"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": plural[:-1], "kind": "Widget" + plural[7:]},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["replicas", "maxReplicas"],
                                    "properties": {
                                        "replicas": {"type": "integer", "minimum": 0},
                                        "maxReplicas": {"type": "integer", "minimum": 1},
                                    },
                                    "x-kubernetes-validations": [
                                        {
                                            "rule": "self.replicas <= self.maxReplicas",
                                            "message": "replicas must not exceed maxReplicas",
                                        }
                                    ],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    ext = client.ApiextensionsV1Api(api)
    ext.create_custom_resource_definition(crd)
    try:

        def established() -> bool:
            got = ext.read_custom_resource_definition(crd["metadata"]["name"])
            conds = got.status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conds)

        kube_cluster.wait_for("CRD Established", established)
        objects = client.CustomObjectsApi(api)
        kind = crd["spec"]["names"]["kind"]

        def widget(name: str, replicas: int, max_replicas: int) -> dict[str, Any]:
            return {
                "apiVersion": f"{group}/v1",
                "kind": kind,
                "metadata": {"name": name},
                "spec": {"replicas": replicas, "maxReplicas": max_replicas},
            }

        def create(body: dict[str, Any]) -> Any:
            return objects.create_namespaced_custom_object(group, "v1", "default", plural, body)

        # Right after Established the CEL rule may not be compiled into the handler yet; retry
        # the good object until the endpoint serves, then the bad one must fail.
        kube_cluster.wait_for("widget endpoint", lambda: create(widget("good", 2, 4)))
        with pytest.raises(ApiException) as err:
            create(widget("bad", 5, 4))
        assert err.value.status == 422
        assert "replicas must not exceed maxReplicas" in err.value.body
        got = objects.get_namespaced_custom_object(group, "v1", "default", plural, "good")
        assert got["spec"] == {"replicas": 2, "maxReplicas": 4}
        assert (
            _get_or_none(
                objects.get_namespaced_custom_object, group, "v1", "default", plural, "bad"
            )
            is None
        )
    finally:
        ext.delete_custom_resource_definition(crd["metadata"]["name"])


def test_job_pod_is_scheduled_on_npu_node_and_completes(
    kube_cluster: Any, api: client.ApiClient, namespace: str
) -> None:
    """Scheduler honours the NPU request and node selector; kwok makes the pod succeed."""
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "shard"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"dsop.io/accelerator": "npu"},
                    "containers": [_container({NPU: "8", "cpu": "1"})],
                }
            },
        },
    }
    batch = client.BatchV1Api(api)
    batch.create_namespaced_job(namespace, job)

    def complete() -> bool:
        status = batch.read_namespaced_job_status("shard", namespace).status
        conds = status.conditions or []
        failed = [c for c in conds if c.type == "Failed" and c.status == "True"]
        assert not failed, failed
        return any(c.type == "Complete" and c.status == "True" for c in conds)

    kube_cluster.wait_for("Job Complete", complete, timeout=120)
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="job-name=shard")
    assert len(pods.items) == 1
    pod = pods.items[0]
    assert pod.status.phase == "Succeeded"
    assert pod.spec.node_name in {"kwok-npu-0", "kwok-npu-1"}


def test_statefulset_becomes_ready_and_respects_gpu_capacity(
    kube_cluster: Any, api: client.ApiClient, namespace: str
) -> None:
    """Two 8-GPU replicas fill both GPU nodes; a third cannot fit and stays Pending."""
    apps = client.AppsV1Api(api)
    core = client.CoreV1Api(api)
    labels = {"app": "workers"}
    sts = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "workers"},
        "spec": {
            "replicas": 2,
            "serviceName": "workers",
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [_container({GPU: "8"})]},
            },
        },
    }
    apps.create_namespaced_stateful_set(namespace, sts)

    def ready() -> bool:
        status = apps.read_namespaced_stateful_set_status("workers", namespace).status
        return (status.ready_replicas or 0) == 2

    kube_cluster.wait_for("StatefulSet readyReplicas == 2", ready, timeout=120)
    pods = core.list_namespaced_pod(namespace, label_selector="app=workers").items
    assert sorted(p.spec.node_name for p in pods) == ["kwok-gpu-0", "kwok-gpu-1"]
    assert all(p.status.phase == "Running" for p in pods)

    apps.patch_namespaced_stateful_set_scale("workers", namespace, {"spec": {"replicas": 3}})

    def unschedulable() -> bool:
        pod = _get_or_none(core.read_namespaced_pod_status, "workers-2", namespace)
        if pod is None or not pod.status.conditions:
            return False
        return any(
            c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable"
            for c in pod.status.conditions
        )

    kube_cluster.wait_for("workers-2 Unschedulable (no GPU left)", unschedulable)
    status = apps.read_namespaced_stateful_set_status("workers", namespace).status
    assert status.ready_replicas == 2


def test_garbage_collector_deletes_dependents(
    kube_cluster: Any, api: client.ApiClient, namespace: str
) -> None:
    """ownerReferences work: the operator relies on them to clean up a deleted deployment."""
    core = client.CoreV1Api(api)
    owner = core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "owner"}, "data": {"role": "owner"}}
    )
    ref = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    for name in ("child-a", "child-b"):
        core.create_namespaced_config_map(
            namespace, {"metadata": {"name": name, "ownerReferences": [ref]}}
        )
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "bystander"}})

    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Foreground")

    def dependents_gone() -> bool:
        names = {cm.metadata.name for cm in core.list_namespaced_config_map(namespace).items}
        return not names & {"owner", "child-a", "child-b"}

    kube_cluster.wait_for("owner and dependents deleted", dependents_gone)
    assert core.read_namespaced_config_map("bystander", namespace).metadata.name == "bystander"


def test_server_side_apply_from_python_client(api: client.ApiClient, namespace: str) -> None:
    """Apply patches with a field manager; a second manager conflicts unless it forces."""
    core = client.CoreV1Api(api)

    def apply(manager: str, data: dict[str, str], force: bool | None = None) -> Any:
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "applied", "namespace": namespace},
            "data": data,
        }
        return core.patch_namespaced_config_map(
            "applied",
            namespace,
            body,
            field_manager=manager,
            force=force,
            _content_type=APPLY,
        )

    created = apply("dsop-operator", {"a": "1", "b": "2"}, force=True)
    assert created.data == {"a": "1", "b": "2"}
    managers = {(m.manager, m.operation) for m in created.metadata.managed_fields}
    assert ("dsop-operator", "Apply") in managers

    # Applying again without a field drops it (it is owned only by this manager).
    updated = apply("dsop-operator", {"a": "1"}, force=True)
    assert updated.data == {"a": "1"}

    with pytest.raises(ApiException) as err:
        apply("someone-else", {"a": "changed"})
    assert err.value.status == 409

    forced = apply("someone-else", {"a": "changed"}, force=True)
    assert forced.data == {"a": "changed"}


def test_helm_install_and_uninstall(kube_cluster: Any, tmp_path: Path, namespace: str) -> None:
    """A chart with a kubeVersion constraint installs, renders values, and uninstalls."""
    chart = tmp_path / "tiny"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        textwrap.dedent(
            """\
            apiVersion: v2
            name: tiny
            version: 0.1.0
            kubeVersion: ">=1.30.0-0"
            """
        )
    )
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "configmap.yaml").write_text(
        textwrap.dedent(
            """\
            apiVersion: v1
            kind: ConfigMap
            metadata:
              name: {{ .Release.Name }}-cfg
            data:
              greeting: {{ .Values.greeting | quote }}
              kube: {{ .Capabilities.KubeVersion.Version | quote }}
            """
        )
    )
    kube_cluster.helm(
        "install", "demo", str(chart), "-n", namespace, "--set", "greeting=hi", "--wait"
    )
    cm = json.loads(
        kube_cluster.kubectl("get", "cm", "demo-cfg", "-n", namespace, "-o", "json").stdout
    )
    assert cm["data"]["greeting"] == "hi"
    assert cm["data"]["kube"].startswith("v1.3")
    releases = json.loads(kube_cluster.helm("list", "-n", namespace, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in releases] == [("demo", "deployed")]

    kube_cluster.helm("uninstall", "demo", "-n", namespace, "--wait")
    gone = kube_cluster.kubectl("get", "cm", "demo-cfg", "-n", namespace, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    assert json.loads(kube_cluster.helm("list", "-n", namespace, "-o", "json").stdout) == []
