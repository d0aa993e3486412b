"""The gateway process: startup → serve → drain → shutdown.

``run`` wires one gateway around an endpoint source and serves it with uvicorn:

1. startup: the HTTP client, the metrics registry, the catalog, and the endpoint source
   (a static file, or the local supervisor that starts model workers);
2. serve until SIGINT or SIGTERM;
3. drain: uvicorn stops accepting connections and waits for the requests in flight, whose
   handlers wait on the dispatchers, so every admitted request is answered first;
4. shutdown: the dispatchers and probes stop, then the source (the local workers last, so
   the drain could still use them), then the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Protocol

import uvicorn
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.catalog import EndpointListener, ModelCatalog
from gateway.client import HttpModelClient
from gateway.config import GatewayConfig, load_static_endpoints
from gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)


class EndpointSource(Protocol):
    """Where endpoints come from; it reports them through ``catalog.set_endpoints``."""

    async def start(self, listener: EndpointListener, registry: CollectorRegistry) -> None:
        """Begin reporting endpoints; ``registry`` is the gateway's, for the source's metrics."""

    async def stop(self) -> None: ...


class StaticEndpoints:
    """Endpoints listed in a file, per model; they can be any v2 server (Triton, MLServer)."""

    def __init__(self, path: Path) -> None:
        self.endpoints = load_static_endpoints(path)

    async def start(self, listener: EndpointListener, registry: CollectorRegistry) -> None:
        for model, urls in self.endpoints.items():
            listener(model, urls)

    async def stop(self) -> None:
        return None


async def run(
    source: EndpointSource,
    host: str,
    port: int,
    config: GatewayConfig,
    log_level: str = "info",
) -> None:
    async with _gateway(source, config) as catalog:
        server = _Server(
            uvicorn.Config(
                create_app(catalog),
                host=host,
                port=port,
                log_level=log_level,
                access_log=False,
                lifespan="off",
            )
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.stop)
        await server.serve()


class _Server(uvicorn.Server):
    """uvicorn's server, minus its signal handling, which ``run`` owns.

    uvicorn re-raises a caught SIGTERM once it has drained, which would end the process
    before the shutdown step stops the workers.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def stop(self) -> None:
        """First signal: drain and stop. A second one: stop without waiting."""
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True


@contextlib.asynccontextmanager
async def _gateway(source: EndpointSource, config: GatewayConfig) -> AsyncIterator[ModelCatalog]:
    client = HttpModelClient()
    registry = CollectorRegistry()
    catalog = ModelCatalog(client, GatewayMetrics(registry), config)
    try:
        await source.start(catalog.set_endpoints, registry)
        yield catalog
    finally:
        await catalog.close()
        await source.stop()
        await client.close()
