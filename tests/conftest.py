"""Shared pytest fixtures: the local Kubernetes control plane (see tests/cluster/).

The cluster is started once per session, only when a test asks for ``kube_cluster``, and is
always stopped at the end. Set DSOP_KUBECONFIG to run the integration tests against a cluster
that is already up (for example one from ``scripts/cluster up``) instead of starting one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "cluster"))

from localcluster import LocalCluster, build_binaries  # noqa: E402

from waiting import wait_until  # noqa: E402

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: needs the local Kubernetes control plane (tests/cluster)"
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the cluster binaries before any test runs, if a collected test needs the cluster.

    A cold build takes minutes; done here it is not charged to the first test's timeout.
    """
    if session.config.option.collectonly or os.environ.get("DSOP_KUBECONFIG"):
        return
    if any("kube_cluster" in getattr(item, "fixturenames", ()) for item in session.items):
        build_binaries(_log)


@dataclass
class KubeCluster:
    """What a test needs to talk to the cluster, whichever way it was started."""

    kubeconfig: Path
    bin_dir: Path
    env: dict[str, str]
    local: LocalCluster | None = None
    _clients: list[Any] = field(default_factory=list, repr=False)

    def api_client(self) -> ApiClient:
        """A fresh kubernetes.client.ApiClient for this cluster (closed at session end)."""
        from kubernetes import config

        client = config.new_client_from_config(config_file=str(self.kubeconfig))
        self._clients.append(client)
        return client

    def run(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run a built tool (kubectl, helm, ...) with KUBECONFIG set; output in the error."""
        binary = self.bin_dir / args[0]
        proc = subprocess.run(
            [str(binary), *args[1:]],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, **kwargs)

    def helm(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("helm", *args, **kwargs)

    @staticmethod
    def wait_for(
        what: str, probe: Callable[[], T | None], timeout: float = 60.0, interval: float = 0.2
    ) -> T:
        """Poll probe() until it returns something truthy; fail with the last value seen."""
        return wait_until(probe, timeout, what, interval_s=interval)

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()


def _external_cluster(kubeconfig: str) -> KubeCluster:
    bin_dir = Path(os.environ.get("DSOP_CLUSTER_BIN") or build_binaries(_log))
    env = dict(os.environ)
    env["KUBECONFIG"] = kubeconfig
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return KubeCluster(kubeconfig=Path(kubeconfig), bin_dir=bin_dir, env=env)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[KubeCluster]:
    """A real control plane (etcd, apiserver, controller-manager, scheduler, kwok nodes)."""
    external = os.environ.get("DSOP_KUBECONFIG")
    if external:
        handle = _external_cluster(external)
        try:
            yield handle
        finally:
            handle.close()
        return

    cluster = LocalCluster(log=_log, die_with_parent=True)
    try:
        cluster.start()
        assert cluster.bin_dir is not None
        handle = KubeCluster(
            kubeconfig=cluster.kubeconfig, bin_dir=cluster.bin_dir, env=cluster.env, local=cluster
        )
        try:
            yield handle
        finally:
            handle.close()
    finally:
        cluster.stop()
