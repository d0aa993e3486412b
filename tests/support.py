"""Helpers for tests that run real processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import httpx
import uvicorn
from starlette.types import ASGIApp

from protocol.support import free_port


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


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
