"""The shards of the current plan: the store claim and the sharding Job (created, retried after a
spec change, failed, complete), the bytes they hold, and the removal of earlier plans' shards once
the group serving the current plan is Ready."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..api import DeepSeekDeploymentSpec
from ..api.status import SHARDED
from . import names, objects
from . import status as st
from .observed import (
    Obj,
    annotation,
    container_problem,
    job_failure_reason,
    job_state,
    meta,
    pods_of_job,
    terminating,
    termination,
    uid,
    unschedulable,
)
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
    waiting: bool = False  # for something outside (a claim to bind, a node to fit the pod)
    message: str = ""
    summary: dict[str, Any] | None = None


def plan_shards(state: PassState, store: StoreChange | None) -> Shards:
    ctx, spec = state.ctx, state.spec
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
    claim_pending = _store_claim(state, store)
    job_name = names.shard_job(ctx.name, ctx.fingerprint)
    job = state.observed.job(job_name)
    if job is not None and terminating(job):
        return Shards(
            Cond(SHARDED, "False", st.SHARDING_PENDING, f"waiting for Job {job_name} to go"),
            message=f"restarting sharding: waiting for the failed Job {job_name} to go",
        )
    if job is None:
        state.apply.append(objects.shard_job(ctx))
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
        return _complete_job(state, pods)
    return _running_job(state, job_name, pods, claim_pending)


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
    return Shards(
        Cond(SHARDED, "False", st.SHARDING_FAILED, text),
        failed=True,
        bad_input=bool(term and term.bad_input),
        message=detail if term and term.bad_input else text,
    )


def _complete_job(state: PassState, pods: list[Obj]) -> Shards:
    term = termination(pods, succeeded=True)
    summary = term.summary if term and term.summary else None
    text = f"shards of {plan_text(state.spec)} complete in {names.shard_dir(state.ctx.fingerprint)}"
    if summary and summary.get("bytes") is not None:
        text += f" ({summary.get('files')} files, {int(summary['bytes']) / 1e9:.2f} GB)"
    return Shards(Cond(SHARDED, "True", st.SHARDS_COMPLETE, text), complete=True, summary=summary)


def _running_job(state: PassState, job_name: str, pods: list[Obj], claim_pending: str) -> Shards:
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
    if not state.spec.sharding.enabled:
        return None
    job = names.shard_job(state.ctx.name, state.ctx.fingerprint)
    nodes = objects.store_nodes(state.spec)
    if nodes:
        job = ", ".join(
            names.shard_job(state.ctx.name, state.ctx.fingerprint, i) for i in range(len(nodes))
        )
    if shards.summary:
        keys = ("bytes", "files", "seconds", "throughputMBps", "dirBytes")
        return {**{k: shards.summary[k] for k in keys if k in shards.summary}, "job": job}
    old = state.previous.shards
    if shards.complete and old is not None and state.previous.fingerprint == state.ctx.fingerprint:
        return old.to_dict()
    return {"job": job}


def remove_old_shards(state: PassState) -> None:
    """Once the group serving the current plan is Ready, delete the shard directories of
    earlier plans (a cleanup Job on their store), then their sharding Jobs."""
    ctx, observed = state.ctx, state.observed
    current = names.shard_job(ctx.name, ctx.fingerprint)
    for old in observed.jobs_of(names.SHARDER):
        name = str(meta(old).get("name"))
        if name == current or terminating(old):
            continue
        old_fp = annotation(old, names.FINGERPRINT_ANNOTATION) or ""
        cleanup_name = names.cleanup_job(
            ctx.name, old_fp, annotation(old, names.NODE_INDEX_ANNOTATION)
        )
        cleanup = observed.job(cleanup_name)
        if cleanup is None:
            job = objects.cleanup_job(ctx, old)
            if job is None:
                state.delete.append(Delete("Job", name, uid(old)))
                continue
            state.apply.append(job)
            state.events.append(
                EventSpec(
                    "Normal",
                    "RemovingOldShards",
                    f"deleting the shards of the previous plan ({names.shard_dir(old_fp)}) "
                    f"with Job {cleanup_name}",
                )
            )
            continue
        cleanup_state = job_state(cleanup)
        if cleanup_state == "active":
            continue
        state.delete.append(Delete("Job", name, uid(old)))
        if cleanup_state == "complete":
            state.events.append(
                EventSpec(
                    "Normal",
                    "OldShardsRemoved",
                    f"removed {names.shard_dir(old_fp)} and sharding Job {name}",
                )
            )
        else:
            state.events.append(
                EventSpec(
                    "Warning",
                    "OldShardsLeft",
                    f"cleanup Job {cleanup_name} failed ({job_failure_reason(cleanup)}); "
                    f"{names.shard_dir(old_fp)} is left in the store: delete it by hand",
                )
            )
