"""The gateway's own cost per request, in process: CPU time and Python calls, traced or not.

The real app, catalog, dispatcher and codec serve 1-row JSON requests one after another
through the ASGI interface, to a pod that answers at once (no I/O), so what is counted is the
gateway's work alone. Process CPU time (every thread: the span exporter's too) is much less
sensitive to other load on the machine than wall time; Python calls (cProfile) not at all.
With ``--trace`` the process traces as ``--otlp-endpoint`` makes it, its spans sent over
OTLP/HTTP to a sink in this process that reads and drops them::

    python -m tests.gateway.bench_cpu --requests 4000 [--trace]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import random
import threading
import time
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import uvloop
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.catalog import ModelCatalog, ServedModel
from gateway.config import GatewayConfig
from gateway.dispatcher import BatchPolicy, Dispatcher
from gateway.metrics import GatewayMetrics
from gateway.router import EndpointPool, Tensors
from protocol import tracing
from protocol.schema import ModelMetadata

METADATA = ModelMetadata.from_json(
    {
        "name": "m",
        "versions": ["1"],
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 16]}],
        "parameters": {"max_batch_size": 8},
    }
)
ROUNDS = 5


class _InstantPod:
    async def infer(self, url: str, model: str, inputs: Tensors, timeout_s: float) -> Tensors:
        return {"y": inputs["x"] * 2}

    async def ready(self, url: str, model: str) -> bool:
        return True


class _Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


async def _gateway() -> tuple[Callable[[], Awaitable[None]], Dispatcher, asyncio.Task[None]]:
    metrics = GatewayMetrics(CollectorRegistry())
    pod: Any = _InstantPod()
    catalog = ModelCatalog(pod, metrics, GatewayConfig())
    pool = EndpointPool("m", pod, rng=random.Random(0))
    pool.set_endpoints(["http://pod"])
    model_metrics = metrics.for_model("m", "1")
    dispatcher = Dispatcher("m", BatchPolicy(max_batch_size=8), pool, model_metrics)
    task = asyncio.create_task(dispatcher.run())
    served = ServedModel(METADATA, dispatcher, model_metrics, task)
    catalog.models["m"] = served
    catalog.versions["m"] = {"1": served}
    app = create_app(catalog)
    body = orjson.dumps(
        {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}
    )
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v2/models/m/infer",
        "headers": [(b"content-type", b"application/json")],
        "query_string": b"",
        "http_version": "1.1",
        "scheme": "http",
        "server": ("gateway", 80),
        "client": ("client", 1),
        "root_path": "",
    }

    async def call() -> None:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(dict(scope), receive, send)
        assert sent[0]["status"] == 200, sent

    return call, dispatcher, task


async def _measure(requests: int) -> tuple[float, float]:
    call, dispatcher, task = await _gateway()
    for _ in range(500):
        await call()
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.process_time()
        for _ in range(requests):
            await call()
        best = min(best, (time.process_time() - started) / requests)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(requests):
        await call()
    profile.disable()
    calls = pstats.Stats(profile).total_calls / requests  # type: ignore[attr-defined]
    dispatcher.close()
    task.cancel()
    return best, calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.gateway.bench_cpu", description=__doc__)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--trace", action="store_true", help="trace, spans to a local sink")
    args = parser.parse_args(argv)
    if args.trace:
        sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
        threading.Thread(target=sink.serve_forever, daemon=True).start()
        tracing.configure("bazaar-gateway", f"http://127.0.0.1:{sink.server_address[1]}")
    cpu_s, calls = uvloop.run(_measure(args.requests))
    tracing.shutdown()
    mode = "traced" if args.trace else "not traced"
    print(
        f"{mode}: {cpu_s * 1e6:.1f} us CPU a request (best of {ROUNDS} x {args.requests}), "
        f"{calls:.0f} Python calls a request"
    )


if __name__ == "__main__":
    main()
