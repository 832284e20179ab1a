"""The planner: from one custom resource and its observed children to the objects to apply, the
objects to delete, the status to write and the Events to post. Pure: no clock, no I/O.

Level-triggered: the result depends only on the inputs, so running it again after a crash, or
for an event that changed nothing, repeats the same decisions (server-side apply of the same
objects is a no-op). The few memories it needs live in the status it writes (groupRestarts,
Failed at a generation) and in the children's annotations (fingerprint, generation).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from ..api import DeepSeekDeploymentStatus, parse_deployment
from ..api.quantity import compare_quantities
from ..api.status import READY, SHARDED, VALIDATED, WORKERS_READY, Phase
from ..validation import review_config
from . import names, objects, ownership
from . import status as st
from .fingerprint import fingerprint
from .observed import (
    Obj,
    Observed,
    annotation,
    bad_input,
    container_problem,
    failure,
    job_failure_reason,
    job_state,
    meta,
    pod_ready,
    pod_stage,
    pods_of_job,
    revision,
    terminating,
    termination,
    uid,
    unschedulable,
)
from .status import Cond, EventSpec, Summary


@dataclass(frozen=True)
class Delete:
    """A child to delete (Background propagation: a Job's pods go with it), only while it is the
    object of this uid (a precondition: a namesake created since is never deleted)."""

    kind: Literal["Job", "Pod"]
    name: str
    uid: str


@dataclass
class Plan:
    """What one reconcile does."""

    apply: list[Obj]
    delete: list[Delete]
    status: DeepSeekDeploymentStatus
    events: list[EventSpec]
    previous: DeepSeekDeploymentStatus
    # uids of worker pods whose failure was acted on (the operator stops re-reporting them).
    counted_failures: list[str] = field(default_factory=list)
    # The store claim with a new storage request, applied before everything else: the API server
    # may refuse it (then the shell plans again with Observed.store_resize_refused set).
    resize: Obj | None = None

    @property
    def status_changed(self) -> bool:
        return self.status.to_dict() != self.previous.to_dict()

    @property
    def phase(self) -> Phase | None:
        return self.status.phase


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
    return _Planner(ctx, observed, previous, warnings, retry, sticky).run()


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
    )


@dataclass(frozen=True)
class StoreChange:
    """What to do about an existing store claim whose spec.sharding.store.pvc may have changed."""

    current: str = ""  # the claim's storage request now
    request: str | None = None  # the storage request to apply; None leaves the claim alone
    event: str = ""  # the Normal Event posted when the request is changed
    waiting: str = ""  # why a larger size waits (joins the StoreNotBound message)
    warning: str = ""  # what of the spec the claim does not get, and the fix


def store_change(
    name: str, size: str, storage_class: str | None, claim: Mapping[str, Any]
) -> StoreChange:
    """Compare spec.sharding.store.pvc with the claim the operator created from it.

    Kubernetes lets a claim's request grow once the claim is Bound (the storage class must allow
    volume expansion: the API server checks that), never shrink below what the volume already
    has, and never change class. A larger size is applied when the claim is Bound, and waits while
    it is not; a smaller one only undoes an expansion the volume has not reached yet (a request
    still above status.capacity), else it is refused with a warning; quantities are compared by
    value ("2048Mi" is "2Gi").
    """
    spec = claim.get("spec") or {}
    status = claim.get("status") or {}
    requested = str(((spec.get("resources") or {}).get("requests") or {}).get("storage") or "")
    capacity = str((status.get("capacity") or {}).get("storage") or "")
    bound = status.get("phase") == "Bound"
    warnings: list[str] = []
    have_class = spec.get("storageClassName")
    if storage_class is not None and have_class is not None and storage_class != have_class:
        warnings.append(
            f"spec.sharding.store.pvc.storageClassName: PersistentVolumeClaim {name} was created "
            f"with storage class {have_class} and a claim's class cannot change, so the shards "
            f"stay there: set storageClassName back to {have_class}"
        )
    order = compare_quantities(size, requested)
    if not order:  # equal, or a request that is not a quantity (nothing sensible to do)
        failure = expansion_failure(status)
        if failure and capacity and compare_quantities(requested, capacity) == 1:
            warnings.insert(
                0,
                f"spec.sharding.store.pvc.size: the volume of PersistentVolumeClaim {name} did "
                f"not grow from {capacity} to {requested} ({failure}): fix what the storage "
                f"backend reports (the claim's Events say more), or lower size to a value above "
                f"{capacity} to retry the expansion at that size",
            )
        return StoreChange(current=requested, warning="; ".join(warnings))
    if order > 0 and not bound:
        return StoreChange(
            current=requested,
            waiting=f"spec.sharding.store.pvc.size {size} is applied once the claim is bound "
            f"(it asks for {requested}; an unbound claim cannot change)",
            warning="; ".join(warnings),
        )
    if order > 0:
        return StoreChange(
            current=requested,
            request=size,
            event=f"raising the storage request of PersistentVolumeClaim {name} from {requested} "
            f"to {size} (spec.sharding.store.pvc.size)",
            warning="; ".join(warnings),
        )
    if bound and compare_quantities(size, capacity) == 1:
        return StoreChange(
            current=requested,
            request=size,
            event=f"lowering the storage request of PersistentVolumeClaim {name} from "
            f"{requested} to {size}, still above its capacity {capacity}: the expansion the "
            "volume has not reached yet is retried at the smaller size",
            warning="; ".join(warnings),
        )
    fix = f"set size to {requested} or more"
    if capacity and compare_quantities(capacity, requested) == -1:
        fix += f" (or to more than its capacity {capacity}, to retry an unfinished expansion)"
    warnings.insert(
        0,
        f"spec.sharding.store.pvc.size: {size} is less than the {requested} that "
        f"PersistentVolumeClaim {name} asks for, and a claim never shrinks, so it keeps "
        f"{requested}: {fix}",
    )
    return StoreChange(current=requested, warning="; ".join(warnings))


# A claim's expansion that stopped: the resizer's error conditions, or a size it cannot reach.
RESIZE_ERRORS = ("ControllerResizeError", "NodeResizeError")
RESIZE_INFEASIBLE = ("ControllerResizeInfeasible", "NodeResizeInfeasible")


def expansion_failure(status: Mapping[str, Any]) -> str:
    """Why a claim's volume expansion stopped, from its status; "" while none did."""
    for c in status.get("conditions") or ():
        if c.get("type") in RESIZE_ERRORS and c.get("status") == "True":
            return f"{c['type']}: {c.get('message') or 'no message'}"
    state = str((status.get("allocatedResourceStatuses") or {}).get("storage") or "")
    return state if state in RESIZE_INFEASIBLE else ""


# A group that has served this long without interruption gets its whole restart budget back:
# the budget stops crash loops, not the rare failure of a group that runs for months.
RESTART_BUDGET_RESET_SECONDS = 600

# The spec fields each kind of child passes through to the API server: where to look when one is
# refused.
CHILD_FIELDS = {
    "StatefulSet": "fix spec.worker: resources, env, nodeSelector, tolerations, affinity, "
    "podAnnotations, priorityClassName, schedulerName",
    "Job": "fix spec.sharding.resources, or spec.worker placement and imagePullPolicy",
    "PersistentVolumeClaim": "fix spec.sharding.store.pvc",
    "Service": "fix spec.serving.port",
    "PodDisruptionBudget": "fix spec.parallelism.nodes",
    "ConfigMap": "fix spec.serving",
}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@dataclass
class _Shards:
    cond: Cond
    complete: bool = False
    failed: bool = False
    bad_input: bool = False
    waiting: bool = False  # for something outside (a claim to bind, a node to fit the pod)
    message: str = ""
    summary: dict[str, Any] | None = None


@dataclass
class _Workers:
    cond: Cond
    ready: int = 0
    replicas: int = 0
    all_ready: bool = False
    stage: str = "none"
    message: str = ""
    budget_exhausted: bool = False
    bad_input: bool = False  # a worker exited with dsworker's bad-input code

    @classmethod
    def not_ready(cls, reason: str, text: str, **kw: Any) -> _Workers:
        """WorkersReady False for `reason`; `text` is both the condition's and the status message."""
        return cls(Cond(WORKERS_READY, "False", reason, text), message=text, **kw)


class _Planner:
    """One planning pass; the methods share the inputs and accumulate the outputs."""

    def __init__(
        self,
        ctx: objects.Context,
        observed: Observed,
        previous: DeepSeekDeploymentStatus,
        warnings: list[str],
        retry: bool,
        sticky: bool,
    ) -> None:
        self.ctx, self.observed, self.previous = ctx, observed, previous
        self.spec = ctx.spec
        self.warnings, self.retry, self.sticky = warnings, retry, sticky
        self.apply: list[Obj] = []
        self.delete: list[Delete] = []
        self.events: list[EventSpec] = []
        self.counted: list[str] = []
        self.resize: Obj | None = None
        self.restarts = 0 if retry else (previous.group_restarts or 0)
        if self.restarts and self._served_since_budget_window():
            self.events.append(
                EventSpec(
                    "Normal",
                    "RestartBudgetReset",
                    f"the group has served for {RESTART_BUDGET_RESET_SECONDS // 60} minutes "
                    f"without interruption: {self.restarts} spent group restart(s) forgotten",
                )
            )
            self.restarts = 0

    def _served_since_budget_window(self) -> bool:
        """Whether Ready has been True (as last written) for the whole reset window."""
        ready = st.condition(self.previous, READY)
        if ready is None or ready.status != "True":
            return False
        held = (self.observed.now - ready.last_transition_time).total_seconds()
        return held >= RESTART_BUDGET_RESET_SECONDS

    # ------------------------------------------------------------------------------ run

    def run(self) -> Plan:
        ctx = self.ctx
        store = self._store()
        validated = self._validated(store.warning if store else "")
        self.apply += [objects.headless_service(ctx), objects.client_service(ctx)]
        shards = self._shards(store)
        sts_name = names.statefulset(ctx.name)
        observed_sts = self.observed.statefulset(sts_name)
        if observed_sts is not None and terminating(observed_sts):
            observed_sts = None
        desired_sts = None
        if shards.complete and not shards.failed:
            config_map = objects.engine_config_map(ctx)
            digest = config_map["metadata"]["annotations"][names.ENGINE_CONFIG_ANNOTATION]
            desired_sts = objects.statefulset(ctx, digest, self._shard_bytes(shards))
            desired_sts["metadata"]["annotations"][names.TEMPLATE_ANNOTATION] = _digest(
                desired_sts["spec"]
            )
            self.apply += [config_map, desired_sts, objects.disruption_budget(ctx)]
        workers = self._workers(observed_sts, desired_sts, shards)
        serving_previous = (
            workers.all_ready
            and observed_sts is not None
            and annotation(observed_sts, names.FINGERPRINT_ANNOTATION) != ctx.fingerprint
        )
        if shards.bad_input:
            validated = Cond(VALIDATED, "False", st.CONFIG_MISMATCH, shards.message)
        if workers.bad_input:
            validated = Cond(VALIDATED, "False", st.CONFIG_MISMATCH, workers.message)
        phase, message = self._phase(shards, workers, serving_previous)
        rejected = self._rejected()
        if rejected:
            validated = Cond(VALIDATED, "False", st.CHILD_REJECTED, rejected)
            phase, message = "Failed", rejected
        foreign = self._foreign()
        if foreign:
            validated = Cond(VALIDATED, "False", st.FOREIGN_OBJECT, foreign)
            phase, message = "Failed", foreign
        if phase == "Ready":
            self._remove_old_shards()
        world = ctx.spec.parallelism.world()
        total = ctx.spec.parallelism.nodes
        if serving_previous and observed_sts is not None:
            world = int(annotation(observed_sts, names.WORLD_SIZE_ANNOTATION) or world)
            total = workers.replicas
        summary = Summary(
            phase=phase,
            message=message,
            generation=ctx.generation,
            conditions=[
                validated,
                shards.cond,
                workers.cond,
                st.ready_condition(phase, serving_previous, message),
            ],
            fingerprint=ctx.fingerprint,
            model_name=ctx.spec.model.name,
            world_size=world,
            shards=self._shards_status(shards),
            ready_workers=f"{workers.ready}/{total}",
            group_restarts=self.restarts,
            endpoint=objects.endpoint(ctx),
        )
        return _finish(
            self.previous,
            summary,
            self.observed,
            self.apply,
            self.delete,
            self.events,
            self.counted,
            self.resize,
        )

    # ------------------------------------------------------------------------ validation

    def _validated(self, store_warning: str) -> Cond:
        """Valid, with the settings that have no effect named; each warning is posted as an
        Event once, when it first appears in the condition's message."""
        spec_text = "; ".join(self.warnings)
        text = "; ".join(t for t in (store_warning, spec_text) if t)
        if not text:
            return Cond(VALIDATED, "True", st.VALID, "the spec is valid")
        old = st.condition(self.previous, VALIDATED)
        before = old.message if old is not None else ""
        if store_warning and store_warning not in before:
            self.events.append(
                EventSpec("Warning", "StoreSpecNotApplied", st.truncate(store_warning))
            )
        if spec_text and spec_text not in before:
            self.events.append(EventSpec("Warning", "SpecWarning", st.truncate(spec_text)))
        reason = st.STORE_SPEC_NOT_APPLIED if store_warning else st.VALID_WITH_WARNINGS
        return Cond(VALIDATED, "True", reason, text)

    def _rejected(self) -> str:
        """What the API server refused to store, with the spec fields the child is built from;
        a Warning Event when the message is new."""
        texts = [
            f"the API server refused {child} ({CHILD_FIELDS.get(child.split()[0], 'the spec')}): "
            f"{why}"
            for child, why in sorted(self.observed.rejected.items())
        ]
        text = "; ".join(texts)
        if text:
            old = st.condition(self.previous, VALIDATED)
            if old is None or old.reason != st.CHILD_REJECTED or old.message != text:
                self.events.append(EventSpec("Warning", "ChildRejected", st.truncate(text)))
        return text

    def _foreign(self) -> str:
        """Objects under a child's name that are not ours: their children are held back (never
        applied over, adopted or deleted); a Warning Event when the message is new."""
        foreign = self.observed.foreign
        if not foreign:
            return ""
        self.apply = ownership.hold(self.apply, foreign)
        text = ownership.foreign_message(foreign, self.ctx.name)
        old = st.condition(self.previous, VALIDATED)
        if old is None or old.reason != st.FOREIGN_OBJECT or old.message != text:
            self.events.append(EventSpec("Warning", "ForeignObject", st.truncate(text)))
        return text

    # ----------------------------------------------------------------------------- store

    def _store(self) -> StoreChange | None:
        """The store claim the operator created, against spec.sharding.store.pvc now: plans a
        new storage request, or says what the claim does not get."""
        ctx, store = self.ctx, self.spec.sharding.store
        claim = objects.store_claim(ctx) if self.spec.sharding.enabled else None
        if claim is None or store is None or store.pvc is None or store.pvc.size is None:
            return None
        name = claim["metadata"]["name"]
        observed = self.observed.claim(name)
        if observed is None or terminating(observed):
            return None
        change = store_change(name, store.pvc.size, store.pvc.storage_class_name, observed)
        if change.request is None:
            return change
        refused = self.observed.store_resize_refused
        if refused:
            fix = f"set size back to {change.current}"
            if compare_quantities(change.request, change.current) == 1:
                storage_class = (observed.get("spec") or {}).get("storageClassName")
                fix = (
                    f"let storage class {storage_class} expand volumes (allowVolumeExpansion: "
                    f"true), or {fix}"
                )
            warning = (
                f"spec.sharding.store.pvc.size: the API server refused to change the storage "
                f"request of PersistentVolumeClaim {name} from {change.current} to "
                f"{change.request} ({refused}): {fix}"
            )
            return StoreChange(
                current=change.current,
                warning="; ".join(w for w in (warning, change.warning) if w),
            )
        self.resize = objects.resized_store_claim(ctx, observed, change.request)
        self.events.append(EventSpec("Normal", "ResizingStore", change.event))
        return change

    # -------------------------------------------------------------------------- sharding

    def _shards(self, store: StoreChange | None) -> _Shards:
        ctx, spec = self.ctx, self.spec
        if not spec.sharding.enabled:
            return _Shards(
                Cond(
                    SHARDED,
                    "True",
                    st.SHARDING_DISABLED,
                    "offline sharding is off: the workers load and split the checkpoint",
                ),
                complete=True,
            )
        claim = objects.store_claim(ctx)
        claim_pending = ""
        if claim is not None:
            observed_claim = self.observed.claim(claim["metadata"]["name"])
            if observed_claim is None:
                self.apply.append(claim)
            phase = ((observed_claim or {}).get("status") or {}).get("phase")
            if phase != "Bound":
                storage_class = ((observed_claim or claim).get("spec") or {}).get(
                    "storageClassName"
                )
                claim_pending = (
                    f"waiting for PersistentVolumeClaim {claim['metadata']['name']} (storage "
                    f"class {storage_class}) to be bound"
                )
                if store is not None and store.waiting:
                    claim_pending += f"; {store.waiting}"

        job_name = names.shard_job(ctx.name, ctx.fingerprint)
        job = self.observed.job(job_name)
        plan_text = self._plan_text()
        if job is not None and terminating(job):
            return _Shards(
                Cond(SHARDED, "False", st.SHARDING_PENDING, f"waiting for Job {job_name} to go"),
                message=f"restarting sharding: waiting for the failed Job {job_name} to go",
            )
        if job is None:
            self.apply.append(objects.shard_job(ctx))
            text = claim_pending or f"sharding Job {job_name} created for {plan_text}"
            return _Shards(
                Cond(
                    SHARDED,
                    "False",
                    st.STORE_NOT_BOUND if claim_pending else st.SHARDING_PENDING,
                    text,
                ),
                waiting=bool(claim_pending),
                message=text,
            )
        pods = pods_of_job(job_name, self.observed.pods)
        state = job_state(job)
        if state == "failed":
            if annotation(job, names.GENERATION_ANNOTATION) != str(ctx.generation):
                # The spec changed since this Job failed: run it again.
                self.delete.append(Delete("Job", job_name, uid(job)))
                self.events.append(
                    EventSpec("Normal", "RetryingSharding", f"spec changed: re-running {job_name}")
                )
                text = f"re-running the sharding Job {job_name} after the spec changed"
                return _Shards(Cond(SHARDED, "False", st.SHARDING_PENDING, text), message=text)
            term = termination(pods, succeeded=False)
            detail = (term.error if term and term.error else None) or job_failure_reason(job)
            text = f"sharding Job {job_name} failed: {detail}"
            return _Shards(
                Cond(SHARDED, "False", st.SHARDING_FAILED, text),
                failed=True,
                bad_input=bool(term and term.bad_input),
                message=detail if term and term.bad_input else text,
            )
        if state == "complete":
            term = termination(pods, succeeded=True)
            summary = term.summary if term and term.summary else None
            text = f"shards of {plan_text} complete in {names.shard_dir(ctx.fingerprint)}"
            if summary and summary.get("bytes") is not None:
                text += f" ({summary.get('files')} files, {int(summary['bytes']) / 1e9:.2f} GB)"
            return _Shards(
                Cond(SHARDED, "True", st.SHARDS_COMPLETE, text), complete=True, summary=summary
            )
        problem = next((found for p in pods if (found := container_problem(p))), None)
        if problem and not claim_pending:
            kind, detail = problem
            reason = st.IMAGE_PULL_FAILED if kind == "image" else st.CONTAINER_CONFIG_ERROR
            text = f"sharding Job {job_name} cannot start: {detail}"
            return _Shards(Cond(SHARDED, "False", reason, text), waiting=True, message=text)
        waiting = claim_pending or next(
            (
                f"sharding pod {meta(p).get('name')} cannot be scheduled: {why}"
                for p in pods
                if (why := unschedulable(p))
            ),
            "",
        )
        if waiting:
            return _Shards(
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
            f"sharding Job {job_name} is writing {plan_text} to {names.shard_dir(ctx.fingerprint)}"
        )
        return _Shards(Cond(SHARDED, "False", st.SHARDING_IN_PROGRESS, text), message=text)

    def _shard_bytes(self, shards: _Shards) -> int | None:
        """The bytes of the current shards: from the sharder's termination message, else as
        recorded in the status for the same fingerprint. The sharder's pod may be garbage-collected
        long after the Job completed; a fact that went missing must not change the worker template
        (that would restart a serving group)."""
        if shards.summary and shards.summary.get("bytes") is not None:
            return int(shards.summary["bytes"])
        old = self.previous.shards
        if (
            old is not None
            and old.bytes is not None
            and (self.previous.fingerprint == self.ctx.fingerprint)
        ):
            return old.bytes
        return None

    def _plan_text(self) -> str:
        p = self.spec.parallelism.to_plan()
        return (
            f"world {p.world_size} (dp {p.dp} x tp {p.tp}, moeTp {p.moe_tp} x moeEp {p.moe_ep}"
            + (", MTP" if self.spec.model.mtp else "")
            + ")"
        )

    def _shards_status(self, shards: _Shards) -> dict[str, Any] | None:
        if not self.spec.sharding.enabled:
            return None
        job = names.shard_job(self.ctx.name, self.ctx.fingerprint)
        if shards.summary:
            keys = ("bytes", "files", "seconds", "throughputMBps")
            return {**{k: shards.summary[k] for k in keys if k in shards.summary}, "job": job}
        old = self.previous.shards
        if (
            shards.complete
            and old is not None
            and self.previous.fingerprint == self.ctx.fingerprint
        ):
            return old.to_dict()
        return {"job": job}

    # --------------------------------------------------------------------------- workers

    def _workers(self, sts: Obj | None, desired: Obj | None, shards: _Shards) -> _Workers:
        if sts is None:
            if shards.complete and not shards.failed:
                text = "creating the worker StatefulSet"
                return _Workers.not_ready(st.STARTING, text, stage="starting")
            return _Workers(
                Cond(WORKERS_READY, "False", st.WAITING_FOR_SHARDS, "waiting for the shards"),
                stage="waiting",
            )
        pods = [p for p in self.observed.component_pods(names.WORKER) if not terminating(p)]
        ready = sum(1 for p in pods if pod_ready(p))
        replicas = int((sts.get("spec") or {}).get("replicas") or 0)
        if self.sticky:
            old = st.condition(self.previous, WORKERS_READY)
            reason = old.reason if old else st.RESTART_BUDGET_EXHAUSTED
            text = old.message if old else "the restart budget is spent"
            return _Workers.not_ready(
                reason,
                text,
                ready=ready,
                replicas=replicas,
                budget_exhausted=reason == st.RESTART_BUDGET_EXHAUSTED,
                bad_input=reason == st.CONFIG_MISMATCH,
            )
        status = sts.get("status") or {}
        settled = int(status.get("observedGeneration") or 0) >= int(
            meta(sts).get("generation") or 0
        )
        if desired is not None and annotation(sts, names.TEMPLATE_ANNOTATION) != annotation(
            desired, names.TEMPLATE_ANNOTATION
        ):
            settled = False  # this pass applies a new template; its pods come next pass
        update_revision = status.get("updateRevision")
        stale = [p for p in pods if settled and update_revision and revision(p) != update_revision]
        if stale:
            self._delete_pods(pods)
            self.events.append(
                EventSpec(
                    "Normal",
                    "RollingOut",
                    f"replacing all {len(pods)} worker pods together with the new template",
                )
            )
            text = "replacing the worker group with the new template"
            return _Workers.not_ready(st.ROLLING_OUT, text, replicas=replicas, stage="rolling")

        # Only a pod of the current template speaks for the current spec.
        rejected = self._bad_input(pods, update_revision if settled else None)
        if rejected:
            return _Workers.not_ready(
                st.CONFIG_MISMATCH, rejected, ready=ready, replicas=replicas, bad_input=True
            )
        failures = self._failures(pods)
        if failures:
            return self._restart_group(pods, failures, ready, replicas)
        if not settled:
            text = f"{ready}/{replicas} workers ready; applying the new worker template"
            return _Workers.not_ready(
                st.ROLLING_OUT,
                text,
                ready=ready,
                replicas=replicas,
                stage="rolling",
            )
        if len(pods) == replicas and ready == replicas:
            return _Workers(
                Cond(
                    WORKERS_READY, "True", st.ALL_WORKERS_READY, f"{ready}/{replicas} workers ready"
                ),
                ready=ready,
                replicas=replicas,
                all_ready=True,
                stage="ready",
            )
        stages = [pod_stage(p) for p in pods]
        for kind, reason in (
            ("image", st.IMAGE_PULL_FAILED),
            ("config", st.CONTAINER_CONFIG_ERROR),
            ("unschedulable", st.UNSCHEDULABLE),
            ("staging", st.STAGING),
            ("pending", st.STARTING),
            ("loading", st.LOADING),
        ):
            found = [detail for stage, detail in stages if stage == kind]
            if found:
                text = f"{ready}/{replicas} workers ready; {found[0]}"
                return _Workers.not_ready(reason, text, ready=ready, replicas=replicas, stage=kind)
        missing = replicas - len(pods)
        text = f"{ready}/{replicas} workers ready; waiting for {missing} pod(s) to be created"
        return _Workers.not_ready(
            st.STARTING,
            text,
            ready=ready,
            replicas=replicas,
            stage="pending",
        )

    def _restart_group(
        self, pods: list[Obj], failures: list[tuple[str, str]], ready: int, replicas: int
    ) -> _Workers:
        """One rank down takes the whole torch.distributed group down: replace every pod, within
        the restart budget; past it the deployment is Failed until the spec changes."""
        detail = failures[0][1]
        budget = self.spec.worker.restart_budget
        self.counted += [u for u, _ in failures]
        if self.restarts >= budget:
            text = (
                f"{detail}; the restart budget ({budget} group restarts) is spent: fix the cause "
                "(kubectl logs, Events) and change the spec to try again"
            )
            return _Workers.not_ready(
                st.RESTART_BUDGET_EXHAUSTED,
                text,
                ready=ready,
                replicas=replicas,
                budget_exhausted=True,
            )
        self.restarts += 1
        self._delete_pods(pods)
        text = (
            f"{detail}; restarting all {len(pods)} worker pods together "
            f"(group restart {self.restarts} of {budget})"
        )
        self.events.append(EventSpec("Warning", "GroupRestart", st.truncate(text)))
        return _Workers.not_ready(st.GROUP_RESTARTING, text, replicas=replicas, stage="restarting")

    def _bad_input(self, pods: list[Obj], current: str | None) -> str:
        """A worker of the `current` template revision that exited with the bad-input code, as
        the sharder does: the plan or the checkpoint cannot work, so the group is not restarted
        (no budget spent) and the deployment fails at once, until the spec changes. Right after a
        spec change, and until its template is rolled out, a pod that said so is an ordinary
        failure or a stale pod: the group restarts or rolls to try the new spec."""
        if self.retry or not current:
            return ""
        seen = {uid(p) for p in pods}
        hints = [h for h in self.observed.failed_pods if uid(h) not in seen and not terminating(h)]
        for pod in [*pods, *hints]:
            if revision(pod) != current:
                continue
            why = bad_input(pod)
            if why:
                self.counted.append(uid(pod))
                return why
        return ""

    def _failures(self, pods: list[Obj]) -> list[tuple[str, str]]:
        out = [(uid(p), why) for p in pods if (why := failure(p))]
        known = {uid(p) for p in self.observed.component_pods(names.WORKER)}
        live = {u for u, _ in out}
        for hint in self.observed.failed_pods:
            u = uid(hint)
            if u in live or terminating(hint):
                continue
            current = [p for p in self.observed.pods if uid(p) == u]
            if u in known and (not current or terminating(current[0])):
                continue  # already being replaced
            why = failure(hint)
            if why:
                out.append((u, why))
        return out

    def _delete_pods(self, pods: list[Obj]) -> None:
        for pod in pods:
            self.delete.append(Delete("Pod", str(meta(pod).get("name")), uid(pod)))

    # ----------------------------------------------------------------------------- phase

    def _phase(
        self, shards: _Shards, workers: _Workers, serving_previous: bool
    ) -> tuple[Phase, str]:
        prev = self.previous
        if workers.budget_exhausted or workers.bad_input:
            return "Failed", workers.message
        if shards.failed:
            return "Failed", shards.message
        if not shards.complete:
            if serving_previous:
                return "Sharding", f"{shards.message}; the previous plan keeps serving"
            return ("Pending" if shards.waiting else "Sharding"), shards.message
        if workers.all_ready and not serving_previous:
            name = self.spec.model.name
            return "Ready", f"serving {name} at {objects.endpoint(self.ctx)}"
        was_ready = prev.phase in ("Ready", "Degraded") and prev.fingerprint == self.ctx.fingerprint
        if was_ready:
            return "Degraded", workers.message or "a worker was lost"
        if workers.stage in ("unschedulable", "image", "config"):
            return "Pending", workers.message
        if workers.stage in ("staging", "starting", "pending", "rolling", "waiting"):
            return "Staging", workers.message or "creating the workers"
        return "Loading", workers.message or "loading the model"

    # ---------------------------------------------------------------------- old shards

    def _remove_old_shards(self) -> None:
        """Once the group serving the current plan is Ready, delete the shard directories of
        earlier plans (a cleanup Job on their store), then their sharding Jobs."""
        current = names.shard_job(self.ctx.name, self.ctx.fingerprint)
        for old in self.observed.jobs_of(names.SHARDER):
            name = str(meta(old).get("name"))
            if name == current or terminating(old):
                continue
            old_fp = annotation(old, names.FINGERPRINT_ANNOTATION) or ""
            cleanup_name = names.cleanup_job(self.ctx.name, old_fp)
            cleanup = self.observed.job(cleanup_name)
            if cleanup is None:
                job = objects.cleanup_job(self.ctx, old)
                if job is None:
                    self.delete.append(Delete("Job", name, uid(old)))
                    continue
                self.apply.append(job)
                self.events.append(
                    EventSpec(
                        "Normal",
                        "RemovingOldShards",
                        f"deleting the shards of the previous plan ({names.shard_dir(old_fp)}) "
                        f"with Job {cleanup_name}",
                    )
                )
                continue
            state = job_state(cleanup)
            if state == "active":
                continue
            self.delete.append(Delete("Job", name, uid(old)))
            if state == "complete":
                self.events.append(
                    EventSpec(
                        "Normal",
                        "OldShardsRemoved",
                        f"removed {names.shard_dir(old_fp)} and sharding Job {name}",
                    )
                )
            else:
                self.events.append(
                    EventSpec(
                        "Warning",
                        "OldShardsLeft",
                        f"cleanup Job {cleanup_name} failed ({job_failure_reason(cleanup)}); "
                        f"{names.shard_dir(old_fp)} is left in the store: delete it by hand",
                    )
                )
