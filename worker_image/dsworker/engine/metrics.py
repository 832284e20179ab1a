"""Prometheus metrics of the serving rank, in one registry per server (tests run several).

Names carry the `dsworker_` prefix and base units (seconds, bytes); the list is in docs/serving.md.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# The *_created series double the output and no dashboard of ours reads them.
disable_created_metrics()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """All serving metrics; the engine loop and the HTTP handlers update them."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        # Long on purpose: one flat declaration per metric with its help text (docs/serving.md
        # lists them all); splitting it would only scatter the list.
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "dsworker_requests",
            "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.refused_connections = Counter(
            "dsworker_refused_connections",
            "HTTP connections closed by the server's bounds: max_connections (answered 503) or "
            "read_timeout (a request that did not arrive whole in time, answered 408).",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "dsworker_prompt_tokens", "Prompt tokens admitted to the engine.", registry=r
        )
        self.generation_tokens = Counter(
            "dsworker_generation_tokens", "Tokens generated.", registry=r
        )
        self.finished = Counter(
            "dsworker_finished_sequences",
            "Sequences finished, by finish_reason.",
            ["reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "dsworker_time_to_first_token_seconds",
            "From request admission to its first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "dsworker_inter_token_latency_seconds",
            "Between consecutive generated tokens of one sequence.",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "dsworker_request_latency_seconds",
            "From request admission to its last token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "dsworker_step_seconds",
            "Duration of one engine step (broadcast, forward, sampling).",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "dsworker_request_queue_seconds",
            "From request arrival to its first step (waiting for a KV slot and pages).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_usage = Gauge(
            "dsworker_kv_cache_usage_ratio",
            "Share of the KV cache (pages, or slots without paging) running sequences hold; "
            "pages kept only for prefix caching count as free.",
            registry=r,
        )
        self.running = Gauge(
            "dsworker_running_batch_size", "Sequences holding a KV slot.", registry=r
        )
        self.waiting = Gauge(
            "dsworker_waiting_requests", "Requests queued for a KV slot.", registry=r
        )
        self.load_seconds = Gauge(
            "dsworker_load_seconds", "Seconds rank 0 took to load its weights.", registry=r
        )
        self.load_bytes = Gauge(
            "dsworker_load_bytes", "Bytes of weights rank 0 loaded.", registry=r
        )
        self.load_gbps = Gauge(
            "dsworker_load_gigabytes_per_second", "Rank 0 weight-load throughput.", registry=r
        )
        self.warmup_seconds = Gauge(
            "dsworker_warmup_seconds", "Seconds the warm-up forward passes took.", registry=r
        )
        self.dropped_rows = Counter(
            "dsworker_dropped_routed_rows",
            "Routed token rows dropped by the routing cutoff or a full AllToAll buffer.",
            registry=r,
        )
        self.rejected_steps = Counter(
            "dsworker_rejected_steps",
            "Engine steps every rank refused (e.g. a full AllToAll buffer); their requests failed.",
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            "dsworker_prefix_cache_hit_tokens",
            "Prompt tokens whose KV cache came from an earlier sequence's pages.",
            registry=r,
        )
        self.preemptions = Counter(
            "dsworker_preemptions",
            "Sequences that gave their KV pages back to an older one and were computed again.",
            registry=r,
        )
        self.draft_tokens = Counter(
            "dsworker_spec_draft_tokens",
            "MTP draft tokens the main model verified (speculative decoding).",
            registry=r,
        )
        self.accepted_draft_tokens = Counter(
            "dsworker_spec_accepted_tokens",
            "MTP draft tokens the main model accepted; accepted / draft is the acceptance rate.",
            registry=r,
        )
        self.ready = Gauge("dsworker_ready", "1 once weights are loaded and warmed up.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
