"""Node-local shards on several nodes (spec.sharding.store.hostPath.nodes): one sharding Job per
node, pinned to it, each writing the ranks of the worker pod that runs there plus the files every
rank reads. Each Job lives as the single Job does (shards.plan_shard_job: recorded completion,
replacement, cleanup of the same directory); the shards are complete when every node's Job is,
and one failed Job fails them all. A node that rebooted since its Job completed has lost its
tmpfs shards and is sharded again (node_reboot.py)."""

from __future__ import annotations

from typing import Any

from ..api.status import SHARDED
from . import names
from . import status as st
from .node_reboot import boot_of_completion, plan_reboots, rebooted_shards, replace_lost_job
from .objects.placement import store_nodes
from .shards import Shards, plan_shard_job, plan_text, recorded
from .state import PassState
from .status import Cond

SUMMARY_KEYS = ("bytes", "files", "seconds", "dirBytes")


def node_job_names(state: PassState) -> list[str]:
    nodes = store_nodes(state.spec) or []
    return [names.shard_job(state.ctx.name, state.ctx.fingerprint, i) for i in range(len(nodes))]


def plan_node_shards(state: PassState) -> Shards:
    ctx, spec = state.ctx, state.spec
    nodes = store_nodes(spec) or []
    plan_reboots(state)
    entries = [_entry(state, i, node, None) for i, node in enumerate(nodes)]
    done: list[Shards] = []
    pending: list[Shards] = []
    for i, node in enumerate(nodes):
        one = replace_lost_job(state, i, node) or plan_shard_job(state, i)
        one = rebooted_shards(state, i, node, one)
        entries[i] = _entry(state, i, node, one)
        if one.failed:
            one.message = f"node {node}: {one.message}"
            one.nodes = entries  # the later nodes as recorded
            return one
        (done if one.complete else pending).append(one)
    if pending:
        first = pending[0]
        first.message = f"{len(done)}/{len(nodes)} nodes sharded; {first.message}"
        first.cond = Cond(SHARDED, "False", first.cond.reason, first.message)
        first.summary = None
        first.complete = False
        first.nodes = entries
        return first
    summary = _combined([s.summary for s in done])
    text = (
        f"node-local shards of {plan_text(spec)} complete in {names.shard_dir(ctx.fingerprint)} "
        f"on {', '.join(nodes)}"
    )
    return Shards(
        Cond(SHARDED, "True", st.SHARDS_COMPLETE, text),
        complete=True,
        summary=summary,
        nodes=entries,
    )


def _entry(state: PassState, index: int, node: str, shards: Shards | None) -> dict[str, Any]:
    """Node `index`'s entry of status.shards.nodes: its Job, and once complete, its completion
    (this pass's, else as recorded), the node's bootID then and what it wrote; while it is
    written again after a reboot, the Job that wrote the lost shards."""
    out: dict[str, Any] = {
        "index": index,
        "node": node,
        "job": names.shard_job(state.ctx.name, state.ctx.fingerprint, index),
    }
    record = recorded(state, index)
    if (record is None) if shards is None else not shards.complete:
        if index in state.resharding:
            out["lostJobUid"] = state.resharding[index]
        return out
    if shards is None:
        assert record is not None
        job_uid, summary = record.job_uid, record.summary
    else:
        job_uid, summary = shards.job_uid, shards.summary
    out["complete"] = True
    if job_uid:
        out["jobUid"] = job_uid
    boot = (record.boot_id if record else None) or boot_of_completion(state, index, node, job_uid)
    if boot:
        out["bootID"] = boot
    out.update({k: (summary or {})[k] for k in SUMMARY_KEYS if k in (summary or {})})
    return out


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
    first = summaries[0] or {}  # the model, as every node's sharder read it (reported_fit.py)
    out.update({k: first[k] for k in ("modelConfig", "quantization") if k in first})
    return out
