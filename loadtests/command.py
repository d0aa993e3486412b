"""``bazaar loadtest`` and ``bazaar bench``: the command lines of the load-test harness and
the benchmark.

``add_loadtest_parser`` and ``add_bench_parser`` register the subcommands; what they run
(``loadtests.runner``, which draws with matplotlib; ``loadtests.bench``, which starts ONNX
Runtime) is imported only when it runs, so the rest of the ``bazaar`` command pays nothing
for it: this module imports the standard library only. Load-test arguments are checked here
and become one frozen ``LoadTestConfig``.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import time
from pathlib import Path
from typing import Any

from loadtests.shapes import SCENARIOS, TRACE
from protocol.support import missing_extra

BENCH_MODELS = ("digits", "mlp", "mlp_wide")
"""The demo models the benchmark knows the input width of."""
BENCH_SCENARIOS = ("serving", "overload", "hostile")
"""What ``bazaar bench --scenarios`` may run (``loadtests.bench``, ``loadtests.overload``)."""
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``1m30s``, ``2m``, ``1h`` -> seconds (more than 0)."""
    match = _DURATION.match(text.strip())
    if not text.strip() or match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30s, 2m, 1m30s)")
    hours, minutes, seconds = (float(part) if part else 0.0 for part in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise argparse.ArgumentTypeError(f"the duration must be more than 0, got {text!r}")
    return total


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text}")
    return value


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a number above 0, got {text}")
        return value

    return parse


def add_loadtest_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``loadtest`` on ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    scenarios = "; ".join(f"{name}: {what}" for name, what in SCENARIOS.items())
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "loadtest",
        help="load-test any v2 server with Locust and judge an SLO",
        description=f"Scenarios — {scenarios}. Exit status: 0 SLO met, 1 missed, 2 run failed.",
    )
    parser.add_argument("--host", default="http://127.0.0.1:8000", help="default %(default)s")
    parser.add_argument(
        "--scenario",
        choices=list(SCENARIOS),
        help="default: trace with --schedule, else steady",
    )
    parser.add_argument(
        "--duration",
        type=parse_duration,
        default=30.0,
        help="e.g. 30s, 2m (default 30s; a schedule lasts until its last due time)",
    )
    parser.add_argument(
        "--schedule",
        type=Path,
        metavar="FILE",
        help="open loop at these due times: seconds from the start, one a line, in order "
        "(the trace scenario; `bazaar loadtest --trace` writes one from a workload trace)",
    )
    parser.add_argument(
        "--users",
        type=_positive(int),
        default=10,
        help="peak concurrent users; in open loop, schedule keepers (default %(default)s)",
    )
    parser.add_argument(
        "--rate",
        type=_positive(float),
        default=50.0,
        help="open loop: requests per second offered (default %(default)s)",
    )
    parser.add_argument(
        "--models",
        default="",
        metavar="NAME[:WEIGHT],...",
        help="model mix, e.g. digits:3,mlp:1 (default: every ready model, equally)",
    )
    parser.add_argument("--slo-p99-ms", type=_positive(float), default=250.0, metavar="MS")
    parser.add_argument(
        "--max-error-rate",
        type=_fraction,
        default=0.01,
        metavar="FRACTION",
        help="of due requests that did not succeed (default %(default)s)",
    )
    parser.add_argument(
        "--binary-ratio",
        type=_fraction,
        default=0.5,
        help="fraction sent as binary tensors, the rest JSON (default %(default)s)",
    )
    parser.add_argument(
        "--priorities", default="", metavar="N,...", help="request priorities to pick from"
    )
    parser.add_argument(
        "--timeout-ms", type=float, default=0.0, help="request timeout parameter (0 = none)"
    )
    parser.add_argument("--rows", type=_positive(int), default=1, help="batch rows per request")
    parser.add_argument(
        "--wrong-shape-ratio",
        type=_fraction,
        default=0.0,
        help="fraction sent with a wrong shape, to see 400s counted (default 0)",
    )
    parser.add_argument(
        "--max-outstanding",
        type=_positive(int),
        default=1000,
        help="open loop: requests in flight before a due one is missed (default %(default)s)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        metavar="DIR",
        help="default: results/loadtest/<time>-<scenario> under the current directory",
    )
    parser.set_defaults(run=run_loadtest)
    return parser


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench``: throughput and latency against raw ONNX Runtime and references."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench", help="throughput and latency against raw ONNX Runtime and reference servers"
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--duration",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="measured seconds per point (default %(default)s)",
    )
    length.add_argument("--quick", action="store_true", help="3 s per point, for a smoke run")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/bench"),
        metavar="DIR",
        help="default: %(default)s under the current directory",
    )
    parser.add_argument(
        "--models", nargs="+", choices=BENCH_MODELS, default=["mlp", "digits", "mlp_wide"]
    )
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=BENCH_SCENARIOS,
        default=list(BENCH_SCENARIOS),
        help="serving: against raw ONNX Runtime and reference servers (--models); overload: "
        "mlp at 64, 512 and 2,048 connections and at 3x capacity; hostile: normal traffic "
        "under slow, idle and oversized clients (default: all three)",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        metavar="DIR",
        help="a demo repository to reuse (default: build one in a temp dir)",
    )
    parser.set_defaults(run=run_bench)
    return parser


def run_bench(args: argparse.Namespace) -> int:
    from loadtests.bench import run

    return run(args)


def run_loadtest(args: argparse.Namespace) -> int:
    if problem := missing_extra("bazaar loadtest", "tools", ("locust", "matplotlib")):
        print(problem, file=sys.stderr)
        return 2
    from loadtests.runner import LoadTestConfig, run
    from loadtests.verdict import Slo

    priorities = [p.strip() for p in args.priorities.split(",") if p.strip()]
    if not all(p.isdigit() for p in priorities):
        print(f"loadtest: --priorities {args.priorities!r}: expected integers like 1,2")
        return 2
    scenario = args.scenario or (TRACE if args.schedule else "steady")
    if (scenario == TRACE) != (args.schedule is not None):
        print("loadtest: --schedule FILE goes with the trace scenario, and it needs one")
        return 2
    duration_s = args.duration
    if args.schedule is not None:
        try:
            duration_s = schedule_duration_s(args.schedule)
        except (OSError, ValueError) as exc:
            print(f"loadtest: --schedule {args.schedule}: {exc}")
            return 2
    results = results_folder(args.results, scenario)
    config = LoadTestConfig(
        host=args.host,
        scenario=scenario,
        duration_s=duration_s,
        users=args.users,
        arrival_rate=args.rate,
        models=args.models,
        slo=Slo(p99_ms=args.slo_p99_ms, max_error_rate=args.max_error_rate),
        results=results,
        binary_ratio=args.binary_ratio,
        priorities=",".join(priorities),
        timeout_ms=args.timeout_ms,
        rows=args.rows,
        wrong_shape_ratio=args.wrong_shape_ratio,
        max_outstanding=args.max_outstanding,
        schedule=args.schedule.absolute() if args.schedule else None,
    )
    return run(config)


def schedule_duration_s(schedule: Path) -> float:
    """How long a schedule file runs: to the end of the second of its last due time. Raises
    ValueError when its lines are not due times in order."""
    due = [float(line) for line in schedule.read_text().split()]
    if not due or due[0] < 0 or any(b < a for a, b in itertools.pairwise(due)):
        raise ValueError("expected due times in seconds, at least one, from 0, in order")
    return float(int(due[-1]) + 1)


def results_folder(given: Path | None, name: str) -> Path:
    """``--results``, or ``results/loadtest/TIME-NAME``; absolute, since Locust runs in
    another working directory."""
    return (
        given or Path("results", "loadtest", f"{time.strftime('%Y%m%d-%H%M%S')}-{name}")
    ).absolute()
