"""`helm show crds charts/deepseek-operator | kubectl apply --server-side -f -` (install.md) applies
every CRD: Helm joins the chart's crds/ files as they are, so each generated YAML file must start
with a document marker or its first document merges into the previous file's last one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "deepseek-operator"
EXPECTED_CRDS = {
    "deepseekdeployments.llm.dsop.io",
    "clusterkopfpeerings.kopf.dev",
    "kopfpeerings.kopf.dev",
}


def find_helm() -> Path:
    """The helm binary built with the cluster binaries (tests/cluster), or skip."""
    if bin_dir := os.environ.get("DSOP_CLUSTER_BIN"):
        return Path(bin_dir) / "helm"
    from localcluster import ClusterError, build_binaries

    try:
        return build_binaries(lambda _msg: None) / "helm"
    except ClusterError as exc:  # no Go toolchain: only `make test` guarantees the binaries
        pytest.skip(f"helm not available: {exc}")


def test_every_generated_yaml_file_starts_with_a_document_marker() -> None:
    files = sorted((REPO / "crds").glob("*.yaml")) + sorted((CHART / "crds").glob("*.yaml"))
    assert len(files) == 4
    for path in files:
        assert path.read_text().startswith("---\n"), path


def test_helm_show_crds_yields_every_crd() -> None:
    env = {**os.environ, "KUBECONFIG": "/dev/null"}
    proc = subprocess.run(
        [str(find_helm()), "show", "crds", str(CHART)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    names = [d["metadata"]["name"] for d in docs if d.get("kind") == "CustomResourceDefinition"]
    assert sorted(names) == sorted(EXPECTED_CRDS)
    assert len(docs) == len(EXPECTED_CRDS)
