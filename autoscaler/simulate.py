"""``bazaar simulate``: replay traces against bazaar's policy, the baselines and the references.

Each trace is generated once per seed and every policy replays the same arrivals. bazaar's
policy runs through :class:`Bazaar`, a three-line adapter over the very ``decide`` the control
loop calls. Output goes to ``--out``: ``results.json`` (every number of the table), one PNG per
trace, and the table on stdout. Runs are independent, so the work is spread over processes;
results do not depend on that.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoscaler import report
from autoscaler.baselines import Hpa, Keda, Kpa, Oracle, Ray, StaticPeak, replicas_for
from autoscaler.policy import PolicyState, Sample, ScaleConfig, decide
from autoscaler.simulator import (
    MAX_BATCH_THROUGHPUT_RPS,
    Outcome,
    ScalePolicy,
    SimConfig,
    initial_replicas,
)
from autoscaler.simulator import simulate as run_one
from autoscaler.traces import BUILTIN, Trace, TraceError, load

POLICIES = ("bazaar", "hpa", "keda", "kpa", "ray", "static-peak", "oracle")
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


def make_policy(name: str, trace: Trace, sim: SimConfig) -> ScalePolicy[Any]:
    """A policy by name, bounded as the trace asks (min 0 only where zero is the point)."""
    low, high = trace.min_replicas, sim.max_replicas
    if name == "bazaar":
        config = ScaleConfig(
            min_replicas=low,
            max_replicas=high,
            scale_to_zero_after_s=SCALE_TO_ZERO_AFTER_S if low == 0 else None,
            replica_throughput_rps=MAX_BATCH_THROUGHPUT_RPS,
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


def _job(trace: Trace, policy: str, sim: SimConfig, slo_ms: int) -> dict[str, Any]:
    chosen = make_policy(policy, trace, sim)
    # The references start as they mean to go on; the autoscalers start at the common count,
    # HPA at its floor of one (it cannot leave zero).
    initial = initial_replicas(trace)
    if policy in ("static-peak", "oracle"):
        initial = chosen.decide(_EMPTY, chosen.initial_state(), 0.0).replicas
    elif policy == "hpa":
        initial = max(1, initial)
    run = run_one(trace, chosen, sim, initial)
    return report.summarize(run, trace, slo_ms) | {"series": report.series(run, slo_ms)}


def run(args: argparse.Namespace) -> int:
    """Run every trace x policy, print the table, write JSON and plots; 0 on success."""
    sim = SimConfig(cold_start_s=args.cold_start_s, metrics=args.metrics, lag_s=args.lag_s)
    try:
        trace_list = [load(name, args.seed) for name in args.traces or BUILTIN]
    except TraceError as e:
        print(f"bazaar simulate: {e}", file=sys.stderr)
        return 2
    if args.duration_s is not None:
        trace_list = [t.truncated(args.duration_s) for t in trace_list]
    policies = args.policies or list(POLICIES)
    jobs = [(t, p) for t in trace_list for p in policies]
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(_job, t, p, sim, args.slo_ms) for t, p in jobs]
            results = [f.result() for f in futures]
    else:
        results = [_job(t, p, sim, args.slo_ms) for t, p in jobs]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "seed": args.seed,
        "cold_start_s": sim.cold_start_s,
        "metrics": sim.metrics,
        "lag_s": sim.lag_s,
        "slo_ms": args.slo_ms,
    }
    report.write_json(out / "results.json", settings, results)
    for trace in trace_list:
        rows = [r for r in results if r["trace"] == trace.name]
        report.plot(out / f"{trace.name}.png", trace, rows, args.slo_ms)
    print(report.table(results))
    print(f"\nwrote {out / 'results.json'} and one PNG per trace in {out}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``simulate`` on the CLI's subparsers; the command runs ``run(args)``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "simulate", help="benchmark autoscaling policies on simulated traces (AUTOSCALING.md)"
    )
    parser.add_argument(
        "--trace",
        action="append",
        dest="traces",
        metavar="NAME|PATH",
        help=f"{', '.join(BUILTIN)} or a CSV file (repeatable; default: all built-ins)",
    )
    parser.add_argument(
        "--policy",
        action="append",
        dest="policies",
        choices=POLICIES,
        help="repeatable; default: all",
    )
    parser.add_argument("--cold-start-s", type=int, default=30, metavar="S")
    parser.add_argument("--metrics", choices=["direct", "prometheus"], default="direct")
    parser.add_argument("--lag-s", type=int, default=0, metavar="S", help="Prometheus lag")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration-s", type=int, metavar="S", help="cut every trace to this")
    parser.add_argument("--out", type=Path, default=Path("results/simulate"), metavar="DIR")
    parser.add_argument("--slo-ms", type=int, default=500, metavar="MS")
    parser.add_argument("--jobs", type=int, default=2, metavar="N", help="worker processes")
    parser.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m autoscaler.simulate``: the subcommand on its own."""
    parser = argparse.ArgumentParser(prog="bazaar")
    commands = parser.add_subparsers(dest="command", required=True)
    add_parser(commands)
    args = parser.parse_args(["simulate", *(argv if argv is not None else sys.argv[1:])])
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
