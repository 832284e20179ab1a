"""Node-local shards on several nodes (spec.sharding.store.hostPath.nodes): one sharding Job per
node, pinned to it, each writing the ranks of the worker pod that runs there plus the files every
rank reads. The shards are complete when every node's Job is; one failed Job fails them all."""

from __future__ import annotations

from typing import Any

from ..api.status import SHARDED
from . import names, objects
from . import status as st
from .objects.placement import store_nodes
from .observed import job_state, pods_of_job, terminating
from .shards import Shards, _complete_job, _failed_job, _running_job, plan_text
from .state import PassState
from .status import Cond


def node_job_names(state: PassState) -> list[str]:
    nodes = store_nodes(state.spec) or []
    return [names.shard_job(state.ctx.name, state.ctx.fingerprint, i) for i in range(len(nodes))]


def plan_node_shards(state: PassState) -> Shards:
    ctx, spec = state.ctx, state.spec
    nodes = store_nodes(spec) or []
    done: list[Shards] = []
    pending: list[Shards] = []
    for i, node in enumerate(nodes):
        job_name = names.shard_job(ctx.name, ctx.fingerprint, i)
        job = state.observed.job(job_name)
        if job is not None and terminating(job):
            text = f"restarting sharding on {node}: waiting for the failed Job {job_name} to go"
            pending.append(Shards(Cond(SHARDED, "False", st.SHARDING_PENDING, text), message=text))
            continue
        if job is None:
            state.apply.append(objects.shard_job(ctx, i))
            text = f"sharding Jobs created for {plan_text(spec)} on {', '.join(nodes)}"
            pending.append(Shards(Cond(SHARDED, "False", st.SHARDING_PENDING, text), message=text))
            continue
        pods = pods_of_job(job_name, state.observed.pods)
        job_status = job_state(job)
        if job_status == "failed":
            failed = _failed_job(state, job_name, job, pods)
            if failed.failed:
                failed.message = f"node {node}: {failed.message}"
                return failed
            pending.append(failed)
        elif job_status == "complete":
            done.append(_complete_job(state, pods))
        else:
            pending.append(_running_job(state, job_name, pods, ""))
    if pending:
        first = pending[0]
        first.message = f"{len(done)}/{len(nodes)} nodes sharded; {first.message}"
        first.cond = Cond(SHARDED, "False", first.cond.reason, first.message)
        first.summary = None
        first.complete = False
        return first
    summary = _combined([s.summary for s in done])
    text = (
        f"node-local shards of {plan_text(spec)} complete in {names.shard_dir(ctx.fingerprint)} "
        f"on {', '.join(nodes)}"
    )
    return Shards(Cond(SHARDED, "True", st.SHARDS_COMPLETE, text), complete=True, summary=summary)


def _combined(summaries: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One summary of the nodes' Jobs: bytes and files added up, the longest time, and per
    directory group the largest directory any node wrote. None unless every Job reported."""
    if not summaries or any(s is None or s.get("bytes") is None for s in summaries):
        return None
    out: dict[str, Any] = {
        "bytes": sum(int(s["bytes"]) for s in summaries if s),
        "files": sum(int(s.get("files") or 0) for s in summaries if s),
        "seconds": max(float(s.get("seconds") or 0) for s in summaries if s),
    }
    groups: dict[str, int] = {}
    for s in summaries:
        for k, v in ((s or {}).get("dirBytes") or {}).items():
            groups[k] = max(groups.get(k, 0), int(v))
    if groups and all((s or {}).get("dirBytes") for s in summaries):
        out["dirBytes"] = groups
    return out
