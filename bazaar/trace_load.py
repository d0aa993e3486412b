"""``bazaar loadtest --trace``: a workload trace, compressed in time, as the load test's
open-loop schedule.

The load test knows schedules (due times, one a line: its ``trace`` scenario); the traces are
the simulator's (built-in shapes and trace files, :mod:`autoscaler.simulation.traces`). This
module, in the command package because it may import both, turns one into the other:

1. the trace is loaded (``--seed`` draws the built-in shapes that are random) and compressed
   ``--compress`` times (each second of the result is the mean of its share of the original,
   so the rate at each moment is the original's), optionally scaled to ``--peak-rps``;
2. its arrivals, drawn once (Poisson within each second, as the simulator draws them), are
   written to ``schedule.txt`` in the results folder, a record of what was offered;
3. the load test runs that schedule open loop: each request is sent when it falls due,
   whatever became of the ones before, and counted by outcome (or as missed when the
   outstanding bound was reached), with the requests due and sent per second in its summary.

``bazaar replay`` sends its trace with ``loadtests.loadgen.trace_loop`` instead: it needs each
request's due time and latency, which Locust's tally keeps only as a histogram. Both draw the
arrivals with :func:`autoscaler.simulation.traces.compressed`.

The parser is built by every ``bazaar`` command, so this module imports the standard library
and the load test's command line only; numpy comes with the run.
"""

from __future__ import annotations

import argparse
import sys

from autoscaler.simulation.catalog import TRACES
from loadtests.command import results_folder, run_loadtest
from loadtests.shapes import TRACE

SCHEDULE_FILE = "schedule.txt"


def add_trace_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--trace`` and its options to the ``loadtest`` parser."""
    group = parser.add_argument_group("a workload trace as the schedule (the trace scenario)")
    group.add_argument(
        "--trace",
        metavar="NAME|PATH",
        help=f"open loop at a trace's arrivals: {', '.join(TRACES)} or a CSV file "
        "(see `bazaar simulate --help`)",
    )
    group.add_argument(
        "--compress",
        type=float,
        default=1.0,
        metavar="X",
        help="play the trace X times faster, at its own rates (default %(default)s)",
    )
    group.add_argument(
        "--peak-rps",
        type=float,
        metavar="R",
        help="scale the trace so that its busiest second is R requests/s (default: its own)",
    )
    group.add_argument("--seed", type=int, default=1, help="the arrivals' (default %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.trace is None:
        if args.compress != 1.0 or args.peak_rps is not None:
            print("loadtest: --compress and --peak-rps go with --trace", file=sys.stderr)
            return 2
        return run_loadtest(args)
    if args.schedule is not None or args.scenario not in (None, TRACE):
        print("loadtest: --trace is the trace scenario with its own schedule", file=sys.stderr)
        return 2
    if args.compress <= 0:
        print(f"loadtest: --compress {args.compress:g}: expected more than 0", file=sys.stderr)
        return 2
    from autoscaler.simulation.traces import TraceError, compressed, load

    try:
        trace = load(args.trace, args.seed)
        played = compressed(
            trace, round(trace.duration_s / args.compress), args.seed, args.peak_rps
        )
    except TraceError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    results = results_folder(args.results, f"trace-{trace.name}")
    results.mkdir(parents=True, exist_ok=True)
    schedule = results / SCHEDULE_FILE
    schedule.write_text("".join(f"{ms / 1000:.3f}\n" for ms in played.arrivals_ms.tolist()))
    print(
        f"loadtest: {trace.name}, {trace.duration_s} s played in {played.duration_s} s: "
        f"{len(played.arrivals_ms)} requests, at most {played.rate_per_s.max():.0f} req/s"
    )
    args.results, args.schedule, args.scenario = results, schedule, TRACE
    return run_loadtest(args)
