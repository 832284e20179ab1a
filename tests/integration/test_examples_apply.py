"""examples/ on a real control plane: the API server accepts every example (OpenAPI schema and CEL
rules of the CRD), refuses a broken variant of each with the rule's message, and the operator
reconciles each one at least to its sharding Job with a status that says what it waits for.

The examples name checkpoints, claims and nodes of a real cluster that the kwok nodes do not
have, so their Jobs stay Pending here (unbound claim, no such node): the status must say so.
"""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_chart import create_namespace, get_json, operator_process

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
RECONCILE_TIMEOUT = 60.0


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def write(tmp_path: Path, body: dict[str, Any]) -> Path:
    path = tmp_path / f"{body['metadata']['name']}-{secrets.token_hex(2)}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


# example -> (how to break it, text of the rule's message the API server must answer with)
BREAKS: dict[str, tuple[str, Any, str]] = {
    "deepseek-r1-w8a8-ascend-2x8-ep2.yaml": (
        "spec.expertParallel.interconnect",
        "direct",
        "needs the nodes connected through a switch",
    ),
    "deepseek-r1-a3-16npu-hostpath.yaml": (
        "spec.parallelism.nodes",
        2,
        "spec.sharding.store.hostPath is node-local",
    ),
    "deepseek-r1-w8a8-ascend-2x8-nodelocal.yaml": (
        "spec.parallelism.nodes",
        4,
        "spec.sharding.store.hostPath is node-local",
    ),
    "deepseek-v3-fp8-gpu-2x8.yaml": ("spec.parallelism.tp", 16, "dp*tp must equal worldSize"),
    "tiny-cpu.yaml": ("spec.serving.maxInputTokenLen", 512, "must be less than"),
    "deepseek-r1-mindie-ascend-2x8.yaml": (
        "spec.serving.reasoningParser",
        "deepseek_r1",
        "spec.serving.reasoningParser: runtime mindie has no reasoning parser setting",
    ),
    "deepseek-v3-vllm-gpu-2x8.yaml": (
        "spec.sharding.enabled",
        True,
        "spec.sharding.enabled: runtime vllm loads the HuggingFace checkpoint itself",
    ),
}


def broken(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    node = out
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    return out


@pytest.fixture
def namespace(kube_cluster: Any) -> Iterator[str]:
    name = create_namespace(kube_cluster, "examples")
    yield name
    kube_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_every_example_has_a_broken_variant() -> None:
    assert sorted(p.name for p in EXAMPLES) == sorted(BREAKS)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_api_server_accepts_the_example_and_refuses_it_broken(
    kube_cluster: Any, dsd_crd: str, namespace: str, tmp_path: Path, example: Path
) -> None:
    body = load(example)
    ok = kube_cluster.kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-f", str(example), check=False
    )
    assert ok.returncode == 0, ok.stderr
    path, value, message = BREAKS[example.name]
    bad = write(tmp_path, broken(body, path, value))
    refused = kube_cluster.kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-f", str(bad), check=False
    )
    assert refused.returncode != 0, f"{example.name} with {path}={value} was accepted"
    assert message in refused.stderr, refused.stderr


def sharded(example: Path) -> bool:
    return (load(example)["spec"].get("sharding") or {}).get("enabled", True)


def test_operator_reconciles_every_example_to_its_sharding_job(
    kube_cluster: Any, dsd_crd: str, namespace: str, tmp_path: Path
) -> None:
    kube = kube_cluster
    log = tmp_path / "operator.log"
    with operator_process(["--standalone", "--namespace", namespace], kube.kubeconfig, log):
        for example in EXAMPLES:
            kube.kubectl("apply", "--server-side", "-n", namespace, "-f", str(example))

        def reconciled() -> dict[str, dict[str, Any]] | None:
            out = {}
            for example in EXAMPLES:
                name = load(example)["metadata"]["name"]
                obj = get_json(kube, "deepseekdeployment", name, "-n", namespace) or {}
                status = obj.get("status") or {}
                if not sharded(example):  # no Job: the workers start on the checkpoint
                    if get_json(kube, "statefulset", f"{name}-worker", "-n", namespace) is None:
                        return None
                    out[name] = obj
                    continue
                shards = status.get("shards") or {}
                # Node-local shards: one Job per node, listed in status.shards.nodes.
                jobs = [n["job"] for n in shards.get("nodes") or ()] or [shards.get("job")]
                if not all(j and get_json(kube, "job", j, "-n", namespace) for j in jobs):
                    return None
                out[name] = obj
            return out

        try:
            found = kube.wait_for("a sharding Job per example", reconciled, RECONCILE_TIMEOUT, 0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\noperator log:\n{log.read_text()[-4000:]}") from None

    engines = {load(e)["metadata"]["name"]: load(e)["spec"].get("runtime", {}) for e in EXAMPLES}
    for name, obj in found.items():
        status = obj["status"]
        conditions = {c["type"]: c for c in status["conditions"]}
        assert status["observedGeneration"] == obj["metadata"]["generation"], name
        assert conditions["Validated"]["status"] == "True", (name, conditions["Validated"])
        assert status["runtime"] == engines[name].get("engine", "dsworker"), name
        if "shards" not in status:  # sharding disabled: waiting for the workers, saying why
            assert conditions["Sharded"]["reason"] == "ShardingDisabled", name
            assert status["phase"] in ("Pending", "Staging", "Loading"), (name, status["phase"])
            assert conditions["Ready"]["status"] == "False" and status["message"], name
            continue
        # Nothing here can run the Jobs (no such claims or nodes): waiting, and saying why.
        assert status["phase"] in ("Pending", "Sharding"), (name, status["phase"])
        assert conditions["Sharded"]["reason"] in (
            "StoreNotBound",
            "ShardingPending",
            "ShardingInProgress",
        ), (name, conditions["Sharded"])
        assert conditions["Ready"]["status"] == "False"
        assert status["message"], name
        shards = status["shards"]
        for job_name in [n["job"] for n in shards.get("nodes") or ()] or [shards["job"]]:
            job = get_json(kube, "job", job_name, "-n", namespace)
            assert job is not None, job_name
            owners = job["metadata"]["ownerReferences"]
            assert owners[0]["kind"] == "DeepSeekDeployment" and owners[0]["name"] == name
            command = job["spec"]["template"]["spec"]["containers"][0]
            assert [*command["command"], *command["args"]][:2] == ["dsworker", "shard"]

    # The operator-created claim of the pvc-store example, waiting for a provisioner.
    r1 = found["deepseek-r1-w8a8"]
    assert r1["status"]["phase"] == "Pending"
    assert json.dumps(r1["status"]["conditions"]).count("StoreNotBound") == 1
    claims = get_json(kube, "pvc", "-n", namespace) or {"items": []}
    # the operator-created claims of the two examples that ask for one (R1 on dsworker and MindIE)
    assert [c["spec"]["accessModes"] for c in claims["items"]] == [["ReadWriteMany"]] * 2
