#!/usr/bin/env python3
"""`make demo`: the whole product on one machine, with no container engine and no accelerator.

1. starts the local control plane (real etcd/kube-apiserver/controllers, kwok fake nodes),
2. installs the CRD and the operator with the Helm chart, and runs the operator process itself
   (kwok marks the chart's operator pod Ready but runs nothing, so the real one runs here),
3. synthesizes a tiny random DeepSeek-V3 checkpoint,
4. applies a tiny DeepSeekDeployment and follows it to Ready,
5. because kwok pods run nothing, runs the sharding Job's own `dsworker shard` command and a 2-rank
   `dsworker serve` locally on that model, and prints a real completion from the OpenAI endpoint,
6. stops everything it started (pass --keep to leave the cluster up).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "cluster"))

from localcluster import LocalCluster  # noqa: E402

WORK = REPO / ".demo"
NAME, NAMESPACE = "tiny", "demo"
PLAN = {"worldSize": 2, "tp": 2, "moeTp": 1, "moeEp": 2}
# Room for a prompt offering tools (tests/data/weather_tool.json is ~700 tokens of system prompt
# with the tiny model's byte-level tokenizer); the tiny model's context is 4096.
SEQ = {"maxSeqLen": 2048, "maxInputTokenLen": 1536, "maxBatchSize": 4}


def say(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(cmd: list[str], env: dict[str, str] | None = None, **kw: object) -> str:
    out = subprocess.run(cmd, env=env, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload]
    return out.stdout


def custom_resource(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    return {
        "apiVersion": "llm.dsop.io/v1alpha1",
        "kind": "DeepSeekDeployment",
        "metadata": {
            "name": NAME,
            "namespace": NAMESPACE,
            # Lets the operator check divisibility against config.json before any Job runs.
            "annotations": {"llm.dsop.io/model-config": json.dumps(config)},
        },
        "spec": {
            "model": {
                "source": {"hostPath": {"path": str(model_dir)}},
                "architecture": "DeepseekV3",
                "quantization": "bf16",
            },
            "parallelism": {"devicesPerNode": 2, "tp": 2, "moeEp": 2},
            "expertParallel": {"level": 2},
            "sharding": {"store": {"hostPath": {"path": "/dev/shm/dsd"}}, "processes": 2},
            "serving": dict(SEQ),
            "worker": {
                "accelerator": {"type": "cpu"},
                "nodeSelector": {"kubernetes.io/hostname": "kwok-npu-0"},
                "restartBudget": 2,
            },
        },
    }


def columns(table: str) -> list[list[str]]:
    """`kubectl get` output as cells, cut where the header's columns start: an empty printer
    column stays a cell ("-") instead of shifting the ones after it."""
    lines = [line for line in table.splitlines() if line.strip()]
    if not lines:
        return []
    header = lines[0]
    starts = [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 1] == " ")]
    ends = [*starts[1:], None]
    return [[line[a:b].strip() or "-" for a, b in zip(starts, ends, strict=True)] for line in lines]


def follow_to_ready(cluster: LocalCluster, timeout: float = 240) -> None:
    """Print every change of `kubectl get dsd` (header first) until the phase is Ready."""
    last: list[str] = []
    widths: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = cluster.kubectl("-n", NAMESPACE, "get", "dsd", NAME, check=False)
        rows = [row[:-1] for row in columns(out.stdout)]  # without AGE, which always changes
        if len(rows) == 2 and rows[1] != last:
            if not widths:
                widths = [max(len(h), 12) for h in rows[0]]
                print(
                    "    " + "  ".join(h.ljust(w) for h, w in zip(rows[0], widths, strict=True)),
                    flush=True,
                )
            print(
                "    " + "  ".join(c.ljust(w) for c, w in zip(rows[1], widths, strict=True)),
                flush=True,
            )
            last = rows[1]
        phase = cluster.kubectl(
            "-n", NAMESPACE, "get", "dsd", NAME, "-o", "jsonpath={.status.phase}", check=False
        ).stdout.strip()
        if phase == "Ready":
            return
        if phase == "Failed":
            raise SystemExit("the DeepSeekDeployment failed:\n" + describe(cluster))
        time.sleep(1)
    raise SystemExit("timed out waiting for Ready:\n" + describe(cluster))


def describe(cluster: LocalCluster) -> str:
    return cluster.kubectl("-n", NAMESPACE, "get", "dsd", NAME, "-o", "yaml", check=False).stdout


def wait_health(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"dsworker serve exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit("the local server never became healthy")


def job_shard_args(cluster: LocalCluster, model_dir: Path, shards: Path) -> list[str]:
    """The sharding Job's own `dsworker` arguments, with this machine's paths."""
    jobs = json.loads(cluster.kubectl("-n", NAMESPACE, "get", "jobs", "-o", "json").stdout)
    [job] = [j for j in jobs["items"] if j["metadata"]["name"].startswith(f"{NAME}-shard-")]
    [shard] = [c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "shard"]
    args = list(shard["args"])
    args[args.index("--model-path") + 1] = str(model_dir)
    args[args.index("--save-directory") + 1] = str(shards)
    return args


def serve_locally(cluster: LocalCluster, model_dir: Path, py: str) -> None:
    """Shard with the Job's own arguments, start 2 ranks, ask for a completion."""
    shards = WORK / "shards"
    args = job_shard_args(cluster, model_dir, shards)
    say(f"Sharding {model_dir.name} locally with the sharding Job's arguments: dsworker {args[0]}")
    print("    " + " ".join(args[1:]))
    out = run(
        [py, "-m", "dsworker.cli", *args],
        env={**os.environ, "DSOP_TERMINATION_LOG": str(WORK / "termination-log")},
    )
    print("    " + out.strip().splitlines()[-1])
    engine = WORK / "engine.json"
    engine.write_text(
        json.dumps(
            {
                "modelName": NAME,
                "worldSize": 2,
                "tp": 2,
                "moe_ep": 2,
                "ep_level": 2,
                **SEQ,
                "dtype": "float32",
                "device": "cpu",
            }
        )  # fmt: skip
    )
    port = free_port()
    log = WORK / "serve.log"
    say(f"Starting `dsworker serve` with 2 ranks on 127.0.0.1:{port} (log {log})")
    proc = subprocess.Popen(
        [py, "-m", "dsworker.cli", "serve", "--model", str(shards), "--config", str(engine),
         "--nproc-per-node", "2", "--host", "127.0.0.1", "--port", str(port),
         "--master-port", str(free_port())],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url, proc, log)
        body = json.dumps(
            {"model": NAME, "prompt": "DeepSeek on Kubernetes", "max_tokens": 16,
             "temperature": 0}
        ).encode()  # fmt: skip
        say(f"POST {url}/v1/completions")
        req = urllib.request.Request(
            url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
        print(json.dumps(answer, indent=2))
        print("    (random weights: the text is noise, the path is real)")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="leave the cluster running at the end")
    args = ap.parse_args()
    py = sys.executable
    WORK.mkdir(exist_ok=True)

    say("Synthesizing a tiny random DeepSeek-V3 checkpoint: dsworker synth")
    model_dir = WORK / "model"
    # Afresh each run (a second or two): a model or shards left by an older demo may not fit
    # this spec, and the sharder rightly refuses a directory sealed for another plan.
    for old in (model_dir, WORK / "shards"):
        shutil.rmtree(old, ignore_errors=True)
    run([py, "-m", "dsworker.cli", "synth", "--arch", "v3", "--preset", "tiny",
         "--format", "bf16", "--seed", "0", "--out", str(model_dir)])  # fmt: skip
    print(f"    {model_dir}")

    say("Starting the local control plane (etcd, kube-apiserver, controllers, kwok nodes)")
    print("    kwok nodes are simulated: pods scheduled there are marked Running, nothing executes")
    cluster = LocalCluster(state_dir=WORK / "cluster", log=lambda m: print(f"    {m}"))
    cluster.start()
    operator: subprocess.Popen[bytes] | None = None
    try:
        env = cluster.env
        print(f"    export KUBECONFIG={cluster.kubeconfig}")
        say("Installing the CRD and the operator with Helm (charts/deepseek-operator)")
        print(
            "    "
            + run(
                ["helm", "install", "dsop", str(REPO / "charts" / "deepseek-operator"),
                 "--namespace", "dsop-system", "--create-namespace", "--wait",
                 "--timeout", "120s"],
                env=env,
            ).strip().splitlines()[0]
        )  # fmt: skip
        say("Running the operator process against the cluster (python -m deepseek_operator)")
        op_log = WORK / "operator.log"
        operator = subprocess.Popen(
            [py, "-m", "deepseek_operator", "--standalone", "--liveness", "off",
             "--metrics-port", str(free_port()), "--metrics-address", "127.0.0.1"],
            stdout=op_log.open("wb"), stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        print(f"    log: {op_log}")
        say(f"Applying DeepSeekDeployment {NAMESPACE}/{NAME} and following it to Ready")
        cluster.kubectl("create", "namespace", NAMESPACE, check=False)
        manifest = WORK / "tiny.json"
        manifest.write_text(json.dumps(custom_resource(model_dir), indent=2))
        cluster.kubectl("apply", "-f", str(manifest))
        follow_to_ready(cluster)
        print(cluster.kubectl("-n", NAMESPACE, "get", "dsd,jobs,statefulsets,pods,svc").stdout)
        print(
            "    Note: kwok nodes run no containers. The sharding Job and the worker pods above were\n"
            "    only marked Running/Succeeded by kwok; nothing was sharded or served in the cluster.\n"
            "    The next step runs the Job's own `dsworker shard` and `dsworker serve` on this machine."
        )
        serve_locally(cluster, model_dir, py)
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(30)
        if args.keep:
            print(f"\nCluster left running: export KUBECONFIG={cluster.kubeconfig}")
            print(f"Clean up with: DSOP_CLUSTER_STATE={cluster.state_dir} scripts/cluster down")
        else:
            say("Stopping the local control plane")
            cluster.stop()
    say("Done. `rm -rf .demo` removes the model and shards.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
