"""The gateway→pod hop, binary HTTP against gRPC: ``python -m tests.gateway.bench_hop REPOSITORY``.

One pod (``bazaar model-server`` in a child process, serving HTTP and gRPC) and, in this
process, the gateway's side of the hop: today's ``gateway.client.HttpModelClient`` (aiohttp,
binary tensors) and a ``grpc.aio`` channel sending ``ModelInferRequest`` with raw contents
(``protocol.grpc.codec``, what a gRPC model client would send). Each case is a batch of
``mlp``'s FP32 rows (256 features), 1 or 32 rows, at 1 or 8 calls in flight; the transports
alternate round by round, so a machine shared with other work loads both alike. Printed:
round trips per second and p50/p99 latency per case and transport, best round of each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx
import numpy as np

from gateway.client import HttpModelClient
from protocol.grpc import codec
from protocol.grpc.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from protocol.support import free_port

Call = Callable[[], Awaitable[object]]


async def _round(call: Call, concurrency: int, calls: int) -> tuple[float, list[float]]:
    latencies: list[float] = []

    async def caller(n: int) -> None:
        for _ in range(n):
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller(calls // concurrency) for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - started), latencies


async def _measure(http_url: str, grpc_target: str, calls: int, rounds: int) -> None:
    client = HttpModelClient()
    channel = grpc.aio.insecure_channel(
        grpc_target,
        options=[
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            ("grpc.max_send_message_length", 256 * 1024 * 1024),
        ],
    )
    stub = GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    rng = np.random.default_rng(0)
    print(f"{'rows':>4} {'conc':>4} {'transport':>9} {'calls/s':>9} {'p50 ms':>7} {'p99 ms':>7}")
    try:
        for rows in (1, 32):
            inputs = {"input": rng.random((rows, 256), dtype=np.float32)}

            async def http_call(inputs: dict[str, np.ndarray] = inputs) -> object:
                return await client.infer(http_url, "mlp", inputs, 10.0)

            async def grpc_call(inputs: dict[str, np.ndarray] = inputs) -> object:
                message = codec.encode_request("mlp", inputs, {"timeout": 10_000_000})
                return codec.decode_response(await stub.ModelInfer(message, timeout=10.0))

            for concurrency in (1, 8):
                best: dict[str, tuple[float, list[float]]] = {}
                for _ in range(rounds):
                    for name, call in (("http", http_call), ("grpc", grpc_call)):
                        await _round(call, concurrency, calls // 10)  # warm
                        rate, latencies = await _round(call, concurrency, calls)
                        if name not in best or rate > best[name][0]:
                            best[name] = (rate, latencies)
                for name, (rate, latencies) in best.items():
                    cuts = statistics.quantiles(latencies, n=100)
                    print(
                        f"{rows:>4} {concurrency:>4} {name:>9} {rate:>9.0f} "
                        f"{cuts[49] * 1000:>7.2f} {cuts[98] * 1000:>7.2f}"
                    )
    finally:
        await client.close()
        await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "repository", type=Path, help="a demo repository (bazaar models build-demo)"
    )
    parser.add_argument("--calls", type=int, default=2000, help="calls per round (2000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per transport (3)")
    args = parser.parse_args()
    http_port, grpc_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    pod = subprocess.Popen(
        [
            *(sys.executable, "-m", "bazaar", "--log-level", "warning", "model-server"),
            *("--model-repository", str(args.repository.absolute()), "--model", "mlp"),
            *("--port", str(http_port), "--grpc-port", str(grpc_port)),
        ]
    )
    http_url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{http_url}/v2/models/mlp/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or pod.poll() is not None:
                raise SystemExit("the pod did not become ready")
            time.sleep(0.1)
        import uvloop

        uvloop.run(_measure(http_url, f"127.0.0.1:{grpc_port}", args.calls, args.rounds))
    finally:
        pod.terminate()
        pod.wait(30)


if __name__ == "__main__":
    main()
