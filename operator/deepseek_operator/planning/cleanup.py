"""The removal of earlier plans' shard directories, once the group serving the current plan is
Ready: a cleanup Job (`rm -rf` of one directory on the store its sharding Job wrote to), then
that sharding Job.

Keyed by the directory and the sharding Job it cleans up after (its uid and generation): a
cleanup Job left from an earlier switch to the same plan proves nothing about a later Job's
output. And never beside a live writer: a sharding Job still running is stopped first (deleted
in the foreground, so it stays until its pod is gone) while its cleanup waits suspended.
"""

from __future__ import annotations

from . import names, objects
from .observed import Obj, annotation, job_failure_reason, job_state, meta, terminating, uid
from .shards import suspended
from .state import Delete, PassState
from .status import EventSpec


def remove_old_shards(state: PassState) -> None:
    ctx, observed = state.ctx, state.observed
    sharders: dict[str, list[Obj]] = {}
    for job in observed.jobs_of(names.SHARDER):
        fp = annotation(job, names.FINGERPRINT_ANNOTATION) or ""
        sharders.setdefault(fp, []).append(job)
    for fp, jobs in sharders.items():
        if fp == ctx.fingerprint:
            continue
        for old in jobs:
            if not terminating(old):
                _remove(state, old, fp)
    for cleanup in observed.jobs_of(names.CLEANUP):
        fp = annotation(cleanup, names.FINGERPRINT_ANNOTATION) or ""
        if fp != ctx.fingerprint and not terminating(cleanup) and fp not in sharders:
            _resume(state, cleanup, fp)


def _remove(state: PassState, old: Obj, fp: str) -> None:
    """One old sharding Job: stop it if it still writes, remove its directory, then delete it."""
    name = str(meta(old).get("name"))
    node = annotation(old, names.NODE_INDEX_ANNOTATION)
    cleanup_name = names.cleanup_job(state.ctx.name, fp, node)
    cleanup = state.observed.job(cleanup_name)
    directory = names.shard_dir(fp)
    if cleanup is not None and annotation(cleanup, names.CLEANS_UID_ANNOTATION) != uid(old):
        # Left from an earlier Job of that plan: no proof about this one's directory.
        if job_state(cleanup) != "active" or suspended(cleanup):
            state.delete.append(Delete("Job", cleanup_name, uid(cleanup)))
        return
    running = job_state(old) == "active"
    if cleanup is None:
        job = objects.cleanup_job(state.ctx, old, suspend=running)
        if job is None:  # no store to clean (an old Job of another shape): just the Job
            state.delete.append(Delete("Job", name, uid(old)))
            return
        state.apply.append(job)
        if running:
            state.delete.append(Delete("Job", name, uid(old), propagation="Foreground"))
            text = (
                f"stopping sharding Job {name}, which still writes {directory} for a plan no "
                f"longer wanted; Job {cleanup_name} deletes that directory once it has stopped"
            )
            state.events.append(EventSpec("Normal", "StoppingOldSharding", text))
        else:
            text = f"deleting the shards of the previous plan ({directory}) with Job {cleanup_name}"
            state.events.append(EventSpec("Normal", "RemovingOldShards", text))
        return
    if suspended(cleanup):
        if running:  # its stop was not carried out: again
            state.delete.append(Delete("Job", name, uid(old), propagation="Foreground"))
        else:
            _resume(state, cleanup, fp)
        return
    cleanup_state = job_state(cleanup)
    if cleanup_state == "active":
        return
    state.delete.append(Delete("Job", name, uid(old)))
    if cleanup_state == "complete":
        text = f"removed {directory} and sharding Job {name}"
        state.events.append(EventSpec("Normal", "OldShardsRemoved", text))
    else:
        text = (
            f"cleanup Job {cleanup_name} failed ({job_failure_reason(cleanup)}); {directory} is "
            "left in the store: delete it by hand"
        )
        state.events.append(EventSpec("Warning", "OldShardsLeft", text))


def _resume(state: PassState, cleanup: Obj, fp: str) -> None:
    """A cleanup Job created suspended: its sharding Job is gone (with its pod), so it may run."""
    if not suspended(cleanup):
        return
    job = objects.cleanup_job(state.ctx, cleanup, suspend=False)
    if job is None:
        return
    state.apply.append(job)
    text = (
        f"the old sharding Job has stopped: Job {meta(cleanup).get('name')} deletes "
        f"{names.shard_dir(fp)}"
    )
    state.events.append(EventSpec("Normal", "RemovingOldShards", text))
