"""``bazaar replay``: one trace through ``bazaar serve`` and through the simulator, side by side.

The autoscaling benchmark (``bazaar simulate``) is only as good as its simulator; this command
checks it against the real thing on this machine:

1. the trace (built-in or a file) is compressed to ``--duration-s`` (each second the mean of
   its share of the original) and scaled to ``--peak-rps``; its arrivals are drawn once;
2. a repository holds the demo ``mlp`` alone, with ``max_batch_size`` and
   ``min_batch_time_ms`` set, so a worker's capacity is an accelerator's (a batch takes a fixed
   wall time) and several workers really add capacity on a small machine;
3. ``bazaar serve`` runs it with its local autoscaler, 1 to ``--max-workers`` workers; the
   arrivals are sent open loop (``loadtests.loadgen.trace_loop``, one-row requests) while the
   gateway's ``/metrics`` is read every second for the replicas asked for and ready;
4. from that run: the batch time (the workers' compute seconds per batch), the hop (the
   gateway's mean pod call less that: the path outside the batch, during which its rows are
   in flight and the worker computes the next batch) and the cold start (the mean time from a
   worker's start to its readiness, from the supervisor's log);
5. the same arrivals through the simulator, with bazaar's policy in the ``ScaleConfig``
   ``bazaar serve`` builds, the measured batch time, hop and cold start, the gateway's queue bound,
   queue time and batches per pod (two: one computing, one waiting at the pod), and direct
   signals with 1 s rates, as the local autoscaler reads them;
6. both, side by side: replica-seconds, SLO attainment, p50 and p99, with ``replay.json`` and
   ``replay.png`` (replicas, load and p99 over time) in ``--out``.

The parser is built by every ``bazaar`` command, so this module imports the standard library
only; the work is :mod:`bazaar.reality`'s. It is a measurement, not a test: the real run shares
this machine's cores with whatever else runs, and its numbers move with them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from autoscaler.simulation.catalog import TRACES
from protocol.support import missing_extra

REQUEST_PATH = "/v2/models/mlp/infer"
MAX_CONNECTIONS = 8192
"""Open-loop connections: at the peak a request may wait the gateway's 30 s queue time."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "replay",
        help="a trace through `bazaar serve` and through the simulator, side by side",
    )
    parser.add_argument(
        "--trace",
        default="step",
        metavar="NAME|PATH",
        help=f"{', '.join(TRACES)} or a CSV file (default %(default)s)",
    )
    parser.add_argument(
        "--duration-s",
        type=int,
        default=300,
        metavar="S",
        help="the trace compressed to this (default %(default)s)",
    )
    parser.add_argument(
        "--peak-rps",
        type=float,
        default=150.0,
        help="the trace's peak, requests/s (default %(default)s)",
    )
    parser.add_argument("--max-workers", type=int, default=8, help="default %(default)s")
    parser.add_argument("--max-batch-size", type=int, default=8, help="default %(default)s")
    parser.add_argument(
        "--min-batch-time-ms",
        type=float,
        default=200.0,
        help="each batch's wall time (default %(default)s): capacity max-batch-size / this",
    )
    parser.add_argument(
        "--scale-down-window-s", type=float, default=60.0, help="default %(default)s"
    )
    parser.add_argument(
        "--slo-ms",
        type=int,
        default=1000,
        help="default %(default)s: five batch times, so that attainment measures the scaling "
        "rather than the few milliseconds the real path adds to each batch",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help="the gateway's (default: a free one)")
    parser.add_argument("--out", type=Path, default=Path("results/replay"), metavar="DIR")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if problem := missing_extra("bazaar replay", "tools", ("matplotlib",)):
        print(problem, file=sys.stderr)
        return 2
    from bazaar.reality import replay

    return replay(args)
