"""The Helm chart on a real control plane: install, reconcile, upgrade, uninstall.

kwok stands in for the kubelets, so the operator pods the chart creates are marked Running and
Ready without running anything (the image need not exist). The operator's code therefore runs
here, on the test machine, as the chart's ServiceAccount: a token of that ServiceAccount is its
only credential, so every call it makes goes through the chart's RBAC (and its peering object,
when leader election is on). A DeepSeekDeployment applied then must be reconciled all the way:
sharding Job (kwok completes it), worker StatefulSet (kwok makes it Ready), status Ready.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from waiting import holds_for, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "deepseek-operator"
EXAMPLES = REPO / "examples"
CRD_NAME = "deepseekdeployments.llm.dsop.io"
OPERATOR_READY_TIMEOUT = 60.0
RECONCILE_TIMEOUT = 90.0


# ------------------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_namespace(kube: Any, prefix: str, restricted: bool = False) -> str:
    """A fresh namespace; `restricted` enforces the restricted Pod Security Standard on it."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    kube.kubectl("create", "namespace", name)
    if restricted:
        kube.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
    kube.wait_for(
        f"default ServiceAccount in {name}",
        lambda: kube.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0,
    )
    return name


def get_json(kube: Any, *args: str) -> dict[str, Any] | None:
    proc = kube.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def service_account_kubeconfig(kube: Any, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig whose only credential is a token of the ServiceAccount `sa`."""
    token = kube.kubectl("create", "token", sa, "-n", namespace, "--duration", "2h").stdout.strip()
    admin = yaml.safe_load(Path(kube.kubeconfig).read_text())
    cluster = admin["clusters"][0]["cluster"]
    ca = path.with_suffix(".ca.crt")
    if "certificate-authority-data" in cluster:
        ca.write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
    else:
        ca.write_bytes(Path(cluster["certificate-authority"]).read_bytes())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {"server": cluster["server"], "certificate-authority": str(ca)},
            }
        ],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": sa}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def operator_process(args: list[str], kubeconfig: Path, log_path: Path) -> Iterator[dict[str, Any]]:
    """`python -m deepseek_operator` on this machine, stopped (SIGTERM, then SIGKILL) at exit.

    Yields the liveness and metrics URLs; ready once kopf answers its liveness probe."""
    pytest.importorskip("deepseek_operator.__main__", reason="the operator is not written yet")
    health, metrics = free_port(), free_port()
    cmd = [
        sys.executable,
        "-m",
        "deepseek_operator",
        *args,
        "--kubeconfig",
        str(kubeconfig),
        "--liveness",
        f"http://127.0.0.1:{health}/healthz",
        "--metrics-port",
        str(metrics),
        "--metrics-address",
        "127.0.0.1",
    ]
    # KUBECONFIG too: kopf logs in through the kubernetes client, which reads $KUBECONFIG when
    # it is imported, before --kubeconfig is parsed.
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    urls = {
        "health": f"http://127.0.0.1:{health}/healthz",
        "metrics": f"http://127.0.0.1:{metrics}/metrics",
    }

    def live() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"operator exited {proc.returncode}")
        with urllib.request.urlopen(urls["health"], timeout=2) as resp:
            return resp.status == 200

    try:
        try:
            wait_until(live, OPERATOR_READY_TIMEOUT, "the operator's /healthz", retry_on=(OSError,))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log_path.read_text()}") from None
        yield urls
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def forbidden_lines(log_path: Path) -> list[str]:
    """Log lines where RBAC refused the operator: the API server's 'X is forbidden: User "..."
    cannot VERB resource' (other 403s, such as writing into a terminating namespace, are not
    about permissions)."""
    return [
        line
        for line in log_path.read_text().splitlines()
        if re.search(r'is forbidden: User \\?"[^"\\]+\\?" cannot', line)
    ]


def tiny_deployment(node: str) -> dict[str, Any]:
    """examples/tiny-cpu.yaml pinned to a kwok node, so kwok runs its Job and worker pod."""
    body = yaml.safe_load((EXAMPLES / "tiny-cpu.yaml").read_text())
    body["spec"]["worker"]["nodeSelector"] = {"kubernetes.io/hostname": node}
    return body


def apply(kube: Any, namespace: str, body: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / f"{body['metadata']['name']}-{secrets.token_hex(2)}.yaml"
    path.write_text(yaml.safe_dump(body))
    kube.kubectl("apply", "--server-side", "-n", namespace, "-f", str(path))


def wait_phase(kube: Any, namespace: str, name: str, phase: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        obj = get_json(kube, "deepseekdeployment", name, "-n", namespace)
        return obj if obj and (obj.get("status") or {}).get("phase") == phase else None

    try:
        return kube.wait_for(f"{namespace}/{name} phase {phase}", probe, RECONCILE_TIMEOUT, 0.5)
    except AssertionError as exc:
        obj = get_json(kube, "deepseekdeployment", name, "-n", namespace) or {}
        pods = get_json(kube, "pods", "-n", namespace) or {"items": []}
        seen = {
            p["metadata"]["name"]: {
                "phase": p["status"].get("phase"),
                "conditions": [(c["type"], c["status"]) for c in p["status"].get("conditions", [])],
            }
            for p in pods["items"]
        }
        raise AssertionError(
            f"{exc}\nstatus: {json.dumps(obj.get('status'), indent=1)}\npods: {seen}"
        ) from None


def helm_install(kube: Any, release: str, namespace: str, *values: str) -> str:
    proc = kube.helm(
        "upgrade",
        "--install",
        release,
        str(CHART),
        "-n",
        namespace,
        "--wait",
        "--timeout",
        "120s",
        *values,
        timeout=180,
    )
    return proc.stdout


def releases(kube: Any, namespace: str) -> dict[str, dict[str, Any]]:
    out = kube.helm("list", "-n", namespace, "-a", "-o", "json").stdout
    return {r["name"]: r for r in json.loads(out)}


# ---------------------------------------------------------------------------------- tests


def test_kube_version_matches_the_render_tests(kube_cluster: Any) -> None:
    """tests/repo/test_chart_render.py validates objects for the release in kube/go.mod."""
    version = json.loads(kube_cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]
    gomod = (REPO / "tests" / "cluster" / "kube" / "go.mod").read_text()
    assert f"k8s.io/kubernetes {version['gitVersion']}" in gomod


def test_cluster_scope_install_reconcile_upgrade_uninstall(
    kube_cluster: Any, tmp_path: Path
) -> None:
    kube = kube_cluster
    ns = create_namespace(kube, "dsop-sys", restricted=True)
    app = create_namespace(kube, "llm")
    release = f"dsop{secrets.token_hex(2)}"
    fullname = f"{release}-deepseek-operator"
    try:
        # --- install: two replicas, so leader election through a ClusterKopfPeering.
        notes = helm_install(kube, release, ns, "--set", "replicaCount=2")
        assert "Serves DeepSeekDeployments in: all namespaces" in notes
        assert f'leader election through kopf peering "{fullname}"' in notes
        crd = get_json(kube, "crd", CRD_NAME)
        assert crd and any(
            c["type"] == "Established" and c["status"] == "True"
            for c in crd["status"]["conditions"]
        )
        deployment = get_json(kube, "deployment", fullname, "-n", ns)
        assert deployment
        # kwok marks the pods Ready; the restricted Pod Security level admitted them.
        assert deployment["status"].get("readyReplicas") == 2
        assert get_json(kube, "clusterkopfpeering", fullname)
        slices = get_json(
            kube, "endpointslices", "-n", ns, "-l", f"kubernetes.io/service-name={fullname}-metrics"
        )
        assert slices and slices["items"][0]["ports"][0]["port"] == 8081

        # --- least privilege, as the API server sees it.
        who = f"system:serviceaccount:{ns}:{fullname}"
        for verb, what, expected in [
            ("list", "deepseekdeployments.llm.dsop.io", "yes"),
            ("patch", "deepseekdeployments.llm.dsop.io/status", "yes"),
            ("patch", "deepseekdeployments.llm.dsop.io", "no"),
            ("delete", "pods", "yes"),
            ("delete", "statefulsets.apps", "no"),
            ("get", "secrets", "no"),
            ("create", "pods", "no"),
            ("get", "nodes", "yes"),  # a node-local store's bootIDs
            ("list", "nodes", "no"),
            ("patch", "nodes", "no"),
        ]:
            resource, _, sub = what.partition("/")
            extra = ["--subresource", sub] if sub else []
            got = kube.kubectl(
                "auth", "can-i", verb, resource, *extra, "-n", app, "--as", who, check=False
            )
            assert got.stdout.strip() == expected, (verb, what, got.stdout, got.stderr)

        # --- the operator, running as the chart's ServiceAccount, reconciles a deployment.
        kubeconfig = service_account_kubeconfig(kube, ns, fullname, tmp_path / "sa.kubeconfig")
        log = tmp_path / "operator.log"
        with operator_process(["--peering", fullname, "--all-namespaces"], kubeconfig, log) as urls:
            apply(kube, app, tiny_deployment("kwok-npu-0"), tmp_path)
            ready = wait_phase(kube, app, "tiny", "Ready")
            jobs = get_json(kube, "jobs", "-n", app, "-l", "app.kubernetes.io/instance=tiny")
            assert jobs and [j["metadata"]["name"] for j in jobs["items"]] == [
                ready["status"]["shards"]["job"]
            ]
            assert ready["status"]["observedGeneration"] == ready["metadata"]["generation"]
            assert ready["status"]["readyWorkers"] == "1/1"
            with urllib.request.urlopen(urls["metrics"], timeout=5) as resp:
                text = resp.read().decode()
            ready_gauge = re.search(r'^dsop_deployments\{phase="Ready"\} ([0-9.]+)$', text, re.M)
            assert ready_gauge and float(ready_gauge.group(1)) >= 1, text
            peering = get_json(kube, "clusterkopfpeering", fullname)
            assert peering and peering.get("status"), "the operator did not peer"
            # The Argo CD health check, on the status the operator really wrote.
            from lupa import lua51

            lua = lua51.LuaRuntime()
            lua.globals().obj = lua.table_from(ready, recursive=True)
            health = lua.execute((REPO / "docs" / "gitops" / "argocd-health.lua").read_text())
            assert health["status"] == "Healthy", dict(health.items())
        assert not forbidden_lines(log), "\n".join(forbidden_lines(log))

        # --- upgrade: new values roll the Deployment; a typo is refused and changes nothing.
        helm_install(
            kube,
            release,
            ns,
            "--reuse-values",
            "--set",
            "operator.logLevel=debug",
            "--set",
            "replicaCount=3",
        )
        deployment = get_json(kube, "deployment", fullname, "-n", ns)
        assert deployment and deployment["spec"]["replicas"] == 3
        assert "--verbose" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert releases(kube, ns)[release]["revision"] == "2"
        bad = kube.helm(
            "upgrade",
            release,
            str(CHART),
            "-n",
            ns,
            "--reuse-values",
            "--set",
            "replicaCont=1",
            check=False,
        )
        assert bad.returncode != 0 and "replicaCont" in bad.stderr
        assert releases(kube, ns)[release]["revision"] == "2"
        assert releases(kube, ns)[release]["status"] == "deployed"

        # --- uninstall: the operator's objects go; the CRD and the custom resources stay.
        kube.helm("uninstall", release, "-n", ns, "--wait", timeout=120)
        assert get_json(kube, "deployment", fullname, "-n", ns) is None
        assert get_json(kube, "clusterrole", fullname) is None
        assert get_json(kube, "clusterkopfpeering", fullname) is None
        assert get_json(kube, "crd", CRD_NAME) is not None
        assert get_json(kube, "deepseekdeployment", "tiny", "-n", app) is not None
    finally:
        kube.helm("uninstall", release, "-n", ns, check=False)
        kube.kubectl("delete", "namespace", app, ns, "--wait=false", check=False)


def test_namespace_scope_install_reconciles_only_its_namespaces(
    kube_cluster: Any, tmp_path: Path
) -> None:
    kube = kube_cluster
    ns = create_namespace(kube, "dsop-ops", restricted=True)
    app = create_namespace(kube, "llm-team")
    other = create_namespace(kube, "llm-other")
    release = f"dsopns{secrets.token_hex(2)}"
    fullname = f"{release}-deepseek-operator"
    try:
        notes = helm_install(
            kube,
            release,
            ns,
            "--set",
            "rbac.scope=namespace",
            "--set",
            f"watchNamespaces={{{app}}}",
            "--set",
            "metrics.serviceMonitor.enabled=false",
        )
        assert f"Serves DeepSeekDeployments in: {app}" in notes
        assert get_json(kube, "clusterrole", fullname) is None
        assert get_json(kube, "role", fullname, "-n", app)
        who = f"system:serviceaccount:{ns}:{fullname}"
        for where, expected in [(["-n", app], "yes"), (["-n", other], "no"), (["-A"], "no")]:
            got = kube.kubectl(
                "auth",
                "can-i",
                "list",
                "deepseekdeployments.llm.dsop.io",
                *where,
                "--as",
                who,
                check=False,
            )
            assert got.stdout.strip() == expected, (where, got.stdout)

        kubeconfig = service_account_kubeconfig(kube, ns, fullname, tmp_path / "sa.kubeconfig")
        log = tmp_path / "operator.log"
        with operator_process(["--standalone", "--namespace", app], kubeconfig, log):
            apply(kube, app, tiny_deployment("kwok-gpu-0"), tmp_path)
            apply(kube, other, tiny_deployment("kwok-gpu-1"), tmp_path)
            wait_phase(kube, app, "tiny", "Ready")
            # Its log, not the object's status: another operator of the session may serve `other`.
            holds_for(lambda: other not in log.read_text(), 2, f"silent about namespace {other}")
        forbidden = [
            line
            for line in forbidden_lines(log)
            # kopf probes cluster-wide lists once and falls back when they are refused.
            if "namespaces" not in line and "customresourcedefinitions" not in line
        ]
        assert not forbidden, "\n".join(forbidden)
    finally:
        kube.helm("uninstall", release, "-n", ns, check=False)
        kube.kubectl("delete", "namespace", app, other, ns, "--wait=false", check=False)
