"""Fixtures for the operator's integration tests: the CRDs installed on the session's cluster, the
operator running as a real subprocess, a fresh namespace with bound claims per test.

Builds on the session fixture `kube_cluster` of tests/conftest.py.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "deepseekdeployments.llm.dsop.io.yaml"
PEERING_FILE = REPO / "crds" / "kopf-peering.yaml"
GROUP, VERSION, PLURAL = "llm.dsop.io", "v1alpha1", "deepseekdeployments"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except OSError:
        return 0, ""


@dataclass
class OperatorProcess:
    """`python -m deepseek_operator` as a subprocess against the test cluster."""

    env: dict[str, str]
    log_dir: Path
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    liveness_port: int = 0
    metrics_port: int = 0
    starts: int = 0

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"operator-{self.starts}.log"

    def start(self, *extra: str, wait: bool = True) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        self.liveness_port, self.metrics_port = _free_port(), _free_port()
        args = [
            sys.executable,
            "-m",
            "deepseek_operator",
            *(extra or ("--standalone",)),
            *self.extra,
            "--liveness",
            f"http://127.0.0.1:{self.liveness_port}/healthz",
            "--metrics-port",
            str(self.metrics_port),
            "--metrics-address",
            "127.0.0.1",
        ]
        with open(self.log_file, "wb") as log:
            self.proc = subprocess.Popen(
                args, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        if wait:
            self.wait_live()

    def wait_live(self, timeout: float = 60) -> None:
        def live() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"operator exited {self.proc.returncode}")
            return _get(self.liveness_url)[0] == 200

        try:
            wait_until(live, timeout, f"the operator's liveness probe {self.liveness_url}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.tail()}") from None

    @property
    def liveness_url(self) -> str:
        return f"http://127.0.0.1:{self.liveness_port}/healthz"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as when a node dies under the operator."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _apply_file(kube_cluster: Any, path: Path) -> None:
    kube_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))


@pytest.fixture(scope="session")
def dsd_crd(kube_cluster: Any) -> str:
    """The DeepSeekDeployment CRD (and kopf's peering CRDs) installed and Established."""
    _apply_file(kube_cluster, CRD_FILE)
    _apply_file(kube_cluster, PEERING_FILE)
    kube_cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/deepseekdeployments.llm.dsop.io",
        "crd/clusterkopfpeerings.kopf.dev",
        "crd/kopfpeerings.kopf.dev",
    )
    return "deepseekdeployments.llm.dsop.io"


@pytest.fixture(scope="module")
def operator(
    kube_cluster: Any, dsd_crd: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """One operator per test module (never two acting on the cluster at once); a test may kill
    and restart it (running_operator starts it again if a test left it stopped)."""
    env = dict(kube_cluster.env)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("DSOP_PEERING", None)
    handle = OperatorProcess(env=env, log_dir=tmp_path_factory.mktemp("operator"))
    handle.start()
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def running_operator(operator: OperatorProcess) -> OperatorProcess:
    """The session operator, started again when an earlier test left it stopped."""
    if operator.proc is None or operator.proc.poll() is not None:
        operator.start()
    return operator


@pytest.fixture(scope="session")
def k8s(kube_cluster: Any) -> client.ApiClient:
    return kube_cluster.api_client()


def bound_claim(core: client.CoreV1Api, namespace: str, name: str, storage_class: str) -> None:
    """A PersistentVolume reserved for namespace/name (the claim is created when asked)."""
    pv = f"dsop-{namespace}-{name}"
    core.create_persistent_volume(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv, "labels": {"dsop-test-namespace": namespace}},
            "spec": {
                "capacity": {"storage": "100Gi"},
                "accessModes": ["ReadWriteMany", "ReadOnlyMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": storage_class,
                "hostPath": {"path": f"/tmp/{pv}"},
                "claimRef": {"namespace": namespace, "name": name},
            },
        }
    )


def bind(core: client.CoreV1Api, namespace: str, name: str) -> None:
    """Finish the binding of a claim to its reserved volume at once.

    The PersistentVolume controller gets there too, but only at its next periodic sync (up to
    15 s); writing what it would write keeps each test seconds shorter.
    """
    pv = f"dsop-{namespace}-{name}"
    claim = core.read_namespaced_persistent_volume_claim(name, namespace)
    core.patch_persistent_volume(
        pv,
        {
            "spec": {
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": namespace,
                    "name": name,
                    "uid": claim.metadata.uid,
                }
            }
        },
    )
    core.patch_persistent_volume_status(pv, {"status": {"phase": "Bound"}})
    if not claim.spec.volume_name:
        core.patch_namespaced_persistent_volume_claim(name, namespace, {"spec": {"volumeName": pv}})
    core.patch_namespaced_persistent_volume_claim_status(
        name,
        namespace,
        {
            "status": {
                "phase": "Bound",
                "accessModes": ["ReadWriteMany", "ReadOnlyMany"],
                "capacity": {"storage": "100Gi"},
            }
        },
    )


def create_claim(core: client.CoreV1Api, namespace: str, name: str, storage_class: str) -> None:
    """A bound ReadWriteMany claim on a volume of its own."""
    bound_claim(core, namespace, name, storage_class)
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": storage_class,
                "resources": {"requests": {"storage": "10Gi"}},
                "volumeName": f"dsop-{namespace}-{name}",
            },
        },
    )
    bind(core, namespace, name)


@pytest.fixture
def dsd_namespace(kube_cluster: Any, k8s: client.ApiClient) -> Iterator[str]:
    """A fresh namespace with two bound ReadWriteMany claims: `models` (the checkpoint) and
    `shards` (a shard store)."""
    name = f"op-{secrets.token_hex(4)}"
    core = client.CoreV1Api(k8s)
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    kube_cluster.wait_for(
        f"service account default in {name}",
        lambda: _exists(core.read_namespaced_service_account, "default", name),
    )
    for claim in ("models", "shards"):
        create_claim(core, name, claim, "manual")
    yield name
    core.delete_namespace(name)
    core.delete_collection_persistent_volume(label_selector=f"dsop-test-namespace={name}")


def _exists(read: Any, *args: Any) -> Any:
    try:
        return read(*args)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


class Dsd:
    """Small helper around the custom objects API for one namespace."""

    def __init__(self, kube_cluster: Any, api: client.ApiClient, namespace: str) -> None:
        self.cluster = kube_cluster
        self.api = api
        self.namespace = namespace
        self.objects = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.apps = client.AppsV1Api(api)

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.objects.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, body
        )

    def get(self, name: str) -> dict[str, Any] | None:
        return _exists(
            self.objects.get_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, name
        )

    def patch_spec(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.objects.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec}
        )

    def delete(self, name: str) -> None:
        self.objects.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def status(self, name: str) -> dict[str, Any]:
        return (self.get(name) or {}).get("status") or {}

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == kind), {})

    def wait_phase(self, name: str, phase: str, timeout: float = 120) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            status = self.status(name)
            if status.get("phase") == phase and status.get("observedGeneration") == (
                (self.get(name) or {}).get("metadata", {}).get("generation")
            ):
                return status
            return None

        try:
            return self.cluster.wait_for(f"{name} phase {phase}", probe, timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\nstatus: {json.dumps(self.status(name), indent=1)}"
            ) from None

    def wait(self, what: str, probe: Any, timeout: float = 60) -> Any:
        return self.cluster.wait_for(what, probe, timeout=timeout)

    def jobs(self, component: str | None = None) -> list[Any]:
        selector = "app.kubernetes.io/managed-by=deepseek-operator"
        if component:
            selector += f",app.kubernetes.io/component={component}"
        return self.batch.list_namespaced_job(self.namespace, label_selector=selector).items

    def pods(self, selector: str) -> list[Any]:
        return self.core.list_namespaced_pod(self.namespace, label_selector=selector).items

    def events(self, name: str) -> list[Any]:
        return self.core.list_namespaced_event(
            self.namespace,
            field_selector=f"involvedObject.kind=DeepSeekDeployment,involvedObject.name={name}",
        ).items

    def event_reasons(self, name: str) -> list[str]:
        return [e.reason for e in self.events(name)]


@pytest.fixture
def dsd(kube_cluster: Any, k8s: client.ApiClient, dsd_namespace: str) -> Dsd:
    return Dsd(kube_cluster, k8s, dsd_namespace)


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    """Show the operator's log tail under a failed integration test."""
    if call.when == "call" and call.excinfo is not None:
        op = item.funcargs.get("running_operator") or item.funcargs.get("operator")
        if isinstance(op, OperatorProcess):
            item.add_report_section("call", "operator log", op.tail(80))
