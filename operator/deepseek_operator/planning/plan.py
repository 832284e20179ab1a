"""The planner: from one custom resource and its observed children to the objects to apply, the
objects to delete, the status to write and the Events to post. Pure: no clock, no I/O.

Level-triggered: the result depends only on the inputs, so running it again after a crash, or
for an event that changed nothing, repeats the same decisions (server-side apply of the same
objects is a no-op). The few memories it needs live in the status it writes (groupRestarts,
Failed at a generation) and in the children's annotations (fingerprint, generation).

This module parses the object and decides the verdict; the concerns of one pass live beside it:
store.py (the store claim), shards.py (the sharding Job, old shards), workers.py (the group),
validated.py (the Validated condition), with state.py holding what a pass shares and returns.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from ..api import DeepSeekDeploymentStatus, parse_deployment
from ..api.config_rules import review_config
from ..api.status import READY, SHARDED, VALIDATED, WORKERS_READY, Phase
from . import names, objects
from . import status as st
from .fingerprint import fingerprint
from .hccl import plan_rank_table
from .node_shards import plan_node_shards
from .observed import Obj, Observed, annotation, meta, terminating
from .pinning import plan_pins
from .shards import (
    Shards,
    dir_bytes,
    plan_shards,
    remove_old_shards,
    shard_bytes,
    shards_status,
)
from .state import Delete, PassState, Plan
from .status import Cond, EventSpec, Summary
from .store import plan_store
from .validated import foreign, rejected, validated
from .workers import Workers, plan_workers, restart_budget


def previous_status(body: Mapping[str, Any]) -> DeepSeekDeploymentStatus:
    """The status as written last; one this version cannot read counts as empty."""
    try:
        return DeepSeekDeploymentStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return DeepSeekDeploymentStatus()


def read_model_config(body: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The config.json given inline in the llm.dsop.io/model-config annotation, or an error."""
    raw = (meta(body).get("annotations") or {}).get(names.MODEL_CONFIG_ANNOTATION)
    if raw is None:
        return None, None
    try:
        config = json.loads(raw)
    except ValueError as exc:
        return None, (
            f"metadata.annotations[{names.MODEL_CONFIG_ANNOTATION}] is not valid JSON ({exc}); "
            "paste the checkpoint's config.json there or remove the annotation"
        )
    if not isinstance(config, dict):
        return None, (
            f"metadata.annotations[{names.MODEL_CONFIG_ANNOTATION}] must hold a JSON object "
            "(the checkpoint's config.json)"
        )
    return config, None


def _not_validated(generation: int, reason: str, message: str, previous: Any) -> Summary:
    return Summary(
        phase="Failed",
        message=message,
        generation=generation,
        conditions=[
            Cond(VALIDATED, "False", reason, message),
            Cond(SHARDED, "Unknown", st.NOT_VALIDATED, "the spec is not valid"),
            Cond(WORKERS_READY, "Unknown", st.NOT_VALIDATED, "the spec is not valid"),
            Cond(READY, "False", "Failed", message),
        ],
        group_restarts=previous.group_restarts,
    )


def plan(body: Mapping[str, Any], observed: Observed) -> Plan:
    """Decide everything for one custom resource (body: the object as the API server has it)."""
    md = meta(body)
    generation = int(md.get("generation") or 1)
    previous = previous_status(body)

    parsed = parse_deployment(body)
    if not parsed.ok:
        summary = _not_validated(generation, st.INVALID_SPEC, "; ".join(parsed.errors), previous)
        return _finish(previous, summary, observed, [], [], [], [])
    dep = parsed.deployment
    assert dep is not None
    spec = dep.spec

    model_config, config_error = read_model_config(body)
    warnings = list(parsed.warnings)
    if config_error:
        summary = _not_validated(generation, st.INVALID_MODEL_CONFIG, config_error, previous)
        return _finish(previous, summary, observed, [], [], [], [])
    if model_config is not None:
        review = review_config(spec, model_config)
        if review.errors:
            summary = _not_validated(
                generation, st.CONFIG_MISMATCH, "; ".join(review.errors), previous
            )
            return _finish(previous, summary, observed, [], [], [], [])
        warnings += [w for w in review.warnings if w not in warnings]

    fp = fingerprint(spec, model_config, owner=f"{dep.namespace}/{dep.name}")
    ctx = objects.Context(dep, str(md.get("uid") or ""), fp, generation)
    retry = previous.phase == "Failed" and previous.observed_generation not in (None, generation)
    # Failed for the workers holds until the spec changes: the budget is spent, or a worker said
    # its input cannot work.
    sticky = (
        previous.phase == "Failed"
        and previous.observed_generation == generation
        and _reason(previous, WORKERS_READY) in (st.RESTART_BUDGET_EXHAUSTED, st.CONFIG_MISMATCH)
    )
    return _run(PassState(ctx, observed, previous, warnings, retry, sticky))


def _reason(status: DeepSeekDeploymentStatus, kind: str) -> str | None:
    cond = st.condition(status, kind)
    return cond.reason if cond else None


def _finish(
    previous: DeepSeekDeploymentStatus,
    summary: Summary,
    observed: Observed,
    apply: list[Obj],
    delete: list[Delete],
    events: list[EventSpec],
    counted: list[str],
    resize: Obj | None = None,
    pins: list[Any] | None = None,
) -> Plan:
    new = st.build_status(previous, summary, observed.now)
    return Plan(
        apply=apply,
        delete=delete,
        status=new,
        events=[*events, *st.transition_events(previous, new)],
        previous=previous,
        counted_failures=counted,
        resize=resize,
        pins=pins or [],
    )


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _run(state: PassState) -> Plan:
    """One pass over a valid spec: the store, the shards, the workers, then the verdict."""
    ctx = state.ctx
    restart_budget(state)
    store = plan_store(state)
    validated_cond = validated(state, store.warning if store else "")
    state.apply += [objects.headless_service(ctx), objects.client_service(ctx)]
    nodes = objects.store_nodes(state.spec)
    shards = plan_node_shards(state) if nodes else plan_shards(state, store)
    observed_sts = state.observed.statefulset(names.statefulset(ctx.name))
    if observed_sts is not None and terminating(observed_sts):
        observed_sts = None
    desired_sts = _worker_children(state, shards)
    workers = plan_rank_table(state, plan_workers(state, observed_sts, desired_sts, shards))
    plan_pins(state)
    serving_previous = (
        workers.all_ready
        and observed_sts is not None
        and annotation(observed_sts, names.FINGERPRINT_ANNOTATION) != ctx.fingerprint
    )
    if shards.bad_input:
        validated_cond = Cond(VALIDATED, "False", st.CONFIG_MISMATCH, shards.message)
    if workers.bad_input:
        validated_cond = Cond(VALIDATED, "False", st.CONFIG_MISMATCH, workers.message)
    phase, message = _phase(state, shards, workers, serving_previous)
    refused = rejected(state)
    if refused:
        validated_cond = Cond(VALIDATED, "False", st.CHILD_REJECTED, refused)
        phase, message = "Failed", refused
    not_ours = foreign(state)
    if not_ours:
        validated_cond = Cond(VALIDATED, "False", st.FOREIGN_OBJECT, not_ours)
        phase, message = "Failed", not_ours
    if phase == "Ready":
        remove_old_shards(state)
    world = ctx.spec.parallelism.world()
    total = ctx.spec.parallelism.nodes
    runtime = ctx.spec.runtime.engine
    if serving_previous and observed_sts is not None:
        world = int(annotation(observed_sts, names.WORLD_SIZE_ANNOTATION) or world)
        total = workers.replicas
        # A group from before spec.runtime existed ran dsworker.
        runtime = annotation(observed_sts, names.RUNTIME_ANNOTATION) or "dsworker"
    summary = Summary(
        phase=phase,
        message=message,
        generation=ctx.generation,
        conditions=[
            validated_cond,
            shards.cond,
            workers.cond,
            st.ready_condition(phase, serving_previous, message),
        ],
        fingerprint=ctx.fingerprint,
        model_name=ctx.spec.model.name,
        world_size=world,
        moe_ep=ctx.spec.parallelism.moe_ep,
        runtime=runtime,
        shards=shards_status(state, shards),
        ready_workers=f"{workers.ready}/{total}",
        group_restarts=state.restarts,
        endpoint=objects.endpoint(ctx),
    )
    return _finish(
        state.previous,
        summary,
        state.observed,
        state.apply,
        state.delete,
        state.events,
        state.counted,
        state.resize,
        state.pins,
    )


def _worker_children(state: PassState, shards: Shards) -> Obj | None:
    """Once the shards are complete: the engine config, the worker StatefulSet (returned, with
    the digest of its template) and the disruption budget, to apply."""
    if not shards.complete or shards.failed:
        return None
    ctx = state.ctx
    config_map = objects.engine_config_map(ctx)
    digest = config_map["metadata"]["annotations"][names.ENGINE_CONFIG_ANNOTATION]
    desired = objects.statefulset(ctx, digest, shard_bytes(state, shards), dir_bytes(state, shards))
    desired["metadata"]["annotations"][names.TEMPLATE_ANNOTATION] = _digest(desired["spec"])
    group = objects.pod_group(ctx)  # before the pods, which name it
    state.apply += [*([group] if group else []), config_map, desired]
    state.apply.append(objects.disruption_budget(ctx))
    return desired


def _phase(
    state: PassState, shards: Shards, workers: Workers, serving_previous: bool
) -> tuple[Phase, str]:
    prev = state.previous
    if workers.budget_exhausted or workers.bad_input:
        return "Failed", workers.message
    if shards.failed:
        return "Failed", shards.message
    if not shards.complete:
        if serving_previous:
            return "Sharding", f"{shards.message}; the previous plan keeps serving"
        return ("Pending" if shards.waiting else "Sharding"), shards.message
    if workers.all_ready and not serving_previous:
        name = state.spec.model.name
        return "Ready", f"serving {name} at {objects.endpoint(state.ctx)}"
    was_ready = prev.phase in ("Ready", "Degraded") and prev.fingerprint == state.ctx.fingerprint
    if was_ready:
        return "Degraded", workers.message or "a worker was lost"
    if workers.stage in ("unschedulable", "image", "config"):
        return "Pending", workers.message
    if workers.stage in ("staging", "starting", "pending", "rolling", "waiting"):
        return "Staging", workers.message or "creating the workers"
    return "Loading", workers.message or "loading the model"
