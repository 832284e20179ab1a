"""The worker group: ready, still starting (and why), rolled out to a new template with all its
pods together, restarted as a whole when a rank fails (within the restart budget, which comes back
after a while of serving), or failed at once when a worker says its input cannot work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..api.status import READY, WORKERS_READY
from . import names
from . import status as st
from .observed import (
    Obj,
    annotation,
    bad_input,
    failure,
    meta,
    pod_ready,
    pod_stage,
    revision,
    terminating,
    uid,
)
from .shards import Shards
from .state import PassState
from .status import Cond, EventSpec

# A group that has served this long without interruption gets its whole restart budget back:
# the budget stops crash loops, not the rare failure of a group that runs for months.
RESTART_BUDGET_RESET_SECONDS = 600

# The stages a pod of the group can be in, the most telling first, with their condition reasons.
STAGE_REASONS = (
    ("image", st.IMAGE_PULL_FAILED),
    ("config", st.CONTAINER_CONFIG_ERROR),
    ("unschedulable", st.UNSCHEDULABLE),
    ("staging", st.STAGING),
    ("pending", st.STARTING),
    ("loading", st.LOADING),
)


@dataclass
class Workers:
    """Where the worker group stands, for the WorkersReady condition and the phase."""

    cond: Cond
    ready: int = 0
    replicas: int = 0
    all_ready: bool = False
    stage: str = "none"
    message: str = ""
    budget_exhausted: bool = False
    bad_input: bool = False  # a worker exited with dsworker's bad-input code

    @classmethod
    def not_ready(cls, reason: str, text: str, **kw: Any) -> Workers:
        """WorkersReady False for `reason`; `text` is both the condition's and the status message."""
        return cls(Cond(WORKERS_READY, "False", reason, text), message=text, **kw)


def restart_budget(state: PassState) -> None:
    """The group restarts spent: none after a spec change that follows a failure, none once the
    group has served for the whole reset window (an Event says so), else as last written."""
    state.restarts = 0 if state.retry else (state.previous.group_restarts or 0)
    if state.restarts and _served_since_budget_window(state):
        state.events.append(
            EventSpec(
                "Normal",
                "RestartBudgetReset",
                f"the group has served for {RESTART_BUDGET_RESET_SECONDS // 60} minutes "
                f"without interruption: {state.restarts} spent group restart(s) forgotten",
            )
        )
        state.restarts = 0


def _served_since_budget_window(state: PassState) -> bool:
    """Whether Ready has been True (as last written) for the whole reset window."""
    ready = st.condition(state.previous, READY)
    if ready is None or ready.status != "True":
        return False
    held = (state.observed.now - ready.last_transition_time).total_seconds()
    return held >= RESTART_BUDGET_RESET_SECONDS


def plan_workers(state: PassState, sts: Obj | None, desired: Obj | None, shards: Shards) -> Workers:
    if sts is None:
        if shards.complete and not shards.failed:
            text = "creating the worker StatefulSet"
            return Workers.not_ready(st.STARTING, text, stage="starting")
        return Workers(
            Cond(WORKERS_READY, "False", st.WAITING_FOR_SHARDS, "waiting for the shards"),
            stage="waiting",
        )
    pods = [p for p in state.observed.component_pods(names.WORKER) if not terminating(p)]
    ready = sum(1 for p in pods if pod_ready(p))
    replicas = int((sts.get("spec") or {}).get("replicas") or 0)
    if state.sticky:
        return _still_failed(state, ready, replicas)
    status = sts.get("status") or {}
    settled = int(status.get("observedGeneration") or 0) >= int(meta(sts).get("generation") or 0)
    if desired is not None and annotation(sts, names.TEMPLATE_ANNOTATION) != annotation(
        desired, names.TEMPLATE_ANNOTATION
    ):
        settled = False  # this pass applies a new template; its pods come next pass
    update_revision = status.get("updateRevision")
    stale = [p for p in pods if settled and update_revision and revision(p) != update_revision]
    if stale:
        state.delete_pods(pods)
        state.events.append(
            EventSpec(
                "Normal",
                "RollingOut",
                f"replacing all {len(pods)} worker pods together with the new template",
            )
        )
        text = "replacing the worker group with the new template"
        return Workers.not_ready(st.ROLLING_OUT, text, replicas=replicas, stage="rolling")

    # Only a pod of the current template speaks for the current spec.
    rejected = _bad_input(state, pods, update_revision if settled else None)
    if rejected:
        return Workers.not_ready(
            st.CONFIG_MISMATCH, rejected, ready=ready, replicas=replicas, bad_input=True
        )
    failures = _failures(state, pods)
    if failures:
        return _restart_group(state, pods, failures, ready, replicas)
    if not settled:
        text = f"{ready}/{replicas} workers ready; applying the new worker template"
        return Workers.not_ready(
            st.ROLLING_OUT,
            text,
            ready=ready,
            replicas=replicas,
            stage="rolling",
        )
    return _progress(pods, ready, replicas)


def _still_failed(state: PassState, ready: int, replicas: int) -> Workers:
    """Failed for the workers at this generation: the same condition until the spec changes."""
    old = st.condition(state.previous, WORKERS_READY)
    reason = old.reason if old else st.RESTART_BUDGET_EXHAUSTED
    text = old.message if old else "the restart budget is spent"
    return Workers.not_ready(
        reason,
        text,
        ready=ready,
        replicas=replicas,
        budget_exhausted=reason == st.RESTART_BUDGET_EXHAUSTED,
        bad_input=reason == st.CONFIG_MISMATCH,
    )


def _progress(pods: list[Obj], ready: int, replicas: int) -> Workers:
    """A settled group without failures: all ready, or the stage its pods are in."""
    if len(pods) == replicas and ready == replicas:
        return Workers(
            Cond(WORKERS_READY, "True", st.ALL_WORKERS_READY, f"{ready}/{replicas} workers ready"),
            ready=ready,
            replicas=replicas,
            all_ready=True,
            stage="ready",
        )
    stages = [pod_stage(p) for p in pods]
    for kind, reason in STAGE_REASONS:
        found = [detail for stage, detail in stages if stage == kind]
        if found:
            text = f"{ready}/{replicas} workers ready; {found[0]}"
            return Workers.not_ready(reason, text, ready=ready, replicas=replicas, stage=kind)
    missing = replicas - len(pods)
    text = f"{ready}/{replicas} workers ready; waiting for {missing} pod(s) to be created"
    return Workers.not_ready(
        st.STARTING,
        text,
        ready=ready,
        replicas=replicas,
        stage="pending",
    )


def _restart_group(
    state: PassState, pods: list[Obj], failures: list[tuple[str, str]], ready: int, replicas: int
) -> Workers:
    """One rank down takes the whole torch.distributed group down: replace every pod, within
    the restart budget; past it the deployment is Failed until the spec changes."""
    detail = failures[0][1]
    budget = state.spec.worker.restart_budget
    state.counted += [u for u, _ in failures]
    if state.restarts >= budget:
        text = (
            f"{detail}; the restart budget ({budget} group restarts) is spent: fix the cause "
            "(kubectl logs, Events) and change the spec to try again"
        )
        return Workers.not_ready(
            st.RESTART_BUDGET_EXHAUSTED,
            text,
            ready=ready,
            replicas=replicas,
            budget_exhausted=True,
        )
    state.restarts += 1
    state.delete_pods(pods)
    text = (
        f"{detail}; restarting all {len(pods)} worker pods together "
        f"(group restart {state.restarts} of {budget})"
    )
    state.events.append(EventSpec("Warning", "GroupRestart", st.truncate(text)))
    return Workers.not_ready(st.GROUP_RESTARTING, text, replicas=replicas, stage="restarting")


def _bad_input(state: PassState, pods: list[Obj], current: str | None) -> str:
    """A worker of the `current` template revision that exited with the bad-input code, as
    the sharder does: the plan or the checkpoint cannot work, so the group is not restarted
    (no budget spent) and the deployment fails at once, until the spec changes. Right after a
    spec change, and until its template is rolled out, a pod that said so is an ordinary
    failure or a stale pod: the group restarts or rolls to try the new spec."""
    if state.retry or not current:
        return ""
    seen = {uid(p) for p in pods}
    hints = [h for h in state.observed.failed_pods if uid(h) not in seen and not terminating(h)]
    for pod in [*pods, *hints]:
        if revision(pod) != current:
            continue
        why = bad_input(pod)
        if why:
            state.counted.append(uid(pod))
            return why
    return ""


def _failures(state: PassState, pods: list[Obj]) -> list[tuple[str, str]]:
    """(uid, why) of the failed workers: the live pods', and those seen only in an Event (a pod
    replaced since) unless it is already being replaced."""
    observed = state.observed
    out = [(uid(p), why) for p in pods if (why := failure(p))]
    known = {uid(p) for p in observed.component_pods(names.WORKER)}
    live = {u for u, _ in out}
    for hint in observed.failed_pods:
        u = uid(hint)
        if u in live or terminating(hint):
            continue
        current = [p for p in observed.pods if uid(p) == u]
        if u in known and (not current or terminating(current[0])):
            continue  # already being replaced
        why = failure(hint)
        if why:
            out.append((u, why))
    return out
