"""``bazaar simulate``: replay traces against bazaar's policy, the baselines and the references.

The parser is built by every ``bazaar`` command, ``--help`` included, so this module imports
only the standard library and the names in :mod:`.catalog`; numpy, matplotlib and the simulator
are imported by :func:`run`, when the benchmark actually runs. Output goes to ``--out``:
``results.json`` (every number of the table), one PNG per trace, and the table on stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from autoscaler.simulation.catalog import POLICIES, TRACES
from protocol.support import missing_extra

TRACE_FILES = """\
trace files (CSV):
  Lines starting with # before the header are settings; the one setting is
  "# min_replicas: N", the floor every policy gets (default 1; 0 allows scaling to zero).
  The header says what the rows are:
    timestamp_s          one arrival per row, in seconds, replayed as is from the first
    rate_per_s           one row per second, Poisson arrivals drawn at that rate
    time_s,rate_per_s    a rate from that time (seconds) until the next row's time; the
                         last row lasts as long as the one before it
  Example:
    # min_replicas: 0
    time_s,rate_per_s
    0,120
    60,0
    600,300
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``simulate`` on the CLI's subparsers; the command runs ``run(args)``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "simulate",
        help="benchmark autoscaling policies on simulated traces (docs/autoscaling.md)",
        epilog=TRACE_FILES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--trace",
        action="append",
        dest="traces",
        metavar="NAME|PATH",
        help=f"{', '.join(TRACES)} or a CSV file, below (repeatable; default: all built-ins)",
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


def run(args: argparse.Namespace) -> int:
    """Run every trace x policy, print the table, write JSON and plots; 0 on success, 2 on a
    trace that cannot be loaded."""
    if problem := missing_extra("bazaar simulate", "tools", ("matplotlib",)):
        print(problem, file=sys.stderr)  # before minutes of simulation, not after
        return 2
    from autoscaler.simulation import benchmark, goal, report
    from autoscaler.simulation.simulator import SimConfig
    from autoscaler.simulation.traces import TraceError, load

    sim = SimConfig(cold_start_s=args.cold_start_s, metrics=args.metrics, lag_s=args.lag_s)
    try:
        traces = [load(name, args.seed) for name in args.traces or TRACES]
    except TraceError as e:
        print(f"bazaar simulate: {e}", file=sys.stderr)
        return 2
    if args.duration_s is not None:
        traces = [trace.truncated(args.duration_s) for trace in traces]
    policies = args.policies or list(POLICIES)
    settings = {
        "seed": args.seed,
        "cold_start_s": sim.cold_start_s,
        "metrics": sim.metrics,
        "lag_s": sim.lag_s,
        "slo_ms": args.slo_ms,
    }
    out: Path = args.out
    results = benchmark.run_and_write(
        out, settings, traces, policies, sim, args.slo_ms, args.jobs, sys.stderr
    )
    print(report.table(results))
    lead_s = sim.pending_s + sim.cold_start_s + 1
    verdicts = [goal.judge(trace, results, lead_s, args.slo_ms) for trace in traces]
    judged = [v for v in verdicts if v is not None]
    if judged:
        print(f"\nGoal (docs/autoscaling.md): {sum(v.met for v in judged)} of {len(judged)} met\n")
        print(goal.table(judged))
    print(f"\nwrote {out / 'results.json'} and one PNG per trace in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m autoscaler.simulation.command``: the subcommand on its own."""
    parser = argparse.ArgumentParser(prog="bazaar")
    commands = parser.add_subparsers(dest="command", required=True)
    add_parser(commands)
    args = parser.parse_args(["simulate", *(argv if argv is not None else sys.argv[1:])])
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
