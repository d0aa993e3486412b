"""The benchmark: every trace against bazaar's policy, the baselines and the references.

Each trace is generated once per seed and every policy replays the same arrivals. bazaar's
policy runs through :class:`Bazaar`, a three-line adapter over the very ``decide`` the control
loop calls. Runs are independent, so :func:`run_all` spreads them over processes; the results do
not depend on that. :func:`run_and_write` says as each run finishes, and puts ``results.json``
(every number of the table) and a trace's PNG in a directory as soon as that trace is done.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from autoscaler.policy import PolicyState, Sample, ScaleConfig, decide
from autoscaler.simulation import report
from autoscaler.simulation.baselines import Hpa, Keda, Kpa, Oracle, Ray, StaticPeak, replicas_for
from autoscaler.simulation.catalog import POLICIES
from autoscaler.simulation.keda_external import KedaExternal
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
    if name in ("bazaar", "bazaar-keda"):
        config = ScaleConfig(
            min_replicas=low,
            max_replicas=high,
            scale_to_zero_after_s=SCALE_TO_ZERO_AFTER_S if low == 0 else None,
            replica_throughput_rps=MAX_BATCH_THROUGHPUT_RPS,
            latency_slo_s=slo_ms / 1000,
        )
        return Bazaar(config) if name == "bazaar" else KedaExternal(config)
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
) -> Iterator[dict[str, Any]]:
    """The summary and series of every trace x policy as each finishes, on ``jobs`` processes
    (in trace x policy order on one)."""
    pairs = [(trace, policy) for trace in traces for policy in policies]
    if jobs <= 1:
        for trace, policy in pairs:
            yield _run_one(trace, policy, sim, slo_ms)
        return
    pool = ProcessPoolExecutor(max_workers=jobs)
    try:
        futures = [pool.submit(_run_one, trace, policy, sim, slo_ms) for trace, policy in pairs]
        for future in as_completed(futures):
            yield future.result()
    finally:
        # Interrupted: runs not started are dropped, not run to the end behind the user's back.
        pool.shutdown(cancel_futures=True)


def run_and_write(
    out: Path,
    settings: dict[str, Any],
    traces: list[Trace],
    policies: list[str],
    sim: SimConfig,
    slo_ms: int,
    jobs: int,
    progress: TextIO,
) -> list[dict[str, Any]]:
    """Every trace x policy, in that order, written to ``out`` as it goes.

    A line on ``progress`` as each run finishes; when a trace's last policy finishes, its plot and
    ``results.json`` (every run finished so far) are written, so an interrupt keeps what was done.
    """
    out.mkdir(parents=True, exist_ok=True)
    order = {(t.name, p): i for i, (t, p) in enumerate((t, p) for t in traces for p in policies)}
    done: dict[tuple[str, str], dict[str, Any]] = {}
    for result in run_all(traces, policies, sim, slo_ms, jobs):
        done[(result["trace"], result["policy"])] = result
        print(f"[{len(done)}/{len(order)}] {report.progress(result)}", file=progress, flush=True)
        trace = next(t for t in traces if t.name == result["trace"])
        rows = [done[(trace.name, p)] for p in policies if (trace.name, p) in done]
        if len(rows) == len(policies):
            report.plot(out / f"{trace.name}.png", trace, rows, slo_ms)
            finished = sorted(done.values(), key=lambda r: order[(r["trace"], r["policy"])])
            report.write_json(out / "results.json", settings, finished)
    return sorted(done.values(), key=lambda r: order[(r["trace"], r["policy"])])


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
