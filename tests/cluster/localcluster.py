"""A real Kubernetes control plane on loopback, for tests and the local demo.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok run as local processes
(built from Go modules by build.sh; no container engine is needed). kwok plays the kubelet for a
few fake nodes that advertise Ascend NPUs or NVIDIA GPUs, so pods get scheduled, turn
Running/Ready, and Job pods succeed, while controllers (Jobs, StatefulSets, garbage collection)
and admission (RBAC, CEL validation) are the real ones.

Only the standard library and the ``openssl`` CLI are used, so the harness runs before any
project dependency is installed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build.sh"
STATE_FILE = "cluster.json"
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"  # first address of SERVICE_CIDR: the `kubernetes` Service
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
ACCELERATOR_LABEL = "dsop.io/accelerator"

# The fake fleet: two Ascend nodes and two NVIDIA nodes with eight devices each.
DEFAULT_NODES: tuple[tuple[str, str, str], ...] = (
    ("kwok-npu-0", "npu", "huawei.com/Ascend910"),
    ("kwok-npu-1", "npu", "huawei.com/Ascend910"),
    ("kwok-gpu-0", "gpu", "nvidia.com/gpu"),
    ("kwok-gpu-1", "gpu", "nvidia.com/gpu"),
)

# Start order; stop() goes the other way so nothing loses its backend while still running.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


class ClusterError(RuntimeError):
    """The control plane could not be built, started or reached."""


def build_binaries(log: Callable[[str], None] = print) -> Path:
    """Run build.sh (a no-op when its cache is warm) and return the bin dir it prints last."""
    log(f"localcluster: ensuring binaries with {BUILD_SCRIPT}")
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=None,  # build progress goes straight to the caller's stderr
        text=True,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise ClusterError(f"{BUILD_SCRIPT} failed with exit code {proc.returncode}")
    bin_dir = Path(lines[-1])
    if not (bin_dir / "kube-apiserver").is_file():
        raise ClusterError(f"{BUILD_SCRIPT} printed {bin_dir}, which has no kube-apiserver")
    return bin_dir


# Where build.sh leaves Volcano's PodGroup CRD, relative to the cache dir that holds bin/.
VOLCANO_PODGROUP_CRD = Path("crds") / "volcano-podgroups.yaml"


def volcano_podgroup_crd(bin_dir: Path) -> Path:
    """Path of the PodGroup CRD (scheduling.volcano.sh/v1beta1) that build.sh rendered.

    Tests apply it with kubectl when they need Volcano's PodGroup kind; its source and sha256
    are recorded in tests/data/formats/volcano_podgroup.source.json.
    """
    path = bin_dir.parent / VOLCANO_PODGROUP_CRD
    if not path.is_file():
        raise ClusterError(f"{path} is missing; rerun {BUILD_SCRIPT} (DSOP_CLUSTER_FORCE=1)")
    return path


def free_port() -> int:
    """Ask the kernel for an unused loopback port (closed again before the component binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def generate_pki(pki: Path) -> None:
    """Create a CA, an apiserver serving cert signed by it, and a service-account key pair.

    Our own CA (instead of the apiserver's self-signed cert) lets every client verify TLS with
    one file, and it doubles as the root CA the controller-manager publishes to pods.
    """
    pki.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
        "-subj", "/CN=dsop-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        cwd=pki,
    )  # fmt: skip
    sans = [
        "IP:127.0.0.1",
        f"IP:{SERVICE_IP}",
        "DNS:localhost",
        "DNS:kubernetes",
        "DNS:kubernetes.default",
        "DNS:kubernetes.default.svc",
        "DNS:kubernetes.default.svc.cluster.local",
    ]
    (pki / "apiserver.ext").write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        f"subjectAltName={','.join(sans)}\n"
    )
    _openssl(
        "req", "-new", *ec, "-keyout", "apiserver.key", "-out", "apiserver.csr",
        "-subj", "/CN=kube-apiserver",
        cwd=pki,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "3650", "-out", "apiserver.crt",
        "-extfile", "apiserver.ext",
        cwd=pki,
    )  # fmt: skip
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "sa.key",
        cwd=pki,
    )  # fmt: skip
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    for key in pki.glob("*.key"):
        key.chmod(0o600)


def node_manifest(name: str, accelerator: str, resource: str, devices: int = 8) -> dict[str, Any]:
    """A fake Node for kwok: real capacity/allocatable so the real scheduler can place pods."""
    capacity = {
        "cpu": "192",
        "memory": "1536Gi",
        "pods": "110",
        "ephemeral-storage": "2Ti",
        resource: str(devices),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": f"kwok-{accelerator}",
                "type": "kwok",
                ACCELERATOR_LABEL: accelerator,
            },
        },
        "spec": {},
        "status": {
            "capacity": capacity,
            "allocatable": dict(capacity),
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux"},
        },
    }


@dataclass
class LocalCluster:
    """Starts and stops one control plane whose state (certs, data, logs) lives in state_dir.

    Use as a context manager, or call start() and stop(). A cluster started by one process
    (``scripts/cluster up``) can be stopped by another with ``LocalCluster.load(state_dir)``.
    """

    state_dir: Path | None = None
    bin_dir: Path | None = None
    nodes: tuple[tuple[str, str, str], ...] = DEFAULT_NODES
    log: Callable[[str], None] = print
    remove_state_on_stop: bool = True
    die_with_parent: bool = False
    startup_timeout: float = 180.0
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    token: str = ""
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)
    _owns_state_dir: bool = field(default=False, repr=False)

    # ----------------------------------------------------------------- paths and accessors

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (token of a system:masters user, CA embedded)."""
        return self._state / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def ca_file(self) -> Path:
        return self._state / "pki" / "ca.crt"

    @property
    def log_dir(self) -> Path:
        return self._state / "logs"

    @property
    def env(self) -> dict[str, str]:
        """Environment for kubectl/helm subprocesses: KUBECONFIG, PATH, and a private helm home."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        if self.bin_dir:
            env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        helm = self._state / "helm"
        env["HELM_CACHE_HOME"] = str(helm / "cache")
        env["HELM_CONFIG_HOME"] = str(helm / "config")
        env["HELM_DATA_HOME"] = str(helm / "data")
        return env

    @property
    def _state(self) -> Path:
        if self.state_dir is None:
            raise ClusterError("the cluster has no state dir yet; call start() first")
        return self.state_dir

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Build if needed, start every component, wait until usable, create the fake nodes.

        The processes run in their own sessions, so they outlive this Python process unless
        stop() is called (scripts/cluster relies on that). On any failure everything started so
        far is stopped and the log tails are printed.
        """
        if self.bin_dir is None:
            self.bin_dir = build_binaries(self.log)
        if self.state_dir is None:
            self.state_dir = Path(tempfile.mkdtemp(prefix="dsop-cluster-"))
            self._owns_state_dir = True
        self._state.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            self._prepare()
            self._start_etcd()
            self._start_apiserver()
            self._start_controller_manager()
            self._start_scheduler()
            self._start_kwok()
            self._wait_usable()
            self._create_nodes()
        except BaseException as exc:
            self.log(f"localcluster: start-up failed: {exc}")
            self.print_log_tails()
            self.stop()
            raise
        self.log(
            f"localcluster: control plane up in {time.monotonic() - started:.1f}s at {self.server}"
            f" (state {self.state_dir})"
        )

    def stop(self) -> None:
        """Kill every process this cluster started (whole process groups), then drop its state.

        A process still there after SIGKILL keeps its pid in the saved state and is named in a
        ClusterError: stop() never reports a cluster gone that is not."""
        survivors = []
        for name in reversed(COMPONENTS):
            pid = self.pids.get(name)
            if pid is None:
                continue
            proc = self._procs.get(name)
            if proc is None and not _is_our_process(pid, self.bin_dir):
                continue  # already gone, or the pid now belongs to something else
            if not _kill_group(pid, proc):
                survivors.append(f"{name} (pid {pid})")
                continue
            self.pids.pop(name, None)
            self._procs.pop(name, None)
        if survivors:
            if self.state_dir is not None and self.state_dir.exists():
                self._save_state()
            raise ClusterError(f"still running after SIGKILL: {', '.join(survivors)}")
        if self.state_dir is not None and self.state_dir.exists():
            if self.remove_state_on_stop:
                shutil.rmtree(self.state_dir, ignore_errors=True)
            else:
                self._save_state()

    # ----------------------------------------------------------------- persistence

    def _save_state(self) -> None:
        state = {
            "bin_dir": str(self.bin_dir),
            "ports": self.ports,
            "pids": self.pids,
            "token": self.token,
            "server": self.server if "apiserver" in self.ports else None,
            "kubeconfig": str(self.kubeconfig),
        }
        tmp = self._state / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self._state / STATE_FILE)

    @classmethod
    def load(cls, state_dir: Path, log: Callable[[str], None] = print) -> LocalCluster:
        """Attach to a cluster that another process started with the same state_dir."""
        data = json.loads((state_dir / STATE_FILE).read_text())
        return cls(
            state_dir=state_dir,
            bin_dir=Path(data["bin_dir"]),
            ports={k: int(v) for k, v in data["ports"].items()},
            pids={k: int(v) for k, v in data["pids"].items()},
            token=data["token"],
            log=log,
        )

    def running(self) -> dict[str, bool]:
        """Which components still have a live process."""
        return {
            name: name in self.pids and _is_our_process(self.pids[name], self.bin_dir)
            for name in COMPONENTS
        }

    # ----------------------------------------------------------------- start-up steps

    def _prepare(self) -> None:
        generate_pki(self._state / "pki")
        self.token = secrets.token_hex(24)
        # Static token file: token,user,uid,"group1,group2". system:masters bypasses RBAC.
        (self._state / "tokens.csv").write_text(
            f'{self.token},dsop-admin,dsop-admin-uid,"system:masters"\n'
        )
        (self._state / "tokens.csv").chmod(0o600)
        for name in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok"):
            self.ports[name] = free_port()
        self._write_kubeconfig()
        self._save_state()

    def _write_kubeconfig(self) -> None:
        ca = base64.b64encode(self.ca_file.read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "dsop-local",
                    "cluster": {"server": self.server, "certificate-authority-data": ca},
                }
            ],
            "users": [{"name": "dsop-admin", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "dsop-local",
                    "context": {
                        "cluster": "dsop-local",
                        "user": "dsop-admin",
                        "namespace": "default",
                    },
                }
            ],
            "current-context": "dsop-local",
        }
        # JSON is valid YAML, so every kubeconfig reader takes it.
        self.kubeconfig.write_text(json.dumps(config, indent=2) + "\n")
        self.kubeconfig.chmod(0o600)

    def _spawn(self, name: str, args: list[str]) -> None:
        """Start one component in its own process group, output to logs/<name>.log."""
        assert self.bin_dir is not None
        binary = self.bin_dir / args[0]
        with open(self.log_dir / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                [str(binary), *args[1:]],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._state,
                start_new_session=True,  # own group: stop() kills it and its children together
                preexec_fn=_die_with_parent if self.die_with_parent else None,
                env={**os.environ, "HOME": str(self._state)},  # keep ~/.kwok etc. out of reach
            )
        self._procs[name] = proc
        self.pids[name] = proc.pid
        self._save_state()
        self.log(f"localcluster: started {name} (pid {proc.pid})")

    def _start_etcd(self) -> None:
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        self._spawn(
            "etcd",
            [
                "etcd",
                "--name=dsop",
                f"--data-dir={self._state / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=dsop={peer}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync",  # test data: durability buys nothing, fsync costs seconds
                "--quota-backend-bytes=2147483648",
                "--log-level=warn",
            ],
        )
        self._wait_http("etcd", f"{client}/health", expect=b'"health":"true"')

    def _start_apiserver(self) -> None:
        pki = self._state / "pki"
        self._spawn(
            "kube-apiserver",
            [
                "kube-apiserver",
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.ports['apiserver']}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--token-auth-file={self._state / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--allow-privileged=true",
                f"--cert-dir={self._state / 'apiserver-certs'}",
                "--v=0",
            ],
        )
        self._wait_https("kube-apiserver", "/readyz", port=self.ports["apiserver"], auth=True)

    def _component_common(self, name: str) -> list[str]:
        """Flags the controller-manager and scheduler share: kubeconfig and loopback serving."""
        kc = str(self.kubeconfig)
        return [
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.ports[name]}",
            f"--cert-dir={self._state / (name + '-certs')}",
            "--leader-elect=false",  # one replica: skip the lease wait on start-up
        ]

    def _start_controller_manager(self) -> None:
        pki = self._state / "pki"
        self._spawn(
            "kube-controller-manager",
            [
                "kube-controller-manager",
                *self._component_common("controller-manager"),
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                "--use-service-account-credentials=true",  # each controller under its own RBAC
                "--controllers=*",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allocate-node-cidrs=false",
                "--v=0",
            ],
        )

    def _start_scheduler(self) -> None:
        self._spawn(
            "kube-scheduler",
            ["kube-scheduler", *self._component_common("scheduler"), "--v=0"],
        )

    def _start_kwok(self) -> None:
        self._spawn(
            "kwok",
            [
                "kwok",
                f"--kubeconfig={self.kubeconfig}",
                f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
                f"--server-address=127.0.0.1:{self.ports['kwok']}",
                "--cidr=10.244.0.1/16",
                "--node-ip=127.0.0.1",
                # Node leases keep nodes Ready between kwok's slow status heartbeats; without them
                # the node-lifecycle controller flaps nodes NotReady and strands pods NotReady.
                "--node-lease-duration-seconds=40",
            ],
        )

    def _wait_usable(self) -> None:
        """Every component healthy, and the objects tests rely on exist."""
        self._wait_https(
            "kube-controller-manager", "/healthz", port=self.ports["controller-manager"]
        )
        self._wait_https("kube-scheduler", "/healthz", port=self.ports["scheduler"])
        self._wait_http("kwok", f"http://127.0.0.1:{self.ports['kwok']}/healthz")
        self._wait_for(
            "namespace default and its service account",
            lambda: self.api_get("/api/v1/namespaces/default/serviceaccounts/default") is not None,
        )
        self._wait_for(
            "configmap kube-root-ca.crt in default",
            lambda: (
                self.api_get("/api/v1/namespaces/default/configmaps/kube-root-ca.crt") is not None
            ),
        )

    def _create_nodes(self) -> None:
        for name, accelerator, resource in self.nodes:
            if self.api_get(f"/api/v1/nodes/{name}") is None:
                self.api_request(
                    "POST", "/api/v1/nodes", node_manifest(name, accelerator, resource)
                )

        def all_ready() -> bool:
            for name, _, _ in self.nodes:
                node = self.api_get(f"/api/v1/nodes/{name}") or {}
                conditions = node.get("status", {}).get("conditions", [])
                if not any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                    return False
            return True

        self._wait_for("kwok nodes Ready", all_ready)

    # ----------------------------------------------------------------- HTTP helpers

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def api_request(self, method: str, path: str, body: Any = None) -> dict[str, Any] | None:
        """Call the apiserver as the admin; None on 404, ClusterError on other errors."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.server + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, context=self._ssl_context(), timeout=10) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise ClusterError(f"{method} {path}: {err.code} {err.read()[:500]!r}") from err

    def api_get(self, path: str) -> dict[str, Any] | None:
        return self.api_request("GET", path)

    def _check_alive(self, name: str) -> None:
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is not None:
            raise ClusterError(f"{name} exited with code {proc.returncode}")

    def _wait_for(self, what: str, ready: Callable[[], bool]) -> None:
        """Poll ready() until it returns True; fail early if a component died."""
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        delay = 0.05
        while time.monotonic() < deadline:
            for name in self._procs:
                self._check_alive(name)
            try:
                if ready():
                    return
            except (OSError, ClusterError, ValueError) as exc:
                last_error = exc
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        detail = f" (last error: {last_error})" if last_error else ""
        raise ClusterError(
            f"timed out after {self.startup_timeout:.0f}s waiting for {what}{detail}"
        )

    def _wait_http(self, name: str, url: str, expect: bytes = b"") -> None:
        def ok() -> bool:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status == 200 and expect in resp.read()

        self._wait_for(f"{name} at {url}", ok)

    def _wait_https(self, name: str, path: str, port: int, auth: bool = False) -> None:
        """Health endpoint over TLS; components other than the apiserver self-sign, so no verify."""
        if name == "kube-apiserver":
            ctx = self._ssl_context()
        else:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}

        def ok() -> bool:
            req = urllib.request.Request(f"https://127.0.0.1:{port}{path}", headers=headers)
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
                    return resp.status == 200
            except urllib.error.HTTPError:
                return False  # 500 while post-start hooks run

        self._wait_for(f"{name} {path}", ok)

    # ----------------------------------------------------------------- diagnostics

    def print_log_tails(self, lines: int = 40) -> None:
        """Show the end of each component log: the first thing to read when start-up fails."""
        if self.state_dir is None or not self.log_dir.exists():
            return
        for name in COMPONENTS:
            path = self.log_dir / f"{name}.log"
            if not path.exists():
                continue
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            print(f"----- {name} log ({path}), last {len(tail)} lines -----", file=sys.stderr)
            print("\n".join(tail), file=sys.stderr)

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this cluster."""
        assert self.bin_dir is not None
        return subprocess.run(
            [str(self.bin_dir / "kubectl"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
        )


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it if the Python that started it dies.

    A pytest run killed hard (CI time-out, SIGKILL) never reaches the fixture's teardown; this
    keeps it from leaving an apiserver and etcd behind.
    """
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def _is_our_process(pid: int, bin_dir: Path | None) -> bool:
    """True if pid is alive and runs one of our binaries (guards against reused pids)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    exe = cmdline.split(b"\0", 1)[0].decode(errors="replace")
    if bin_dir is None:
        return True
    return exe.startswith(str(bin_dir) + os.sep)


def _kill_group(
    pid: int, proc: subprocess.Popen[bytes] | None, grace: float = 10.0, after_kill: float = 5.0
) -> bool:
    """SIGTERM the process group led by pid, SIGKILL whatever is left after `grace` seconds
    (the grace period ends in SIGKILL, not in carrying on); whether pid is gone at the end."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    if _gone_within(pid, proc, grace):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # the rest of its group
        return True
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    return _gone_within(pid, proc, after_kill)


def _gone_within(pid: int, proc: subprocess.Popen[bytes] | None, seconds: float) -> bool:
    """Poll until pid has exited (reaped, when it is our child), for at most `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        if proc is not None:
            if proc.poll() is not None:
                return True
        elif not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


@contextlib.contextmanager
def running_cluster(**kwargs: Any) -> Iterator[LocalCluster]:
    """Context manager form used by the pytest fixture: always stops, even on errors."""
    cluster = LocalCluster(**kwargs)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
