"""The autoscaler's own Prometheus metrics, on a registry it is given.

Per model: the replicas the policy wants, the replicas asked for and serving now, every
signal the policy saw, and a counter of decisions by kind. Labels stay low-cardinality
(model, kind); the policy's free-text reason goes to the log, never into a label.

Gauges are exported at scrape time from the last observation of each model
(``_LastObservation``), so a signal that was missing (None) is absent from the scrape,
never a stale value or a zero. ``forget(model)`` drops a model that no longer exists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from autoscaler.policy import Sample

KINDS = ("scale_up", "scale_down", "hold", "to_zero", "from_zero")

# Sample field → (metric name, help): one family per signal, so units never mix.
_SIGNALS = {
    "queued": ("bazaar_autoscaler_queued_rows", "Rows queued in the gateways, summed."),
    "inflight": ("bazaar_autoscaler_inflight_rows", "Rows sent to pods and not yet answered."),
    "arrival_rate": (
        "bazaar_autoscaler_arrival_rows_per_second",
        "Rows per second admitted by the gateways.",
    ),
    "completion_rate": (
        "bazaar_autoscaler_completion_rows_per_second",
        "Rows per second answered by the pods.",
    ),
    "busy_ratio": ("bazaar_autoscaler_busy_ratio", "Mean busy ratio of the ready pods (0..1)."),
    "gpu_utilization": (
        "bazaar_autoscaler_gpu_utilization_ratio",
        "Mean GPU utilisation of the ready pods (0..1), from NVML or DCGM.",
    ),
}


def decision_kind(current: int, desired: int) -> str:
    """The decision's kind, from the replicas asked for now and the replicas it wants."""
    if desired == current:
        return "hold"
    if current == 0:
        return "from_zero"
    if desired == 0:
        return "to_zero"
    return "scale_up" if desired > current else "scale_down"


@dataclass(frozen=True, slots=True)
class _Observation:
    sample: Sample
    desired: int
    reason: str


class AutoscalerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._decisions = Counter(
            "bazaar_autoscaler_decisions",
            "Policy decisions by model and kind (scale_up, scale_down, hold, to_zero, from_zero).",
            ["model", "kind"],
            registry=registry,
        )
        self._last: dict[str, _Observation] = {}
        registry.register(_LastObservation(self._last))

    def observe(self, model: str, sample: Sample, desired: int, kind: str, reason: str) -> None:
        """Record one decision: what the policy saw, what it wants, its kind and why."""
        self._last[model] = _Observation(sample, desired, reason)
        self._decisions.labels(model, kind).inc()

    def forget(self, model: str) -> None:
        self._last.pop(model, None)
        for kind in KINDS:
            with contextlib.suppress(KeyError):  # never decided this kind for this model
                self._decisions.remove(model, kind)


class _LastObservation(Collector):
    def __init__(self, last: dict[str, _Observation]) -> None:
        self._last = last

    def collect(self) -> Iterator[GaugeMetricFamily]:
        desired = GaugeMetricFamily(
            "bazaar_autoscaler_desired_replicas",
            "Replicas the policy wants.",
            labels=["model"],
        )
        current = GaugeMetricFamily(
            "bazaar_autoscaler_current_replicas",
            "Replicas asked for when the policy decided (spec.replicas).",
            labels=["model"],
        )
        ready = GaugeMetricFamily(
            "bazaar_autoscaler_ready_replicas", "Replicas serving.", labels=["model"]
        )
        # The last decision's reason, as Prometheus exports text: one series per model at a
        # time, its label the sentence (it changes only when the reasoning does).
        reason = GaugeMetricFamily(
            "bazaar_autoscaler_last_decision",
            "Always 1; the reason label says why the policy wants what it wants.",
            labels=["model", "reason"],
        )
        signals = {
            field: GaugeMetricFamily(name, help_text, labels=["model"])
            for field, (name, help_text) in _SIGNALS.items()
        }
        for model, observation in sorted(self._last.items()):
            sample = observation.sample
            desired.add_metric([model], observation.desired)
            current.add_metric([model], sample.replicas)
            ready.add_metric([model], sample.ready_replicas)
            reason.add_metric([model, observation.reason], 1)
            for field, family in signals.items():
                value = getattr(sample, field)
                if value is not None:  # a missing signal is absent, never zero
                    family.add_metric([model], value)
        yield desired
        yield current
        yield ready
        yield reason
        yield from signals.values()
