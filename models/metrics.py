"""The pod's Prometheus metrics, on a registry the server is given.

Counters and histograms are updated on the request path. Gauges that describe the present
(in-flight batches, busy ratio, GPU readings) are read from the live runtimes at scrape
time by a collector, so they can never go stale or drift from the truth.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from models.store import ModelStore
from models.utilisation import GpuMonitor

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
COMPUTE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class PodMetrics:
    def __init__(self, registry: CollectorRegistry, store: ModelStore, gpus: GpuMonitor) -> None:
        self.requests = Counter(
            "bazaar_model_inference_requests",
            "Inference requests by model and outcome (success, client_error, rate_limited: 429, "
            "shed: 503, expired: 504, server_error, cancelled: the caller left).",
            ["model", "outcome"],
            registry=registry,
        )
        self.batches = Counter(
            "bazaar_model_inference_batches",
            "Batches executed by the runtime, by model and outcome.",
            ["model", "outcome"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "bazaar_model_batch_size",
            "Rows per executed batch.",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.compute_seconds = Histogram(
            "bazaar_model_compute_seconds",
            "Time the runtime spent executing one batch.",
            ["model"],
            buckets=COMPUTE_BUCKETS,
            registry=registry,
        )
        registry.register(RuntimeCollector(store, gpus))


class RuntimeCollector(Collector):
    """Scrape-time gauges from the loaded runtimes and NVML."""

    def __init__(self, store: ModelStore, gpus: GpuMonitor) -> None:
        self._store = store
        self._gpus = gpus

    def collect(
        self,
    ) -> Iterator[GaugeMetricFamily | CounterMetricFamily | SummaryMetricFamily]:
        inflight = GaugeMetricFamily(
            "bazaar_model_inflight_batches", "Batches executing now.", labels=["model", "version"]
        )
        ratio = GaugeMetricFamily(
            "bazaar_model_busy_ratio",
            "Fraction of the runtime's capacity (instances x wall time) spent executing "
            "over the last 10 s.",
            labels=["model", "version"],
        )
        busy = CounterMetricFamily(
            "bazaar_model_busy_seconds",
            "Cumulative time spent executing batches (sum over instances).",
            labels=["model", "version"],
        )
        provider = GaugeMetricFamily(
            "bazaar_model_execution_provider",
            "Always 1; the provider label says where the version computes "
            "(CUDAExecutionProvider or CPUExecutionProvider).",
            labels=["model", "version", "provider"],
        )
        for name, loaded in sorted(self._store.models.items()):
            for version, runtime in sorted(loaded.versions.items()):
                labels = [name, str(version)]
                inflight.add_metric(labels, runtime.busy.active)
                ratio.add_metric(labels, runtime.busy.ratio())
                busy.add_metric(labels, runtime.busy.busy_seconds())
                provider.add_metric([*labels, runtime.providers[0]], 1)
        yield inflight
        yield ratio
        yield busy
        yield provider
        yield from self._paging()
        readings = self._gpus.read()
        if not readings:
            return  # no NVML: the series are absent, never zero
        util = GaugeMetricFamily(
            "bazaar_gpu_utilization_ratio",
            "Fraction of the last NVML sample period in which a kernel ran.",
            labels=["gpu", "name"],
        )
        used = GaugeMetricFamily(
            "bazaar_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu", "name"]
        )
        total = GaugeMetricFamily(
            "bazaar_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu", "name"]
        )
        for reading in readings:
            labels = [str(reading.index), reading.name]
            util.add_metric(labels, reading.utilization)
            used.add_metric(labels, reading.memory_used_bytes)
            total.add_metric(labels, reading.memory_total_bytes)
        yield util
        yield used
        yield total

    def _paging(self) -> Iterator[GaugeMetricFamily | SummaryMetricFamily]:
        store = self._store
        loads = SummaryMetricFamily(
            "bazaar_model_load_seconds",
            "Model loads (start-up, repository API, paging in) and the time they took.",
            labels=["model"],
        )
        evictions = SummaryMetricFamily(
            "bazaar_model_eviction_seconds",
            "Models evicted under the memory budget and the time closing them took.",
            labels=["model"],
        )
        for name, counts in sorted(store.counts.items()):
            loads.add_metric([name], counts.loads, counts.load_seconds)
            if counts.evictions:
                evictions.add_metric([name], counts.evictions, counts.eviction_seconds)
        footprint = GaugeMetricFamily(
            "bazaar_model_memory_bytes",
            "What a loaded model took from the allocator when it loaded.",
            labels=["model"],
        )
        for name, loaded in sorted(store.models.items()):
            footprint.add_metric([name], loaded.footprint_bytes)
        yield loads
        yield evictions
        yield footprint
        yield GaugeMetricFamily(
            "bazaar_model_memory_used_bytes",
            "The loaded models' footprints together.",
            value=store.memory_used_bytes(),
        )
        if store.memory_budget_bytes is not None:
            yield GaugeMetricFamily(
                "bazaar_model_memory_budget_bytes",
                "The models' memory budget: past it, idle models are evicted.",
                value=store.memory_budget_bytes,
            )
