"""The Helm chart, rendered offline: lint, every object valid for the Kubernetes version the test
cluster runs, values checked by the schema, least-privilege RBAC and a hardened pod.

Rendering needs only the helm binary (built with the test cluster's binaries, see tests/cluster);
installing it into a real cluster is tests/integration/test_chart.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "deepseek-operator"
CRD_NAME = "deepseekdeployments.llm.dsop.io"

# The operator's children and what it does to them (see the operator's handlers); the chart must
# grant exactly these verbs, nothing broader.
APPLY_VERBS = {"get", "list", "watch", "create", "patch"}
EXPECTED_RULES: dict[tuple[str, str], set[str]] = {
    ("llm.dsop.io", "deepseekdeployments"): {"get", "list", "watch"},
    ("llm.dsop.io", "deepseekdeployments/status"): {"patch"},
    ("llm.dsop.io", "deepseekdeployments/finalizers"): {"update"},
    ("", "configmaps"): APPLY_VERBS,
    ("", "services"): APPLY_VERBS,
    ("", "persistentvolumeclaims"): APPLY_VERBS,
    ("batch", "jobs"): APPLY_VERBS | {"delete"},
    ("apps", "statefulsets"): APPLY_VERBS,
    ("policy", "poddisruptionbudgets"): APPLY_VERBS,
    ("", "pods"): {"get", "list", "watch", "delete"},
    ("", "events"): {"create"},
}
# Never granted: the operator reads no secrets and needs no escalation paths.
FORBIDDEN_RESOURCES = {"secrets", "*", "clusterroles", "roles", "rolebindings", "nodes"}

# Values that switch on every optional branch of the templates.
FULL_VALUES: dict[str, Any] = {
    "replicaCount": 3,
    "image": {"repository": "registry.example.com/dsop/deepseek-operator", "tag": "0.1.0-rc1"},
    "imagePullSecrets": [{"name": "regcred"}],
    "leaderElection": {"peeringName": "dsop-leader"},
    "rbac": {"scope": "namespace"},
    "watchNamespaces": ["llm", "llm-staging"],
    "serviceAccount": {"annotations": {"example.com/role": "dsop"}},
    "operator": {
        "logLevel": "debug",
        "workers": 4,
        "resyncPeriodSeconds": 0,
        "extraEnv": [{"name": "EXTRA", "value": "1"}],
    },
    "metrics": {
        "port": 9191,
        "service": {"annotations": {"prometheus.io/scrape": "true"}},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    },
    "podAnnotations": {"example.com/a": "b"},
    "podLabels": {"team": "llm"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops"}],
    "priorityClassName": "system-cluster-critical",
}

# name -> values; each must render and validate.
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "full-namespaced": FULL_VALUES,
    "cluster-listed-namespaces-peered": {
        "replicaCount": 2,
        "watchNamespaces": ["team-a", "team-b"],
    },
    "cluster-all-peered": {"replicaCount": 2},
    "single-replica-peered": {"leaderElection": {"enabled": True}},
    "namespace-scope-release-ns": {"rbac": {"scope": "namespace"}},
    "no-metrics-no-rbac-byo-sa": {
        "metrics": {"enabled": False, "serviceMonitor": {"enabled": True}},
        "rbac": {"create": False},
        "serviceAccount": {"create": False, "name": "ops-sa"},
        "affinity": {"nodeAffinity": {}},
        "operator": {"logLevel": "warning", "extraArgs": ["--verbose"]},
    },
}

# (values, text the error must contain): typos and bad values fail in the schema, not silently.
BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"replicaCont": 2}, "replicaCont"),
    ({"metrics": {"serviceMonitor": {"enable": True}}}, "enable"),
    ({"image": {"repo": "x"}}, "repo"),
    ({"rbac": {"scope": "namespaces"}}, "scope"),
    ({"replicaCount": "2"}, "replicaCount"),
    ({"replicaCount": 0}, "replicaCount"),
    ({"watchNamespaces": ["Bad_Name"]}, "watchNamespaces"),
    ({"operator": {"logLevel": "trace"}}, "logLevel"),
    ({"operator": {"resyncPeriodSeconds": -1}}, "resyncPeriodSeconds"),
    ({"operator": {"resyncPeriodSeconds": "5m"}}, "resyncPeriodSeconds"),
    ({"securityContext": {"runAsUser": 0}}, "runAsUser"),
    ({"securityContext": {"privileged": True}}, "privileged"),
    ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "interval"),
]


def cluster_k8s_version() -> str:
    """The Kubernetes release the test cluster is built from (tests/cluster/kube/go.mod)."""
    gomod = (REPO / "tests" / "cluster" / "kube" / "go.mod").read_text()
    found = re.search(r"^\s*k8s\.io/kubernetes (v\d+\.\d+\.\d+)", gomod, re.M)
    assert found, "k8s.io/kubernetes version not found in tests/cluster/kube/go.mod"
    return found.group(1)


@pytest.fixture(scope="session")
def helm() -> Path:
    """The helm binary built with the cluster binaries (a no-op when the cache is warm)."""
    if bin_dir := os.environ.get("DSOP_CLUSTER_BIN"):
        return Path(bin_dir) / "helm"
    from localcluster import ClusterError, build_binaries

    try:
        return build_binaries(lambda _msg: None) / "helm"
    except ClusterError as exc:  # no Go toolchain: only `make test` guarantees the binaries
        pytest.skip(f"helm not available: {exc}")


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": os.environ.get("HOME", "/tmp"), "KUBECONFIG": "/dev/null"}
    return subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def render(helm: Path, values: dict[str, Any], tmp_path: Path, *extra: str) -> list[dict[str, Any]]:
    """`helm template` with the values as a file; the objects, CRDs included."""
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    proc = run_helm(
        helm,
        "template",
        "dsop",
        str(CHART),
        "--namespace",
        "dsop-system",
        "--include-crds",
        "--kube-version",
        cluster_k8s_version(),
        "-f",
        str(values_file),
        *extra,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def rules_of(role: dict[str, Any]) -> Iterator[tuple[str, str, set[str]]]:
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                yield group, resource, set(rule["verbs"])


def peering_crd_schema(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    crd = next(
        o
        for o in by_kind(objects, "CustomResourceDefinition")
        if o["spec"]["names"]["kind"] == kind
    )
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# ---------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("scenario", ["default", "full-namespaced"])
def test_helm_lint_strict(helm: Path, tmp_path: Path, scenario: str) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(SCENARIOS[scenario]))
    proc = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(values_file))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


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


@pytest.mark.parametrize(("values", "needle"), BAD_VALUES, ids=[n for _, n in BAD_VALUES])
def test_bad_values_fail_the_schema(
    helm: Path, tmp_path: Path, values: dict[str, Any], needle: str
) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    proc = run_helm(helm, "template", "dsop", str(CHART), "-f", str(values_file))
    assert proc.returncode != 0, f"{values} was accepted"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert needle in proc.stderr, proc.stderr


def test_values_schema_forbids_unknown_keys_everywhere() -> None:
    """additionalProperties: false on every object the chart defines, so a typo at any depth
    fails; only free-form Kubernetes objects (resources, affinity, maps of labels) are open."""
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
        yield path, node
        for key, sub in node.get("properties", {}).items():
            yield from walk(sub, f"{path}.{key}" if path else key)
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], f"{path}[]")

    for path, node in walk(schema, ""):
        assert node.get("description") or path in ("",) or path.endswith("[]"), path
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path}: unknown keys allowed"


def _value_keys(node: Any, schema: dict[str, Any], path: str = "") -> Iterator[str]:
    """Dotted paths of values.yaml keys that the schema declares (not free-form map contents)."""
    if not isinstance(node, dict):
        return
    for key, sub in node.items():
        here = f"{path}.{key}" if path else key
        yield here
        sub_schema = schema.get("properties", {}).get(key, {})
        if "properties" in sub_schema:
            yield from _value_keys(sub, sub_schema, here)


def test_values_and_schema_list_the_same_keys() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    in_values = set(_value_keys(values, schema))

    def declared(node: dict[str, Any], path: str = "") -> Iterator[str]:
        for key, sub in node.get("properties", {}).items():
            here = f"{path}.{key}" if path else key
            yield here
            yield from declared(sub, here)

    # global: Helm passes it to a chart used as a dependency; values.yaml need not set it.
    assert in_values == set(declared(schema)) - {"global"}


def test_every_values_key_is_commented() -> None:
    """Each key the schema declares has a comment on the line(s) just above it."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    declared = set(_value_keys(values, schema))
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    uncommented = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9_.-]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([p for _, p in stack] + [m.group(2)])
        stack.append((indent, m.group(2)))
        if path in declared and not lines[i - 1].lstrip().startswith("#"):
            uncommented.append(path)
    assert not uncommented, f"values.yaml keys without a comment: {uncommented}"


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


def test_namespace_scope_grants_nothing_cluster_wide(helm: Path, tmp_path: Path) -> None:
    objects = render(helm, FULL_VALUES, tmp_path)
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    roles = by_kind(objects, "Role")
    bindings = by_kind(objects, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["llm", "llm-staging"]
    sa = one(objects, "ServiceAccount")
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "dsop-system"}
        ]
    args = operator_container(objects)["args"]
    assert "--namespace=llm" in args and "--namespace=llm-staging" in args
    assert "--peering=dsop-leader" in args
    assert sorted(p["metadata"]["namespace"] for p in by_kind(objects, "KopfPeering")) == [
        "llm",
        "llm-staging",
    ]


def test_namespace_scope_defaults_to_the_release_namespace(helm: Path, tmp_path: Path) -> None:
    objects = render(helm, SCENARIOS["namespace-scope-release-ns"], tmp_path)
    assert [r["metadata"]["namespace"] for r in by_kind(objects, "Role")] == ["dsop-system"]
    assert "--namespace=dsop-system" in operator_container(objects)["args"]


@pytest.mark.parametrize(
    "scenario", ["default", "full-namespaced", "cluster-listed-namespaces-peered"]
)
def test_rbac_is_least_privilege(helm: Path, tmp_path: Path, scenario: str) -> None:
    objects = render(helm, SCENARIOS[scenario], tmp_path)
    roles = by_kind(objects, "ClusterRole") + by_kind(objects, "Role")
    assert roles
    for role in roles:
        granted: dict[tuple[str, str], set[str]] = {}
        for group, resource, verbs in rules_of(role):
            assert "*" not in verbs and group != "*", role["rules"]
            assert resource not in FORBIDDEN_RESOURCES, resource
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & verbs
            granted.setdefault((group, resource), set()).update(verbs)
        for key, verbs in EXPECTED_RULES.items():
            assert granted.get(key) == verbs, f"{role['kind']}: {key} has {granted.get(key)}"
        extra = set(granted) - set(EXPECTED_RULES)
        allowed_extra = {
            ("kopf.dev", "kopfpeerings"),
            ("kopf.dev", "clusterkopfpeerings"),
            ("", "namespaces"),
            ("apiextensions.k8s.io", "customresourcedefinitions"),
        }
        assert extra <= allowed_extra, extra
        for key in extra & {
            ("", "namespaces"),
            ("apiextensions.k8s.io", "customresourcedefinitions"),
        }:
            assert granted[key] == {"list", "watch"}, key  # read-only


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


def test_image_defaults_to_the_app_version(helm: Path, tmp_path: Path) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    image = operator_container(render(helm, {}, tmp_path))["image"]
    assert image == f"deepseek-operator:{chart['appVersion']}"
    from deepseek_operator import __version__

    assert chart["appVersion"] == __version__ == chart["version"]


def test_old_kubernetes_is_refused(helm: Path, tmp_path: Path) -> None:
    """The CRD's CEL rules need Kubernetes >= 1.29: Helm refuses older clusters up front."""
    proc = run_helm(helm, "template", "dsop", str(CHART), "--kube-version", "1.28.9")
    assert proc.returncode != 0 and "kubeVersion" in proc.stderr


def test_rbac_covers_every_call_the_operator_makes(helm: Path, tmp_path: Path) -> None:
    """Ties the ClusterRole to the operator's code: every kind its REST layer touches is granted
    (apply = create + patch for children; delete for the kinds the planner deletes)."""
    import typing

    k8s = pytest.importorskip("deepseek_operator.runtime.k8s")
    from deepseek_operator.planning.plan import Delete

    granted: dict[tuple[str, str], set[str]] = {}
    for group, resource, verbs in rules_of(one(render(helm, {}, tmp_path), "ClusterRole")):
        granted.setdefault((group, resource), set()).update(verbs)
    deleted = set(typing.get_args(typing.get_type_hints(Delete)["kind"]))
    for kind, (prefix, plural) in k8s.RESOURCES.items():
        group = "" if prefix == "/api/v1" else prefix.split("/")[2]
        verbs = granted.get((group, plural), set())
        if kind == "Event":
            assert "create" in verbs  # kopf and the operator POST Events, never PATCH them
            continue
        assert {"get", "list", "watch"} <= verbs, kind
        if kind not in ("Pod", "DeepSeekDeployment"):
            assert {"create", "patch"} <= verbs, f"{kind}: server-side apply needs create+patch"
        if kind in deleted:
            assert "delete" in verbs, kind
    assert "patch" in granted[("llm.dsop.io", "deepseekdeployments/status")]


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
