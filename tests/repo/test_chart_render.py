"""The Helm chart, rendered offline: every object valid for the Kubernetes version the test
cluster runs, the generated CRDs shipped byte-equal, scope and leader election as the values say,
a hardened pod, the metrics Service, and arguments the operator's own parser accepts. The values
schema is test_chart_values.py, RBAC test_chart_rbac.py.

Rendering needs only the helm binary (built with the test cluster's binaries, see tests/cluster);
installing it into a real cluster is tests/integration/test_chart.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
from helm_chart import (
    CHART,
    CRD_NAME,
    FULL_VALUES,
    REPO,
    SCENARIOS,
    by_kind,
    cluster_k8s_version,
    one,
    operator_container,
    peering_crd_schema,
    render,
    rules_of,
)


def test_chart_peering_crds_are_the_operators() -> None:
    """kopf's peering CRDs: the chart ships the file `python -m deepseek_operator.generators.peering`
    generates (copy it with --output charts/deepseek-operator/crds/kopf-peering.yaml)."""
    generated = (REPO / "crds" / "kopf-peering.yaml").read_text()
    assert (CHART / "crds" / "kopf-peering.yaml").read_text() == generated
    peering = pytest.importorskip("deepseek_operator.generators.peering")
    assert peering.render() == generated
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sorted(
        [f"{CRD_NAME}.yaml", "kopf-peering.yaml"]
    )


def test_chart_crd_is_byte_equal_to_the_generated_crd() -> None:
    """Helm installs CRDs only from the chart's crds/; `python -m deepseek_operator.generators.crd` writes
    both copies, and its --check covers both."""
    generated = (REPO / "crds" / f"{CRD_NAME}.yaml").read_bytes()
    assert (CHART / "crds" / f"{CRD_NAME}.yaml").read_bytes() == generated
    from deepseek_operator.generators import crd as crdgen

    assert CHART / "crds" / f"{CRD_NAME}.yaml" == crdgen.CHART_OUTPUT
    assert crdgen.main(["--check"]) == 0


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_rendered_object_is_valid_kubernetes(
    helm: Path, tmp_path: Path, scenario: str
) -> None:
    """Strict schemas of the cluster's Kubernetes release: unknown or misplaced fields fail."""
    objects = render(helm, SCENARIOS[scenario], tmp_path)
    version = cluster_k8s_version()
    kinds = set()
    for obj in objects:
        kinds.add(obj["kind"])
        where = f"{obj['kind']}/{obj['metadata'].get('name')}"
        if obj["apiVersion"] == "kopf.dev/v1":
            jsonschema.validate(obj, peering_crd_schema(objects, obj["kind"]))
            continue
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # no schema in kubernetes-validate: checked in test_service_monitor
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.absolute_path)
            pytest.fail(f"{where} invalid for Kubernetes {version} at {path}: {exc.message}")
        name = obj["metadata"]["name"]
        assert len(name) <= 63 or obj["kind"] == "CustomResourceDefinition", where
    assert {"CustomResourceDefinition", "Deployment"} <= kinds


def test_default_install_is_cluster_scoped_and_standalone(helm: Path, tmp_path: Path) -> None:
    objects = render(helm, {}, tmp_path)
    args = operator_container(objects)["args"]
    assert "--standalone" in args and "--all-namespaces" in args
    assert not any(a.startswith("--peering") or a.startswith("--namespace") for a in args)
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    # No leader election: an upgrade must never run the old and the new operator together.
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert not by_kind(objects, "Role") and not by_kind(objects, "ClusterKopfPeering")
    assert not by_kind(objects, "PodDisruptionBudget")
    assert (
        one(objects, "ClusterRoleBinding")["roleRef"]["name"]
        == one(objects, "ClusterRole")["metadata"]["name"]
    )
    crds = {o["metadata"]["name"] for o in by_kind(objects, "CustomResourceDefinition")}
    assert crds == {CRD_NAME, "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"}
    assert "--metrics-port=8081" in args and "--liveness=http://0.0.0.0:8080/healthz" in args


def test_replicas_elect_a_leader_through_kopf_peering(helm: Path, tmp_path: Path) -> None:
    objects = render(helm, SCENARIOS["cluster-all-peered"], tmp_path)
    args = operator_container(objects)["args"]
    assert "--peering=dsop-deepseek-operator" in args and "--standalone" not in args
    peering = one(objects, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "dsop-deepseek-operator"
    rules = {(g, r): v for g, r, v in rules_of(one(objects, "ClusterRole"))}
    assert rules[("kopf.dev", "clusterkopfpeerings")] == {"get", "list", "watch", "patch"}
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["preferredDuringSchedulingIgnoredDuringExecution"]


def test_listed_namespaces_peer_per_namespace(helm: Path, tmp_path: Path) -> None:
    objects = render(helm, SCENARIOS["cluster-listed-namespaces-peered"], tmp_path)
    args = operator_container(objects)["args"]
    assert [a for a in args if a.startswith("--namespace")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]
    assert "--all-namespaces" not in args
    peerings = by_kind(objects, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]
    rules = {(g, r): v for g, r, v in rules_of(one(objects, "ClusterRole"))}
    assert ("kopf.dev", "kopfpeerings") in rules
    assert ("kopf.dev", "clusterkopfpeerings") not in rules


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_operator_pod_is_hardened(helm: Path, tmp_path: Path, scenario: str) -> None:
    objects = render(helm, SCENARIOS[scenario], tmp_path)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod)
    assert all("hostPath" not in v for v in pod.get("volumes", []))
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc.get("privileged", False) is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container["resources"]["limits"]["memory"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_metrics_service_and_service_monitor_line_up(helm: Path, tmp_path: Path) -> None:
    objects = render(helm, FULL_VALUES, tmp_path)
    container = operator_container(objects)
    assert "--metrics-port=9191" in container["args"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == 9191
    service = next(
        s for s in by_kind(objects, "Service") if s["metadata"]["name"].endswith("-metrics")
    )
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9191, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = one(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["dsop-system"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert re.fullmatch(r"[0-9]+[smh]", endpoint["interval"])


def test_metrics_off_renders_no_service_or_monitor(helm: Path, tmp_path: Path) -> None:
    objects = render(helm, SCENARIOS["no-metrics-no-rbac-byo-sa"], tmp_path)
    assert not by_kind(objects, "Service") and not by_kind(objects, "ServiceMonitor")
    assert not by_kind(objects, "ServiceAccount")
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "Role")
    container = operator_container(objects)
    assert "--metrics-port=0" in container["args"]  # the operator serves metrics by default
    assert "--quiet" in container["args"] and container["args"][-1] == "--verbose"
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "ops-sa"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_operator_accepts_the_rendered_arguments(helm: Path, tmp_path: Path, scenario: str) -> None:
    """The Deployment's args parse with the operator's own argument parser, and mean what the
    values say (scope, leader election, ports)."""
    main = pytest.importorskip("deepseek_operator.__main__")
    objects = render(helm, SCENARIOS[scenario], tmp_path)
    container = operator_container(objects)
    args = main.parse_args(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.liveness == f"http://0.0.0.0:{ports['health']}/healthz"
    assert args.metrics_port == ports.get("metrics", 0)
    operator = {"resyncPeriodSeconds": 300, **SCENARIOS[scenario].get("operator", {})}
    assert args.resync_period == operator["resyncPeriodSeconds"]
    peerings = by_kind(objects, "ClusterKopfPeering") + by_kind(objects, "KopfPeering")
    if args.standalone:
        assert not peerings
    else:
        assert {p["metadata"]["name"] for p in peerings} == {args.peering}
        if args.namespace:
            assert sorted(p["metadata"]["namespace"] for p in peerings) == sorted(args.namespace)
        else:
            assert [p["kind"] for p in peerings] == ["ClusterKopfPeering"]
    roles = by_kind(objects, "Role")
    if roles:
        assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(args.namespace)
