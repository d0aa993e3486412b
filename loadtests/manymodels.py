"""Many small models on one machine: memory, time to ready, cold starts, throughput by layout.

``python -m loadtests.manymodels`` (``make bench-models``) copies the digits classifier (built
with ``bazaar models build-demo``, or ``--digits DIR``) under ``--models`` names and measures
three layouts, each started fresh, one after the other:

- ``per-model``: ``bazaar serve``, one worker process per model, as before issue 15. It
  costs about 90 MB a model, so it runs with ``--per-model-models`` of them (default 20):
  200 would not fit a shared machine.
- ``shared``: ``bazaar serve --worker-memory``: the models packed into a few workers.
- ``paged``: ``bazaar gateway --endpoints`` in front of one ``bazaar model-server
  --memory-budget`` pod holding about ``--resident`` models at once: the Kubernetes shape of
  a model group, and the one with cold models.
- ``serve-paged``: ``bazaar serve --worker-memory --memory-budget``: the models packed into
  about ``--paged-workers`` workers, which hold about ``--resident`` models between them.
- ``paged-pods``: as ``paged``, with two pods that each serve every model and hold half of
  ``--resident``: where the gateway's cache affinity decides how often models page in.

Per layout: one request to every model, each of which must be answered (a layout where
one is not fails the run); the resident memory of every process of the layout together
(gateway, workers or pod), after the Zipf run; the time from starting the processes until
every model is ready at the gateway; of those first requests, the ones to the first
``--cold`` models (in ``paged``, models the pod has evicted, so the request waits for a
load, as in ``serve-paged``; elsewhere the first request through the gateway to a loaded
model) and a second one
to each; and a closed loop of ``--connections`` clients for ``--duration`` seconds, each
request for a model drawn from a Zipf distribution (rank ``k`` weighs ``1/k^s``, ``s`` =
``--zipf``), one row each: requests per second, p50 and p99 latency, errors, and the model
loads the workers or pods made during it (``bazaar_model_load_seconds_count``). Servers and
generator share the machine's cores; the figures compare layouts on one machine, not
machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from loadtests.procs import children, http_get, rss_bytes
from loadtests.wrk import BenchError

BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [8.0] * 64}]}
).encode()
READY_DEADLINE_S = 600.0
TERMINATE_GRACE_S = 15.0


@dataclass(frozen=True, slots=True)
class Figures:
    layout: str
    models: int
    processes: int
    rss_bytes: int
    ready_s: float
    first_ms: float
    """Median latency of the first request to a model (cold in the paged layouts)."""
    again_ms: float
    """Median latency of the second request to the same models."""
    rate: float
    p50_ms: float
    p99_ms: float
    errors: int
    loads: int
    """Models loaded (paged in) during the Zipf run, over every worker or pod."""


def build_repository(digits: Path, root: Path, count: int) -> list[str]:
    names = [f"m{index:03d}" for index in range(count)]
    for name in names:
        shutil.copytree(digits, root / name)
    return names


@contextlib.contextmanager
def started(command: Sequence[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process in a session of its own; SIGTERM on exit, then SIGKILL to the session."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(TERMINATE_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


def tree_rss(pids: Sequence[int]) -> tuple[int, int]:
    """(processes, resident bytes) of ``pids`` and all their descendants."""
    seen, total, todo = 0, 0, list(pids)
    while todo:
        pid = todo.pop()
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, BenchError):
            total += rss_bytes(pid)
            seen += 1
            todo.extend(children(pid))
    return seen, total


def wait_ready(
    url: str, models: Sequence[str], processes: Sequence[subprocess.Popen[bytes]]
) -> None:
    """Until every model has a ready endpoint at the gateway (``/stats``)."""
    give_up = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < give_up:
        for process in processes:
            if process.poll() is not None:
                raise BenchError(f"{process.args!r} exited with {process.returncode}")
        with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
            stats = json.loads(http_get(f"{url}/stats"))["models"]
            if all(stats.get(m, {}).get("ready_endpoints", 0) > 0 for m in models):
                return
        time.sleep(0.1)
    raise BenchError(f"not every model was ready at {url} within {READY_DEADLINE_S:g} s")


async def _post(session: aiohttp.ClientSession, url: str, model: str) -> tuple[int, float]:
    started_at = time.perf_counter()
    async with session.post(
        f"{url}/v2/models/{model}/infer",
        data=BODY,
        headers={"Content-Type": "application/json"},
    ) as response:
        await response.read()
        return response.status, time.perf_counter() - started_at


async def first_requests(url: str, models: Sequence[str], cold: int) -> tuple[float, float]:
    """The median ms of a first request to each of the first ``cold`` models and of a second
    one to each; then a request to every other model. Each must be answered 200."""
    order = [*models[:cold], *models[:cold], *models[cold:]]
    async with aiohttp.ClientSession() as session:
        answers = [await _post(session, url, model) for model in order]
    for model, (status, _) in zip(order, answers, strict=True):
        if status != 200:
            raise BenchError(f"{model}: a first request was answered {status}")
    first, again = answers[:cold], answers[cold : 2 * cold]
    return (
        float(np.median([t for _, t in first])) * 1000,
        float(np.median([t for _, t in again])) * 1000,
    )


async def zipf_run(
    url: str, models: Sequence[str], connections: int, duration_s: float, s: float, seed: int
) -> tuple[float, float, float, int]:
    """Closed loop; (requests/s, p50 ms, p99 ms, errors)."""
    weights = 1.0 / np.arange(1, len(models) + 1) ** s
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(models), size=1_000_000, p=weights / weights.sum())
    latencies: list[float] = []
    errors = 0
    next_pick = 0
    end = time.perf_counter() + duration_s

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors, next_pick
        while time.perf_counter() < end:
            model = models[picks[next_pick % len(picks)]]
            next_pick += 1
            try:
                status, seconds = await _post(session, url, model)
            except aiohttp.ClientError as exc:
                errors += 1
                print(f"{model}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            if status == 200:
                latencies.append(seconds)
            else:
                errors += 1
                print(f"{model}: answered {status}", file=sys.stderr)

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        began = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(connections)))
        elapsed = time.perf_counter() - began
    if not latencies:
        raise BenchError("no request was answered")
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    return len(latencies) / elapsed, float(p50), float(p99), errors


def model_loads(urls: Sequence[str]) -> int:
    """Model loads so far, summed over the ``/metrics`` expositions at ``urls``."""
    loads = 0.0
    for url in urls:
        text = http_get(url, timeout_s=10.0).decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "bazaar_model_load_seconds_count":
                    loads += sample.value
    return int(loads)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bazaar(*args: str) -> list[str]:
    return [sys.executable, "-m", "bazaar", "--log-level", "warning", *args]


def measure(args: argparse.Namespace, layout: str, work: Path) -> Figures:
    count = args.per_model_models if layout == "per-model" else args.models
    root = Path(tempfile.mkdtemp(prefix=f"{layout}-repository-", dir=work))
    models = build_repository(args.digits, root, count)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve = ["serve", "--model-repository", str(root), "--port", str(port), "--grpc-port", "0"]
    serve += ["--no-autoscale"]
    with contextlib.ExitStack() as stack:
        began = time.monotonic()
        if layout in ("paged", "paged-pods"):
            count_pods = 1 if layout == "paged" else 2
            budget = args.resident * args.footprint // count_pods
            pods, pod_urls = [], []
            for index in range(count_pods):
                pod_port = _free_port()
                pods.append(
                    stack.enter_context(
                        started(
                            _bazaar(
                                "model-server",
                                "--model-repository",
                                str(root),
                                "--port",
                                str(pod_port),
                                "--memory-budget",
                                str(budget),
                            ),
                            work / f"{layout}-pod{index}.log",
                        )
                    )
                )
                pod_urls.append(f"http://127.0.0.1:{pod_port}")
            endpoints = work / f"{layout}-endpoints.yaml"
            endpoints.write_text(json.dumps({"models": {m: pod_urls for m in models}}))
            metrics = [f"{url}/metrics" for url in pod_urls]
            gateway = stack.enter_context(
                started(
                    _bazaar(
                        "gateway",
                        "--endpoints",
                        str(endpoints),
                        "--port",
                        str(port),
                        "--grpc-port",
                        "0",
                    ),
                    work / f"{layout}-gateway.log",
                )
            )
            processes = [*pods, gateway]
        else:
            if layout == "shared":
                serve += ["--worker-memory", str(args.worker_memory)]
            elif layout == "serve-paged":
                # A model is estimated at a little under --footprint: this packs about
                # count / --paged-workers models into each worker.
                per_worker = -(-count // args.paged_workers)
                serve += ["--worker-memory", str(per_worker * args.footprint)]
                budget = args.resident * args.footprint // args.paged_workers
                serve += ["--memory-budget", str(budget)]
            processes = [stack.enter_context(started(_bazaar(*serve), work / f"{layout}.log"))]
            metrics = [f"{url}/metrics/workers"]
        wait_ready(url, models, processes)
        ready_s = time.monotonic() - began
        # The paged layouts: the first models swept in were evicted by the last ones.
        first_ms, again_ms = asyncio.run(first_requests(url, models, args.cold))
        loads_before = model_loads(metrics)
        rate, p50, p99, errors = asyncio.run(
            zipf_run(url, models, args.connections, args.duration, args.zipf, args.seed)
        )
        loads = model_loads(metrics) - loads_before
        count_processes, rss = tree_rss([p.pid for p in processes])
    return Figures(
        layout,
        count,
        count_processes,
        rss,
        ready_s,
        first_ms,
        again_ms,
        rate,
        p50,
        p99,
        errors,
        loads,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.manymodels", description=__doc__)
    parser.add_argument(
        "--digits",
        type=Path,
        metavar="DIR",
        help="the digits model directory (default: built with bazaar models build-demo)",
    )
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--per-model-models", type=int, default=20, metavar="N")
    parser.add_argument("--worker-memory", type=int, default=64_000_000, metavar="BYTES")
    parser.add_argument(
        "--resident",
        type=int,
        default=50,
        metavar="N",
        help="paged, serve-paged, paged-pods: models held at once",
    )
    parser.add_argument(
        "--footprint", type=int, default=1_250_000, metavar="BYTES", help="paged: one model's"
    )
    parser.add_argument(
        "--paged-workers", type=int, default=2, metavar="N", help="serve-paged: workers"
    )
    parser.add_argument("--cold", type=int, default=20, metavar="N")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=20.0, metavar="SECONDS")
    parser.add_argument("--zipf", type=float, default=1.1, metavar="S")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument(
        "--layout",
        action="append",
        choices=["per-model", "shared", "paged", "serve-paged", "paged-pods"],
    )
    args = parser.parse_args(argv)
    print(
        "layout      models procs    RSS MB  ready s  first ms  again ms    req/s  p50 ms  p99 ms"
        "  errors   loads"
    )
    with tempfile.TemporaryDirectory(prefix="manymodels-") as work:
        if args.digits is None:
            demo = Path(work) / "demo"
            command = _bazaar("models", "build-demo", str(demo))
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            args.digits = demo / "digits"
        args.digits = args.digits.resolve()
        layouts = ["per-model", "shared", "paged", "serve-paged", "paged-pods"]
        for layout in args.layout or layouts:
            f = measure(args, layout, Path(work))
            print(
                f"{f.layout:11} {f.models:6d} {f.processes:5d} {f.rss_bytes / 1e6:9.0f} "
                f"{f.ready_s:8.1f} {f.first_ms:9.1f} {f.again_ms:9.1f} {f.rate:8.0f} "
                f"{f.p50_ms:7.1f} {f.p99_ms:7.1f} {f.errors:7d} {f.loads:7d}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
