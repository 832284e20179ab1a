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
from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from dsworker.contract.model_config import ModelConfig, ModelConfigError, parse_model_config

from ..api import DeepSeekDeploymentStatus, parse_deployment
from ..api.config_rules import review_config
from ..api.status import READY, SHARDED, VALIDATED, WORKERS_READY, Phase
from . import names, objects
from . import status as st
from .cleanup import remove_old_shards
from .fingerprint import fingerprint
from .hccl import plan_rank_table
from .memory import check_memory
from .node_reboot import hold_workers
from .node_shards import plan_node_shards
from .observed import Obj, Observed, annotation, meta, terminating, uid
from .pinning import plan_pins
from .reported_fit import check_reported_fit
from .shards import Shards, dir_bytes, plan_shards, shard_bytes, shards_status
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


def read_model_config(body: Mapping[str, Any]) -> tuple[ModelConfig | None, str | None]:
    """The config.json given inline in the llm.dsop.io/model-config annotation, parsed and
    validated once (contract.model_config), or the error naming the key."""
    raw = (meta(body).get("annotations") or {}).get(names.MODEL_CONFIG_ANNOTATION)
    if raw is None:
        return None, None
    where = f"metadata.annotations[{names.MODEL_CONFIG_ANNOTATION}]"
    try:
        return parse_model_config(str(raw), where=where), None
    except ModelConfigError as exc:
        return None, (f"{exc}; paste the checkpoint's config.json there, or remove the annotation")


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
    memory_warning = ""
    if config_error:
        summary = _not_validated(generation, st.INVALID_MODEL_CONFIG, config_error, previous)
        return _finish(previous, summary, observed, [], [], [], [])
    if model_config is not None:
        reviewed = _review_model_config(spec, model_config, generation, previous, observed)
        if isinstance(reviewed, Plan):
            return reviewed
        warnings += [w for w in reviewed[0] if w not in warnings]
        memory_warning = reviewed[1]

    fp = fingerprint(
        spec, model_config.raw if model_config else None, owner=f"{dep.namespace}/{dep.name}"
    )
    ctx = objects.Context(dep, str(md.get("uid") or ""), fp, generation)
    retry = previous.phase == "Failed" and previous.observed_generation not in (None, generation)
    # Failed for the workers holds until the spec changes: the budget is spent, or a worker said
    # its input cannot work.
    sticky = (
        previous.phase == "Failed"
        and previous.observed_generation == generation
        and _reason(previous, WORKERS_READY) in (st.RESTART_BUDGET_EXHAUSTED, st.CONFIG_MISMATCH)
    )
    state = PassState(ctx, observed, previous, warnings, retry, sticky)
    state.memory_warning = memory_warning
    state.config_known = model_config is not None
    return _run(state)


def _review_model_config(
    spec: Any, config: ModelConfig, generation: int, previous: Any, observed: Observed
) -> Plan | tuple[list[str], str]:
    """The rules and the memory fit that need config.json: a refusal (Validated False), or the
    warnings and the memory warning to carry."""
    review = review_config(spec, config)
    if review.errors:
        summary = _not_validated(generation, st.CONFIG_MISMATCH, "; ".join(review.errors), previous)
        return _finish(previous, summary, observed, [], [], [], [])
    try:
        memory = check_memory(spec, config, review.quantization)
    except ModelConfigError as exc:
        message = f"{exc}; paste the checkpoint's config.json there, or remove the annotation"
        summary = _not_validated(generation, st.INVALID_MODEL_CONFIG, message, previous)
        return _finish(previous, summary, observed, [], [], [], [])
    if memory is not None and memory.error:
        return _does_not_fit(generation, memory.error, previous, observed)
    return review.warnings, memory.warning if memory is not None else ""


def _does_not_fit(generation: int, message: str, previous: Any, observed: Observed) -> Plan:
    """Validated False (InsufficientMemory): nothing is sharded or started; a Warning Event
    names the numbers and the fix when the message is new."""
    summary = _not_validated(generation, st.INSUFFICIENT_MEMORY, message, previous)
    old = st.condition(previous, VALIDATED)
    events = []
    if old is None or old.reason != st.INSUFFICIENT_MEMORY or old.message != message:
        events.append(EventSpec("Warning", st.INSUFFICIENT_MEMORY, st.truncate(message)))
    return _finish(previous, summary, observed, [], [], events, [])


def _validated_and_fit(state: PassState, shards: Shards, store_warning: str) -> tuple[Shards, Cond]:
    """The Validated condition, and the shards; a plan that the sharder's report shows does not
    fit is Validated False InsufficientMemory (a Warning Event when the message is new), and
    its shards count as failed so that no worker starts (they stay for devices that fit)."""
    message = check_reported_fit(state, shards)
    if not message:
        return shards, validated(state, store_warning)
    old = st.condition(state.previous, VALIDATED)
    if old is None or old.reason != st.INSUFFICIENT_MEMORY or old.message != message:
        state.events.append(EventSpec("Warning", st.INSUFFICIENT_MEMORY, st.truncate(message)))
    failed = replace(shards, failed=True, message=message)
    return failed, Cond(VALIDATED, "False", st.INSUFFICIENT_MEMORY, message)


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
    state.apply += [objects.headless_service(ctx), objects.client_service(ctx)]
    _network_policy(state)
    nodes = objects.store_nodes(state.spec)
    shards = plan_node_shards(state) if nodes else plan_shards(state, store)
    shards, validated_cond = _validated_and_fit(state, shards, store.warning if store else "")
    observed_sts = state.observed.statefulset(names.statefulset(ctx.name))
    if observed_sts is not None and terminating(observed_sts):
        observed_sts = None
    desired_sts = _worker_children(state, shards)
    held = hold_workers(state, observed_sts)  # a rebooted node's pod (node_reboot.py)
    workers = plan_rank_table(state, held or plan_workers(state, observed_sts, desired_sts, shards))
    plan_pins(state)
    serving_previous = (
        workers.all_ready
        and observed_sts is not None
        and annotation(observed_sts, names.FINGERPRINT_ANNOTATION) != ctx.fingerprint
    )
    if shards.bad_input:
        validated_cond = Cond(VALIDATED, "False", shards.validated_reason, shards.message)
    if workers.bad_input:
        validated_cond = Cond(VALIDATED, "False", st.CONFIG_MISMATCH, workers.message)
    phase, message = _phase(state, shards, workers, serving_previous)
    refused_reason, refused = rejected(state)
    if refused:
        validated_cond = Cond(VALIDATED, "False", refused_reason, refused)
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
    result = _finish(
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
    result.recheck = state.recheck
    result.node_check = bool(nodes)
    return result


def _network_policy(state: PassState) -> None:
    """spec.serving.networkPolicy: applied when enabled; ours deleted once it is not."""
    policy = objects.network_policy(state.ctx)
    if policy is not None:
        state.apply.append(policy)
        return
    for old in state.observed.network_policies:
        if not terminating(old):
            state.delete.append(Delete("NetworkPolicy", str(meta(old).get("name")), uid(old)))


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
    if workers.stage in ("unschedulable", "image", "config", "creation"):
        return "Pending", workers.message
    if workers.stage in ("staging", "starting", "pending", "rolling", "waiting"):
        return "Staging", workers.message or "creating the workers"
    return "Loading", workers.message or "loading the model"
