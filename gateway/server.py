"""The gateway process: startup → serve → drain → shutdown.

``run`` wires one gateway around an endpoint source and serves it with uvicorn:

1. startup: the pods' client (over HTTP, or with ``grpc_targets`` batches over gRPC to the
   pods it knows: ``gateway.grpc_client``), the metrics registry (``protocol.metrics``),
   the catalog, the rollout record if any (``gateway.rollout_record``: it joins the
   election) with the peers whose samples it sums (``gateway.rollout_peers``), and the
   endpoint source (a static file, or the local supervisor that starts
   model workers);
2. serve HTTP, and with ``grpc_port`` Triton's gRPC API (``gateway.grpc``: the same
   dispatchers, quotas, keys and limits), until SIGINT or SIGTERM, behind the edge's limits
   on what clients send and how slowly (``protocol.edge``, set by ``config.edge``), over
   TLS when given ``tls``
   (``protocol.tls``), and with ``keys`` only to callers with a key for the route's scope
   (``protocol.auth``: the tenant reaches the app in the ASGI scope);
3. drain: uvicorn and gRPC stop accepting and wait for the requests in flight, whose
   handlers wait on the dispatchers, so every admitted request is answered first (for at
   most ``drain_timeout_s``, which outlasts any request: a bound, not a budget);
4. shutdown: the dispatchers and probes stop, then the source (the local workers last, so
   the drain could still use them), the rollout record (handing its Lease over), then the
   client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.routing import BaseRoute

from gateway.app import EXTENSIONS, SERVER_NAME, create_app
from gateway.catalog import ModelCatalog
from gateway.client import HttpModelClient
from gateway.config import GatewayConfig
from gateway.discovery import EndpointSource
from gateway.inference import GatewayInference
from gateway.metrics import GatewayMetrics
from protocol.auth import OPEN_BY_DEFAULT, ApiKeyAuth, KeyFile
from protocol.edge import uvicorn_options
from protocol.metrics import process_registry
from protocol.server import ManagedServer
from protocol.tls import ServerTls

if TYPE_CHECKING:
    import grpc

    from gateway.grpc_client import GrpcTargets
    from gateway.rollout_peers import RolloutPeers
    from gateway.rollout_record import ServiceRolloutRecord

log = logging.getLogger(__name__)


async def run(
    source: EndpointSource,
    host: str,
    port: int,
    config: GatewayConfig,
    log_level: str = "info",
    *,
    access_log: bool = False,
    keys: KeyFile | None = None,
    open_scopes: frozenset[str] = OPEN_BY_DEFAULT,
    tls: ServerTls | None = None,
    grpc_port: int | None = None,
    extra_routes: Sequence[BaseRoute] = (),
    grpc_targets: GrpcTargets | None = None,
    rollout_record: ServiceRolloutRecord | None = None,
    rollout_peers: RolloutPeers | None = None,
) -> None:
    async with _gateway(source, config, grpc_targets, rollout_record, rollout_peers) as catalog:
        inference = GatewayInference(catalog)
        app = create_app(catalog, inference, extra_routes)
        if keys is not None:
            app = ApiKeyAuth(app, keys, open_scopes)
        tls_options: dict[str, Any] = {} if tls is None else tls.uvicorn_options()
        server = ManagedServer(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level=log_level,
                log_config=None,
                access_log=access_log,
                lifespan="off",
                timeout_graceful_shutdown=math.ceil(config.drain_timeout_s),
                **uvicorn_options(config.edge),
                **tls_options,
            )
        )
        grpc = None
        if grpc_port is not None:
            grpc = await _grpc_serving(inference, host, grpc_port, config, keys, open_scopes, tls)
        stopping: list[asyncio.Task[None]] = []

        def stop() -> None:
            server.stop()
            if grpc is not None and not stopping:
                # gRPC stops taking calls with HTTP and drains alongside it.
                stopping.append(asyncio.create_task(grpc.stop(config.drain_timeout_s)))

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        try:
            await server.serve()
        finally:
            if grpc is not None:
                await (stopping[0] if stopping else grpc.stop(config.drain_timeout_s))


async def _grpc_serving(
    inference: GatewayInference,
    host: str,
    port: int,
    config: GatewayConfig,
    keys: KeyFile | None,
    open_scopes: frozenset[str],
    tls: ServerTls | None,
) -> grpc.aio.Server:
    """The gRPC API, started (grpc is imported here: without gRPC it is never loaded)."""
    from gateway.grpc import GatewayGrpcBackend
    from protocol.grpc.service import InferenceService, grpc_server

    backend = GatewayGrpcBackend(inference, SERVER_NAME, EXTENSIONS)
    server, bound = grpc_server(
        InferenceService(backend, keys, open_scopes), host, port, config.edge, tls
    )
    await server.start()
    log.info("gRPC on %s:%d%s", host, bound, " (TLS)" if tls is not None else "")
    return server


@contextlib.asynccontextmanager
async def _gateway(
    source: EndpointSource,
    config: GatewayConfig,
    grpc_targets: GrpcTargets | None,
    rollout_record: ServiceRolloutRecord | None,
    rollout_peers: RolloutPeers | None,
) -> AsyncIterator[ModelCatalog]:
    if grpc_targets is None:
        client = HttpModelClient()
    else:
        from gateway.grpc_client import GrpcModelClient  # grpc is loaded only when used

        client = GrpcModelClient(grpc_targets)
    registry = process_registry("gateway")
    catalog = ModelCatalog(
        client,
        GatewayMetrics(registry),
        config,
        rollout_record=rollout_record,
        rollout_peers=rollout_peers,
    )
    try:
        if rollout_record is not None:
            await rollout_record.start()
        await source.start(catalog.set_endpoints, registry)
        yield catalog
    finally:
        await catalog.close()
        await source.stop()
        if rollout_record is not None:
            await rollout_record.stop()
        await client.close()
