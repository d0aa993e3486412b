"""The autoscaler's own Prometheus metrics, on a registry it is given, and its ``/stats``.

Per model: the replicas the policy wants, the replicas asked for and serving now, the
signals the policy saw but the rates (those are ``rate()`` of the gateway's row counters), a
counter of decisions by kind, and the last decision by kind and reason code. Labels are enums
(model, kind, reason code: closed sets, declared in :data:`KINDS` and
:data:`autoscaler.policy.REASON_CODES`), so the series stay one per model however the numbers
move; the policy's free-text reason goes to the log and to :meth:`AutoscalerMetrics.stats`,
never into a label.

Gauges are exported at scrape time from the last observation of each model
(``_LastObservation``), so a signal that was missing (None) is absent from the scrape,
never a stale value or a zero. ``forget(model)`` drops a model that no longer exists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from autoscaler.policy import Decision, Sample

KINDS = ("scale_up", "scale_down", "hold", "to_zero", "from_zero")

SIGNALS = ("queued", "inflight", "arrival_rate", "completion_rate", "busy_ratio", "gpu_utilization")
"""The ``Sample`` fields the policy decides on, all on ``/stats``."""

# Sample field → (metric name, help): one gauge per signal, so units never mix. The rates
# have none: a gauge of a rate averaged over the autoscaler's own window is what Prometheus
# users compute themselves, with rate() over the gateway's counters of the same rows
# (bazaar_gateway_admitted_rows_total, bazaar_gateway_completed_rows_total).
_SIGNAL_GAUGES = {
    "queued": ("bazaar_autoscaler_queued_rows", "Rows queued in the gateways, summed."),
    "inflight": ("bazaar_autoscaler_inflight_rows", "Rows sent to pods and not yet answered."),
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
    decision: Decision
    kind: str


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

    def observe(self, model: str, sample: Sample, decision: Decision, kind: str) -> None:
        """Record one decision: what the policy saw, what it wants, its kind and why."""
        if model not in self._last:
            # Every kind from the first decision on, at 0 until it happens: rate() and
            # increase() over a kind not yet decided then read 0, not nothing.
            for each in KINDS:
                self._decisions.labels(model, each)
        self._last[model] = _Observation(sample, decision, kind)
        self._decisions.labels(model, kind).inc()

    def forget(self, model: str) -> None:
        self._last.pop(model, None)
        for kind in KINDS:
            with contextlib.suppress(KeyError):  # never decided this kind for this model
                self._decisions.remove(model, kind)

    def stats(self) -> dict[str, Any]:
        """The last decision of each model, for people; JSON-ready, served on ``/stats``.

        ``{model: {desired_replicas, current_replicas, ready_replicas, kind, reason_code, reason,
        signals: {queued, inflight, arrival_rate, completion_rate, busy_ratio, gpu_utilization},
        time_s}}``: a missing signal is None, ``time_s`` is when the signals were read (the
        autoscaler's clock, seconds).
        """
        return {
            model: {
                "desired_replicas": observation.decision.replicas,
                "current_replicas": observation.sample.replicas,
                "ready_replicas": observation.sample.ready_replicas,
                "kind": observation.kind,
                "reason_code": observation.decision.code,
                "reason": observation.decision.reason,
                "signals": {field: getattr(observation.sample, field) for field in SIGNALS},
                "time_s": observation.sample.time_s,
            }
            for model, observation in sorted(self._last.items())
        }


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
        last_decision = GaugeMetricFamily(
            "bazaar_autoscaler_last_decision",
            "Always 1; kind and reason say what the policy decided last and why, as codes.",
            labels=["model", "kind", "reason"],
        )
        signals = {
            field: GaugeMetricFamily(name, help_text, labels=["model"])
            for field, (name, help_text) in _SIGNAL_GAUGES.items()
        }
        for model, observation in sorted(self._last.items()):
            sample = observation.sample
            desired.add_metric([model], observation.decision.replicas)
            current.add_metric([model], sample.replicas)
            ready.add_metric([model], sample.ready_replicas)
            last_decision.add_metric([model, observation.kind, observation.decision.code], 1)
            for field, family in signals.items():
                value = getattr(sample, field)
                if value is not None:  # a missing signal is absent, never zero
                    family.add_metric([model], value)
        yield desired
        yield current
        yield ready
        yield last_decision
        yield from signals.values()
