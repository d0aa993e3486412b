"""The gateway's HTTP app: the Open Inference Protocol v2 API in front of the dispatchers.

Handlers decode, submit, encode. ``infer`` runs the steps gRPC shares
(``gateway.inference``): the model's dispatcher first asks whether the request fits, knowing
only its headers, so one that will not is refused (503, ``Retry-After``) before its body is
decoded; then the body is validated against the model's metadata (a bad request is answered
400 here and never reaches a pod), the schedule parameters are read (``priority``,
``timeout`` in µs as in Triton, or the ``X-Request-Timeout-Ms`` header), and the caller's own
rows are encoded as it asked (JSON or binary, only the outputs it named). A client that
disconnects meanwhile cancels the wait, and with it its place in the queue. A request for a
model the gateway knows but has not yet seen an endpoint of (scaled to zero before the
gateway started) is held until one appears, up to the queue time. A model the gateway cannot
validate has its requests passed through as sent (``gateway.passthrough``), with the same
quotas, admission and queue.

Routes: ``/v2``, ``/v2/health/{live,ready}``, ``/v2/models/{m}[/versions/{v}]`` with
``/ready``, ``/config`` (Triton's, of what the gateway enforces), ``/stats`` (Triton's
statistics, also ``/v2/models/stats``) and ``POST /infer``, ``POST /v2/repository/index``,
``/metrics`` and ``/stats`` (queue depth and in-flight work per model, for the autoscaler;
rollouts' samples, for the gateway deciding them).
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from gateway.catalog import ModelCatalog
from gateway.inference import Forwarded, GatewayInference, model_config, statistics
from gateway.passthrough import raw_request
from protocol.codec import InferenceRequest
from protocol.errors import InvalidRequest
from protocol.fastpath import Answer, Headers, InferHandler, answer, decode, with_infer_route
from protocol.openapi import openapi_route
from protocol.responses import (
    EXCEPTION_HANDLERS,
    index_ready_only,
    json_response,
    model_routes,
    server_routes,
    shared_memory_routes,
    statistics_routes,
    unimplemented_routes,
)
from protocol.schema import ModelMetadata

SERVER_NAME = "bazaar"
EXTENSIONS = [
    "binary_tensor_data",
    "classification",
    "schedule_policy",
    "parameters",
    "statistics",
]
"""What the HTTP and gRPC APIs implement: ``model_repository`` is not listed, its index alone
is."""
TIMEOUT_HEADER = b"x-request-timeout-ms"


def create_app(
    catalog: ModelCatalog,
    inference: GatewayInference | None = None,
    extra_routes: Sequence[BaseRoute] = (),
) -> ASGIApp:
    """The gateway's ASGI app: the inference route in front of ``routes(catalog)``.
    ``inference``: the steps shared with gRPC, when it is served too (one set of quotas);
    ``extra_routes``: what the endpoint source serves besides (``bazaar serve``'s workers'
    metrics)."""
    starlette = Starlette(
        routes=[*routes(catalog), *extra_routes], exception_handlers=EXCEPTION_HANDLERS
    )
    handler = _infer_handler(inference or GatewayInference(catalog))
    return with_infer_route(starlette, handler, catalog.config.edge.max_infer_body_bytes)


def _infer_handler(inference: GatewayInference) -> InferHandler:
    async def infer(
        model: str, version: str | None, body: bytes, headers: Headers, tenant_name: str | None
    ) -> Answer:
        # Read once: admission uses it before the body is decoded, a bad value is answered
        # 400 after the body's own faults, as the other schedule parameters are.
        bad: InvalidRequest | None = None
        try:
            limit_s = _header_limit_s(headers)
        except InvalidRequest as exc:
            limit_s, bad = None, exc

        def decode_body(metadata: ModelMetadata) -> tuple[InferenceRequest, float | None]:
            request = decode(body, headers, metadata)
            if bad is not None:
                raise bad
            return request, limit_s

        def forward() -> Forwarded:
            if bad is not None:
                raise bad
            raw, parameters = raw_request(body, headers)
            return raw, parameters, limit_s

        return await inference.run(
            model, version, tenant_name, limit_s, decode_body, answer, forward, headers
        )

    return infer


def routes(catalog: ModelCatalog) -> list[Route]:
    """Every route but inference (``protocol.fastpath.INFER_PATHS``)."""

    async def repository_index(request: Request) -> Response:
        return json_response(catalog.index(await index_ready_only(request)))

    async def stats(request: Request) -> Response:
        return json_response({"instance": catalog.instance, "models": catalog.stats()})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(catalog.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return [
        # Ready means this gateway takes requests, whatever the models' replicas: a gateway
        # that waited for them would drop out of the Service the autoscaler reads its queue
        # through, and a model at zero would never be scaled up. Per model: .../ready.
        *server_routes(SERVER_NAME, EXTENSIONS, lambda: True),
        *statistics_routes(lambda name, version: statistics(catalog, name, version)),
        *model_routes(
            catalog.metadata,
            catalog.is_ready,
            lambda name, version: model_config(catalog, name, version),
        ),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        *shared_memory_routes(),
        *unimplemented_routes(
            "the gateway does not load or unload models: its pods serve what their deployment "
            "says (bazaar model-server --enable-model-control loads at a pod)"
        ),
        Route("/metrics", prometheus),
        Route("/stats", stats),
        openapi_route(lambda: [served.metadata for served in catalog.models.values()]),
    ]


def _header_limit_s(headers: Headers) -> float | None:
    """``X-Request-Timeout-Ms`` in seconds (0 or absent: none); 400 unless a number >= 0."""
    header = headers.get(TIMEOUT_HEADER)
    if header is None:
        return None
    try:
        header_s = float(header) / 1000
    except ValueError:
        header_s = -1.0
    if not header_s >= 0:  # also refuses NaN
        shown = header.decode(errors="replace")
        raise InvalidRequest(f"header X-Request-Timeout-Ms must be a number >= 0, got {shown!r}")
    return header_s or None
