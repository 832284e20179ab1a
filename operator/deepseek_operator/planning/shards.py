"""The shards of the current plan: the store claim and the sharding Job (created, retried after a
spec change, replaced while it has not completed, failed, complete), the completion recorded in
the status, and the bytes they hold. One Job's life (plan_shard_job) is the same for the single
Job and for each node's Job of a node-local store (node_shards.py). Earlier plans' shards are
removed by cleanup.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..api import DeepSeekDeploymentSpec
from ..api.status import SHARDED
from . import names, objects
from . import status as st
from .observed import (
    Obj,
    Termination,
    annotation,
    container_problem,
    creation_failure,
    job_failure_reason,
    job_state,
    meta,
    pods_of_job,
    terminating,
    termination,
    uid,
    unschedulable,
)
from .sharder_failure import sharder_failure
from .state import Delete, PassState
from .status import Cond, EventSpec
from .store import StoreChange


@dataclass
class Shards:
    """Where the shards of the current plan stand, for the Sharded condition and the phase."""

    cond: Cond
    complete: bool = False
    failed: bool = False
    bad_input: bool = False
    validated_reason: str = st.CONFIG_MISMATCH  # Validated's reason when bad_input
    waiting: bool = False  # for something outside (a claim to bind, a node to fit the pod)
    message: str = ""
    summary: dict[str, Any] | None = None
    job_uid: str | None = None  # of the Job that wrote the complete shards
    # Node-local shards on several nodes: each node's entry of status.shards.nodes.
    nodes: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Recorded:
    """A sharding Job's completion as the status recorded it (the Job may be gone since)."""

    job_uid: str | None
    summary: dict[str, Any] | None = None
    boot_id: str | None = None  # of the node, for a node's Job (node_reboot.py)


def plan_shards(state: PassState, store: StoreChange | None) -> Shards:
    spec = state.spec
    if not spec.sharding.enabled:
        return Shards(
            Cond(
                SHARDED,
                "True",
                st.SHARDING_DISABLED,
                "offline sharding is off: the workers load and split the checkpoint",
            ),
            complete=True,
        )
    return plan_shard_job(state, None, _store_claim(state, store))


def plan_shard_job(state: PassState, node: int | None, claim_pending: str = "") -> Shards:
    """One sharding Job of the current plan (`node`: the Job of that node of a node-local store):
    created, replaced, retried, or taken as complete (from the Job, else from the status)."""
    ctx, spec = state.ctx, state.spec
    job_name = names.shard_job(ctx.name, ctx.fingerprint, node)
    job = state.observed.job(job_name)
    record = recorded(state, node)
    blocked = _cleanup_of_this_plan(state, job, node, record)
    if blocked:
        return blocked
    if job is not None and terminating(job):
        return Shards(
            Cond(SHARDED, "False", st.SHARDING_PENDING, f"waiting for Job {job_name} to go"),
            message=f"restarting sharding: waiting for the old Job {job_name} to go",
        )
    if job is None:
        if record is not None:
            return _complete(state, None, record=record, gone=True)
        state.apply.append(objects.shard_job(ctx, node))
        state.recheck = True  # its pod may not come (see _running_job)
        text = claim_pending or f"sharding Job {job_name} created for {plan_text(spec)}"
        return Shards(
            Cond(
                SHARDED,
                "False",
                st.STORE_NOT_BOUND if claim_pending else st.SHARDING_PENDING,
                text,
            ),
            waiting=bool(claim_pending),
            message=text,
        )
    pods = pods_of_job(job_name, state.observed.pods)
    job_status = job_state(job)
    if job_status == "failed":
        return _failed_job(state, job_name, job, pods)
    if job_status == "complete":
        return _complete(state, job, termination(pods, succeeded=True), record)
    replaced = _replace_changed_job(state, job_name, job, node)
    if replaced:
        return replaced
    return _running_job(state, job_name, pods, claim_pending)


def recorded(state: PassState, node: int | None) -> Recorded | None:
    """The completion of this plan's sharding Job (of node `node`) as the status records it: the
    Job may have been deleted since (by hand, by a TTL controller). None when not recorded, or
    when the node rebooted since (its shards are gone: state.resharding)."""
    old = state.previous.shards
    if old is None or old.fingerprint != state.ctx.fingerprint or node in state.resharding:
        return None
    if node is None:
        return Recorded(old.job_uid) if old.complete else None
    nodes = objects.store_nodes(state.spec) or []
    for entry in old.nodes or ():
        if entry.index == node and entry.node == nodes[node] and entry.complete:
            summary = entry.to_dict()
            keys = ("bytes", "files", "seconds", "dirBytes")
            numbers = {k: summary[k] for k in keys if k in summary} or None
            return Recorded(entry.job_uid, numbers, entry.boot_id)
    return None


def _where(state: PassState, node: int | None) -> str:
    """The directory of this plan's shards (on its node, for a node's Job)."""
    directory = names.shard_dir(state.ctx.fingerprint)
    nodes = objects.store_nodes(state.spec)
    return directory if node is None or not nodes else f"{directory} on node {nodes[node]}"


def _cleanup_of_this_plan(
    state: PassState, job: Obj | None, node: int | None, record: Recorded | None
) -> Shards | None:
    """A cleanup Job of this plan's directory (left from a plan switched away from and back): the
    shards are not written beside it, nor taken as complete once it ran on them."""
    ctx = state.ctx
    index = None if node is None else str(node)
    cleanup = state.observed.job(names.cleanup_job(ctx.name, ctx.fingerprint, index))
    if cleanup is None or terminating(cleanup):
        return None
    directory = _where(state, node)
    cleanup_name = str(meta(cleanup).get("name"))
    if suspended(cleanup):  # never ran: the directory is as its sharder left it
        state.delete.append(Delete("Job", cleanup_name, uid(cleanup)))
        text = f"the plan is current again: cancelling cleanup Job {cleanup_name} of {directory}"
        return Shards(Cond(SHARDED, "False", st.SHARDING_PENDING, text), message=text)
    if job_state(cleanup) == "active":
        text = (
            f"waiting for cleanup Job {cleanup_name} to finish removing {directory} before it is "
            "written again"
        )
        return Shards(Cond(SHARDED, "False", st.SHARDING_PENDING, text), message=text)
    cleaned = annotation(cleanup, names.CLEANS_UID_ANNOTATION)
    current = uid(job) if job is not None else (record.job_uid if record else None)
    if current is None or cleaned != current:
        # History: it removed the output of an earlier Job of this plan (or of none the status
        # knows), not these shards.
        state.delete.append(Delete("Job", cleanup_name, uid(cleanup)))
        return None
    # It removed (part of) these very shards: write them again once it is gone.
    state.delete.append(Delete("Job", cleanup_name, uid(cleanup)))
    if job is not None and not terminating(job):
        state.delete.append(Delete("Job", str(meta(job).get("name")), uid(job)))
    state.events.append(
        EventSpec(
            "Normal",
            "RetryingSharding",
            f"cleanup Job {cleanup_name} removed {directory}: sharding it again",
        )
    )
    text = f"re-sharding: cleanup Job {cleanup_name} removed {directory}"
    return Shards(Cond(SHARDED, "False", st.SHARDING_PENDING, text), message=text)


def _replace_changed_job(
    state: PassState, job_name: str, job: Obj, node: int | None
) -> Shards | None:
    """A sharding Job that has not completed, built from a pod template the spec no longer asks
    for (placement, resources, image: a pod that may never be scheduled), is replaced: deleted in
    the foreground, so the new one starts only once its pod is gone. A Job of an earlier operator
    version (no digest) is left to finish."""
    have = annotation(job, names.TEMPLATE_ANNOTATION)
    want = objects.template_digest(objects.shard_job(state.ctx, node)["spec"]["template"])
    if have is None or have == want:
        return None
    state.delete.append(Delete("Job", job_name, uid(job), propagation="Foreground"))
    text = f"the spec changed the sharding pod: replacing Job {job_name}, which has not completed"
    state.events.append(EventSpec("Normal", "ReplacingShardingJob", text))
    return Shards(Cond(SHARDED, "False", st.SHARDING_PENDING, text), message=text)


def suspended(job: Obj) -> bool:
    return bool((job.get("spec") or {}).get("suspend"))


def _store_claim(state: PassState, store: StoreChange | None) -> str:
    """Applies the store claim the operator creates (when it is not there yet); what sharding
    waits for while the claim is not bound ("" when it is, or there is none)."""
    claim = objects.store_claim(state.ctx)
    if claim is None:
        return ""
    observed_claim = state.observed.claim(claim["metadata"]["name"])
    if observed_claim is None:
        state.apply.append(claim)
    phase = ((observed_claim or {}).get("status") or {}).get("phase")
    if phase == "Bound":
        return ""
    storage_class = ((observed_claim or claim).get("spec") or {}).get("storageClassName")
    pending = (
        f"waiting for PersistentVolumeClaim {claim['metadata']['name']} (storage "
        f"class {storage_class}) to be bound"
    )
    if store is not None and store.waiting:
        pending += f"; {store.waiting}"
    return pending


def _failed_job(state: PassState, job_name: str, job: Obj, pods: list[Obj]) -> Shards:
    if annotation(job, names.GENERATION_ANNOTATION) != str(state.ctx.generation):
        # The spec changed since this Job failed: run it again.
        state.delete.append(Delete("Job", job_name, uid(job)))
        state.events.append(
            EventSpec("Normal", "RetryingSharding", f"spec changed: re-running {job_name}")
        )
        text = f"re-running the sharding Job {job_name} after the spec changed"
        return Shards(Cond(SHARDED, "False", st.SHARDING_PENDING, text), message=text)
    term = termination(pods, succeeded=False)
    detail = (term.error if term and term.error else None) or job_failure_reason(job)
    text = f"sharding Job {job_name} failed: {detail}"
    if term is not None and (term.bad_input or term.reason == st.OUTPUT_BUSY):
        why = sharder_failure(term.reason, detail, job_name, state.spec)
        return Shards(
            Cond(
                SHARDED, "False", why.sharded_reason, text if why.validated_reason else why.message
            ),
            failed=True,
            bad_input=why.validated_reason is not None,
            validated_reason=why.validated_reason or st.CONFIG_MISMATCH,
            message=why.message,
        )
    return Shards(Cond(SHARDED, "False", st.SHARDING_FAILED, text), failed=True, message=text)


def _complete(
    state: PassState,
    job: Obj | None,
    term: Termination | None = None,
    record: Recorded | None = None,
    gone: bool = False,
) -> Shards:
    summary = term.summary if term and term.summary else (record.summary if record else None)
    directory = names.shard_dir(state.ctx.fingerprint)
    text = f"shards of {plan_text(state.spec)} complete in {directory} (sealed by its _COMPLETE)"
    if summary and summary.get("bytes") is not None:
        text += f" ({summary.get('files')} files, {int(summary['bytes']) / 1e9:.2f} GB)"
    if gone:
        text += "; the sharding Job is gone, its completion is recorded in the status"
    return Shards(
        Cond(SHARDED, "True", st.SHARDS_COMPLETE, text),
        complete=True,
        summary=summary,
        job_uid=uid(job) if job is not None else (record.job_uid if record else None),
    )


def _running_job(state: PassState, job_name: str, pods: list[Obj], claim_pending: str) -> Shards:
    refused = creation_failure(state.observed, "Job", job_name) if not pods else None
    if not pods:
        state.recheck = True  # no watch event comes when a pod cannot be created
    if refused and not claim_pending:
        text = f"sharding Job {job_name} cannot create its pod: {refused}"
        return Shards(
            Cond(SHARDED, "False", st.POD_CREATION_FAILED, text), waiting=True, message=text
        )
    problem = next((found for p in pods if (found := container_problem(p))), None)
    if problem and not claim_pending:
        kind, detail = problem
        reason = st.IMAGE_PULL_FAILED if kind == "image" else st.CONTAINER_CONFIG_ERROR
        text = f"sharding Job {job_name} cannot start: {detail}"
        return Shards(Cond(SHARDED, "False", reason, text), waiting=True, message=text)
    waiting = claim_pending or next(
        (
            f"sharding pod {meta(p).get('name')} cannot be scheduled: {why}"
            for p in pods
            if (why := unschedulable(p))
        ),
        "",
    )
    if waiting:
        return Shards(
            Cond(
                SHARDED,
                "False",
                st.STORE_NOT_BOUND if claim_pending else st.SHARDING_PENDING,
                waiting,
            ),
            waiting=True,
            message=waiting,
        )
    text = (
        f"sharding Job {job_name} is writing {plan_text(state.spec)} to "
        f"{names.shard_dir(state.ctx.fingerprint)}"
    )
    return Shards(Cond(SHARDED, "False", st.SHARDING_IN_PROGRESS, text), message=text)


def plan_text(spec: DeepSeekDeploymentSpec) -> str:
    p = spec.parallelism.to_plan()
    return (
        f"world {p.world_size} (dp {p.dp} x tp {p.tp}, moeTp {p.moe_tp} x moeEp {p.moe_ep}"
        + (", MTP" if spec.model.mtp else "")
        + ")"
    )


def shard_bytes(state: PassState, shards: Shards) -> int | None:
    """The bytes of the current shards: from the sharder's termination message, else as
    recorded in the status for the same fingerprint. The sharder's pod may be garbage-collected
    long after the Job completed; a fact that went missing must not change the worker template
    (that would restart a serving group)."""
    if shards.summary and shards.summary.get("bytes") is not None:
        return int(shards.summary["bytes"])
    old = state.previous.shards
    if (
        old is not None
        and old.bytes is not None
        and (state.previous.fingerprint == state.ctx.fingerprint)
    ):
        return old.bytes
    return None


def dir_bytes(state: PassState, shards: Shards) -> dict[str, int] | None:
    """The bytes per directory group of the current shards (sharder's summary, else the status
    for the same fingerprint), as shard_bytes; None from a sharder that did not report them."""
    if shards.summary and shards.summary.get("dirBytes"):
        return {k: int(v) for k, v in shards.summary["dirBytes"].items()}
    old = state.previous.shards
    if old is not None and old.dir_bytes and state.previous.fingerprint == state.ctx.fingerprint:
        return dict(old.dir_bytes)
    return None


def shards_status(state: PassState, shards: Shards) -> dict[str, Any] | None:
    """The status of this plan's shards; once complete, it says so for good (with the uid of the
    Job that wrote them), even after that Job is deleted."""
    if not state.spec.sharding.enabled:
        return None
    fp = state.ctx.fingerprint
    job = names.shard_job(state.ctx.name, fp)
    nodes = objects.store_nodes(state.spec)
    if nodes:
        job = ", ".join(names.shard_job(state.ctx.name, fp, i) for i in range(len(nodes)))
    old = state.previous.shards
    same = old is not None and old.fingerprint in (fp, None) and state.previous.fingerprint == fp
    out: dict[str, Any] = {"job": job, "fingerprint": fp}
    if shards.nodes is not None:
        out["nodes"] = shards.nodes
    if not shards.complete:
        return out
    if shards.summary:
        keys = ("bytes", "files", "seconds", "throughputMBps", "dirBytes", "modelConfig")
        keys += ("quantization",)
        out.update({k: shards.summary[k] for k in keys if k in shards.summary})
    elif same and old is not None:
        out = {**old.to_dict(), **out}
    out["complete"] = True
    job_uid = shards.job_uid or (old.job_uid if same and old is not None else None)
    if job_uid:
        out["jobUid"] = job_uid
    return out
