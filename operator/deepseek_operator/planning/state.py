"""One planning pass: what a reconcile does (Plan: apply, delete, status, Events), and the state the
concerns of one pass share (PassState: the inputs, and the outputs each concern adds to)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..api import DeepSeekDeploymentSpec, DeepSeekDeploymentStatus
from ..api.status import Phase
from .objects import Context
from .observed import Obj, Observed, meta, uid
from .status import EventSpec


@dataclass(frozen=True)
class Delete:
    """A child to delete (Background propagation: a Job's pods go with it), only while it is the
    object of this uid (a precondition: a namesake created since is never deleted)."""

    kind: Literal["Job", "Pod", "NetworkPolicy"]
    name: str
    uid: str
    # Foreground: the object stays (terminating) until its pods are gone, so the planner can
    # wait for a sharder to stop before anything else touches its directory.
    propagation: Literal["Background", "Foreground"] = "Background"


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
    # Look again in RECHECK_SECONDS even without an event: a controller that cannot create a
    # pod records only an Event, which the operator does not watch.
    recheck: bool = False
    # Node-local shards on several nodes: held worker pods to place on their node (pinning.py).
    pins: list[Any] = field(default_factory=list)
    # Node-local shards: look again in NODE_CHECK_SECONDS, so that a node that rebooted (its
    # tmpfs shards gone) is noticed even when no watch event comes (node_reboot.py).
    node_check: bool = False

    @property
    def status_changed(self) -> bool:
        return self.status.to_dict() != self.previous.to_dict()

    @property
    def phase(self) -> Phase | None:
        return self.status.phase


@dataclass
class PassState:
    """One planning pass of a valid spec: the inputs, and the outputs the concerns (store, shards,
    workers, validated) accumulate."""

    ctx: Context
    observed: Observed
    previous: DeepSeekDeploymentStatus
    warnings: list[str]
    # The deployment was Failed at an earlier generation: this spec gets a fresh start.
    retry: bool
    # Failed for the workers at this generation (budget spent, or bad input): holds until the
    # spec changes.
    sticky: bool
    apply: list[Obj] = field(default_factory=list)
    delete: list[Delete] = field(default_factory=list)
    events: list[EventSpec] = field(default_factory=list)
    counted: list[str] = field(default_factory=list)
    resize: Obj | None = None
    pins: list[Any] = field(default_factory=list)
    restarts: int = 0  # group restarts spent of the budget
    recheck: bool = False  # see Plan.recheck
    memory_warning: str = ""  # the plan fits its devices with little headroom (memory.py)
    config_known: bool = False  # the model-config annotation gave config.json (checked already)
    # Node-local shards written again after the node rebooted: node index -> the uid of the
    # completed Job whose output the reboot wiped ("" when none was there). Their recorded
    # completion no longer counts (node_reboot.py).
    resharding: dict[int, str] = field(default_factory=dict)

    @property
    def spec(self) -> DeepSeekDeploymentSpec:
        return self.ctx.spec

    def delete_pods(self, pods: list[Obj]) -> None:
        for pod in pods:
            self.delete.append(Delete("Pod", str(meta(pod).get("name")), uid(pod)))
