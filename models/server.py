"""The model-serving pod's HTTP server: the Open Inference Protocol v2 REST API.

Handlers only decode, call, encode: the codec validates the body against the model's
metadata (400 on any mismatch, before the runtime sees it), the runtime executes the batch
in a worker thread, the codec encodes the answer. Models load in the background after
start-up, so liveness answers at once and readiness turns true when every start-up model is
in. A request's ``parameters.timeout`` (microseconds, as in Triton: how long it may wait)
bounds its wait for a free instance; past it, the pod answers 504 and never computes it.
A model's ready answer also says whether it is loaded now (``"loaded"``: paging under a
memory budget, a ready model may be evicted), so gateways prefer the pods that hold it.

Routes: ``/v2``, ``/v2/health/{live,ready}``, ``/v2/models/{m}[/versions/{v}]`` with
``/ready``, ``/config``, ``/stats`` (Triton's statistics, also ``/v2/models/stats``) and
``POST /infer``, the repository extension
(``/v2/repository/index``, ``/v2/repository/models/{m}/{load,unload}``), ``/metrics`` and
``/openapi.json``. Load and unload are served only with model control on (otherwise they
answer 400 saying so), and then, given a control token, only to callers presenting it
(``protocol.auth``, scope ``control``). Triton's trace and logging routes answer 400 naming
the extension (``protocol.responses.unimplemented_routes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from models.inference import PodInference
from models.metrics import PodMetrics
from models.store import ModelStore
from models.utilisation import GpuMonitor
from protocol.auth import CONTROL, SCOPES, ApiKeyAuth, KeyFile
from protocol.errors import InvalidRequest
from protocol.fastpath import MAX_BODY_BYTES, Answer, Headers, answer, decode, with_infer_route
from protocol.limits import EdgeLimits
from protocol.openapi import openapi_route
from protocol.responses import (
    EXCEPTION_HANDLERS,
    index_ready_only,
    json_body,
    json_response,
    model_routes,
    server_routes,
    shared_memory_routes,
    statistics_routes,
    unimplemented_routes,
)
from protocol.support import cancel_and_wait

log = logging.getLogger(__name__)

SERVER_NAME = "bazaar-model-server"
EXTENSIONS = ["binary_tensor_data", "classification", "statistics"]
"""What the HTTP and gRPC APIs implement. ``model_repository`` (load and unload) is added over
HTTP with model control only: without it, and over gRPC always, load and unload are refused
and the repository index alone is served, as at the gateway."""
GRPC_DRAIN_S = 60
"""At shutdown, how long gRPC calls in flight may take to finish (the gateway's call timeout)."""


def create_app(
    store: ModelStore,
    registry: CollectorRegistry | None = None,
    control_port: int | None = None,
    model_control: bool = False,
    control_keys: KeyFile | None = None,
    grpc_listener: GrpcListener | None = None,
    max_infer_body_bytes: int = MAX_BODY_BYTES,
) -> ASGIApp:
    """The pod's app. With ``control_port``, ``/metrics`` and the repository routes answer only
    on that port and the data plane (metadata, inference) only on the others, so a
    NetworkPolicy, which filters ports and not paths, can tell them apart; health answers
    on both (probes use the control port). Loading and unloading models over the API changes
    what the pod serves, so it is off unless ``model_control``: Kubernetes decides what a pod
    serves (its args and volume), not whoever can reach it. With ``control_keys``, load and
    unload answer only a caller with a key for the ``control`` scope; everything else stays
    open (a NetworkPolicy guards it). With ``grpc_listener``, the app's lifespan also serves
    the data plane over gRPC (``models.grpc``), in the same event loop, start-up to shutdown."""
    registry = registry if registry is not None else CollectorRegistry()
    inference = PodInference(store, PodMetrics(registry, store, GpuMonitor()))

    def model_config(name: str, version: str | None) -> dict[str, Any]:
        view = store.view(name, version)
        config = view.config.to_json()
        config["max_batch_size"] = view.metadata.max_batch_size
        if view.metadata.labels:
            # Triton's config names a label file; its labels travel here, for the gateway.
            config["labels"] = list(view.metadata.labels)
        return {"name": name, **config}

    async def infer(
        model: str, version: str | None, body: bytes, headers: Headers, tenant: str | None
    ) -> Answer:
        return await inference.run(
            model, version, lambda metadata: decode(body, headers, metadata), answer
        )

    async def repository_index(request: Request) -> Response:
        return json_response(store.index(await index_ready_only(request)))

    async def repository_load(request: Request) -> Response:
        name = request.path_params["model"]
        await store.load(name, _config_override(await json_body(request)))
        return json_response({})

    async def repository_unload(request: Request) -> Response:
        await store.unload(request.path_params["model"])
        return json_response({})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Load after the socket is open: liveness answers during long loads.
        loading = asyncio.create_task(store.load_all())
        async with contextlib.AsyncExitStack() as stack:
            if grpc_listener is not None:
                await stack.enter_async_context(_grpc_serving(inference, grpc_listener))
            try:
                yield
            finally:
                await cancel_and_wait(loading)
                await asyncio.to_thread(store.close)

    routes = [
        *server_routes(
            SERVER_NAME,
            sorted([*EXTENSIONS, "model_repository"]) if model_control else EXTENSIONS,
            store.ready,
        ),
        *statistics_routes(inference.statistics),
        *model_routes(inference.model_metadata, store.is_ready, model_config, store.holds),
        Route("/metrics", prometheus),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        *shared_memory_routes(),
        openapi_route(lambda: [loaded.default.metadata for loaded in store.models.values()]),
    ]
    if model_control:
        routes += [
            Route("/v2/repository/models/{model}/load", repository_load, methods=["POST"]),
            Route("/v2/repository/models/{model}/unload", repository_unload, methods=["POST"]),
        ]
    routes += unimplemented_routes(
        None
        if model_control
        else "this pod does not load or unload models over its API: model control is off "
        "(bazaar model-server --enable-model-control)"
    )
    app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    served = with_infer_route(app, infer, max_infer_body_bytes)
    if control_keys is not None:
        served = ApiKeyAuth(served, control_keys, open_scopes=SCOPES - {CONTROL})
    return served if control_port is None else _split_ports(served, control_port)


@dataclass(frozen=True, slots=True)
class GrpcListener:
    """Where and within which limits the pod serves gRPC."""

    host: str
    port: int
    """0: a free port (then ``bound`` tells which)."""
    limits: EdgeLimits
    bound: list[int] = field(default_factory=list)
    """The port bound, once serving."""


@contextlib.asynccontextmanager
async def _grpc_serving(inference: PodInference, listener: GrpcListener) -> AsyncIterator[None]:
    # grpc is imported here, so a pod without gRPC never loads it.
    from models.grpc import PodGrpcBackend
    from protocol.grpc.service import InferenceService, grpc_server

    backend = PodGrpcBackend(inference, SERVER_NAME, EXTENSIONS)
    server, port = grpc_server(
        InferenceService(backend), listener.host, listener.port, listener.limits
    )
    await server.start()
    listener.bound.append(port)
    log.info("gRPC on %s:%d", listener.host, port)
    try:
        yield
    finally:
        # uvicorn has drained HTTP by now; calls in flight get as long as a pod call may last.
        await server.stop(GRPC_DRAIN_S)


def _split_ports(app: ASGIApp, control_port: int) -> ASGIApp:
    """404 for a control route asked on the data port, and for the data plane on the control
    port (the port a connection came in on is in the ASGI scope)."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/v2/health/"):
            path = scope["path"]
            control = path == "/metrics" or path.startswith("/v2/repository/")
            on_control_port = (scope.get("server") or ("", None))[1] == control_port
            if control != on_control_port:
                port = "control" if control else "data"
                message = f"{path} is served on this pod's {port} port"
                await json_response({"error": message}, 404)(scope, receive, send)
                return
        await app(scope, receive, send)

    return asgi


def _config_override(body: dict[str, Any]) -> dict[str, Any] | None:
    """Triton's load API: ``parameters.config`` is a model config as a JSON string."""
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidRequest("'parameters' must be an object")
    config = parameters.get("config")
    if config is None:
        return None
    if isinstance(config, str):
        try:
            config = orjson.loads(config)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"parameters.config is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidRequest("parameters.config must be a JSON object")
    return config
