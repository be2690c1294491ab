"""Prometheus metrics of a daemon (``GET /metrics``, text format), named as vLLM names its own.

Every daemon already writes each thing that happens to its timeline; ``ServingMetrics`` is a
timeline observer, so the metrics and the timeline can never disagree. Times are model seconds
(wall / TDF), as in every result of the testbed. The router adds what only it sees: when each
token reached the client side (TTFT and inter-token latency). Queue depths and KV use are read
from the node's status when scraped. Names and meanings: docs/api.md#metrics.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                     120.0, 300.0, 600.0)
TOKEN_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STATUS_GAUGES = (("queue_depth", "pdtb:num_requests_waiting", "Requests queued on this node"),
                 ("batch_size", "pdtb:num_requests_running", "Requests in the node's current batch"),
                 ("kv_used_bytes", "pdtb:kv_cache_used_bytes", "KV cache bytes in use (model bytes)"),
                 ("kv_free_bytes", "pdtb:kv_cache_free_bytes", "KV cache bytes free (model bytes)"))


class _StatusCollector:
    """Gauges read from the node's live status at scrape time."""

    def __init__(self, status: Callable[[], dict[str, Any]]):
        self.status = status

    def collect(self) -> Iterable[GaugeMetricFamily]:
        now = self.status()
        for key, name, doc in STATUS_GAUGES:
            if isinstance(now.get(key), (int, float)):
                yield GaugeMetricFamily(name, doc, value=float(now[key]))


class ServingMetrics:
    """One daemon's registry; ``observe`` takes each timeline record."""

    def __init__(self, status: Callable[[], dict[str, Any]] | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pdtb:requests", "Requests ended, by outcome (completed, failed, rejected)",
                                ["outcome"], registry=r)
        self.ttft = Histogram("pdtb:time_to_first_token_seconds", "Arrival at the router to its first token "
                              "(model s)", buckets=LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram("pdtb:inter_token_latency_seconds", "Gap between consecutive tokens at the router "
                             "(model s)", buckets=TOKEN_BUCKETS_S, registry=r)
        self.e2e = Histogram("pdtb:e2e_request_latency_seconds", "Arrival to the last token (model s)",
                             buckets=LATENCY_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("pdtb:prompt_tokens", "Prompt tokens of completed requests", registry=r)
        self.generation_tokens = Counter("pdtb:generation_tokens", "Output tokens of completed requests",
                                         registry=r)
        self.kv_bytes = Counter("pdtb:kv_transfer_bytes", "KV bytes on the wire (byte-scaled), by direction",
                                ["direction"], registry=r)
        self.kv_duration = Histogram("pdtb:kv_transfer_duration_seconds", "KV handoff duration, sender side "
                                     "(model s)", buckets=LATENCY_BUCKETS_S, registry=r)
        self.kv_failures = Counter("pdtb:kv_transfer_failures", "KV handoffs that failed", registry=r)
        self.kv_dropped = Counter("pdtb:kv_datagrams_dropped", "SRD datagrams the KV receiver dropped (malformed, "
                                  "unauthenticated, replayed, ...), by reason", ["reason"], registry=r)
        self.step_lateness = Histogram("pdtb:step_lateness_seconds", "How late a compute step's deadline was "
                                       "met on the wall clock (model s)", buckets=TOKEN_BUCKETS_S, registry=r)
        self.auth_rejected = Counter("pdtb:internal_auth_rejected", "Internal API calls refused for a missing "
                                     "or wrong token", registry=r)
        if status is not None:
            r.register(_StatusCollector(status))
        self._arrival: dict[str, float] = {}
        self._kv_start: dict[str, float] = {}
        self._dropped: dict[str, int] = {}  # kv_dropped records carry running totals per reason

    def observe(self, rec: dict[str, Any]) -> None:
        """Update the metrics from one timeline record."""
        event, rid, t = rec["event"], rec.get("request_id"), rec["t_model"]
        if event == "arrival" and rid:
            self._arrival[rid] = t
        elif event == "done" and rid:
            self.requests.labels("completed").inc()
            self.prompt_tokens.inc(rec.get("prompt_tokens") or 0)
            self.generation_tokens.inc(rec.get("output_tokens") or 0)
            start = self._arrival.pop(rid, None)
            if start is not None:
                self.e2e.observe(max(0.0, t - start))
        elif event == "failed" and rid:
            rejected = str(rec.get("reason", "")).startswith("rejected")
            self.requests.labels("rejected" if rejected else "failed").inc()
            self._arrival.pop(rid, None)
        elif event == "kv_start" and rid:
            self._kv_start[rid] = t
        elif event == "kv_end" and rid:
            start = self._kv_start.pop(rid, None)
            if rec.get("ok"):
                self.kv_bytes.labels("sent").inc(rec.get("bytes") or 0)
                if start is not None:
                    self.kv_duration.observe(max(0.0, t - start))
            else:
                self.kv_failures.inc()
        elif event == "kv_recv_end" and rid and rec.get("verified"):
            self.kv_bytes.labels("received").inc(rec.get("bytes") or 0)
        elif event == "step_timing":
            self.step_lateness.observe(max(0.0, float(rec.get("late_s") or 0.0)))
        elif event == "auth_rejected":
            self.auth_rejected.inc()
        elif event == "kv_dropped":
            reason, total = str(rec.get("reason")), int(rec.get("count") or 0)
            self.kv_dropped.labels(reason).inc(max(0, total - self._dropped.get(reason, 0)))
            self._dropped[reason] = max(total, self._dropped.get(reason, 0))

    def observe_tokens(self, arrival_t: float, previous_t: float | None, now_t: float, count: int) -> None:
        """The router relayed ``count`` tokens at model time ``now_t`` (the first batch if
        ``previous_t`` is None); a batch's gap is shared among its tokens."""
        if count <= 0:
            return
        if previous_t is None:
            self.ttft.observe(max(0.0, now_t - arrival_t))
            count -= 1
            previous_t = now_t
        gap = max(0.0, now_t - previous_t) / max(1, count)
        for _ in range(count):
            self.itl.observe(gap)

    async def handler(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
