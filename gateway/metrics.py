"""The gateway's Prometheus metrics, declared once, on a registry the app is given.

The hot path updates pre-bound children (``ModelMetrics``, one set per model version), so a
request costs no label lookups. Every series of a model carries its ``version`` too: a model
serves a handful of versions at most, and a rollout is judged by comparing them.
Queue depth and in-flight counts describe the present and are read from the live
dispatchers at scrape time (``QueueCollector``), never kept in a second copy; so are the rows
admitted and completed, counters the dispatchers keep anyway (for ``/stats``, which the
autoscaler reads): Prometheus takes their ``rate()``, the arrival rate and the throughput.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from protocol.metrics import OUTCOMES
from protocol.statistics import InferenceStatistics

if TYPE_CHECKING:
    from gateway.dispatcher import Dispatcher

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SHED_STAGES = ("before_decode", "after_decode")
"""Where a refused request was refused: before its body was decoded, or after
(only for what the body alone says, such as a tighter ``timeout`` parameter)."""
SHED_REASONS = ("queue_full", "deadline")
"""Why: the queue was at ``max_queue_size``, or its expected wait exceeded the deadline."""
SHADOW_OUTCOMES = ("sent", "dropped", "failed", "compared")
"""What became of a request shadowed to a candidate version (``gateway.shadow``)."""
SHADOW_RESULTS = ("agreed", "disagreed")
LABELS = ["model", "version"]
"""The labels of the queue's gauges and counters."""


@dataclass(frozen=True, slots=True)
class ModelMetrics:
    """One model version's metric children, bound once, and its Triton statistics."""

    requests: Mapping[str, Counter]
    """By outcome: ``OUTCOMES``."""
    request_seconds: Histogram
    queue_wait: Histogram
    pod_seconds: Histogram
    batch_size: Histogram
    expired: Counter
    shed: Mapping[tuple[str, str], Counter]
    """By (stage, reason): every pair of ``SHED_STAGES`` and ``SHED_REASONS``."""
    statistics: InferenceStatistics
    """Triton's statistics extension (``GET .../stats``): requests answered by the gateway,
    batches its pods ran."""


@dataclass(frozen=True, slots=True)
class ShadowMetrics:
    """One model's shadow children, bound once, labelled with the candidate version."""

    requests: Mapping[str, Counter]
    """By ``SHADOW_OUTCOMES``."""
    rows: Mapping[str, Counter]
    """By ``SHADOW_RESULTS``."""
    seconds: Histogram


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._requests = Counter(
            "bazaar_gateway_requests",
            "Inference requests, by model and outcome (success, client_error, rate_limited: 429, "
            "shed: 503, expired: 504, server_error, cancelled: the client went away first).",
            ["model", "version", "outcome"],
            registry=registry,
        )
        self._request_seconds = Histogram(
            "bazaar_gateway_request_seconds",
            "End-to-end time of an inference request in the gateway.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._queue_wait = Histogram(
            "bazaar_gateway_queue_wait_seconds",
            "Time a request waited in the gateway's queue before its batch left.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._pod_seconds = Histogram(
            "bazaar_gateway_pod_seconds",
            "Time from sending a batch to a pod until its answer arrived.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._batch_size = Histogram(
            "bazaar_gateway_batch_size",
            "Rows per batch sent to a pod.",
            ["model", "version"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self._expired = Counter(
            "bazaar_gateway_expired_requests",
            "Requests whose deadline passed while queued (answered 504, never computed).",
            ["model", "version"],
            registry=registry,
        )
        self._shed = Counter(
            "bazaar_gateway_shed_requests",
            "Requests refused at admission (answered 503), by stage (before_decode: before "
            "the body was decoded; after_decode) and reason (queue_full, deadline).",
            ["model", "version", "stage", "reason"],
            registry=registry,
        )
        self.quota_refusals = Counter(
            "bazaar_gateway_quota_refusals",
            "Requests refused for their tenant's quota (answered 429), by tenant and quota "
            "(rate: requests per second; rows: rows in flight).",
            ["tenant", "quota"],
            registry=registry,
        )

        self._shadow_requests = Counter(
            "bazaar_gateway_shadow_requests",
            "Requests shadowed to a candidate version, by model, candidate version and outcome "
            "(sent; dropped: no room, or its queue refused; failed: the candidate or the "
            "primary erred; compared).",
            ["model", "version", "outcome"],
            registry=registry,
        )
        self._shadow_rows = Counter(
            "bazaar_gateway_shadow_rows",
            "Rows of shadowed requests compared, by whether the candidate's answer agreed with "
            "the primary's (agreed, disagreed): their ratio is the candidate's agreement.",
            ["model", "version", "result"],
            registry=registry,
        )
        self._shadow_seconds = Histogram(
            "bazaar_gateway_shadow_seconds",
            "Time a candidate version took to answer a shadowed request, queue included.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

        self.rollout_percent = Gauge(
            "bazaar_gateway_rollout_percent",
            "A rollout's candidate version's share of the model's unversioned requests, in "
            "percent (0 once rolled back), by model and candidate version.",
            ["model", "version"],
            registry=registry,
        )
        self.rollbacks = Counter(
            "bazaar_gateway_rollbacks",
            "Rollouts rolled back, by model, candidate version and reason (latency: its p99 "
            "over the bound; errors: its 5xx rate; agreement: its shadowed rows agreeing "
            "too little); the details are logged and in /stats.",
            ["model", "version", "reason"],
            registry=registry,
        )

    def for_shadow(self, model: str, version: str) -> ShadowMetrics:
        """The shadow children of ``model``'s candidate ``version``."""
        return ShadowMetrics(
            requests={o: self._shadow_requests.labels(model, version, o) for o in SHADOW_OUTCOMES},
            rows={r: self._shadow_rows.labels(model, version, r) for r in SHADOW_RESULTS},
            seconds=self._shadow_seconds.labels(model, version),
        )

    def for_model(self, model: str, version: str = "") -> ModelMetrics:
        """The children of ``model`` at ``version`` ("" for a server that names none)."""
        return ModelMetrics(
            requests={o: self._requests.labels(model, version, o) for o in OUTCOMES},
            request_seconds=self._request_seconds.labels(model, version),
            queue_wait=self._queue_wait.labels(model, version),
            pod_seconds=self._pod_seconds.labels(model, version),
            batch_size=self._batch_size.labels(model, version),
            expired=self._expired.labels(model, version),
            shed={
                (stage, reason): self._shed.labels(model, version, stage, reason)
                for stage in SHED_STAGES
                for reason in SHED_REASONS
            },
            statistics=InferenceStatistics(),
        )

    def watch(self, dispatchers: Callable[[], Mapping[tuple[str, str], Dispatcher]]) -> None:
        """Export queue depth and in-flight counts of the dispatchers, by (model, version),
        at scrape time."""
        self.registry.register(QueueCollector(dispatchers))


class QueueCollector(Collector):
    def __init__(self, dispatchers: Callable[[], Mapping[tuple[str, str], Dispatcher]]) -> None:
        self._dispatchers = dispatchers

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        depth = GaugeMetricFamily(
            "bazaar_gateway_queue_depth", "Requests queued in the gateway.", labels=LABELS
        )
        rows = GaugeMetricFamily(
            "bazaar_gateway_queue_rows", "Rows queued in the gateway.", labels=LABELS
        )
        inflight = GaugeMetricFamily(
            "bazaar_gateway_inflight_batches",
            "Batches sent to the model's endpoints and not yet answered.",
            labels=LABELS,
        )
        endpoints = GaugeMetricFamily(
            "bazaar_gateway_ready_endpoints",
            "Endpoints taking batches (not ejected).",
            labels=LABELS,
        )
        admitted = CounterMetricFamily(
            "bazaar_gateway_admitted_rows",
            "Rows admitted to the queue (their rate: the arrival rate the autoscaler reads).",
            labels=LABELS,
        )
        completed = CounterMetricFamily(
            "bazaar_gateway_completed_rows",
            "Rows answered by the model's endpoints (their rate: the throughput).",
            labels=LABELS,
        )
        for (model, version), dispatcher in sorted(self._dispatchers().items()):
            stats = dispatcher.stats()
            labels = [model, version]
            depth.add_metric(labels, stats.queued)
            admitted.add_metric(labels, stats.admitted_rows)
            completed.add_metric(labels, stats.completed_rows)
            rows.add_metric(labels, stats.queued_rows)
            endpoints.add_metric(labels, dispatcher.pool.ready_endpoints)
            # Per model version, not per endpoint: pod URLs churn with every pod, and a label
            # per URL would leave a series behind for each (per endpoint: /stats).
            inflight.add_metric(labels, stats.inflight_batches)
        yield depth
        yield rows
        yield inflight
        yield endpoints
        yield admitted
        yield completed
