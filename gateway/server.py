"""The gateway process: startup → serve → drain → shutdown.

``run`` wires one gateway around an endpoint source and serves it with uvicorn:

1. startup: the HTTP client, the metrics registry, the catalog, and the endpoint source
   (a static file, or the local supervisor that starts model workers);
2. serve until SIGINT or SIGTERM, behind the edge's limits on what clients send and how
   slowly (``protocol.edge``, set by ``config.edge``), over TLS when given ``tls``
   (``protocol.tls``), and with ``keys`` only to callers with a key for the route's scope
   (``protocol.auth``: the tenant reaches the app in the ASGI scope);
3. drain: uvicorn stops accepting connections and waits for the requests in flight, whose
   handlers wait on the dispatchers, so every admitted request is answered first (for at
   most ``drain_timeout_s``, which outlasts any request: a bound, not a budget);
4. shutdown: the dispatchers and probes stop, then the source (the local workers last, so
   the drain could still use them), then the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.catalog import ModelCatalog
from gateway.client import HttpModelClient
from gateway.config import GatewayConfig
from gateway.discovery import EndpointSource
from gateway.metrics import GatewayMetrics
from protocol.auth import OPEN_BY_DEFAULT, ApiKeyAuth, KeyFile
from protocol.edge import uvicorn_options
from protocol.server import ManagedServer
from protocol.tls import ServerTls

log = logging.getLogger(__name__)


async def run(
    source: EndpointSource,
    host: str,
    port: int,
    config: GatewayConfig,
    log_level: str = "info",
    *,
    keys: KeyFile | None = None,
    open_scopes: frozenset[str] = OPEN_BY_DEFAULT,
    tls: ServerTls | None = None,
) -> None:
    async with _gateway(source, config) as catalog:
        app = create_app(catalog)
        if keys is not None:
            app = ApiKeyAuth(app, keys, open_scopes)
        tls_options: dict[str, Any] = {} if tls is None else tls.uvicorn_options()
        server = ManagedServer(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level=log_level,
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=math.ceil(config.drain_timeout_s),
                **uvicorn_options(config.edge),
                **tls_options,
            )
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.stop)
        await server.serve()


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
