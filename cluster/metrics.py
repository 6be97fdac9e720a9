"""Prometheus metrics of one router, named after vLLM's.

vLLM exports ``vllm:<name>``; the router exports the same names, meanings
and labels (``model_name``; ``position`` for the per-position counter) under
``specray:<name>``, so dashboards built for vLLM work after a prefix swap.
Counters appear with prometheus_client's ``_total`` suffix, as vLLM's do.
Each router has its own registry (no process-global state) served on
loopback. Failures and restarts have no vLLM counterpart and are specray's
own (``specray:draft_restarts_total`` and its kin, below).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from specray.actors.sampling.rejection import RejectionResult

PREFIX = "specray:"
LOOPBACK = "127.0.0.1"

# vLLM's bucket boundaries for these histograms.
TTFT_BUCKETS: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
)
TTFT_BUCKETS += (2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS: tuple[float, ...] = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
)
ITL_BUCKETS += (2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS: tuple[float, ...] = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
)
E2E_BUCKETS += (60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class RouterMetrics:
    """The router's counters, histograms and gauges, and their HTTP endpoint."""

    def __init__(self, model_name: str, num_positions: int = 0) -> None:
        """``num_positions``: draft positions whose per-position series exist from the start."""
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def counter(name: str, doc: str, extra: Sequence[str] = ()) -> Counter:
            return Counter(PREFIX + name, doc, [*labels, *extra], registry=self.registry)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=self.registry)

        self.num_drafts = counter("spec_decode_num_drafts", "Number of spec decoding drafts.")
        self.num_draft_tokens = counter("spec_decode_num_draft_tokens", "Number of draft tokens.")
        self.num_accepted_tokens = counter(
            "spec_decode_num_accepted_tokens", "Number of accepted tokens."
        )
        self.accepted_per_pos = counter(
            "spec_decode_num_accepted_tokens_per_pos",
            "Accepted tokens per draft position.",
            ("position",),
        )
        self.ttft = histogram(
            "time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self.itl = histogram(
            "inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            E2E_BUCKETS,
        )
        self.running = gauge("num_requests_running", "Number of requests in model execution.")
        self.waiting = gauge("num_requests_waiting", "Number of requests waiting to be processed.")
        self.replica_failures = counter(
            "replica_failures", "Replicas lost (died, failed or hung).", ("kind",)
        )
        self.draft_restarts = counter(
            "draft_restarts", "Draft replicas started to replace lost ones."
        )
        self.target_restarts = counter(
            "target_restarts", "Target groups started (gang restart) to replace lost ones."
        )
        self.fallbacks = counter(
            "spec_decode_fallbacks",
            "Requests whose draft replica was lost mid-request (target-only until re-attached).",
        )
        self.targets_up = gauge("target_replicas_up", "Target replicas taking requests.")
        self.prefix_queries = counter(
            "prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_hits = counter(
            "prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        for position in range(num_positions):
            self.accepted_per_pos.labels(model_name, str(position))
        for family in (self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens):
            family.labels(model_name)
        for family in (self.draft_restarts, self.target_restarts, self.fallbacks):
            family.labels(model_name)
        for family in (self.prefix_queries, self.prefix_hits):
            family.labels(model_name)
        for histogram_family in (self.ttft, self.itl, self.e2e):  # series exist from the start
            histogram_family.labels(model_name)
        for kind in ("draft", "target"):
            self.replica_failures.labels(model_name, kind)
        self._server: Any = None

    def observe_round(self, rejection: RejectionResult) -> None:
        """One round's drafts, counted as vLLM does: a draft is one request's
        non-empty proposal; positions count from 0."""
        name = self.model_name
        drafted = [n for n in rejection.num_draft_tokens if n > 0]
        if not drafted:
            return
        self.num_drafts.labels(name).inc(len(drafted))
        self.num_draft_tokens.labels(name).inc(sum(drafted))
        self.num_accepted_tokens.labels(name).inc(sum(rejection.num_accepted))
        for position, hits in enumerate(rejection.acceptance_by_position().accepted):
            self.accepted_per_pos.labels(name, str(position)).inc(hits)

    def observe_prefix_cache(self, queries: int, hits: int) -> None:
        """Prefix cache lookups: tokens offered, and tokens found cached."""
        if queries:
            self.prefix_queries.labels(self.model_name).inc(queries)
            self.prefix_hits.labels(self.model_name).inc(hits)

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        """Time between two chunks of a request (vLLM: between engine steps)."""
        self.itl.labels(self.model_name).observe(seconds)

    def observe_finished(self, seconds: float) -> None:
        self.e2e.labels(self.model_name).observe(seconds)

    def set_queues(self, running: int, waiting: int) -> None:
        self.running.labels(self.model_name).set(running)
        self.waiting.labels(self.model_name).set(waiting)

    def observe_failure(self, kind: str) -> None:
        """A replica of ``kind`` ("draft" | "target") was lost."""
        self.replica_failures.labels(self.model_name, kind).inc()

    def observe_restart(self, kind: str) -> None:
        """A replica of ``kind`` was started to replace a lost one."""
        family = self.draft_restarts if kind == "draft" else self.target_restarts
        family.labels(self.model_name).inc()

    def observe_fallbacks(self, count: int) -> None:
        self.fallbacks.labels(self.model_name).inc(count)

    def set_targets_up(self, count: int) -> None:
        self.targets_up.labels(self.model_name).set(count)

    def serve(self, port: int = 0) -> int:
        """Serve ``/metrics`` on 127.0.0.1:``port`` (0 picks a free one); returns the port."""
        if self._server is None:
            self._server, _ = start_http_server(port, addr=LOOPBACK, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
