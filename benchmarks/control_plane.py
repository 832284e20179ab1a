"""Operator benchmark on the local control plane (kwok nodes: Job pods complete, workers turn
Ready at once, so what is measured is the operator and the API server, not the model).

    .venv/bin/python benchmarks/control_plane.py [--kubeconfig FILE] [--latency-samples 30] [--burst 100]

Without --kubeconfig (or $DSOP_KUBECONFIG) it starts a LocalCluster of tests/cluster and stops
it at the end. It installs the CRD, runs `python -m deepseek_operator --standalone` as a
subprocess and measures:
  latency  create one DeepSeekDeployment, time until its sharding Job exists (the first child
           the operator creates) and until it is Ready, one at a time: p50, p99, max
  burst    create --burst DeepSeekDeployments at once, time until every one is Ready; errors =
           reconciles that raised (operator metrics) + objects that ended Failed
  memory   the operator's resident set size (psutil): at rest, peak during the burst, at the end
Every figure is one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import psutil
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

GROUP, VERSION, PLURAL = "llm.dsop.io", "v1alpha1", "deepseekdeployments"
NODES = ("kwok-npu-0", "kwok-npu-1", "kwok-gpu-0", "kwok-gpu-1")


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def deployment(name: str, node: str) -> dict[str, Any]:
    """One CPU rank on one kwok node; checkpoint and shards on node paths (no claims needed)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DeepSeekDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": {"hostPath": {"path": "/models/tiny"}}},
            "parallelism": {"nodes": 1, "devicesPerNode": 1},
            "sharding": {"store": {"hostPath": {"path": "/dev/shm/dsd"}}},
            "worker": {
                "image": "dsworker:bench",
                "accelerator": {"type": "cpu"},
                "nodeSelector": {"kubernetes.io/hostname": node},
            },
        },
    }


class JobWatch:
    """Records when each sharding Job of the namespace first appears (a watch, not polling)."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.seen: dict[str, float] = {}
        self.cond = threading.Condition()
        self._watch = watch.Watch()
        batch = client.BatchV1Api(api)
        self._thread = threading.Thread(
            target=self._run, args=(batch, namespace), daemon=True, name="job-watch"
        )
        self._thread.start()

    def _run(self, batch: client.BatchV1Api, namespace: str) -> None:
        with suppress(Exception):  # the stream ends, one way or another, when stop() is called
            self._stream(batch, namespace)

    def _stream(self, batch: client.BatchV1Api, namespace: str) -> None:
        selector = "app.kubernetes.io/component=sharder"
        for event in self._watch.stream(
            batch.list_namespaced_job, namespace, label_selector=selector, timeout_seconds=3600
        ):
            obj = event["object"]
            owner = (obj.metadata.annotations or {}).get("llm.dsop.io/deployment")
            if owner and owner not in self.seen:
                with self.cond:
                    self.seen[owner] = time.monotonic()
                    self.cond.notify_all()

    def wait(self, owner: str, timeout: float = 30) -> float:
        with self.cond:
            if not self.cond.wait_for(lambda: owner in self.seen, timeout=timeout):
                raise TimeoutError(f"no Job for {owner} after {timeout}s")
            return self.seen[owner]

    def stop(self) -> None:
        self._watch.stop()


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", default=os.environ.get("DSOP_KUBECONFIG"))
    parser.add_argument("--latency-samples", type=int, default=30)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument(
        "--operator-log", action="store_true", help="keep the operator's INFO log (default quiet)"
    )
    args = parser.parse_args()

    with ExitStack() as stack:
        if args.kubeconfig:
            kubeconfig = args.kubeconfig
            kubectl = "kubectl"
        else:
            from localcluster import LocalCluster

            cluster = LocalCluster(log=lambda m: print(m, file=sys.stderr), die_with_parent=True)
            cluster.start()
            stack.callback(cluster.stop)
            kubeconfig = str(cluster.kubeconfig)
            assert cluster.bin_dir is not None
            kubectl = str(cluster.bin_dir / "kubectl")
        env = {**os.environ, "KUBECONFIG": kubeconfig, "PYTHONUNBUFFERED": "1"}
        crd = ROOT / "crds" / "deepseekdeployments.llm.dsop.io.yaml"
        subprocess.run([kubectl, "apply", "--server-side", "-f", str(crd)], env=env, check=True)
        subprocess.run(
            [kubectl, "wait", "--for=condition=Established", "crd/" + crd.stem], env=env, check=True
        )
        api = config.new_client_from_config(config_file=kubeconfig)
        stack.callback(api.close)
        core = client.CoreV1Api(api)
        objects = client.CustomObjectsApi(api)

        namespace = f"bench-{secrets.token_hex(3)}"
        core.create_namespace({"metadata": {"name": namespace}})
        stack.callback(lambda: core.delete_namespace(namespace))
        wait_for(
            "default service account",
            lambda: core.list_namespaced_service_account(namespace).items,
            timeout=60,
        )

        metrics_port = free_port()
        log_path = Path(tempfile.mkdtemp(prefix="dsop-bench-")) / "operator.log"
        print(f"operator log: {log_path}", file=sys.stderr)
        log = open(log_path, "wb")  # noqa: SIM115 - closed by the stack
        stack.callback(log.close)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deepseek_operator",
                "--standalone",
                *(() if args.operator_log else ("--quiet",)),
                "--liveness",
                "off",
                "--metrics-port",
                str(metrics_port),
                "--metrics-address",
                "127.0.0.1",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        stack.callback(lambda: (proc.send_signal(signal.SIGTERM), proc.wait(timeout=30)))
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        wait_for("operator metrics", lambda: _up(metrics_url), timeout=60)
        operator = psutil.Process(proc.pid)
        time.sleep(2)  # kopf's initial listing
        rss_idle = operator.memory_info().rss

        def create(name: str, node: str) -> float:
            start = time.monotonic()
            objects.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, deployment(name, node)
            )
            return start

        def phase(name: str) -> str | None:
            got = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            return (got.get("status") or {}).get("phase")

        # -- latency: one at a time, each to Ready before the next
        jobs = JobWatch(api, namespace)
        stack.callback(jobs.stop)
        latencies, to_ready = [], []
        for i in range(args.latency_samples):
            name = f"lat-{i}"
            start = create(name, NODES[i % len(NODES)])
            latencies.append(jobs.wait(name) - start)
            wait_for(f"{name} Ready", lambda n=name: phase(n) == "Ready", timeout=60, interval=0.02)
            to_ready.append(time.monotonic() - start)
        for what, values in (
            ("apply -> sharding Job created", latencies),
            ("apply -> status.phase Ready (kwok workers)", to_ready),
        ):
            emit(
                benchmark="operator",
                what=what,
                samples=len(values),
                p50_s=round(statistics.median(values), 4),
                p99_s=round(percentile(values, 0.99), 4),
                max_s=round(max(values), 4),
            )

        # -- burst: N at once, all to Ready
        errors_before = metric(metrics_url, 'dsop_reconciles_total{result="error"}')
        peak = [operator.memory_info().rss]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.append(operator.memory_info().rss)
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        cpu0 = sum(operator.cpu_times()[:2])
        t0 = time.monotonic()
        names = [f"burst-{i}" for i in range(args.burst)]
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda i: create(names[i], NODES[i % len(NODES)]), range(args.burst)))
        created = time.monotonic() - t0

        def phases() -> dict[str, int]:
            items = objects.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
            out: dict[str, int] = {}
            for item in items["items"]:
                if item["metadata"]["name"].startswith("burst-"):
                    phase = (item.get("status") or {}).get("phase") or "None"
                    out[phase] = out.get(phase, 0) + 1
            return out

        with suppress(TimeoutError):
            wait_for(
                f"{args.burst} Ready",
                lambda: phases().get("Ready", 0) == args.burst,
                timeout=args.timeout,
                interval=0.25,
            )
        elapsed = time.monotonic() - t0
        cpu = sum(operator.cpu_times()[:2]) - cpu0
        done.set()
        sampler.join()
        final = phases()
        errors = metric(metrics_url, 'dsop_reconciles_total{result="error"}') - errors_before
        emit(
            benchmark="operator",
            what=f"{args.burst} DeepSeekDeployments created at once -> all Ready",
            created_s=round(created, 2),
            all_ready_s=round(elapsed, 2),
            ready=final.get("Ready", 0),
            failed=final.get("Failed", 0),
            phases=final,
            reconcile_errors=int(errors),
            reconciles=int(metric(metrics_url, 'dsop_reconciles_total{result="ok"}')),
            operator_cpu_s=round(cpu, 1),
            machine_cpus=os.cpu_count(),
        )
        rss_end = operator.memory_info().rss
        emit(
            benchmark="operator",
            what="operator resident memory",
            idle_mb=round(rss_idle / 2**20, 1),
            peak_mb=round(max(peak) / 2**20, 1),
            end_mb=round(rss_end / 2**20, 1),
            deployments=args.latency_samples + args.burst,
        )
        ok = (
            final.get("Ready", 0) == args.burst
            and errors == 0
            and statistics.median(latencies) < 1.0
            and max(peak) < 150 * 2**20
        )
        emit(benchmark="operator", what="targets met", ok=ok)
    return 0 if ok else 1


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except (OSError, ApiException):
        return False


if __name__ == "__main__":
    sys.exit(main())
