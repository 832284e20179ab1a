"""The thin shell around the planner: Reconciler (coalescing, retries, the order of writes) with a
fake API, the command line, and the generated kopf peering CRDs."""

from __future__ import annotations

import asyncio
import copy
import threading
from typing import Any

import pytest

from deepseek_operator import peering
from deepseek_operator.__main__ import parse_args
from deepseek_operator.planning import Observed
from deepseek_operator.reconcile import Reconciler

BODY: dict[str, Any] = {
    "apiVersion": "llm.dsop.io/v1alpha1",
    "kind": "DeepSeekDeployment",
    "metadata": {"name": "r1", "namespace": "llm", "uid": "u1", "generation": 1},
    "spec": {
        "model": {"source": {"pvc": {"claimName": "models"}}},
        "sharding": {"store": {"pvc": {"claimName": "shards"}}},
    },
}


class FakeKube:
    """Records what the Reconciler writes; the custom resource lives in memory."""

    def __init__(self) -> None:
        self.body: dict[str, Any] | None = copy.deepcopy(BODY)
        self.calls: list[tuple[str, str]] = []
        self.fail_next = 0
        self.gate: threading.Event | None = None
        self.rv = 10

    def deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        if self.gate is not None:
            self.gate.wait(5)
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("apiserver unavailable")
        self.calls.append(("get", name))
        return copy.deepcopy(self.body)

    def observe(self, namespace: str, name: str, owner_uid: str) -> Observed:
        return Observed()

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("apply", f"{obj['kind']}/{obj['metadata']['name']}"))
        return obj

    def apply_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("status", status["phase"]))
        assert self.body is not None
        self.body["status"] = copy.deepcopy(status)
        self.rv += 1
        return {"metadata": {"resourceVersion": str(self.rv), "generation": 1}}

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.calls.append(("delete", f"{kind}/{name}"))

    def post_event(self, deployment: dict[str, Any], event: Any) -> None:
        self.calls.append(("event", event.reason))


def test_reconcile_applies_then_writes_status_then_posts_events() -> None:
    kube = FakeKube()
    reconciler = Reconciler(kube, workers=1)  # type: ignore[arg-type]
    result = reconciler.reconcile("llm", "r1")
    assert result is not None and result.phase == "Sharding"
    kinds = [what for op, what in kube.calls if op == "apply"]
    assert [k.split("/")[0] for k in kinds] == ["Service", "Service", "Job"]
    ops = [op for op, _ in kube.calls]
    assert ops.index("status") > max(i for i, op in enumerate(ops) if op == "apply")
    assert ops[-1] == "event"
    assert reconciler.is_own_write("llm", "r1", "11")
    # Again: same children applied (a no-op on the server), no status write, no Event.
    kube.calls.clear()
    reconciler.reconcile("llm", "r1")
    assert [op for op, _ in kube.calls if op in ("status", "event")] == []
    reconciler.close()


def test_gone_custom_resource_is_forgotten() -> None:
    kube = FakeKube()
    reconciler = Reconciler(kube, workers=1)  # type: ignore[arg-type]
    reconciler.reconcile("llm", "r1")
    kube.body = None
    assert reconciler.reconcile("llm", "r1") is None
    assert not reconciler.is_own_write("llm", "r1", "11")
    reconciler.close()


def test_triggers_coalesce_while_a_reconcile_runs() -> None:
    kube = FakeKube()
    kube.gate = threading.Event()
    reconciler = Reconciler(kube, workers=2)  # type: ignore[arg-type]

    async def scenario() -> None:
        first = asyncio.create_task(reconciler.trigger("llm", "r1"))
        await asyncio.sleep(0.05)
        for _ in range(5):  # all arrive while the first one is blocked
            await reconciler.trigger("llm", "r1")
        assert kube.gate is not None
        kube.gate.set()
        await first

    asyncio.run(scenario())
    assert [c for c in kube.calls if c[0] == "get"] == [("get", "r1"), ("get", "r1")]
    reconciler.close()


def test_a_failed_reconcile_is_retried() -> None:
    kube = FakeKube()
    kube.fail_next = 1
    reconciler = Reconciler(kube, workers=1)  # type: ignore[arg-type]

    async def scenario() -> None:
        await reconciler.trigger("llm", "r1")
        assert not any(op == "status" for op, _ in kube.calls)
        await asyncio.sleep(1.5)  # first backoff is one second

    asyncio.run(scenario())
    assert ("status", "Sharding") in kube.calls
    reconciler.close()


def test_failed_worker_pods_seen_in_events_are_remembered_once() -> None:
    kube = FakeKube()
    reconciler = Reconciler(kube, workers=1)  # type: ignore[arg-type]
    pod = {"metadata": {"uid": "p1", "name": "r1-worker-0"}, "status": {"phase": "Failed"}}
    reconciler.pod_event("llm", "r1", pod)
    assert list(reconciler.states[("llm", "r1")].failed_pods) == ["p1"]
    reconciler.counted["p2"] = None
    reconciler.pod_event("llm", "r1", {**pod, "metadata": {"uid": "p2"}})
    healthy = {"metadata": {"uid": "p3"}, "status": {"phase": "Running"}}
    reconciler.pod_event("llm", "r1", healthy)
    assert list(reconciler.states[("llm", "r1")].failed_pods) == ["p1"]
    reconciler.close()


# ----------------------------------------------------------------------- command line


def test_command_line_defaults_and_choices() -> None:
    args = parse_args([])
    assert not args.standalone and args.peering == "deepseek-operator"
    assert args.liveness == "http://0.0.0.0:8080/healthz" and args.metrics_port == 8081
    assert args.namespace == [] and args.priority is None
    args = parse_args(["--standalone", "-n", "llm", "-n", "llm-canary", "--metrics-port", "0"])
    assert args.standalone and args.namespace == ["llm", "llm-canary"] and args.metrics_port == 0
    with pytest.raises(SystemExit):
        parse_args(["--standalone", "--peering", "x"])


def test_peering_crds_are_generated_and_committed() -> None:
    assert peering.DEFAULT_OUTPUT.read_text() == peering.render()
    assert peering.main(["--check"]) == 0
    import yaml

    docs = list(yaml.safe_load_all(peering.render()))
    assert [d["metadata"]["name"] for d in docs] == [
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    ]
    assert [d["spec"]["scope"] for d in docs] == ["Cluster", "Namespaced"]
    assert peering.peering_object("dsop")["kind"] == "ClusterKopfPeering"
