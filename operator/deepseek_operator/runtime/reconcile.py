"""One reconcile of one custom resource: read it and its children, plan, apply, write status.

Every kopf handler funnels into Reconciler.trigger(namespace, name). Triggers for the same object
coalesce: while a reconcile runs, more events only mark it dirty and it runs once more after; the
blocking kubernetes client calls run on a small thread pool. A reconcile that raises is retried
with backoff, so the operator converges even when an event was the last one for a while; one
that succeeds is repeated after the resync period (default 300 s), so drift that no watch event
reports (a missed event, a child edited so that it no longer names its owner) is repaired too.

The resync is a timer of this class rather than a kopf timer: kopf timers and daemons put a
finalizer on every object, which the operator must not do (GitOps drift, deletion waiting on the
operator, and its RBAC may not patch the object). Being its own, a timer first asks `standby`
whether kopf peering has paused this replica in favour of another, and then does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from ..planning import Plan, ownership, plan
from ..planning.node_reboot import store_node_names
from ..planning.observed import Obj, Observed, failure, meta, terminating, uid
from . import metrics
from .k8s import Kube, failure_message

log = logging.getLogger("deepseek_operator.reconcile")

Key = tuple[str, str]  # (namespace, name)

MAX_BACKOFF = 60.0
MAX_REMEMBERED_FAILURES = 10000
DEFAULT_RESYNC_SECONDS = 300.0
# How soon an object is looked at again while a controller should create pods and has not (its
# FailedCreate Events are read then; no watch event would come).
RECHECK_SECONDS = 10.0
# How soon a deployment with node-local shards is looked at again: each reconcile reads its
# Nodes' bootIDs, so a node that rebooted (its tmpfs shards gone) is noticed within this even
# when no event comes; a periodic read of a few Nodes rather than a watch of every Node in the
# cluster (which a namespace-scoped install may not read at all).
NODE_CHECK_SECONDS = 30.0
# Each resync comes up to this fraction early, so objects seen together spread out over time.
RESYNC_JITTER = 0.1


class ChildApplyFailed(Exception):
    """The API server failed to store a child (already reported in the status): retried with
    the growing delay of trigger()."""


@dataclass
class _State:
    running: bool = False
    dirty: bool = False
    failures: int = 0
    # The next retry (after a failed reconcile) or resync (after a successful one).
    timer: asyncio.TimerHandle | None = None
    failed_pods: dict[str, dict[str, Any]] = field(default_factory=dict)


class Reconciler:
    """Runs reconcile(namespace, name) for triggers, one at a time per object."""

    def __init__(
        self, kube: Kube, workers: int = 8, resync: float = DEFAULT_RESYNC_SECONDS
    ) -> None:
        self.kube = kube
        # Seconds between level-triggered reconciles of an object with no events; 0: never.
        self.resync = resync
        self._tasks: set[asyncio.Future[None]] = set()  # triggers fired by timers, still running
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reconcile")
        self.states: dict[Key, _State] = {}
        self.phases = metrics.PhaseBook()
        # uids of worker pods whose failure has been acted on: never hinted twice.
        self.counted: dict[str, None] = {}
        # resourceVersion of each custom resource after our own status write: the watch event
        # that write causes needs no reconcile.
        self.own_writes: dict[Key, str] = {}
        # The last store resize the API server refused, per object: it is tried again on every
        # reconcile (the storage class may allow it by now) but logged only when it changes.
        self.refusals: dict[Key, str] = {}
        # The foreign objects last reported per object: logged again only when they change.
        self.foreign: dict[Key, dict[str, str]] = {}
        # The live peers that pause this replica (kopf peering); timers skip their work while any.
        self.standby: Callable[[], list[str]] | None = None

    # ------------------------------------------------------------------------ triggers

    async def trigger(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        state = self.states.setdefault(key, _State())
        state.dirty = True
        if state.running:
            return
        state.running = True
        loop = asyncio.get_running_loop()
        try:
            while state.dirty:
                state.dirty = False
                # A failure seen while the last pass ran may be the one that pass counted.
                hints = [p for p in state.failed_pods.values() if uid(p) not in self.counted]
                state.failed_pods.clear()
                try:
                    result = await loop.run_in_executor(
                        self.pool, self.reconcile, namespace, name, hints
                    )
                except Exception as exc:  # noqa: BLE001 - any failure is retried, never fatal
                    state.failures += 1
                    delay = min(MAX_BACKOFF, 0.5 * 2 ** min(state.failures, 8))
                    log.warning(
                        "reconcile %s/%s failed (%s: %s); retrying in %.1fs",
                        namespace,
                        name,
                        type(exc).__name__,
                        exc,
                        delay,
                    )
                    for pod in hints:  # not acted on: keep them for the retry
                        state.failed_pods.setdefault(uid(pod), pod)
                    self._schedule(loop, key, state, delay, resync=False)
                else:
                    state.failures = 0
                    delay = self.resync_delay() if self.resync > 0 else None
                    if result is not None and result.recheck:
                        delay = min(delay or RECHECK_SECONDS, RECHECK_SECONDS)
                    if result is not None and result.node_check:
                        delay = min(delay or NODE_CHECK_SECONDS, NODE_CHECK_SECONDS)
                    if delay is not None:
                        self._schedule(loop, key, state, delay, resync=True)
        finally:
            state.running = False

    def resync_delay(self) -> float:
        """The resync period, up to RESYNC_JITTER of it early."""
        return self.resync * (1.0 - RESYNC_JITTER * random.random())

    def _schedule(
        self,
        loop: asyncio.AbstractEventLoop,
        key: Key,
        state: _State,
        delay: float,
        resync: bool,
    ) -> None:
        """Replace the object's timer: only the latest retry or resync is pending."""
        if self.states.get(key) is not state:
            return  # deleted meanwhile
        if state.timer is not None:
            state.timer.cancel()
        state.timer = loop.call_later(delay, self._fire, key, state, resync)

    def _fire(self, key: Key, state: _State, resync: bool) -> None:
        if self.states.get(key) is not state:
            return  # forgotten (deleted) since the timer was set
        state.timer = None
        task = asyncio.ensure_future(self._timed(key, state, resync))
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _timed(self, key: Key, state: _State, resync: bool) -> None:
        """A retry or resync, unless another replica leads (kopf paused this one's watches)."""
        loop = asyncio.get_running_loop()
        if self.standby is not None:
            try:
                peers = await loop.run_in_executor(self.pool, self.standby)
            except Exception as exc:  # noqa: BLE001 - cannot tell: act, as an unpaused replica
                log.debug("peering check failed (%s: %s)", type(exc).__name__, exc)
                peers = []
            if peers:
                metrics.PAUSED_TIMERS.inc()
                log.debug("%s/%s: timer skipped, paused in favour of %s", *key, ", ".join(peers))
                delay = self.resync_delay() if self.resync > 0 else MAX_BACKOFF
                self._schedule(loop, key, state, delay, resync=resync)
                return
        if resync:
            metrics.RESYNCS.inc()
            log.debug("resync %s/%s", *key)
        await self.trigger(*key)

    def pod_event(self, namespace: str, owner: str, pod: Mapping[str, Any]) -> None:
        """Remember a worker pod seen failing, in case it is gone by the next List."""
        pod_uid = uid(pod)
        if not pod_uid or pod_uid in self.counted or terminating(pod) or not failure(pod):
            return
        state = self.states.setdefault((namespace, owner), _State())
        state.failed_pods[pod_uid] = dict(pod)

    def is_own_write(self, namespace: str, name: str, resource_version: str | None) -> bool:
        """Whether this version of the custom resource is the one our status write made."""
        return bool(resource_version) and self.own_writes.get((namespace, name)) == resource_version

    def forget(self, namespace: str, name: str) -> None:
        self.own_writes.pop((namespace, name), None)
        self.refusals.pop((namespace, name), None)
        self.foreign.pop((namespace, name), None)
        state = self.states.pop((namespace, name), None)
        if state is not None and state.timer is not None:
            state.timer.cancel()
        self.phases.set((namespace, name), None)

    def close(self) -> None:
        for state in self.states.values():
            if state.timer is not None:
                state.timer.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------ reconcile

    def reconcile(
        self, namespace: str, name: str, failed_pods: list[dict[str, Any]] | None = None
    ) -> Plan | None:
        """Read, plan, apply, delete, write status, post Events. Returns the plan it carried out
        (None when the custom resource is gone)."""
        started = time.monotonic()
        try:
            result = self._reconcile(namespace, name, failed_pods or [])
        except Exception as exc:
            metrics.RECONCILES.labels("error").inc()
            metrics.ERRORS.labels(type(exc).__name__).inc()
            raise
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
        metrics.RECONCILES.labels("ok").inc()
        return result

    def _foreign(
        self, namespace: str, name: str, owner_uid: str, result: Plan, observed: Observed
    ) -> dict[str, str]:
        """Read each child about to be applied that is not known as ours: an object of that name
        that is not ours ("Service r1" -> whose it is) must be left alone."""
        found: dict[str, str] = {}
        for obj in ownership.to_check(result.apply, observed):
            existing = self.kube.get(obj["kind"], namespace, obj["metadata"]["name"])
            why = existing and ownership.foreign_reason(existing, owner_uid, name)
            if why:
                found[ownership.key(obj)] = why
        if found and self.foreign.get((namespace, name)) != found:
            text = "; ".join(f"{k} exists and {why}" for k, why in sorted(found.items()))
            log.warning("%s/%s: left alone: %s", namespace, name, text)
        self.foreign[(namespace, name)] = found
        return found

    def _apply_child(self, namespace: str, name: str, obj: Obj, observed: Observed) -> None:
        """Apply one child; a failure is recorded for the status instead of ending the pass.

        A refusal (4xx: a field of the spec the API server rejects, an admission policy) fails
        the same way on every retry: reported, and tried again at the next event or resync. Any
        other failure (a 500 from a child server-side apply cannot merge, a 409, a timeout) is
        reported too, and the reconcile is retried with a growing delay."""
        child = f"{obj['kind']} {obj['metadata']['name']}"
        try:
            refused = self.kube.apply_or_refusal(obj)
        except (ApiException, HTTPError, OSError) as exc:
            why = failure_message(exc)
            observed.apply_failed[child] = why
            log.warning("%s/%s: the API server failed to store %s: %s", namespace, name, child, why)
            return
        finally:
            metrics.APPLIES.labels(obj["kind"]).inc()
        if refused is not None:
            observed.rejected[child] = refused
            log.warning("%s/%s: the API server refused %s: %s", namespace, name, child, refused)

    def _reconcile(
        self, namespace: str, name: str, failed_pods: list[dict[str, Any]]
    ) -> Plan | None:
        kube = self.kube
        body = kube.deployment(namespace, name)
        if body is None or meta(body).get("deletionTimestamp"):
            self.forget(namespace, name)
            return None
        owner_uid = str(meta(body).get("uid") or "")
        observed = kube.observe(namespace, name, owner_uid)
        observed.failed_pods = failed_pods
        observed.boot_ids = kube.boot_ids(store_node_names(body))
        result = plan(body, observed)
        observed.foreign = self._foreign(namespace, name, owner_uid, result, observed)
        if observed.foreign:
            result = plan(body, observed)  # without those children, and the status that says so
        if result.resize is not None:
            # The one change the API server may refuse for reasons the operator cannot see (the
            # storage class must allow expansion): first, and a refusal is planned around.
            try:
                refused = kube.apply_or_refusal(result.resize)
            except (ApiException, HTTPError, OSError) as exc:
                refused = failure_message(exc)
                observed.apply_failed[ownership.key(result.resize)] = refused
            metrics.APPLIES.labels(result.resize["kind"]).inc()
            if refused is None:
                self.refusals.pop((namespace, name), None)
            else:
                repeated = self.refusals.get((namespace, name)) == refused
                self.refusals[(namespace, name)] = refused
                log.log(
                    logging.DEBUG if repeated else logging.WARNING,
                    "%s/%s: store claim resize refused: %s",
                    namespace,
                    name,
                    refused,
                )
                observed.store_resize_refused = refused
                result = plan(body, observed)

        for obj in result.apply:
            self._apply_child(namespace, name, obj, observed)
        if observed.rejected or observed.apply_failed:
            result = plan(body, observed)  # the same children, and the status that says so
        # Status first: a group restart is counted before its pods go, so a crash in between
        # can only over-count, never restart without counting.
        if result.status_changed:
            written = kube.apply_status(namespace, name, result.status.to_dict()) or {}
            rv = meta(written).get("resourceVersion")
            if rv and meta(written).get("generation") == meta(body).get("generation"):
                self.own_writes[(namespace, name)] = str(rv)
        for gone in result.delete:
            kube.delete(gone.kind, namespace, gone.name, gone.uid, gone.propagation)
        for pin in result.pins:
            kube.pin_pod(namespace, pin.name, pin.uid, pin.node_selector)
        if any(e.reason == "GroupRestart" for e in result.events):
            metrics.GROUP_RESTARTS.inc()
        for pod_uid in result.counted_failures:
            self.counted[pod_uid] = None
        while len(self.counted) > MAX_REMEMBERED_FAILURES:
            self.counted.pop(next(iter(self.counted)))
        for event in result.events:
            kube.post_event(body, event)
        self.phases.set((namespace, name), result.phase)
        if observed.apply_failed:
            # Reported in the status above; raising makes trigger() retry with a growing delay.
            raise ChildApplyFailed("; ".join(sorted(observed.apply_failed)))
        if result.events:
            log.info(
                "%s/%s: %s (%s)",
                namespace,
                name,
                result.phase,
                ", ".join(e.reason for e in result.events),
            )
        return result
