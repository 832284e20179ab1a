"""Node-local shards live in each node's tmpfs, which a reboot empties. Each node's completion
records the node's boot identity (status.nodeInfo.bootID, read by the shell into
Observed.boot_ids) when its Job is seen complete; a node seen later with another bootID has lost
its shards: its completion is cleared, its completed Job replaced by a new one, and its worker
pod held (deleted if it runs, kept gated once recreated) until that Job completes. A node whose
bootID is unknown (none recorded, the Node not readable) is taken as recorded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..api.status import SHARDED
from . import names
from . import status as st
from .objects.placement import NODE_PIN_GATE, store_nodes
from .observed import Obj, job_state, meta, pod_ready, terminating, uid
from .shards import Shards
from .state import Delete, PassState
from .status import Cond, EventSpec
from .workers import Workers


def store_node_names(body: Mapping[str, Any]) -> list[str]:
    """spec.sharding.store.hostPath.nodes of the raw custom resource: the Nodes whose bootID the
    shell reads for the planner (none for any other store)."""
    sharding = (body.get("spec") or {}).get("sharding") or {}
    host_path = (sharding.get("store") or {}).get("hostPath") or {}
    nodes = host_path.get("nodes") or []
    return [n for n in nodes if isinstance(n, str)] if isinstance(nodes, list) else []


def plan_reboots(state: PassState) -> None:
    """Fill state.resharding: the nodes whose shards are being written again after a reboot (as
    the last status says), and those seen rebooted since their completion was recorded (a
    Warning Event each)."""
    ctx = state.ctx
    nodes = store_nodes(state.spec) or []
    old = state.previous.shards
    if not nodes or old is None or old.fingerprint != ctx.fingerprint:
        return
    for entry in old.nodes or ():
        if entry.index >= len(nodes) or entry.node != nodes[entry.index]:
            continue
        if not entry.complete:
            if entry.lost_job_uid is not None:  # still being written again: not restarted
                state.resharding[entry.index] = entry.lost_job_uid
            continue
        now = state.observed.boot_ids.get(entry.node) or ""
        if not entry.boot_id or not now or now == entry.boot_id:
            continue
        job_name = names.shard_job(ctx.name, ctx.fingerprint, entry.index)
        job = state.observed.job(job_name)
        lost = uid(job) if job is not None and not terminating(job) else ""
        state.resharding[entry.index] = lost
        text = (
            f"node {entry.node} rebooted (bootID {entry.boot_id} -> {now}): its shards in "
            f"{names.shard_dir(ctx.fingerprint)} (tmpfs) are gone; Job {job_name} writes them "
            "again, and the worker pod on that node waits for it"
        )
        state.events.append(EventSpec("Warning", st.NODE_REBOOTED, text))


def replace_lost_job(state: PassState, index: int, node: str) -> Shards | None:
    """The completed Job whose shards a reboot wiped: deleted (it would count as complete), and
    the node's shards pending until it is gone; None once it is (plan_shard_job runs the new
    one)."""
    lost = state.resharding.get(index)
    if not lost:
        return None
    job_name = names.shard_job(state.ctx.name, state.ctx.fingerprint, index)
    job = state.observed.job(job_name)
    if job is None or uid(job) != lost:
        return None
    if not terminating(job):
        state.delete.append(Delete("Job", job_name, lost))
    text = f"node {node} rebooted: replacing Job {job_name}, whose shards the reboot wiped"
    return Shards(Cond(SHARDED, "False", st.NODE_REBOOTED, text), message=text)


def rebooted_shards(state: PassState, index: int, node: str, shards: Shards) -> Shards:
    """A rebooted node's Job on its way (pending, writing): Sharded says why it runs again. Once
    it completed, the node is no longer held (its worker pod may start this pass)."""
    if index in state.resharding and shards.complete:
        del state.resharding[index]
    if index not in state.resharding or shards.complete or shards.failed:
        return shards
    if shards.cond.reason not in (st.SHARDING_PENDING, st.SHARDING_IN_PROGRESS, st.NODE_REBOOTED):
        return shards  # a more telling reason (cannot start, unschedulable, ...)
    text = shards.message
    if not text.startswith(f"node {node} rebooted"):
        text = f"node {node} rebooted, its shards are written again: {text}"
    shards.message = text
    shards.cond = Cond(SHARDED, "False", st.NODE_REBOOTED, text)
    return shards


def boot_of_completion(state: PassState, index: int, node: str, job_uid: str | None) -> str:
    """The bootID to record with a node's completion: the node's current one while the Job that
    wrote the shards is seen complete, "" when the Job is gone or the Node was not read."""
    job = state.observed.job(names.shard_job(state.ctx.name, state.ctx.fingerprint, index))
    if job is None or job_state(job) != "complete" or (job_uid and uid(job) != job_uid):
        return ""
    return state.observed.boot_ids.get(node) or ""


def hold_workers(state: PassState, sts: Obj | None) -> Workers | None:
    """While a rebooted node's shards are written again, its worker pod must not start (it would
    find no shards): a pod running there is deleted, its replacement stays gated (pinning.py);
    the group waits, and failures of its other pods are not counted meanwhile."""
    nodes = store_nodes(state.spec) or []
    held = sorted(i for i in state.resharding if i < len(nodes))
    if sts is None or not held:
        return None
    pods = [p for p in state.observed.component_pods(names.WORKER) if not terminating(p)]
    for pod in pods:
        if _ordinal(pod) in held and NODE_PIN_GATE not in _gates(pod):
            state.delete_pods([pod])
    replicas = int((sts.get("spec") or {}).get("replicas") or 0)
    which = ", ".join(nodes[i] for i in held)
    text = (
        f"waiting for the shards of node {which}, written again after a reboot; the worker pod "
        "there is held until they are complete"
    )
    ready = sum(1 for p in pods if _ordinal(p) not in held and pod_ready(p))
    return Workers.not_ready(
        st.WAITING_FOR_SHARDS, text, ready=ready, replicas=replicas, stage="waiting"
    )


def _ordinal(pod: Obj) -> int | None:
    tail = str(meta(pod).get("name") or "").rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _gates(pod: Obj) -> list[str]:
    return [str(g.get("name")) for g in (pod.get("spec") or {}).get("schedulingGates") or ()]
