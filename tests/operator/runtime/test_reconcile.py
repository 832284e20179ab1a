"""The thin shell around the planner: Reconciler (coalescing, retries, the order of writes) with a
fake API."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from deepseek_operator.planning import Observed, plan
from deepseek_operator.runtime import metrics
from deepseek_operator.runtime.reconcile import RECHECK_SECONDS, ChildApplyFailed, Reconciler

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

    # Node name -> its status.nodeInfo.bootID (a node left out cannot be read).
    boots: dict[str, str] = {}

    def boot_ids(self, nodes: list[str]) -> dict[str, str]:
        if nodes:
            self.calls.append(("nodes", ",".join(nodes)))
        return {n: self.boots[n] for n in nodes if n in self.boots}

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("apply", f"{obj['kind']}/{obj['metadata']['name']}"))
        return obj

    # "Kind/name" -> the message of the API server refusing that child (HTTP 4xx).
    refuse: dict[str, str] = {}

    # "Kind/name" -> the error the API server answers when that child is applied (not a 4xx).
    fail: dict[str, Exception] = {}

    def apply_or_refusal(self, obj: dict[str, Any]) -> str | None:
        key = f"{obj['kind']}/{obj['metadata']['name']}"
        if key in self.fail:
            self.calls.append(("failed", key))
            raise self.fail[key]
        if key in self.refuse:
            self.calls.append(("refused", key))
            return self.refuse[key]
        self.apply(obj)
        return None

    def apply_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("status", status["phase"]))
        assert self.body is not None
        self.body["status"] = copy.deepcopy(status)
        self.rv += 1
        return {"metadata": {"resourceVersion": str(self.rv), "generation": 1}}

    # "Kind/name" -> an object already there under that name (read before applying).
    existing: dict[str, dict[str, Any]] = {}

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.existing.get(f"{kind}/{name}"))

    def delete(
        self, kind: str, namespace: str, name: str, uid: str, propagation: str = "Background"
    ) -> None:
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


def test_a_failure_the_running_pass_counted_is_not_handed_to_the_next_pass() -> None:
    """The pod event of a failure can arrive while the pass that restarts the group for it runs;
    the next pass (the pod already deleted) must not count it again and spend the budget."""
    gate = threading.Event()
    seen: list[list[str]] = []

    class Recording(Reconciler):
        def reconcile(
            self, namespace: str, name: str, failed_pods: list[dict[str, Any]] | None = None
        ) -> None:
            seen.append([p["metadata"]["uid"] for p in failed_pods or []])
            if len(seen) == 1:
                gate.wait(5)
                self.counted["p1"] = None  # this pass restarted the group for p1

    reconciler = Recording(FakeKube(), workers=1, resync=0)  # type: ignore[arg-type]
    failed = {"metadata": {"uid": "p1", "name": "r1-worker-1"}, "status": {"phase": "Failed"}}

    async def scenario() -> None:
        first = asyncio.create_task(reconciler.trigger("llm", "r1"))
        await asyncio.sleep(0.05)
        reconciler.pod_event("llm", "r1", failed)  # seen before the pass counted it
        await reconciler.trigger("llm", "r1")
        gate.set()
        await first

    asyncio.run(scenario())
    assert seen == [[], []]
    reconciler.close()


def test_resync_reconciles_again_without_events_and_writes_nothing() -> None:
    kube = FakeKube()
    reconciler = Reconciler(kube, workers=1, resync=0.2)  # type: ignore[arg-type]
    before = metrics.RESYNCS._value.get()

    async def scenario() -> None:
        await reconciler.trigger("llm", "r1")
        await asyncio.sleep(0.75)  # a few periods (each up to 10 % early)
        assert kube.body is not None
        kube.body = None  # deleted: the next resync forgets it and no more follow
        await asyncio.sleep(0.5)

    asyncio.run(scenario())
    gets = [c for c in kube.calls if c[0] == "get"]
    assert 3 <= len(gets) <= 6, gets  # the first reconcile and at least two resyncs
    assert [c for c in kube.calls if c[0] == "status"] == [("status", "Sharding")]
    assert [c for c in kube.calls if c[0] == "event"] == [("event", "Sharding")]
    # Every get but the first came from a resync, the last one found the object gone.
    assert metrics.RESYNCS._value.get() - before == len(gets) - 1
    assert ("llm", "r1") not in reconciler.states
    reconciler.close()


def test_resync_zero_never_resyncs() -> None:
    kube = FakeKube()
    reconciler = Reconciler(kube, workers=1, resync=0)  # type: ignore[arg-type]

    async def scenario() -> None:
        await reconciler.trigger("llm", "r1")
        await asyncio.sleep(0.3)
        # Only the recheck of a Job whose pod has not come yet (FailedCreate is no watch event).
        timer = reconciler.states[("llm", "r1")].timer
        assert timer is not None
        due = timer.when() - asyncio.get_running_loop().time()
        assert RECHECK_SECONDS - 1 < due <= RECHECK_SECONDS
        kube.body = None  # deleted: forgotten, no timer left
        await reconciler.trigger("llm", "r1")
        assert ("llm", "r1") not in reconciler.states

    asyncio.run(scenario())
    assert [c for c in kube.calls if c[0] == "get"] == [("get", "r1"), ("get", "r1")]
    reconciler.close()


def test_resync_delay_is_the_period_up_to_a_tenth_early() -> None:
    reconciler = Reconciler(FakeKube(), workers=1, resync=300)  # type: ignore[arg-type]
    delays = [reconciler.resync_delay() for _ in range(200)]
    assert all(270 <= d <= 300 for d in delays) and max(delays) - min(delays) > 1
    reconciler.close()


def test_a_refused_child_is_reported_in_the_status_not_retried_in_silence() -> None:
    kube = FakeKube()
    job = next(o for o in plan(BODY, Observed()).apply if o["kind"] == "Job")["metadata"]["name"]
    why = f'Job.batch "{job}" is invalid: spec.template.spec.tolerations[0].operator'
    kube.refuse = {f"Job/{job}": why}
    reconciler = Reconciler(kube, workers=1)  # type: ignore[arg-type]
    result = reconciler.reconcile("llm", "r1")  # does not raise: nothing to retry faster
    assert result is not None and result.phase == "Failed"
    assert ("refused", f"Job/{job}") in kube.calls
    assert [k for op, k in kube.calls if op == "apply"] == ["Service/r1-ranks", "Service/r1"]
    assert kube.body is not None and kube.body["status"]["phase"] == "Failed"
    validated = next(c for c in kube.body["status"]["conditions"] if c["type"] == "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "ChildRejected")
    assert why in validated["message"]
    assert "ChildRejected" in [w for op, w in kube.calls if op == "event"]
    # Refused again at the resync: the same status, no new Event.
    kube.calls.clear()
    reconciler.reconcile("llm", "r1")
    assert not [c for c in kube.calls if c[0] in ("status", "event")]
    reconciler.close()


def server_error(message: str) -> ApiException:
    """A 500 as the API server sends it: a metav1.Status body with the message."""
    exc = ApiException(status=500, reason="Internal Server Error")
    exc.body = json.dumps({"kind": "Status", "status": "Failure", "message": message, "code": 500})
    return exc


def test_a_child_the_api_server_fails_to_store_is_reported_and_retried_with_backoff() -> None:
    """A 500 (server-side apply cannot merge a child built from the spec) is not a refusal the
    shell knew: it must still end in the status, naming the child and the API server's message,
    and the reconcile must be retried with a growing delay, not in silence."""
    kube = FakeKube()
    job = next(o for o in plan(BODY, Observed()).apply if o["kind"] == "Job")["metadata"]["name"]
    why = f"failed to create typed patch object (llm/{job}; batch/v1, Kind=Job): duplicate entries"
    kube.fail = {f"Job/{job}": server_error(why)}
    reconciler = Reconciler(kube, workers=1, resync=0)  # type: ignore[arg-type]
    with pytest.raises(ChildApplyFailed, match=job):
        reconciler.reconcile("llm", "r1")
    assert [k for op, k in kube.calls if op == "apply"] == ["Service/r1-ranks", "Service/r1"]
    assert kube.body is not None and kube.body["status"]["phase"] == "Failed"
    validated = next(c for c in kube.body["status"]["conditions"] if c["type"] == "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "ChildApplyFailed")
    assert f"Job {job}" in validated["message"] and why in validated["message"]
    assert "500" in validated["message"]
    assert "ChildApplyFailed" in [w for op, w in kube.calls if op == "event"]

    delays: list[float] = []
    real_schedule = reconciler._schedule

    def schedule(loop: Any, key: Any, state: Any, delay: float, resync: bool) -> None:
        delays.append(delay)
        real_schedule(loop, key, state, delay, resync)

    reconciler._schedule = schedule  # type: ignore[method-assign]

    async def scenario() -> None:
        for _ in range(3):
            await reconciler.trigger("llm", "r1")

    asyncio.run(scenario())
    assert len(delays) == 3 and delays[0] < delays[1] < delays[2], delays
    # The failure passes: the status says so at the next try.
    kube.fail = {}
    kube.calls.clear()
    result = reconciler.reconcile("llm", "r1")
    assert result is not None and result.phase == "Sharding"
    assert ("apply", f"Job/{job}") in kube.calls
    reconciler.close()


class StoreKube(FakeKube):
    """A deployment whose spec asks 2Gi of the store claim the operator created at 1Gi, on a
    storage class that does not allow expansion."""

    def __init__(self, refusal: str | None) -> None:
        super().__init__()
        assert self.body is not None
        self.body["spec"]["sharding"]["store"] = {
            "pvc": {"storageClassName": "fixed", "size": "2Gi"}
        }
        self.refusal = refusal

    def observe(self, namespace: str, name: str, owner_uid: str) -> Observed:
        claim = {
            "metadata": {"name": "r1-shards"},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "fixed",
                "resources": {"requests": {"storage": "1Gi"}},
            },
            "status": {"phase": "Bound", "capacity": {"storage": "1Gi"}},
        }
        return Observed(claims=[claim])

    def apply_or_refusal(self, obj: dict[str, Any]) -> str | None:
        if obj["kind"] != "PersistentVolumeClaim":
            return super().apply_or_refusal(obj)
        self.calls.append(("resize", obj["spec"]["resources"]["requests"]["storage"]))
        return self.refusal


def test_a_refused_store_resize_is_planned_around() -> None:
    refusal = 'persistentvolumeclaims "r1-shards" is forbidden: only dynamically provisioned pvc'
    kube = StoreKube(refusal)
    reconciler = Reconciler(kube, workers=1)  # type: ignore[arg-type]
    reconciler.reconcile("llm", "r1")
    ops = [op for op, _ in kube.calls]
    assert ops.index("resize") < ops.index("apply")  # the resize goes first
    assert ("resize", "2Gi") in kube.calls
    assert not [w for op, w in kube.calls if op == "apply" and "PersistentVolumeClaim" in w]
    assert kube.body is not None
    validated = next(c for c in kube.body["status"]["conditions"] if c["type"] == "Validated")
    assert validated["reason"] == "StoreSpecNotApplied" and refusal in validated["message"]
    events = [w for op, w in kube.calls if op == "event"]
    assert "StoreSpecNotApplied" in events and "ResizingStore" not in events
    reconciler.close()


def test_an_accepted_store_resize_is_an_event() -> None:
    kube = StoreKube(None)
    reconciler = Reconciler(kube, workers=1)  # type: ignore[arg-type]
    reconciler.reconcile("llm", "r1")
    assert ("resize", "2Gi") in kube.calls
    events = [w for op, w in kube.calls if op == "event"]
    assert "ResizingStore" in events and "StoreSpecNotApplied" not in events
    reconciler.close()


def test_a_users_object_under_a_childs_name_is_never_applied_over() -> None:
    """Issue 16.1: the user's own Service r1 is read first, left alone and reported."""
    kube = FakeKube()
    kube.existing = {
        "Service/r1": {
            "kind": "Service",
            "metadata": {
                "name": "r1",
                "uid": "user-svc",
                "managedFields": [{"manager": "kubectl"}],
            },
        }
    }
    reconciler = Reconciler(kube, workers=1)  # type: ignore[arg-type]
    result = reconciler.reconcile("llm", "r1")
    assert result is not None and result.phase == "Failed"
    applied = [k for op, k in kube.calls if op == "apply"]
    assert "Service/r1" not in applied and "Service/r1-ranks" in applied
    assert kube.body is not None
    validated = next(c for c in kube.body["status"]["conditions"] if c["type"] == "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "ForeignObject")
    assert "Service r1 already exists" in validated["message"]
    assert "ForeignObject" in [w for op, w in kube.calls if op == "event"]
    reconciler.close()


def test_a_node_local_store_has_its_nodes_bootids_read_and_is_looked_at_again_soon() -> None:
    """The planner gets the bootIDs of the store's nodes (node_reboot.py) and the deployment is
    reconciled again within NODE_CHECK_SECONDS, so a reboot is noticed without any event."""
    from deepseek_operator.runtime.reconcile import NODE_CHECK_SECONDS

    kube = FakeKube()
    kube.boots = {"npu-a": "boot-a"}
    reconciler = Reconciler(kube, workers=1)  # type: ignore[arg-type]
    result = reconciler.reconcile("llm", "r1")  # a claim: no Node is read
    assert result is not None and not result.node_check
    assert not [c for c in kube.calls if c[0] == "nodes"]
    assert kube.body is not None
    kube.body["spec"]["sharding"] = {
        "store": {"hostPath": {"path": "/dev/shm/dsd", "nodes": ["npu-a", "npu-b"]}}
    }
    kube.body["spec"]["parallelism"] = {"nodes": 2, "devicesPerNode": 4, "tp": 4}
    result = reconciler.reconcile("llm", "r1")
    assert result is not None and result.node_check
    assert ("nodes", "npu-a,npu-b") in kube.calls

    async def scenario() -> float:
        await reconciler.trigger("llm", "r1")
        timer = reconciler.states[("llm", "r1")].timer
        assert timer is not None
        return timer.when() - asyncio.get_running_loop().time()

    assert 0 < asyncio.run(scenario()) <= NODE_CHECK_SECONDS
    reconciler.close()
