"""What the operator read from the cluster for one custom resource, and how to read it.

Children are plain dicts as the API server returns them (camelCase JSON), so the planner can be
fed straight from a List call in the operator and from literals in unit tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from . import names

JobState = Literal["active", "complete", "failed"]
Obj = dict[str, Any]

MAX_MESSAGE = 1024
EXIT_BAD_INPUT = 2  # dsworker's exit code for a checkpoint or plan that cannot work


@dataclass
class Observed:
    """The children of one custom resource as last read, plus the clock."""

    jobs: list[Obj] = field(default_factory=list)
    statefulsets: list[Obj] = field(default_factory=list)
    pods: list[Obj] = field(default_factory=list)
    claims: list[Obj] = field(default_factory=list)
    network_policies: list[Obj] = field(default_factory=list)
    # Worker pods seen failing in a watch event: the StatefulSet controller may delete a Failed pod
    # before the next List, and the group must still restart.
    failed_pods: list[Obj] = field(default_factory=list)
    # The API server's answer when it refused the store claim resize this reconcile planned (a
    # storage class without allowVolumeExpansion, ...): the planner reports it and plans again.
    store_resize_refused: str | None = None
    # Children the API server refused to store in this reconcile ("StatefulSet r1-worker" -> its
    # message): a 4xx for something in the spec it passes through (resources, env, tolerations,
    # affinity) or an admission policy. The planner reports them; nothing retries faster.
    rejected: dict[str, str] = field(default_factory=dict)
    # Children the API server failed to store for another reason (a 500 from server-side apply
    # of a child it cannot merge, a timeout, 503): reported like a refusal, and the reconcile is
    # retried with a growing delay (the cause may pass).
    apply_failed: dict[str, str] = field(default_factory=dict)
    # Objects that already exist under a child's name and are not this deployment's ("Service
    # r1" -> whose it is): never applied over, adopted or deleted (see ownership.py).
    foreign: dict[str, str] = field(default_factory=dict)
    # The newest FailedCreate Event of each Job or StatefulSet short of pods ("Job r1-shard-..."
    # -> its message): a ResourceQuota, a Pod Security level or a policy engine that refuses the
    # pods is seen only there.
    creation_failures: dict[str, str] = field(default_factory=dict)
    # status.nodeInfo.bootID of each node of a node-local store, as read by the shell: a node
    # missing (not readable) or with an empty one is unknown (node_reboot.py).
    boot_ids: dict[str, str] = field(default_factory=dict)
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    def component_pods(self, component: str) -> list[Obj]:
        return [p for p in self.pods if label(p, names.COMPONENT_LABEL) == component]

    def job(self, name: str) -> Obj | None:
        return next((j for j in self.jobs if meta(j).get("name") == name), None)

    def jobs_of(self, component: str) -> list[Obj]:
        return [j for j in self.jobs if label(j, names.COMPONENT_LABEL) == component]

    def statefulset(self, name: str) -> Obj | None:
        return next((s for s in self.statefulsets if meta(s).get("name") == name), None)

    def claim(self, name: str) -> Obj | None:
        return next((c for c in self.claims if meta(c).get("name") == name), None)

    def network_policy(self, name: str) -> Obj | None:
        return next((n for n in self.network_policies if meta(n).get("name") == name), None)


def short_of_pods(observed: Observed) -> list[tuple[str, Obj]]:
    """The Jobs and StatefulSets whose pods the controllers should have created and have not:
    a Job still running (not suspended) without any pod, a StatefulSet with fewer pods than
    replicas, as (kind, object): the items of a List carry no kind. Their FailedCreate Events
    say why (read by the shell, see creation_failures)."""
    out: list[tuple[str, Obj]] = []
    for job in observed.jobs:
        suspended = (job.get("spec") or {}).get("suspend")
        if terminating(job) or suspended or job_state(job) != "active":
            continue
        if not pods_of_job(str(meta(job).get("name")), observed.pods):
            out.append(("Job", job))
    for sts in observed.statefulsets:
        replicas = int((sts.get("spec") or {}).get("replicas") or 0)
        owned = [p for p in observed.pods if _controlled_by(p, uid(sts))]
        if not terminating(sts) and len(owned) < replicas:
            out.append(("StatefulSet", sts))
    return out


def _controlled_by(obj: Mapping[str, Any], owner_uid: str) -> bool:
    refs = meta(obj).get("ownerReferences") or ()
    return any(r.get("controller") and r.get("uid") == owner_uid for r in refs)


def creation_failure(observed: Observed, kind: str, name: str) -> str | None:
    return observed.creation_failures.get(f"{kind} {name}")


def meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def label(obj: Mapping[str, Any], key: str) -> str | None:
    return (meta(obj).get("labels") or {}).get(key)


def annotation(obj: Mapping[str, Any], key: str) -> str | None:
    return (meta(obj).get("annotations") or {}).get(key)


def terminating(obj: Mapping[str, Any]) -> bool:
    return bool(meta(obj).get("deletionTimestamp"))


def _true(conditions: Iterable[Mapping[str, Any]] | None, kind: str) -> Mapping[str, Any] | None:
    return next(
        (c for c in conditions or () if c.get("type") == kind and c.get("status") == "True"), None
    )


# ------------------------------------------------------------------------------------- Jobs


def job_state(job: Mapping[str, Any]) -> JobState:
    conds = (job.get("status") or {}).get("conditions")
    if _true(conds, "Complete"):
        return "complete"
    if _true(conds, "Failed"):
        return "failed"
    return "active"


def job_failure_reason(job: Mapping[str, Any]) -> str:
    cond = _true((job.get("status") or {}).get("conditions"), "Failed") or {}
    text = cond.get("message") or cond.get("reason") or "failed"
    return str(text)


def pods_of_job(job_name: str, pods: Iterable[Obj]) -> list[Obj]:
    return [
        p
        for p in pods
        if label(p, names.JOB_NAME_LABEL) == job_name or label(p, "job-name") == job_name
    ]


@dataclass
class Termination:
    """The last words of a Job's container: its exit code and what it wrote to the termination
    log (the sharder's JSON summary or {"error": ...}; the log tail otherwise)."""

    exit_code: int | None
    message: str
    summary: dict[str, Any] | None = None
    error: str | None = None
    reason: str | None = None  # dsworker's termination reason (contract.errors), when it gave one

    @property
    def bad_input(self) -> bool:
        return self.exit_code == EXIT_BAD_INPUT


def _terminated_states(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    out = []
    for cs in (pod.get("status") or {}).get("containerStatuses") or ():
        for key in ("state", "lastState"):
            term = (cs.get(key) or {}).get("terminated")
            if term:
                out.append(term)
    return out


def termination(pods: Iterable[Obj], succeeded: bool) -> Termination | None:
    """The termination record of the newest pod that ended as asked (succeeded or failed)."""
    best: tuple[str, Mapping[str, Any]] | None = None
    for pod in pods:
        for term in _terminated_states(pod):
            if (term.get("exitCode") == 0) != succeeded:
                continue
            finished = str(term.get("finishedAt") or "")
            if best is None or finished >= best[0]:
                best = (finished, term)
    if best is None:
        return None
    term = best[1]
    text = str(term.get("message") or "").strip()
    out = Termination(exit_code=term.get("exitCode"), message=text[-MAX_MESSAGE:])
    try:
        parsed = json.loads(text) if text.startswith("{") else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        if "error" in parsed:
            out.error = str(parsed["error"])[:MAX_MESSAGE]
            if isinstance(parsed.get("reason"), str):
                out.reason = parsed["reason"][:64]
        else:
            out.summary = parsed
    elif not succeeded:
        reason = term.get("reason") or "Error"
        out.error = text[-MAX_MESSAGE:] or f"exit code {term.get('exitCode')} ({reason})"
    return out


# ------------------------------------------------------------------------------------- Pods


def pod_ready(pod: Mapping[str, Any]) -> bool:
    return _true((pod.get("status") or {}).get("conditions"), "Ready") is not None


def unschedulable(pod: Mapping[str, Any]) -> str | None:
    """The scheduler's message when the pod cannot be placed."""
    for c in (pod.get("status") or {}).get("conditions") or ():
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            return str(c.get("message") or c.get("reason") or "unschedulable")
    return None


def failure(pod: Mapping[str, Any]) -> str | None:
    """Why a worker pod breaks its group: it failed, or a container of it restarted."""
    status = pod.get("status") or {}
    pod_name = meta(pod).get("name", "?")
    if status.get("phase") == "Failed":
        why = status.get("message") or status.get("reason") or "phase Failed"
        return f"pod {pod_name} failed: {why}"
    for cs in status.get("containerStatuses") or ():
        if int(cs.get("restartCount") or 0) > 0:
            last = (cs.get("lastState") or {}).get("terminated") or {}
            detail = ""
            if last:
                detail = f" (exit code {last.get('exitCode')}, {last.get('reason') or 'Error'}"
                msg = str(last.get("message") or "").strip()
                detail += f": {msg[-300:]})" if msg else ")"
            return (
                f"pod {pod_name} container {cs.get('name')} restarted "
                f"{cs.get('restartCount')} time(s){detail}"
            )
    return None


def bad_input(pod: Mapping[str, Any]) -> str | None:
    """What a worker pod's container said when it exited with dsworker's bad-input code (the
    checkpoint or plan cannot work: restarting cannot help), else None."""
    status = pod.get("status") or {}
    for cs in [
        *(status.get("initContainerStatuses") or ()),
        *(status.get("containerStatuses") or ()),
    ]:
        single = {"status": {"containerStatuses": [cs]}}
        term = termination([single], succeeded=False)
        if term is not None and term.bad_input:
            detail = term.error or term.message or f"exit code {EXIT_BAD_INPUT}"
            return f"worker pod {meta(pod).get('name', '?')} ({cs.get('name')}): {detail}"
    return None


# Waiting reasons of a container that will not start until something is fixed (the kubelet
# retries, but only a fixed image name, registry credential, ConfigMap or Secret helps).
IMAGE_PROBLEMS = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
)
CONFIG_PROBLEMS = frozenset({"CreateContainerConfigError", "CreateContainerError"})


def container_problem(pod: Mapping[str, Any]) -> tuple[Literal["image", "config"], str] | None:
    """("image" or "config", detail) when a container of the pod cannot start: its image cannot be
    pulled, or the kubelet cannot create it (a missing Secret or ConfigMap key, ...)."""
    status = pod.get("status") or {}
    for cs in [
        *(status.get("initContainerStatuses") or ()),
        *(status.get("containerStatuses") or ()),
    ]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in IMAGE_PROBLEMS or reason in CONFIG_PROBLEMS:
            message = str(waiting.get("message") or "").strip()
            detail = f"pod {meta(pod).get('name', '?')} container {cs.get('name')}: {reason}" + (
                f": {message[-MAX_MESSAGE // 2 :]}" if message else ""
            )
            return ("image" if reason in IMAGE_PROBLEMS else "config"), detail
    return None


PodStage = Literal["unschedulable", "image", "config", "pending", "staging", "loading", "ready"]


def pod_stage(pod: Mapping[str, Any]) -> tuple[PodStage, str]:
    """Where one worker pod is on its way to serving, with a detail for the status message."""
    name = meta(pod).get("name", "?")
    if pod_ready(pod):
        return "ready", ""
    why = unschedulable(pod)
    if why:
        return "unschedulable", f"pod {name} cannot be scheduled: {why}"
    problem = container_problem(pod)
    if problem:
        return problem
    status = pod.get("status") or {}
    for cs in status.get("initContainerStatuses") or ():
        state = cs.get("state") or {}
        if (state.get("terminated") or {}).get("exitCode") == 0:
            continue
        waiting = state.get("waiting") or {}
        detail = f": {waiting.get('reason')}" if waiting.get("reason") else ""
        return "staging", f"pod {name} is staging its shards{detail}"
    if not status.get("containerStatuses"):
        return "pending", f"pod {name} is starting"
    return "loading", f"pod {name} is loading the model"


def revision(pod: Mapping[str, Any]) -> str | None:
    return label(pod, names.REVISION_LABEL)


def uid(obj: Mapping[str, Any]) -> str:
    return str(meta(obj).get("uid") or "")
