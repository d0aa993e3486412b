"""The benchmark: bazaar end to end against raw ONNX Runtime and two reference servers.

One run, one machine, every number from the same run. The servers under test (bazaar serve
with its workers, each reference server, the raw ORT child) run pinned to core 0; wrk and
this driver run pinned to core 1, so the generator never steals the servers' core. In order:

1. raw in-process ORT on core 0 (nothing else running there): rows/s per batch size, and
   per-call p50 (``loadtests.ortbench``);
2. the trivial ASGI endpoint at c=64: the HTTP ceiling of one Python core, and the most
   this generator can measure;
3. the plain Starlette + ORT endpoint for mlp, c=1/16/64;
4. ``bazaar serve`` (gateway and one worker per model, all on core 0): mlp and digits with
   JSON bodies, mlp_wide with binary tensors, c=1/16/64; then, on the same worker, the mlp
   JSON request sent straight to it at c=1 (the gateway's added latency) and sequential
   binary batches of 1/8/32 rows (per-batch latency through a model server);
5. a second ``bazaar serve`` (mlp alone) past its capacity and under hostile clients, with
   every request accounted for (``loadtests.overload``).

``--scenarios`` picks among ``serving`` (1 to 4) and ``overload`` and ``hostile`` (5).
Each wrk point is warmed up for ``WARMUP_S`` first and is refused if wrk saw any non-2xx
answer or socket error. Results: markdown on stdout, ``summary.json`` and
``BENCHMARKS-table.md`` in ``--out``. Processes are always stopped, whatever fails.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loadtests import report
from loadtests.loadgen import raise_fd_limit
from loadtests.ortbench import OrtPoint, measure_ort, model_file, sample_rows
from loadtests.overload import ROWS, run_overload
from loadtests.overload import SCENARIOS as OVERLOAD_SCENARIOS
from loadtests.procs import PinnedServer, http_get
from loadtests.report import BatchLatency, HttpPoint, LoadPoint
from loadtests.wrk import BenchError, Body, run_wrk
from protocol.codec import InferenceRequest, encode_request
from protocol.limits import EdgeLimits
from protocol.support import free_port

SERVER_CORE = 0
CLIENT_CORE = 1
WARMUP_S = 2.0
CONNECTIONS = (1, 16, 64)
TRIVIAL_CONNECTIONS = 64
READY_DEADLINE_S = 180.0
LATENCY_BATCHES = (1, 8, 32)
LATENCY_CALLS = 200
LATENCY_WARMUP_CALLS = 20

FD_LIMIT = 2 * EdgeLimits().max_connections
"""Open files wanted, here and in the servers started from here: a gateway's connection cap
is at most three quarters of its limit, and the idle attack holds a tenth past that cap
beside the normal traffic's connections."""

DEMO_WIDTHS = {"digits": 64, "mlp": 256, "mlp_wide": 1024}
BINARY_MODELS = {"mlp_wide"}
"""Sent as binary tensors at the HTTP points; the others as JSON."""


def encode(model: str, rows: int, binary: bool) -> tuple[bytes, int | None]:
    """A v2 request for the demo model's ``input``, built by the gateway's own codec."""
    array = sample_rows(model, rows, DEMO_WIDTHS[model])
    request = InferenceRequest(
        id=None, parameters={}, inputs={"input": array}, outputs=None, binary_output=binary
    )
    return encode_request(request, binary=binary)


def write_body(out: Path, model: str, binary: bool) -> Body:
    body, header_length = encode(model, 1, binary)
    path = out / "bodies" / f"{model}-{'binary' if binary else 'json'}.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return Body(path, header_length)


def measure(url: str, body: Body, connections: int, duration_s: float) -> HttpPoint:
    """A warm-up run, then the measured one (label and batch size filled in by the caller)."""
    run_wrk(url, body, connections, WARMUP_S, CLIENT_CORE)
    result = run_wrk(url, body, connections, duration_s, CLIENT_CORE)
    return HttpPoint("", connections, result.rps, result.p50_ms, result.p99_ms, result.requests)


def gateway_metrics(base: str) -> str:
    return http_get(f"{base}/metrics").decode()


def _labels(text: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', text))


def worker_urls(base: str) -> dict[str, str]:
    """Each model's first endpoint, from the gateway's ``/stats``."""
    models = json.loads(http_get(f"{base}/stats"))["models"]
    return {model: stats["endpoint_urls"][0] for model, stats in models.items()}


def batch_rows(metrics: str, model: str) -> tuple[float, float]:
    """``(sum, count)`` of the gateway's batch-size histogram for ``model``, all versions."""
    values = {"sum": 0.0, "count": 0.0}
    pattern = r"^bazaar_gateway_batch_size_(sum|count)\{([^}]*)\}\s+(\S+)"
    for match in re.finditer(pattern, metrics, re.M):
        if _labels(match.group(2)).get("model") == model:
            values[match.group(1)] += float(match.group(3))
    return values["sum"], values["count"]


def server_batch_p50(url: str, model: str, rows: int) -> float:
    """Median ms of sequential binary requests of ``rows`` rows sent straight to a worker."""
    body, header_length = encode(model, rows, binary=True)
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(header_length),
    }
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
    times: list[float] = []
    try:
        for call in range(LATENCY_WARMUP_CALLS + LATENCY_CALLS):
            started = time.perf_counter()
            connection.request("POST", f"/v2/models/{model}/infer", body, headers)
            response = connection.getresponse()
            payload = response.read()
            elapsed = time.perf_counter() - started
            if response.status != 200:
                raise BenchError(f"{url} answered {response.status}: {payload[:200]!r}")
            if call >= LATENCY_WARMUP_CALLS:
                times.append(elapsed)
    finally:
        connection.close()
    return statistics.median(times) * 1e3


@dataclass(slots=True)
class Results:
    points: list[HttpPoint] = field(default_factory=list)
    ort: dict[str, list[OrtPoint]] = field(default_factory=dict)
    added: dict[str, float] = field(default_factory=dict)
    """The gateway's added p50 at c=1: through it, straight to the worker, the difference."""
    latencies: list[BatchLatency] = field(default_factory=list)
    overload: list[LoadPoint] = field(default_factory=list)
    """The overload and hostile-client points (``loadtests.overload``)."""


def run_bench(
    out: Path, repository: Path, models: list[str], duration: float, say: Callable[[str], None]
) -> Results:
    python = sys.executable
    results = Results()
    points = results.points
    bodies = {model: write_body(out, model, model in BINARY_MODELS) for model in models}

    def record(point: HttpPoint, scenario: str, mean_batch: float | None = None) -> None:
        labelled = HttpPoint(
            scenario,
            point.connections,
            point.rps,
            point.p50_ms,
            point.p99_ms,
            point.requests,
            mean_batch,
        )
        points.append(labelled)
        say(
            f"  {scenario} c={point.connections}: {point.rps:.0f} req/s, "
            f"p50 {point.p50_ms:.2f} ms, p99 {point.p99_ms:.2f} ms"
        )

    say("raw ONNX Runtime, in-process on core 0")
    ort = results.ort = measure_ort(repository, models, SERVER_CORE, out / "ort.json")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    say("trivial ASGI endpoint")
    trivial_cmd = [python, "-m", "loadtests.references", "trivial", "--port", str(port)]
    with PinnedServer("trivial", trivial_cmd, SERVER_CORE, f"{base}/", out) as server:
        server.start(READY_DEADLINE_S)
        trivial_body = bodies.get("mlp") or next(iter(bodies.values()))
        record(measure(f"{base}/", trivial_body, TRIVIAL_CONNECTIONS, duration), "trivial")

    if "mlp" in models:
        say("plain Starlette + ORT endpoint, mlp")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        plain_cmd = [
            python, "-m", "loadtests.references", "plain", "--port", str(port),
            "--model", str(model_file(repository, "mlp")),
        ]  # fmt: skip
        ready = f"{base}/v2/health/ready"
        with PinnedServer("plain", plain_cmd, SERVER_CORE, ready, out) as server:
            server.start(READY_DEADLINE_S)
            for connections in CONNECTIONS:
                url = f"{base}/v2/models/mlp/infer"
                record(measure(url, bodies["mlp"], connections, duration), "plain mlp JSON")

    say("bazaar serve, gateway and one worker per model")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve_cmd = [
        str(Path(python).with_name("bazaar")), "serve", "--model-repository", str(repository),
        "--port", str(port), "--grpc-port", "0", "--workers-per-model", "1",
    ]  # fmt: skip
    with PinnedServer("bazaar", serve_cmd, SERVER_CORE, f"{base}/v2/health/ready", out) as server:
        server.start(READY_DEADLINE_S)
        for model in models:
            scenario = f"bazaar {model} {'binary' if model in BINARY_MODELS else 'JSON'}"
            for connections in CONNECTIONS:
                url = f"{base}/v2/models/{model}/infer"
                run_wrk(url, bodies[model], connections, WARMUP_S, CLIENT_CORE)
                rows_before, batches_before = batch_rows(gateway_metrics(base), model)
                result = run_wrk(url, bodies[model], connections, duration, CLIENT_CORE)
                rows_after, batches_after = batch_rows(gateway_metrics(base), model)
                batches = batches_after - batches_before
                point = HttpPoint(
                    "", connections, result.rps, result.p50_ms, result.p99_ms, result.requests
                )
                record(point, scenario, (rows_after - rows_before) / batches if batches else None)
        workers = worker_urls(base)
        if "mlp" in models:
            say(f"mlp JSON at c=1 straight to the worker {workers['mlp']}")
            direct = measure(f"{workers['mlp']}/v2/models/mlp/infer", bodies["mlp"], 1, duration)
            record(direct, "mlp worker direct JSON")
            through = report.find(points, "bazaar mlp JSON", 1)
            assert through is not None
            results.added = {
                "gateway_p50_ms": through.p50_ms,
                "worker_p50_ms": direct.p50_ms,
                "added_p50_ms": through.p50_ms - direct.p50_ms,
            }
        say("per-batch latency through each model server, sequential binary requests")
        ort_p50 = {(m, p.batch): p.p50_ms for m, ps in ort.items() for p in ps}
        for model in models:
            for rows in LATENCY_BATCHES:
                server_p50 = server_batch_p50(workers[model], model, rows)
                results.latencies.append(
                    BatchLatency(model, rows, server_p50, ort_p50[(model, rows)])
                )

    return results


def summarise(
    results: Results, scenarios: list[str], duration: float, targets: list[report.Target]
) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "server_core": SERVER_CORE,
            "client_core": CLIENT_CORE,
            "load_average_at_end": os.getloadavg(),
        },
        "scenarios": scenarios,
        "duration_s": duration,
        "warmup_s": WARMUP_S,
    }
    if "serving" in scenarios:
        trivial = report.find(results.points, "trivial", TRIVIAL_CONNECTIONS)
        summary |= {
            "http": [asdict(point) for point in results.points],
            "generator_ceiling_rps": None if trivial is None else trivial.rps,
            "raw_ort": {m: [asdict(p) for p in points] for m, points in results.ort.items()},
            "gateway_added_latency": results.added,
            "per_batch_latency": [asdict(item) for item in results.latencies],
        }
    if results.overload:
        summary["overload"] = [asdict(point) for point in results.overload]
    summary["targets"] = [asdict(target) | {"verdict": target.verdict} for target in targets]
    return summary


def render(results: Results, scenarios: list[str], targets: list[report.Target]) -> str:
    points, added = results.points, results.added
    sections = []
    if "serving" in scenarios:
        sections += [
            "## HTTP throughput (closed loop, wrk -t1, servers on core 0, wrk on core 1)",
            report.http_table(points),
        ]
        trivial = report.find(points, "trivial", TRIVIAL_CONNECTIONS)
        if trivial is not None:
            sections.append(
                f"Generator ceiling: wrk against the trivial endpoint gives {trivial.rps:.0f} "
                "req/s; that is the ceiling this generator can measure on this machine."
            )
    if results.overload:
        sections += [
            f"## Overload and hostile clients ({ROWS}-row mlp JSON, bazaar serve with mlp "
            "alone on core 0, the Python generator on core 1)",
            report.load_table(results.overload),
        ]
    sections += ["## Targets", report.target_table(targets)]
    if "serving" not in scenarios:
        return "\n\n".join(sections) + "\n"
    sections += ["## Raw in-process ONNX Runtime (core 0, 1 thread)", report.ort_table(results.ort)]
    if added:
        sections += [
            "## Gateway added latency (mlp JSON, c=1, p50)",
            report.table(
                ["through gateway ms", "straight to worker ms", "added ms"],
                [
                    [
                        f"{added['gateway_p50_ms']:.3f}",
                        f"{added['worker_p50_ms']:.3f}",
                        f"{added['added_p50_ms']:.3f}",
                    ]
                ],
            ),
        ]
    sections += [
        "## Per-batch latency (binary tensors, sequential, p50 of "
        f"{LATENCY_CALLS} calls; server time includes the Python client on core 1)",
        report.batch_latency_table(results.latencies),
    ]
    return "\n\n".join(sections) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.duration = 3.0
    if not {SERVER_CORE, CLIENT_CORE} <= os.sched_getaffinity(0):
        print(f"needs cores {SERVER_CORE} and {CLIENT_CORE}", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {CLIENT_CORE})
    # Before any server starts: they inherit it, and a gateway's connection cap follows it.
    fd_limit = raise_fd_limit(FD_LIMIT)
    args.out.mkdir(parents=True, exist_ok=True)
    scenarios = [name for name in ("serving", *OVERLOAD_SCENARIOS) if name in args.scenarios]

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bazaar-bench-") as scratch:
        repository = args.repository
        if repository is None:
            repository = Path(scratch) / "repository"
            say(f"building the demo repository in {repository}")
            # The bazaar command builds it: the benchmark drives the product from outside.
            subprocess.run(
                [sys.executable, "-m", "bazaar", "models", "build-demo", str(repository)],
                check=True,
            )
        try:
            results = Results()
            if "serving" in scenarios:
                results = run_bench(args.out, repository, args.models, args.duration, say)
            overload = [name for name in scenarios if name in OVERLOAD_SCENARIOS]
            if overload:
                results.overload = run_overload(
                    args.out, repository, overload, args.duration, WARMUP_S, SERVER_CORE,
                    CLIENT_CORE, READY_DEADLINE_S, fd_limit, say,
                )  # fmt: skip
        except BenchError as exc:
            print(f"benchmark invalid: {exc}", file=sys.stderr)
            return 1
    targets = report.judge(results.points, results.ort) if "serving" in scenarios else []
    targets += report.judge_overload(results.overload)
    summary = summarise(results, scenarios, args.duration, targets)
    tables = render(results, scenarios, targets)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "BENCHMARKS-table.md").write_text(tables)
    print(tables)
    return 0
