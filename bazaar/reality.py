"""The work of ``bazaar replay`` (:mod:`bazaar.replay` says what it measures): the real run
against ``bazaar serve``, the measurements taken from it, and its simulated twin.

The real run's replicas are the local autoscaler's own gauges on the gateway's ``/metrics``,
read once a second: ``bazaar_autoscaler_desired_replicas`` (workers asked for: the local scaler
applies a decision at once) and ``bazaar_autoscaler_ready_replicas``. Its replica-seconds
integrate the first over the trace, as the simulator integrates its replicas asked for.
A request meets the SLO when it is answered 200 within ``--slo-ms`` of falling due; everything
else (refused, timed out, not sent) misses, in both runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import yaml
from prometheus_client.parser import text_string_to_metric_families

from autoscaler.policy import ScaleConfig
from autoscaler.simulation import report
from autoscaler.simulation.benchmark import Bazaar
from autoscaler.simulation.simulator import SimConfig, simulate
from autoscaler.simulation.traces import Trace, TraceError, compressed, load
from bazaar.replay import MAX_CONNECTIONS, REQUEST_PATH
from gateway.config import GatewayConfig
from gateway.dispatcher import DEFAULT_MAX_QUEUE_SIZE
from loadtests.loadgen import Request, Tally, raise_fd_limit, trace_loop
from models.config import load_config
from protocol.support import free_port

READY_TIMEOUT_S = 120.0
SAMPLE_S = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class RealRun:
    """What the real run measured."""

    tally: Tally
    samples: list[tuple[float, int, int]]
    """(seconds since the load started, replicas asked for, ready), once a second."""
    batch_s: float
    """Mean executing time of a batch at the workers."""
    hop_s: float
    """Mean time of a batch's pod call at the gateway beyond the workers' mean compute: the
    hop to the worker and back, encoding and decoding, on this machine under the run's load
    (and the wait of a second, full batch behind the first at a worker, which the simulator
    models itself: small unless the workers saturate)."""


def replay(args: argparse.Namespace) -> int:
    from bazaar.cli import _demo_repository

    try:
        trace = compressed(load(args.trace, args.seed), args.duration_s, args.seed, args.peak_rps)
    except TraceError as exc:
        print(f"bazaar replay: {exc}", file=sys.stderr)
        return 2
    demo = _demo_repository()
    if demo is None:
        return 2
    config = ScaleConfig(
        min_replicas=1,
        max_replicas=args.max_workers,
        scale_down_window_s=args.scale_down_window_s,
    )  # as `bazaar serve` builds it from the same options
    out: Path = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bazaar-replay-") as scratch:
        repository = accelerator_repository(
            demo, Path(scratch), args.max_batch_size, args.min_batch_time_ms
        )
        with _serving(args, repository, out / "serve.log") as (server, port):
            real = asyncio.run(_real_run(server, port, trace))
    starts = cold_starts((out / "serve.log").read_text())
    if not starts:
        print("bazaar replay: the autoscaler started no worker: no cold start", file=sys.stderr)
        return 1
    cold_start_s = float(np.mean(starts))
    sim = SimConfig(
        cold_start_s=round(cold_start_s),
        pending_s=0,
        max_batch=args.max_batch_size,
        batches_per_replica=GatewayConfig().max_batches_per_endpoint,
        batch_base_ms=round(real.batch_s * 1000),
        batch_row_ms=0,
        hop_ms=round(real.hop_s * 1000),
        queue_bound=DEFAULT_MAX_QUEUE_SIZE,
        queue_timeout_s=30,
        metrics="direct",
        rate_window_s=1,
        max_replicas=args.max_workers,
    )
    simulated = simulate(trace, Bazaar(config), sim, initial=1)
    rows = [
        real_summary(real, trace, args.slo_ms),
        report.summarize(simulated, trace, args.slo_ms) | {"policy": "simulated"},
    ]
    measured = {
        "batch_ms": round(real.batch_s * 1000, 1),
        "hop_ms": round(real.hop_s * 1000, 1),
        "capacity_rps": round(args.max_batch_size / real.batch_s, 1),
        "cold_start_s": round(cold_start_s, 1),
        "cold_starts_s": [round(start, 1) for start in starts],
    }
    print(f"measured: {measured}")
    print(table(rows))
    (out / "replay.json").write_text(
        json.dumps(
            {
                "settings": {k: str(v) for k, v in vars(args).items() if k != "run"},
                "measured": measured,
                "runs": rows,
                "real_samples": real.samples,
                "simulated_replicas": simulated.replicas.tolist(),
                "simulated_ready": simulated.ready.tolist(),
            },
            indent=1,
        )
        + "\n"
    )
    plot(out / "replay.png", trace, real, simulated, args.slo_ms)
    print(f"\nwrote {out / 'replay.json'} and {out / 'replay.png'}")
    return 0


def accelerator_repository(
    demo: Path, root: Path, max_batch_size: int, min_batch_time_ms: float
) -> Path:
    """A repository with the demo ``mlp`` alone, each batch taking ``min_batch_time_ms``."""
    shutil.copytree(demo / "mlp", root / "mlp")
    config = load_config(root / "mlp" / "config.yaml")
    config = dataclasses.replace(
        config, max_batch_size=max_batch_size, min_batch_time_ms=min_batch_time_ms
    )
    (root / "mlp" / "config.yaml").write_text(yaml.safe_dump(config.to_json()))
    return root


def one_row_request() -> Request:
    row = [0.5] * 256
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 256], "data": row}]}
    return Request(REQUEST_PATH, json.dumps(body).encode(), (("Content-Type", "application/json"),))


@contextlib.contextmanager
def _serving(
    args: argparse.Namespace, repository: Path, log_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``bazaar serve`` on ``repository`` with its local autoscaler; yields (process, port)."""
    raise_fd_limit(MAX_CONNECTIONS + 1024)  # before the server starts: it inherits the limit
    port = args.port or free_port()
    command = [sys.executable, "-m", "bazaar", "serve", "--model-repository", str(repository)]
    command += ["--port", str(port), "--grpc-port", "0"]
    command += ["--max-workers-per-model", str(args.max_workers)]
    command += ["--scale-down-window", str(args.scale_down_window_s)]
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield server, port
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


async def _real_run(server: subprocess.Popen[bytes], port: int, trace: Trace) -> RealRun:
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        await _ready(session, f"{url}{REQUEST_PATH.removesuffix('/infer')}/ready", server)
        samples: list[tuple[float, int, int]] = []
        stop = asyncio.Event()
        started = time.perf_counter()
        watcher = asyncio.create_task(_watch(session, url, started, samples, stop))
        due_s = (trace.arrivals_ms / 1000).tolist()
        tally = await trace_loop("127.0.0.1", port, one_row_request(), due_s, MAX_CONNECTIONS)
        stop.set()
        await watcher
        batch_s, hop_s = await batch_and_hop_seconds(session, url)
    return RealRun(tally, samples, batch_s, hop_s)


async def _ready(session: aiohttp.ClientSession, url: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"bazaar serve exited ({server.returncode}); see its log")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url) as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {READY_TIMEOUT_S:.0f} s")


async def _watch(
    session: aiohttp.ClientSession,
    url: str,
    started: float,
    samples: list[tuple[float, int, int]],
    stop: asyncio.Event,
) -> None:
    """The autoscaler's replicas asked for and ready, once a second, until ``stop``."""
    while not stop.is_set():
        at = time.perf_counter() - started
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(f"{url}/metrics") as response:
                gauges = _gauges(await response.text(), "mlp")
            desired = gauges.get("bazaar_autoscaler_desired_replicas")
            ready = gauges.get("bazaar_autoscaler_ready_replicas")
            if desired is not None and ready is not None:
                samples.append((round(at, 3), int(desired), int(ready)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_S)


async def batch_and_hop_seconds(session: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    """Mean executing time of a batch in the workers still running at the end, and how much
    longer the gateway's pod calls took on average (:attr:`RealRun.hop_s`)."""
    async with session.get(f"{url}/metrics/workers") as response:
        workers = _gauges(await response.text(), "mlp")
    async with session.get(f"{url}/metrics") as response:
        gateway = _gauges(await response.text(), "mlp")
    batch_s = (
        workers["bazaar_model_compute_seconds_sum"] / workers["bazaar_model_compute_seconds_count"]
    )
    pod_s = gateway["bazaar_gateway_pod_seconds_sum"] / gateway["bazaar_gateway_pod_seconds_count"]
    return batch_s, pod_s - batch_s


def _gauges(text: str, model: str) -> dict[str, float]:
    """Every sample of ``model`` (or without labels) by name, summed over other labels."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model", model) == model:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


_STARTED = re.compile(r"^(\S+ \S+) INFO +bazaar\.supervisor: started mlp worker (\d+) ", re.M)
_READY = re.compile(r"^(\S+ \S+) INFO +bazaar\.supervisor: mlp worker (\d+) on \S+ is ready", re.M)


def cold_starts(log: str) -> list[float]:
    """Seconds from each worker's start to its readiness, from ``bazaar serve``'s log (the
    supervisor says both), for the workers the autoscaler started: the first starts with the
    gateway, before the load."""
    started = {int(n): _log_time(at) for at, n in _STARTED.findall(log)}
    ready = {int(n): _log_time(at) for at, n in _READY.findall(log)}
    return [ready[n] - started[n] for n in sorted(started) if n > 1 and n in ready]


def _log_time(text: str) -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def real_summary(real: RealRun, trace: Trace, slo_ms: int) -> dict[str, Any]:
    tally, total = real.tally, len(trace.arrivals_ms)
    latencies_ms = np.array(tally.ok_latencies_s) * 1000
    return {
        "trace": trace.name,
        "policy": "bazaar serve",
        "requests": total,
        "p50_ms": round(float(np.percentile(latencies_ms, 50)), 1),
        "p99_ms": round(float(np.percentile(latencies_ms, 99)), 1),
        "slo_attainment": round(float(np.sum(latencies_ms <= slo_ms)) / total, 6),
        "not_ok": total - len(latencies_ms),
        "replica_seconds": round(replica_seconds(real.samples, trace.duration_s), 1),
    }


def replica_seconds(samples: list[tuple[float, int, int]], duration_s: int) -> float:
    """The replicas asked for, integrated over [0, duration_s] as a step function."""
    total = 0.0
    for (at, asked, _), (until, _, _) in zip(
        samples, [*samples[1:], (duration_s, 0, 0)], strict=True
    ):
        total += asked * max(0.0, min(until, duration_s) - min(at, duration_s))
    return total


def table(rows: list[dict[str, Any]]) -> str:
    columns = ("policy", "requests", "p50_ms", "p99_ms", "slo_attainment", "replica_seconds")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c)) for c in columns) + " |" for row in rows]
    real, simulated = rows
    for key in ("slo_attainment", "replica_seconds"):
        off = simulated[key] / real[key] - 1
        lines.append(f"simulated {key}: {off:+.1%} of the real run's")
    return "\n".join(lines)


def plot(path: Path, trace: Trace, real: RealRun, simulated: Any, slo_ms: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (load_axis, replicas_axis, p99_axis) = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    load_axis.plot(np.arange(trace.duration_s), trace.rate_per_s, lw=0.8, color="tab:gray")
    load_axis.set_ylabel("offered (req/s)")
    at = [t for t, _, _ in real.samples]
    replicas_axis.step(at, [a for _, a, _ in real.samples], where="post", label="serve: asked")
    replicas_axis.step(at, [r for _, _, r in real.samples], where="post", label="serve: ready")
    seconds = np.arange(len(simulated.replicas))
    replicas_axis.step(seconds, simulated.replicas, where="post", ls="--", label="sim: asked")
    replicas_axis.step(seconds, simulated.ready, where="post", ls="--", label="sim: ready")
    replicas_axis.set_ylabel("replicas")
    replicas_axis.legend(loc="upper left", fontsize="small")
    bins = np.arange(0, trace.duration_s + report.BIN_S, report.BIN_S)
    real_p99 = _p99(np.array(real.tally.ok_due_s), np.array(real.tally.ok_latencies_s), bins)
    done = simulated.finished_ms >= 0
    sim_p99 = _p99(
        simulated.admitted_ms[done] / 1000,
        (simulated.finished_ms[done] - simulated.admitted_ms[done]) / 1000,
        bins,
    )
    p99_axis.plot(bins[:-1], real_p99, label="serve")
    p99_axis.plot(bins[:-1], sim_p99, ls="--", label="sim")
    p99_axis.axhline(slo_ms, lw=0.5, ls=":", color="black")
    p99_axis.set_yscale("log")
    p99_axis.set_ylabel(f"p99 of answered, per {report.BIN_S} s (ms)")
    p99_axis.set_xlabel("time (s)")
    p99_axis.legend(loc="upper left", fontsize="small")
    fig.suptitle(f"{trace.name}: bazaar serve against the simulator")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _p99(
    due_s: npt.NDArray[np.float64], latency_s: npt.NDArray[np.float64], bins: npt.NDArray[Any]
) -> list[float]:
    """p99 in ms of the answered requests, by the bin of their due time."""
    latency = latency_s * 1000
    which = np.digitize(due_s, bins) - 1
    return [
        float(np.percentile(latency[which == b], 99)) if np.any(which == b) else 0.0
        for b in range(len(bins) - 1)
    ]
