"""GitOps health checks: the Argo CD Lua script and the Flux CEL expressions in docs/gitops/,
run over every status shape the operator writes (built with the status models themselves), and
the documented snippets kept identical to the tested files."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from lupa import lua51, lua54, luajit21

from deepseek_operator.api import PHASES, DeepSeekDeploymentStatus

REPO = Path(__file__).resolve().parents[2]
GITOPS = REPO / "docs" / "gitops"
LUA_FILE = GITOPS / "argocd-health.lua"
HEALTH_KEY = "resource.customizations.health.llm.dsop.io_DeepSeekDeployment"
GENERATION = 3
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)

# Argo CD health <-> Flux kstatus result of the same object.
FLUX_OF_ARGO = {"Healthy": "Current", "Progressing": "InProgress", "Degraded": "Failed"}


def condition(ctype: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": NOW,
        "observedGeneration": GENERATION,
    }


def status(phase: str | None, observed: int | None = GENERATION, **extra: Any) -> dict[str, Any]:
    """A status as the operator writes it: validated and serialised by the status model."""
    fields: dict[str, Any] = {"phase": phase, "observedGeneration": observed, **extra}
    model = DeepSeekDeploymentStatus.model_validate(
        {k: v for k, v in fields.items() if v is not None}
    )
    return model.to_dict()


def deployment(st: dict[str, Any] | None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "llm.dsop.io/v1alpha1",
        "kind": "DeepSeekDeployment",
        "metadata": {"name": "r1", "namespace": "llm", "generation": GENERATION},
        "spec": {"model": {"source": {"pvc": {"claimName": "models"}}}},
    }
    if st is not None:
        obj["status"] = st
    return obj


READY_CONDITIONS = [
    condition("Validated", "True", "SpecValid"),
    condition("Sharded", "True", "ShardsComplete"),
    condition("WorkersReady", "True", "AllWorkersReady"),
    condition("Ready", "True", "Serving", "serving DeepSeek-R1 at http://r1.llm.svc:1025/v1"),
]

# (case, object, Argo CD health, text the message must contain)
CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("no-status", deployment(None), "Progressing", "Waiting for the operator"),
    ("empty-status", deployment({}), "Progressing", "Waiting for the operator"),
    (
        "pending",
        deployment(status("Pending", message="validating the spec")),
        "Progressing",
        "validating",
    ),
    (
        "sharding",
        deployment(
            status(
                "Sharding",
                message="sharding job r1-shard-1a2b3c running",
                fingerprint="1a2b3c",
                conditions=[condition("Sharded", "False", "JobRunning")],
            )
        ),
        "Progressing",
        "sharding job",
    ),
    ("staging", deployment(status("Staging", readyWorkers="0/2")), "Progressing", "0/2"),
    ("loading", deployment(status("Loading", readyWorkers="1/2")), "Progressing", "1/2"),
    (
        "ready",
        deployment(
            status(
                "Ready",
                readyWorkers="2/2",
                worldSize=16,
                endpoint="http://r1.llm.svc:1025/v1",
                conditions=READY_CONDITIONS,
                shards={"bytes": 10, "files": 2, "seconds": 1.5, "job": "r1-shard-1a2b3c"},
            )
        ),
        "Healthy",
        "serving DeepSeek-R1",
    ),
    (
        "degraded",
        deployment(
            status(
                "Degraded",
                readyWorkers="1/2",
                groupRestarts=1,
                message="worker r1-1 restarted; restarting the group (1 of 5 restarts)",
            )
        ),
        "Degraded",
        "restarting the group",
    ),
    (
        "failed-invalid-spec",
        deployment(
            status(
                "Failed",
                message="spec.parallelism.tp: 61 heads are not divisible by tp 16",
                conditions=[condition("Validated", "False", "InvalidSpec", "tp")],
            )
        ),
        "Degraded",
        "not divisible",
    ),
    ("failed-no-message", deployment(status("Failed")), "Degraded", "Failed"),
    (
        "ready-but-generation-behind",
        deployment(status("Ready", observed=GENERATION - 1, readyWorkers="2/2")),
        "Progressing",
        f"generation {GENERATION}",
    ),
    (
        "failed-but-generation-behind",
        deployment(status("Failed", observed=GENERATION - 1, message="bad")),
        "Progressing",
        f"generation {GENERATION}",
    ),
    (
        "ready-without-observed-generation",
        deployment(status("Ready", observed=None)),
        "Progressing",
        "observe generation",
    ),
]


@pytest.fixture(scope="module")
def lua_script() -> str:
    return LUA_FILE.read_text()


def run_lua(runtime: Any, script: str, obj: dict[str, Any]) -> dict[str, str]:
    """Run the health script the way Argo CD does: `obj` is a global table, the chunk returns
    the health table."""
    lua = runtime.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(yaml.safe_load(yaml.safe_dump(obj)), recursive=True)
    result = lua.execute(script)
    return dict(result.items())


@pytest.mark.parametrize(("case", "obj", "health", "needle"), CASES, ids=[c[0] for c in CASES])
def test_argocd_health(lua_script: str, case: str, obj: dict, health: str, needle: str) -> None:
    result = run_lua(lua51, lua_script, obj)
    assert result["status"] == health, result
    assert needle in result["message"], result


@pytest.mark.parametrize("runtime", [lua51, luajit21, lua54], ids=["lua51", "luajit", "lua54"])
def test_script_runs_on_every_lua(lua_script: str, runtime: Any) -> None:
    """Argo CD embeds gopher-lua (Lua 5.1); the script uses nothing newer or older."""
    for _, obj, health, _ in CASES:
        assert run_lua(runtime, lua_script, obj)["status"] == health


def test_every_phase_has_a_defined_health(lua_script: str) -> None:
    for phase in PHASES:
        result = run_lua(lua51, lua_script, deployment(status(phase)))
        assert result["status"] in ("Healthy", "Progressing", "Degraded"), (phase, result)
    odd = deployment({"phase": "SomethingNew", "observedGeneration": GENERATION})
    assert run_lua(lua51, lua_script, odd)["status"] == "Unknown"


def _argocd_configmap() -> dict[str, Any]:
    text = (GITOPS / "argocd.md").read_text()
    blocks = re.findall(r"^```yaml\n(.*?)^```", text, re.M | re.S)
    for doc in (d for block in blocks for d in yaml.safe_load_all(block)):
        if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
            return doc
    raise AssertionError("no argocd-cm ConfigMap snippet in docs/gitops/argocd.md")


def test_argocd_snippet_embeds_the_tested_script(lua_script: str) -> None:
    cm = _argocd_configmap()
    assert cm["metadata"]["name"] == "argocd-cm"
    assert cm["data"][HEALTH_KEY] == lua_script, (
        "docs/gitops/argocd.md's snippet differs from docs/gitops/argocd-health.lua"
    )


def _flux_exprs() -> dict[str, str]:
    text = (GITOPS / "flux.md").read_text()
    blocks = re.findall(r"^```yaml\n(.*?)^```", text, re.M | re.S)
    for doc in (d for block in blocks for d in yaml.safe_load_all(block)):
        if isinstance(doc, dict) and "healthCheckExprs" in doc:
            (entry,) = doc["healthCheckExprs"]
            assert entry["kind"] == "DeepSeekDeployment"
            return {k: entry[k] for k in ("inProgress", "failed", "current")}
    raise AssertionError("no healthCheckExprs snippet in docs/gitops/flux.md")


def flux_health(exprs: dict[str, str], obj: dict[str, Any]) -> str:
    """kustomize-controller's order: inProgress, then failed, then current; else InProgress.
    The object's top-level fields are the CEL variables (a missing status as an empty map)."""
    env = celpy.Environment()
    activation = {
        "metadata": celpy.json_to_cel(obj["metadata"]),
        "status": celpy.json_to_cel(yaml.safe_load(yaml.safe_dump(obj.get("status", {})))),
    }
    for key, result in (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current")):
        if env.program(env.compile(exprs[key])).evaluate(activation):
            return result
    return "InProgress"


@pytest.mark.parametrize(("case", "obj", "health", "needle"), CASES, ids=[c[0] for c in CASES])
def test_flux_cel_agrees_with_argocd(case: str, obj: dict, health: str, needle: str) -> None:
    assert flux_health(_flux_exprs(), obj) == FLUX_OF_ARGO[health]
