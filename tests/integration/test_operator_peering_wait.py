"""An operator started with leader election but without its peering object (16.14): kopf pauses
every watch until the object exists and says nothing; the operator says what it waits for at
start and again every period, and that it resumes once the object is there."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from conftest import OperatorProcess

pytestmark = pytest.mark.integration

REPORT_SECONDS = 1
DEADLINE = 60.0


def _wait_for_log(op: OperatorProcess, what: str, ok: Any) -> str:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        text = op.log_file.read_text(errors="replace") if op.log_file.exists() else ""
        if ok(text):
            return text
        assert op.proc is not None and op.proc.poll() is None, f"operator exited:\n{op.tail()}"
        time.sleep(0.2)
    raise AssertionError(f"no {what} in the operator's log after {DEADLINE:.0f}s:\n{op.tail()}")


@pytest.fixture
def peered_operator(
    kube_cluster: Any, dsd_crd: str, tmp_path: Any
) -> Iterator[tuple[OperatorProcess, str]]:
    env = {**kube_cluster.env, "PYTHONUNBUFFERED": "1"}
    env["DSOP_PEERING_REPORT_SECONDS"] = str(REPORT_SECONDS)
    name = f"dsop-wait-{secrets.token_hex(3)}"
    op = OperatorProcess(env=env, log_dir=tmp_path)
    op.start("--peering", name, "--priority", "5", wait=False)
    try:
        yield op, name
    finally:
        op.stop()
        kube_cluster.kubectl(
            "delete", "clusterkopfpeering", name, "--ignore-not-found", check=False
        )


def test_a_missing_peering_object_is_reported_until_it_exists(
    peered_operator: tuple[OperatorProcess, str], k8s: client.ApiClient
) -> None:
    op, name = peered_operator
    waiting = f"leader election: waiting for ClusterKopfPeering '{name}' (kopf.dev/v1)"
    text = _wait_for_log(op, "repeated wait report", lambda t: t.count(waiting) >= 2)
    assert f"through ClusterKopfPeering '{name}' (priority 5)" in text
    assert "--standalone" in text and f'"metadata": {{"name": "{name}"}}' in text
    client.CustomObjectsApi(k8s).create_cluster_custom_object(
        "kopf.dev",
        "v1",
        "clusterkopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}},
    )
    text = _wait_for_log(op, "resume report", lambda t: "the peering objects exist" in t)
    reports = text.count(waiting)
    time.sleep(3 * REPORT_SECONDS)
    assert op.log_file.read_text(errors="replace").count(waiting) == reports
