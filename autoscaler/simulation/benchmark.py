"""The benchmark: every trace against bazaar's policy, the baselines and the references.

Each trace is generated once per seed and every policy replays the same arrivals. bazaar's
policy runs through :class:`Bazaar`, a three-line adapter over the very ``decide`` the control
loop calls. Runs are independent, so :func:`run_all` spreads them over processes; the results do
not depend on that. :func:`write` puts ``results.json`` (every number of the table) and one PNG
per trace in a directory.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoscaler.policy import PolicyState, Sample, ScaleConfig, decide
from autoscaler.simulation import report
from autoscaler.simulation.baselines import Hpa, Keda, Kpa, Oracle, Ray, StaticPeak, replicas_for
from autoscaler.simulation.catalog import POLICIES
from autoscaler.simulation.simulator import (
    MAX_BATCH_THROUGHPUT_RPS,
    Outcome,
    ScalePolicy,
    SimConfig,
    initial_replicas,
    simulate,
)
from autoscaler.simulation.traces import Trace

SCALE_TO_ZERO_AFTER_S = 60.0
"""bazaar's idle period on traces that allow zero (Knative's stable window, for comparison)."""


@dataclass(frozen=True, slots=True)
class Bazaar:
    """bazaar's policy behind the simulator's seam."""

    config: ScaleConfig
    name: str = "bazaar"
    interval_s: int = 1

    def initial_state(self) -> PolicyState:
        return PolicyState()

    def decide(self, sample: Sample, state: PolicyState, now: float) -> Outcome[PolicyState]:
        decision = decide(sample, state, self.config, now)
        return Outcome(decision.replicas, decision.state, decision.reason)


_EMPTY = Sample(0.0, 0, 0, 0, None, None, None, None, None, None)


def make_policy(name: str, trace: Trace, sim: SimConfig, slo_ms: int) -> ScalePolicy[Any]:
    """A policy by name, bounded as the trace asks (min 0 only where zero is the point)."""
    low, high = trace.min_replicas, sim.max_replicas
    if name == "bazaar":
        config = ScaleConfig(
            min_replicas=low,
            max_replicas=high,
            scale_to_zero_after_s=SCALE_TO_ZERO_AFTER_S if low == 0 else None,
            replica_throughput_rps=MAX_BATCH_THROUGHPUT_RPS,
            latency_slo_s=slo_ms / 1000,
        )
        return Bazaar(config)
    if name == "hpa":
        # HPA cannot hold zero replicas by itself: it keeps one.
        return Hpa(min_replicas=max(1, low), max_replicas=high)
    if name == "keda":
        return Keda(min_replicas=low, max_replicas=high)
    if name == "kpa":
        return Kpa(min_replicas=low, max_replicas=high)
    if name == "ray":
        return Ray(min_replicas=low, max_replicas=high)
    if name == "static-peak":
        return StaticPeak(replicas_for(float(trace.rate_per_s.max())))
    if name == "oracle":
        return Oracle(trace.rate_per_s, sim.pending_s + sim.cold_start_s + 1, low)
    raise ValueError(f"unknown policy {name!r}: use one of {', '.join(POLICIES)}")


def run_all(
    traces: list[Trace], policies: list[str], sim: SimConfig, slo_ms: int, jobs: int
) -> list[dict[str, Any]]:
    """The summary and series of every trace x policy, in that order, on ``jobs`` processes."""
    pairs = [(trace, policy) for trace in traces for policy in policies]
    if jobs <= 1:
        return [_run_one(trace, policy, sim, slo_ms) for trace, policy in pairs]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_run_one, trace, policy, sim, slo_ms) for trace, policy in pairs]
        return [future.result() for future in futures]


def write(
    out: Path,
    settings: dict[str, Any],
    traces: list[Trace],
    results: list[dict[str, Any]],
    slo_ms: int,
) -> None:
    """``results.json`` and one plot per trace in ``out`` (created if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "results.json", settings, results)
    for trace in traces:
        rows = [r for r in results if r["trace"] == trace.name]
        report.plot(out / f"{trace.name}.png", trace, rows, slo_ms)


def _run_one(trace: Trace, policy: str, sim: SimConfig, slo_ms: int) -> dict[str, Any]:
    chosen = make_policy(policy, trace, sim, slo_ms)
    # The references start as they mean to go on; the autoscalers start at the common count,
    # HPA at its floor of one (it cannot leave zero).
    initial = initial_replicas(trace)
    if policy in ("static-peak", "oracle"):
        initial = chosen.decide(_EMPTY, chosen.initial_state(), 0.0).replicas
    elif policy == "hpa":
        initial = max(1, initial)
    run = simulate(trace, chosen, sim, initial)
    return report.summarize(run, trace, slo_ms) | {"series": report.series(run, slo_ms)}
