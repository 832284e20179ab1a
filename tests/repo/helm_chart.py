"""The Helm chart rendered offline with `helm template`: the value scenarios the chart tests share
and helpers to pick objects out of a rendering (the helm binary is the `helm` fixture of
conftest.py)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


CHART = REPO / "charts" / "deepseek-operator"


CRD_NAME = "deepseekdeployments.llm.dsop.io"

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


def cluster_k8s_version() -> str:
    """The Kubernetes release the test cluster is built from (tests/cluster/kube/go.mod)."""
    gomod = (REPO / "tests" / "cluster" / "kube" / "go.mod").read_text()
    found = re.search(r"^\s*k8s\.io/kubernetes (v\d+\.\d+\.\d+)", gomod, re.M)
    assert found, "k8s.io/kubernetes version not found in tests/cluster/kube/go.mod"
    return found.group(1)


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
