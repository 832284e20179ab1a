"""The chart's optional NetworkPolicies (values: networkPolicy), rendered with `helm template`:
valid for the cluster's Kubernetes release, selecting the operator's worker pods, and letting in
what the values say: the API port from apiFrom, metrics from metricsFrom, every other port (the
rendezvous and collective-communication ports) only from the worker pods."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_chart import CHART, cluster_k8s_version, run_helm

from deepseek_operator.planning import names

MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
GATEWAY = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}},
    "podSelector": {"matchLabels": {"app": "gateway"}},
}
ON = {
    "networkPolicy": {"enabled": True, "metricsFrom": [MONITORING]},
    "watchNamespaces": ["llm", "b"],
}


def helm_template(helm: Path, values: dict[str, Any], tmp_path: Path) -> Any:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    return run_helm(
        helm,
        *("template", "dsop", str(CHART), "-n", "dsop-system"),
        *("--kube-version", cluster_k8s_version(), "-f", str(values_file)),
    )


def policies(helm: Path, values: dict[str, Any], tmp_path: Path) -> list[dict[str, Any]]:
    proc = helm_template(helm, values, tmp_path)
    assert proc.returncode == 0, proc.stderr
    objects = [d for d in yaml.safe_load_all(proc.stdout) if d]
    for obj in objects:
        if obj["apiVersion"] != "kopf.dev/v1":
            kubernetes_validate.validate(obj, cluster_k8s_version(), strict=True)
    return [o for o in objects if o["kind"] == "NetworkPolicy"]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # all this chart renders
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def admits(policy: dict[str, Any], pod: dict[str, Any], port: str) -> bool:
    """Whether an ingress policy lets `pod` ({namespace, labels}) in on the named port."""
    ns_labels = {"kubernetes.io/metadata.name": pod["namespace"]}
    for rule in policy["spec"].get("ingress") or ():
        if rule.get("ports") and port not in {p["port"] for p in rule["ports"]}:
            continue
        for peer in rule.get("from") or ():
            if "namespaceSelector" in peer:
                ns_ok = _selects(peer["namespaceSelector"], ns_labels)
            else:
                ns_ok = pod["namespace"] == policy["metadata"]["namespace"]
            pod_ok = _selects(peer.get("podSelector") or {}, pod["labels"])
            if ns_ok and pod_ok:
                return True
    return False


def worker(namespace: str, deployment: str = "r1") -> dict[str, Any]:
    return {"namespace": namespace, "labels": names.labels(deployment, names.WORKER)}


def test_off_by_default(helm: Path, tmp_path: Path) -> None:
    assert policies(helm, {}, tmp_path) == []


def test_worker_policies_let_in_what_the_values_say(helm: Path, tmp_path: Path) -> None:
    found = policies(helm, ON, tmp_path)
    workers = {
        p["metadata"]["namespace"]: p for p in found if p["metadata"]["name"].endswith("-workers")
    }
    assert sorted(workers) == ["b", "llm"]
    policy = workers["llm"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    # It selects the pods the operator creates, of every deployment of the namespace.
    assert _selects(policy["spec"]["podSelector"], names.labels("any", names.WORKER))
    assert not _selects(policy["spec"]["podSelector"], names.labels("any", names.SHARDER))
    client = {"namespace": "llm", "labels": {"app": "client"}}
    elsewhere = {"namespace": "other", "labels": {"app": "client"}}
    prometheus = {"namespace": "monitoring", "labels": {"app": "prometheus"}}
    # Rendezvous (dist) and every other port: only from the worker pods.
    assert admits(policy, worker("llm"), "dist") and admits(policy, worker("llm"), "http")
    for pod in (client, elsewhere, prometheus, worker("b")):
        assert not admits(policy, pod, "dist"), pod
    # The API port: the namespace's own pods by default, and metricsFrom for /metrics.
    assert admits(policy, client, "http") and admits(policy, prometheus, "http")
    assert not admits(policy, elsewhere, "http")


def test_api_sources_replace_the_namespace_default(helm: Path, tmp_path: Path) -> None:
    values = {**ON, "networkPolicy": {"enabled": True, "apiFrom": [GATEWAY], "namespaces": ["llm"]}}
    (policy,) = [p for p in policies(helm, values, tmp_path) if p["metadata"]["namespace"] == "llm"]
    gateway = {"namespace": "gateway", "labels": {"app": "gateway"}}
    assert admits(policy, gateway, "http") and not admits(policy, gateway, "dist")
    assert not admits(policy, {"namespace": "llm", "labels": {}}, "http")
    assert not admits(policy, {"namespace": "monitoring", "labels": {}}, "http")


def test_operator_policy_opens_only_the_metrics_port(helm: Path, tmp_path: Path) -> None:
    (policy,) = [
        p for p in policies(helm, ON, tmp_path) if p["metadata"]["name"].endswith("-operator")
    ]
    assert policy["metadata"]["namespace"] == "dsop-system"
    prometheus = {"namespace": "monitoring", "labels": {}}
    assert admits(policy, prometheus, "metrics") and not admits(policy, prometheus, "health")
    assert not admits(policy, {"namespace": "dsop-system", "labels": {}}, "metrics")
    values = {**ON, "networkPolicy": {"enabled": True}}
    (closed,) = [
        p for p in policies(helm, values, tmp_path) if p["metadata"]["name"].endswith("-operator")
    ]
    assert closed["spec"]["ingress"] == []


def test_namespace_scope_defaults_to_the_release_namespace(helm: Path, tmp_path: Path) -> None:
    values = {"rbac": {"scope": "namespace"}, "networkPolicy": {"enabled": True}}
    spaces = {p["metadata"]["namespace"] for p in policies(helm, values, tmp_path)}
    assert spaces == {"dsop-system"}


def test_a_cluster_wide_install_must_name_the_namespaces(helm: Path, tmp_path: Path) -> None:
    proc = helm_template(helm, {"networkPolicy": {"enabled": True}}, tmp_path)
    assert proc.returncode != 0
    assert "networkPolicy.namespaces" in proc.stderr


@pytest.mark.parametrize(
    "values",
    [
        {"networkPolicy": {"enabled": True, "apiFrom": [{"podSelecter": {}}]}},
        {"networkPolicy": {"enabled": True, "apiFrom": [{}]}},
        {"networkPolicy": {"enable": True}},
        {"networkPolicy": {"namespaces": ["Bad_Name"]}},
    ],
)
def test_bad_values_fail_the_schema(helm: Path, tmp_path: Path, values: dict[str, Any]) -> None:
    proc = helm_template(helm, values, tmp_path)
    assert proc.returncode != 0 and "networkPolicy" in proc.stderr, proc.stderr
