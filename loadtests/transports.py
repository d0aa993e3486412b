"""The gateway's transports in one run: its clients' (HTTP with JSON tensors, HTTP with
binary tensors, gRPC with raw contents) and its hop to the pods (binary HTTP or gRPC)
(``python -m loadtests.transports REPOSITORY``).

Two ``bazaar serve`` (gateway and one mlp worker each, no autoscaling), each in its own
process group: one with ``--hop grpc``, one with ``--hop http``. In this process, one
client per transport: an aiohttp session posting bodies made by the gateway's own codec
(``protocol.codec``), and a ``grpc.aio`` channel sending ``ModelInferRequest`` with raw
contents (``protocol.grpc.codec``, what ``tritonclient.grpc`` sends). A call is one request
for ``mlp`` (1 row of 256 FP32 features), each caller sending its next as soon as its last
is answered, 1 or 16 callers (16 makes batches at the gateway). Two tables:

- clients: the three client transports to the ``--hop grpc`` gateway;
- hop: HTTP binary requests to either gateway, so only the hop differs.

Within a table the cases take turns round by round (a warm-up, then the measured calls), so
the noise of a shared machine falls on all alike; per case the best round is printed: calls
per second, p50 and p99 latency, and the rate as a multiple of the table's first case's
(``rate/CASE``). Any answer but a success ends the run. The load average before and after
goes with the numbers: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import grpc
import numpy as np

from protocol.codec import InferenceRequest, encode_request
from protocol.grpc import codec
from protocol.grpc.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from protocol.support import free_port

MODEL = "mlp"
WIDTH = 256
CALLERS = (1, 16)
READY_DEADLINE_S = 120.0
TERMINATE_GRACE_S = 15.0

Call = Callable[[], Awaitable[None]]


@contextlib.contextmanager
def serving(repository: Path, hop: str, log: Path) -> Iterator[tuple[str, str]]:
    """``bazaar serve --hop HOP`` over ``repository``'s mlp alone; yields its HTTP URL and
    gRPC target."""
    with tempfile.TemporaryDirectory() as root:
        shutil.copytree(repository / MODEL, Path(root) / MODEL)
        http_port, grpc_port = free_port("127.0.0.1"), free_port("127.0.0.1")
        command = [sys.executable, "-m", "bazaar", "--log-level", "warning", "serve"]
        command += ["--model-repository", root, "--no-autoscale", "--hop", hop]
        command += ["--port", str(http_port), "--grpc-port", str(grpc_port)]
        url = f"http://127.0.0.1:{http_port}"
        with log.open("wb") as output:
            server = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            _wait_ready(server, f"{url}/v2/models/{MODEL}/ready", log)
            yield url, f"127.0.0.1:{grpc_port}"
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(TERMINATE_GRACE_S)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(server.pid, signal.SIGKILL)  # a worker that missed the news


def _wait_ready(server: subprocess.Popen[bytes], url: str, log: Path) -> None:
    give_up = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < give_up:
        if server.poll() is not None:
            raise SystemExit(f"bazaar serve exited with {server.returncode}; see {log}")
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(url, timeout=1.0),
        ):
            return
        time.sleep(0.1)
    raise SystemExit(f"bazaar serve not ready within {READY_DEADLINE_S:g} s; see {log}")


async def _round(call: Call, callers: int, calls: int) -> tuple[float, list[float]]:
    latencies: list[float] = []

    async def caller(count: int) -> None:
        for _ in range(count):
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller(calls // callers) for _ in range(callers)))
    return len(latencies) / (time.perf_counter() - started), latencies


def _http_call(session: aiohttp.ClientSession, url: str, binary: bool, row: np.ndarray) -> Call:
    request = InferenceRequest(
        id=None, parameters={}, inputs={"input": row}, outputs=None, binary_output=binary
    )
    body, header_length = encode_request(request, binary=binary)
    headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)

    async def call() -> None:
        async with session.post(url, data=body, headers=headers) as response:
            answer = await response.read()
            if response.status != 200:
                raise SystemExit(f"the gateway answered {response.status}: {answer[:200]!r}")

    return call


def _grpc_call(stub: GRPCInferenceServiceStub, row: np.ndarray) -> Call:
    message = codec.encode_request(MODEL, {"input": row}, {})

    async def call() -> None:
        codec.decode_response(await stub.ModelInfer(message, timeout=30.0))

    return call


async def measure(
    clients: tuple[str, str], hop: tuple[str, str], calls: int, rounds: int
) -> list[str]:
    """The tables' lines: ``clients`` (the gRPC hop's gateway) and ``hop`` (the HTTP hop's
    gateway), each an HTTP URL and a gRPC target."""
    row = np.random.default_rng(0).random((1, WIDTH), dtype=np.float32)
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            headers={"Accept-Encoding": "identity"},
            timeout=aiohttp.ClientTimeout(total=30.0),
        ) as session,
        grpc.aio.insecure_channel(clients[1]) as channel,
    ):
        stub = GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        infer = f"{clients[0]}/v2/models/{MODEL}/infer"
        lines = ["clients (hop: grpc)"]
        lines += await _table(
            {
                "http-json": _http_call(session, infer, False, row),
                "http-binary": _http_call(session, infer, True, row),
                "grpc": _grpc_call(stub, row),
            },
            calls,
            rounds,
        )
        lines.append("hop (client: http-binary)")
        lines += await _table(
            {
                "hop-http": _http_call(session, f"{hop[0]}/v2/models/{MODEL}/infer", True, row),
                "hop-grpc": _http_call(session, infer, True, row),
            },
            calls,
            rounds,
        )
    return lines


async def _table(cases: dict[str, Call], calls: int, rounds: int) -> list[str]:
    """Per caller count and case, the best of ``rounds`` rounds, the cases taking turns."""
    first = next(iter(cases))
    columns = f"{'callers':>7} {'case':>11} {'calls/s':>8} {'p50 ms':>7} {'p99 ms':>7}"
    lines = [f"{columns} {'rate/' + first:>14}"]
    for callers in CALLERS:
        best: dict[str, tuple[float, list[float]]] = {}
        for _ in range(rounds):
            for name, call in cases.items():
                await _round(call, callers, max(callers, calls // 10))  # warm
                rate, latencies = await _round(call, callers, calls)
                if name not in best or rate > best[name][0]:
                    best[name] = (rate, latencies)
        for name, (rate, latencies) in best.items():
            cuts = statistics.quantiles(latencies, n=100)
            lines.append(
                f"{callers:>7} {name:>11} {rate:>8.0f} {cuts[49] * 1000:>7.2f} "
                f"{cuts[98] * 1000:>7.2f} {rate / best[first][0]:>14.2f}"
            )
    return lines


def _load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "repository", type=Path, help="a demo repository (bazaar models build-demo DIR)"
    )
    parser.add_argument("--calls", type=int, default=2000, help="calls per round (2000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per transport (3)")
    parser.add_argument(
        "--logs",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="serve logs go here (default: the system's temporary directory, not the checkout)",
    )
    args = parser.parse_args()
    repository = args.repository.absolute()
    with (
        serving(repository, "grpc", args.logs / "transports-grpc-hop.log") as clients,
        serving(repository, "http", args.logs / "transports-http-hop.log") as hop,
    ):
        print(f"cpus {os.cpu_count()}, load average before {_load_average()}")
        print("\n".join(asyncio.run(measure(clients, hop, args.calls, args.rounds))))
        print(f"load average after {_load_average()}")


if __name__ == "__main__":
    main()
