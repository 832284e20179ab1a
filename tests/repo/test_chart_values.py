"""The chart's values: the schema refuses typos and bad values at any depth, values.yaml and the
schema list the same keys, each commented; lint passes strict; the image follows the app version
and old clusters are refused."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_chart import CHART, SCENARIOS, operator_container, render, run_helm

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


@pytest.mark.parametrize("scenario", ["default", "full-namespaced"])
def test_helm_lint_strict(helm: Path, tmp_path: Path, scenario: str) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(SCENARIOS[scenario]))
    proc = run_helm(helm, "lint", "--strict", str(CHART), "-f", str(values_file))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


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
