"""Prometheus metrics of the operator, served on their own port (kopf's liveness has another)."""

from __future__ import annotations

import threading

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from ..api import PHASES

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

RECONCILES = Counter(
    "dsop_reconciles",
    "Reconciles of DeepSeekDeployments, by result (ok or error).",
    ["result"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "dsop_reconcile_duration_seconds",
    "Time of one reconcile: read, plan, apply, write status.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
ERRORS = Counter(
    "dsop_reconcile_errors",
    "Reconciles that raised, by exception type.",
    ["error"],
    registry=REGISTRY,
)
RESYNCS = Counter(
    "dsop_resyncs",
    "Reconciles started by the periodic resync (no event asked for them).",
    registry=REGISTRY,
)
PAUSED_TIMERS = Counter(
    "dsop_paused_timer_skips",
    "Retry and resync timers that found this replica paused by kopf peering and did nothing.",
    registry=REGISTRY,
)
APPLIES = Counter(
    "dsop_applies", "Server-side applies of children, by kind.", ["kind"], registry=REGISTRY
)
GROUP_RESTARTS = Counter(
    "dsop_group_restarts", "Worker groups restarted after a pod failed.", registry=REGISTRY
)
DEPLOYMENTS = Gauge(
    "dsop_deployments",
    "DeepSeekDeployments by status.phase (as last written by this operator).",
    ["phase"],
    registry=REGISTRY,
)


class PhaseBook:
    """The last phase of every custom resource, so the per-phase gauge counts each once."""

    def __init__(self) -> None:
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        for phase in PHASES:
            DEPLOYMENTS.labels(phase).set(0)

    def set(self, key: tuple[str, str], phase: str | None) -> None:
        with self._lock:
            if phase is None:
                self._phases.pop(key, None)
            else:
                self._phases[key] = phase
            counts = dict.fromkeys(PHASES, 0)
            for p in self._phases.values():
                counts[p] = counts.get(p, 0) + 1
        for p, n in counts.items():
            DEPLOYMENTS.labels(p).set(n)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Start the /metrics HTTP server on a daemon thread."""
    start_http_server(port, addr=addr, registry=REGISTRY)
