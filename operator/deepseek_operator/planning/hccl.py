"""The HCCL rank table of an Ascend group on several nodes: rebuilt on every pass from the worker
pods as they are (their IPs, the device plugin's annotation), applied as a ConfigMap the pods
mount; the group is not ready, and the status says what is missing, until it is complete."""

from __future__ import annotations

import re

from ..api.status import WORKERS_READY
from . import names, objects
from . import status as st
from .ascend import rank_table
from .ascend.pod import needs_rank_table
from .observed import Obj, annotation, meta, terminating
from .state import PassState
from .status import Cond
from .workers import Workers

# Stages in which the group is still coming up: the table is what it waits for.
WAITING_STAGES = ("ready", "pending", "staging", "loading", "starting")


def pod_facts(pod: Obj) -> rank_table.PodFacts | None:
    name = str(meta(pod).get("name") or "")
    m = re.search(r"-(\d+)$", name)
    if not m:
        return None
    status = pod.get("status") or {}
    return rank_table.PodFacts(
        ordinal=int(m.group(1)),
        name=name,
        pod_ip=status.get("podIP"),
        host_ip=status.get("hostIP"),
        annotation=annotation(pod, rank_table.DEVICE_ANNOTATION),
    )


def plan_rank_table(state: PassState, workers: Workers) -> Workers:
    """Apply the table's ConfigMap (once the worker StatefulSet is planned) and hold the group
    while the table is incomplete."""
    spec = state.spec
    if not needs_rank_table(spec) or workers.stage in ("waiting", "none"):
        return workers
    pods = [p for p in state.observed.component_pods(names.WORKER) if not terminating(p)]
    facts = [f for p in pods if (f := pod_facts(p)) is not None]
    table = rank_table.build(facts, spec.parallelism.nodes, spec.parallelism.devices_per_node)
    state.apply.append(objects.rank_table_config_map(state.ctx, table))
    if table.complete or workers.stage not in WAITING_STAGES:
        return workers
    text = f"{workers.ready}/{workers.replicas} workers ready; waiting for the HCCL rank table: "
    text += "; ".join(table.missing)
    return Workers(
        Cond(WORKERS_READY, "False", st.RANK_TABLE_INCOMPLETE, st.truncate(text)),
        ready=workers.ready,
        replicas=workers.replicas,
        stage="staging",
        message=text,
    )
