"""`helm show crds charts/deepseek-operator | kubectl apply --server-side -f -` (install.md) applies
every CRD: Helm joins the chart's crds/ files as they are, so each generated YAML file must start
with a document marker or its first document merges into the previous file's last one."""

from __future__ import annotations

from pathlib import Path

import yaml
from helm_chart import CHART, CRD_NAME, REPO, run_helm

EXPECTED_CRDS = {CRD_NAME, "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}


def test_every_generated_yaml_file_starts_with_a_document_marker() -> None:
    files = sorted((REPO / "crds").glob("*.yaml")) + sorted((CHART / "crds").glob("*.yaml"))
    assert len(files) == 4
    for path in files:
        assert path.read_text().startswith("---\n"), path


def test_helm_show_crds_yields_every_crd(helm: Path) -> None:
    proc = run_helm(helm, "show", "crds", str(CHART))
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    names = [d["metadata"]["name"] for d in docs if d.get("kind") == "CustomResourceDefinition"]
    assert sorted(names) == sorted(EXPECTED_CRDS)
    assert len(docs) == len(EXPECTED_CRDS)
