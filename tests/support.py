"""Helpers for tests that run real processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from starlette.types import ASGIApp

from loadtests.loadgen import DRAIN_S, Request, Tally, closed_loop
from protocol.codec import InferenceRequest, encode_request
from protocol.support import free_port


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def post_until(
    url: str,
    rows: np.ndarray,
    clients: int,
    condition: Callable[[], bool],
    timeout_s: float,
    what: str,
) -> list[int]:
    """``clients`` threads post ``rows`` (input ``input``, binary) to the inference ``url``,
    each again as soon as it is answered, until ``condition`` holds (as ``wait_until``);
    the statuses they were answered."""
    body, header_length = encode_request(
        InferenceRequest(None, {}, {"input": rows}, None, binary_output=True)
    )
    headers = {"Inference-Header-Content-Length": str(header_length)}
    statuses: list[int] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                statuses.append(http.post(url, content=body, headers=headers).status_code)

    with ThreadPoolExecutor(clients) as pool:
        running = [pool.submit(client) for _ in range(clients)]
        try:
            wait_until(condition, timeout_s, what)
        finally:
            stop.set()
        for future in running:
            future.result(timeout=120)
    return statuses


async def eventually(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """``wait_until`` for async tests: polls without blocking the running loop."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)


def models_ready(url: str, models: Sequence[str]) -> list[str]:
    """The readiness URL of each model at a gateway: ready once it has an endpoint."""
    return [f"{url}/v2/models/{model}/ready" for model in models]


def http_ok(url: str, verify: ssl.SSLContext | bool = True) -> bool:
    try:
        return httpx.get(url, timeout=1.0, verify=verify).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def bazaar_process(
    args: Sequence[str],
    log_path: Path,
    ready: str | Sequence[str],
    timeout_s: float = 60.0,
    verify: ssl.SSLContext | bool = True,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``bazaar ARGS`` until every ``ready`` URL answers 200; stop it (SIGTERM) afterwards.

    Its output goes to ``log_path``, which is printed when start-up fails. ``verify``: how
    an https ``ready`` URL's certificate is checked (an SSL context trusting a test CA).
    """
    if args and args[0] in ("serve", "gateway") and "--grpc-port" not in args:
        # Their gRPC default, Triton's 8001, is one port for the whole machine, where other
        # test runs may be serving at the same time: HTTP tests leave gRPC off.
        args = [*args, "--grpc-port", "0"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bazaar", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    urls = [ready] if isinstance(ready, str) else list(ready)
    try:
        try:
            wait_until(
                lambda: process.poll() is None and all(http_ok(url, verify) for url in urls),
                timeout_s,
                f"{' '.join(urls)} (bazaar {' '.join(args)})",
            )
        except AssertionError:
            raise AssertionError(
                f"bazaar {' '.join(args)} did not become ready; its log:\n{log_path.read_text()}"
            ) from None
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.asynccontextmanager
async def serve(app: ASGIApp, timeout_s: float = 10.0) -> AsyncIterator[str]:
    """Yields the server's base URL; stops it (and waits for it) on exit."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not server.started:
        if task.done() or loop.time() > deadline:
            server.should_exit = True
            await task
            raise RuntimeError(f"the test server on port {port} did not start")
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


class BackgroundLoad:
    """A closed loop (``loadtests.loadgen``) on a thread and event loop of its own, for a
    test that attacks the server meanwhile. On exit the load stops and every request in
    flight is waited for; ``tally`` then accounts for each one."""

    def __init__(self, port: int, request: Request, connections: int) -> None:
        self.port = port
        self.request = request
        self.connections = connections
        self.tally = Tally()
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)

    @property
    def ok(self) -> int:
        """200s so far (safe to read from another thread)."""
        return len(self.tally.ok_latencies_s)

    def wait_for_ok(self, count: int, timeout_s: float = 60.0) -> None:
        wait_until(lambda: self.ok >= count, timeout_s, f"{count} answers to the normal traffic")

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._started.set()
        await closed_loop(
            "127.0.0.1", self.port, self.request, self.connections, self._stop, tally=self.tally
        )

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        self._started.wait()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(DRAIN_S + 10)
