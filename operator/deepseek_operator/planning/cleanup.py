"""The removal of earlier plans' shard directories, once the group serving the current plan is
Ready: a cleanup Job (`rm -rf` of one directory on the store its sharding Job wrote to), then
that sharding Job.

Keyed by the directory and the sharding Job it cleans up after (its uid and generation): a
cleanup Job left from an earlier switch to the same plan proves nothing about a later Job's
output. And never beside a live writer: a sharding Job still running is stopped first (deleted
in the foreground, so it stays until its pod is gone) while its cleanup waits suspended.

A node-local store on several nodes has one sharding Job per node, so one cleanup Job per node,
pinned to it. A cleanup pinned to a node that left spec.sharding.store.hostPath.nodes and cannot
be scheduled (the node is gone) is deleted, with a Warning naming the directory left there.
"""

from __future__ import annotations

from . import names, objects
from .objects.placement import HOSTNAME_LABEL, store_nodes
from .observed import (
    Obj,
    annotation,
    job_failure_reason,
    job_state,
    meta,
    pods_of_job,
    terminating,
    uid,
    unschedulable,
)
from .shards import suspended
from .state import Delete, PassState
from .status import EventSpec


def remove_old_shards(state: PassState) -> None:
    ctx, observed = state.ctx, state.observed
    sharders: set[tuple[str, str | None]] = set()  # (fingerprint, node index) of each Job
    for old in observed.jobs_of(names.SHARDER):
        fp = annotation(old, names.FINGERPRINT_ANNOTATION) or ""
        sharders.add((fp, annotation(old, names.NODE_INDEX_ANNOTATION)))
        if fp != ctx.fingerprint and not terminating(old):
            _remove(state, old, fp)
    for cleanup in observed.jobs_of(names.CLEANUP):
        fp = annotation(cleanup, names.FINGERPRINT_ANNOTATION) or ""
        key = (fp, annotation(cleanup, names.NODE_INDEX_ANNOTATION))
        if fp == ctx.fingerprint or terminating(cleanup) or key in sharders:
            continue
        if not _stranded(state, cleanup, None, fp):
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
        _stranded(state, cleanup, old, fp)
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


def _stranded(state: PassState, cleanup: Obj, old: Obj | None, fp: str) -> bool:
    """A cleanup Job pinned to a node that is no longer one of the store's nodes and whose pod
    cannot be scheduled there (the node is gone): it would wait forever. It is deleted, with the
    old sharding Job it is for, and a Warning says which directory is left on which node."""
    template = ((cleanup.get("spec") or {}).get("template") or {}).get("spec") or {}
    node = (template.get("nodeSelector") or {}).get(HOSTNAME_LABEL)
    if node is None or annotation(cleanup, names.NODE_INDEX_ANNOTATION) is None:
        return False
    if node in (store_nodes(state.spec) or []):
        return False  # a node of the current plan: its own sharding reports it
    cleanup_name = str(meta(cleanup).get("name"))
    why = next(
        (w for p in pods_of_job(cleanup_name, state.observed.pods) if (w := unschedulable(p))),
        None,
    )
    if why is None:
        return False
    state.delete.append(Delete("Job", cleanup_name, uid(cleanup)))
    if old is not None:
        state.delete.append(Delete("Job", str(meta(old).get("name")), uid(old)))
    text = (
        f"node {node} left spec.sharding.store.hostPath.nodes and cleanup Job {cleanup_name} "
        f"cannot be scheduled there ({why}): gave up; {names.shard_dir(fp)} is left in the store "
        f"on {node}: delete it by hand if that node comes back"
    )
    state.events.append(EventSpec("Warning", "OldShardsLeft", text))
    return True


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
