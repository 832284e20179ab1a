"""Conditions, phase and Events from what the planner found: pure, so every reason is tested.

Conditions follow metav1.Condition: lastTransitionTime changes only when the status (True, False,
Unknown) changes; reason and message may change without a transition. Every phase change yields
one Event, as do the actions the planner takes (group restart, roll-out, shard cleanup).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from ..api.status import (
    CONDITION_TYPES,
    READY,
    SHARDED,
    VALIDATED,
    WORKERS_READY,
    Condition,
    DeepSeekDeploymentStatus,
    Phase,
)

EventType = Literal["Normal", "Warning"]
ConditionStatus = Literal["True", "False", "Unknown"]

MAX_MESSAGE = 1024

# Condition reasons (documented in docs/operator.md, one by one).
VALID = "Valid"
VALID_WITH_WARNINGS = "ValidWithWarnings"
INVALID_SPEC = "InvalidSpec"
INVALID_MODEL_CONFIG = "InvalidModelConfig"
CONFIG_MISMATCH = "ConfigMismatch"
# Valid, but spec.sharding.store.pvc asks the existing claim for something it does not get (a
# smaller size, another storage class, a resize the API server refused).
STORE_SPEC_NOT_APPLIED = "StoreSpecNotApplied"
# config.json and the plan need more device memory per rank than spec.worker.accelerator has.
INSUFFICIENT_MEMORY = "InsufficientMemory"
NOT_VALIDATED = "NotValidated"
# Valid to the CRD, but the API server refused a child built from it (a field passed through to
# pods that it rejects, an admission policy): the message is the API server's.
CHILD_REJECTED = "ChildRejected"
# The API server failed to store a child for another reason (HTTP 5xx, 409, a timeout): the
# message is its answer, and the operator retries with a growing delay.
CHILD_APPLY_FAILED = "ChildApplyFailed"
# An object the operator did not create (a user's, another deployment's) holds a child's name:
# the operator leaves it alone and holds that child.
FOREIGN_OBJECT = "ForeignObject"

SHARDS_COMPLETE = "ShardsComplete"
SHARDING_DISABLED = "ShardingDisabled"
STORE_NOT_BOUND = "StoreNotBound"
SHARDING_PENDING = "ShardingPending"
SHARDING_IN_PROGRESS = "ShardingInProgress"
SHARDING_FAILED = "ShardingFailed"
# A node of a node-local store rebooted (another bootID): its tmpfs shards are written again.
NODE_REBOOTED = "NodeRebooted"
# The sharder's termination reasons for infrastructure (dsworker.contract.errors): Sharded False
# with the fix, the spec still valid.
SOURCE_MISSING = "SourceMissing"
STORAGE_FULL = "StorageFull"
STORAGE_NOT_WRITABLE = "StorageNotWritable"
OUTPUT_BUSY = "OutputBusy"

# A container (the sharder's or a worker's) cannot start: Sharded or WorkersReady False.
IMAGE_PULL_FAILED = "ImagePullFailed"
CONTAINER_CONFIG_ERROR = "ContainerConfigError"
# The Job or StatefulSet controller cannot create a pod (its FailedCreate Event: a ResourceQuota,
# a Pod Security level, a policy webhook): Sharded or WorkersReady False.
POD_CREATION_FAILED = "PodCreationFailed"

WAITING_FOR_SHARDS = "WaitingForShards"
UNSCHEDULABLE = "Unschedulable"
STARTING = "Starting"
STAGING = "Staging"
LOADING = "Loading"
ROLLING_OUT = "RollingOut"
GROUP_RESTARTING = "GroupRestarting"
RESTART_BUDGET_EXHAUSTED = "RestartBudgetExhausted"
ALL_WORKERS_READY = "AllWorkersReady"
# Ascend on several nodes: the HCCL rank table lacks a pod's IP or its device plugin annotation.
RANK_TABLE_INCOMPLETE = "RankTableIncomplete"

SERVING = "Serving"
SERVING_PREVIOUS_PLAN = "ServingPreviousPlan"
NOT_READY = "NotReady"

WARNING_PHASES = frozenset({"Failed", "Degraded"})


@dataclass(frozen=True)
class Cond:
    """A condition as the planner decides it (no timestamps yet)."""

    type: str
    status: ConditionStatus
    reason: str
    message: str = ""


@dataclass(frozen=True)
class EventSpec:
    """A Kubernetes Event to post on the custom resource."""

    type: EventType
    reason: str
    message: str


@dataclass
class Summary:
    """The planner's findings, from which the status is written."""

    phase: Phase
    message: str
    conditions: list[Cond]
    generation: int
    fingerprint: str | None = None
    model_name: str | None = None
    world_size: int | None = None
    moe_ep: int | None = None
    runtime: str | None = None
    shards: dict[str, Any] | None = None
    ready_workers: str | None = None
    group_restarts: int | None = None
    endpoint: str | None = None
    events: list[EventSpec] = field(default_factory=list)


def truncate(text: str, n: int = MAX_MESSAGE) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def merge_conditions(
    previous: Iterable[Condition], new: Iterable[Cond], generation: int, now: datetime
) -> list[Condition]:
    """New conditions keep the previous lastTransitionTime when their status did not change."""
    before = {c.type: c for c in previous}
    out: list[Condition] = []
    for cond in new:
        old = before.get(cond.type)
        since = old.last_transition_time if old is not None and old.status == cond.status else now
        out.append(
            Condition(
                type=cond.type,
                status=cond.status,
                reason=cond.reason,
                message=truncate(cond.message, 32768),
                last_transition_time=since.replace(microsecond=0),
                observed_generation=generation,
            )
        )
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(out, key=lambda c: order.get(c.type, len(order)))


def build_status(
    previous: DeepSeekDeploymentStatus, summary: Summary, now: datetime
) -> DeepSeekDeploymentStatus:
    """The status to write: the summary with condition timestamps carried over."""
    return DeepSeekDeploymentStatus(
        phase=summary.phase,
        observed_generation=summary.generation,
        conditions=merge_conditions(
            previous.conditions, summary.conditions, summary.generation, now
        ),
        fingerprint=summary.fingerprint,
        model_name=summary.model_name,
        world_size=summary.world_size,
        moe_ep=summary.moe_ep,
        runtime=summary.runtime,
        shards=summary.shards,
        ready_workers=summary.ready_workers,
        group_restarts=summary.group_restarts,
        endpoint=summary.endpoint,
        message=truncate(summary.message) if summary.message else None,
    )


def transition_events(
    previous: DeepSeekDeploymentStatus, status: DeepSeekDeploymentStatus
) -> list[EventSpec]:
    """One Event per phase change, Warning for Failed and Degraded."""
    if previous.phase == status.phase or status.phase is None:
        return []
    kind: EventType = "Warning" if status.phase in WARNING_PHASES else "Normal"
    was = previous.phase or "new"
    text = f"{was} -> {status.phase}"
    if status.message:
        text += f": {status.message}"
    return [EventSpec(kind, status.phase, truncate(text))]


def condition(status: DeepSeekDeploymentStatus, kind: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == kind), None)


def ready_condition(phase: Phase, serving_previous: bool, message: str) -> Cond:
    """Ready is True while a group serves: the current plan's, or the previous one's during a
    re-shard."""
    if phase == "Ready":
        return Cond(READY, "True", SERVING, message)
    if serving_previous:
        return Cond(READY, "True", SERVING_PREVIOUS_PLAN, message)
    return Cond(READY, "False", phase if phase != "Ready" else NOT_READY, message)


__all__ = [
    "READY",
    "SHARDED",
    "VALIDATED",
    "WORKERS_READY",
    "Cond",
    "EventSpec",
    "Summary",
    "build_status",
    "condition",
    "merge_conditions",
    "ready_condition",
    "transition_events",
]
