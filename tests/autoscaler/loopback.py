"""Serve an ASGI app on a real uvicorn server on a free loopback port, in the test's loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn
from starlette.types import ASGIApp

from tests.support import free_port


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
