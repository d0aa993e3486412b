"""The gateway's HTTP app: the Open Inference Protocol v2 API in front of the dispatchers.

Handlers decode, submit, encode. ``infer`` first asks the model's dispatcher whether the
request fits, knowing only its headers: one that will not is refused (503, ``Retry-After``)
before its body is decoded, which is what keeps an overloaded gateway serving at capacity.
Then it validates the body against the model's metadata (a bad request is answered 400 here
and never reaches a pod), reads the schedule parameters (``priority``, ``timeout`` in µs as
in Triton, or the ``X-Request-Timeout-Ms`` header), waits on the dispatcher's future and
encodes the caller's own rows as it asked (JSON or binary, only the outputs it named). A
client that disconnects meanwhile cancels the wait, and with it its place in the queue. A
request for a model the gateway knows but has not yet seen an endpoint of (scaled to zero
before the gateway started) is held until one appears, up to the queue time. A model the
gateway cannot validate has its requests passed through as sent (``gateway.passthrough``),
with the same quotas, admission and queue.

Routes: ``/v2``, ``/v2/health/{live,ready}``, ``/v2/models/{m}[/versions/{v}]`` with
``/ready`` and ``POST /infer``, ``POST /v2/repository/index``, ``/metrics`` and ``/stats``
(queue depth and in-flight work per model, for the autoscaler).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from gateway.catalog import ModelCatalog
from gateway.metrics import CANCELLED, outcome_of
from gateway.passthrough import raw_request
from gateway.tenants import Tenants
from protocol.errors import BazaarError, InvalidRequest, QuotaExceeded
from protocol.fastpath import Answer, Headers, InferHandler, answer, decode, with_infer_route
from protocol.responses import (
    EXCEPTION_HANDLERS,
    index_ready_only,
    json_response,
    model_routes,
    server_routes,
)

SERVER_NAME = "bazaar"
EXTENSIONS = ["binary_tensor_data", "model_repository", "schedule_policy", "parameters"]
TIMEOUT_HEADER = b"x-request-timeout-ms"


def create_app(catalog: ModelCatalog) -> ASGIApp:
    """The gateway's ASGI app: the inference route in front of ``routes(catalog)``."""
    starlette = Starlette(routes=routes(catalog), exception_handlers=EXCEPTION_HANDLERS)
    return with_infer_route(starlette, _infer_handler(catalog))


def _infer_handler(catalog: ModelCatalog) -> InferHandler:
    tenants = Tenants(catalog.config.tenants)
    quota_refusals = catalog.metrics.quota_refusals

    async def infer(
        model: str, version: str | None, body: bytes, headers: Headers, tenant_name: str | None
    ) -> Answer:
        started = time.perf_counter()
        served = await catalog.serving(model, version, catalog.config.max_queue_time_s)
        dispatcher = served.dispatcher
        tenant = tenants.get(tenant_name)
        rows = 0
        status = 500
        try:
            tenant.admit(asyncio.get_running_loop().time())
            dispatcher.admit(_header_timeout_s(headers), tenant)
            if served.passthrough:
                raw, parameters = raw_request(body, headers)
                priority, timeout_s = _schedule(parameters, headers)
                tenant.take_rows(1)
                rows = 1
                passed = await dispatcher.submit(raw, rows, priority, timeout_s, tenant)
                status = 200
                return passed
            metadata = served.metadata
            request = decode(body, headers, metadata)
            priority, timeout_s = _schedule(request.parameters, headers)
            request_rows = request.rows(metadata.max_batch_size)
            tenant.take_rows(request_rows)
            rows = request_rows
            future = dispatcher.submit(request.inputs, rows, priority, timeout_s, tenant)
            response = answer(request, metadata, await future)
            status = 200
            return response
        except QuotaExceeded as exc:
            status = exc.status
            quota_refusals.labels(tenant.name, exc.quota).inc()
            raise
        except BazaarError as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = CANCELLED
            raise
        finally:
            if rows:
                tenant.release_rows(rows)
            served.metrics.requests[outcome_of(status)].inc()
            served.metrics.request_seconds.observe(time.perf_counter() - started)

    return infer


def routes(catalog: ModelCatalog) -> list[Route]:
    """Every route but inference (``protocol.fastpath.INFER_PATHS``)."""

    def model_metadata(name: str, version: str | None) -> dict[str, Any]:
        return catalog.get(name, version).metadata.to_json()

    async def repository_index(request: Request) -> Response:
        return json_response(catalog.index(await index_ready_only(request)))

    async def stats(request: Request) -> Response:
        return json_response({"models": catalog.stats()})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(catalog.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return [
        # Ready means this gateway takes requests, whatever the models' replicas: a gateway
        # that waited for them would drop out of the Service the autoscaler reads its queue
        # through, and a model at zero would never be scaled up. Per model: .../ready.
        *server_routes(SERVER_NAME, EXTENSIONS, lambda: True),
        *model_routes(model_metadata, catalog.is_ready),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/metrics", prometheus),
        Route("/stats", stats),
    ]


def _header_timeout_s(headers: Headers) -> float | None:
    """``X-Request-Timeout-Ms`` in seconds, for admission before the body is decoded; a bad
    value counts as none here (``_schedule`` answers it 400 once the body is decoded)."""
    header = headers.get(TIMEOUT_HEADER)
    if header is None:
        return None
    try:
        timeout_s = float(header) / 1000
    except ValueError:
        return None
    return timeout_s if timeout_s > 0 else None


def _schedule(parameters: Mapping[str, Any], headers: Headers) -> tuple[int, float | None]:
    """Triton's schedule parameters: ``priority`` (1 highest, 0 default), ``timeout`` (µs)."""
    priority = parameters.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or priority < 0:
        raise InvalidRequest(f"parameter 'priority' must be an integer >= 0, got {priority!r}")
    timeout = parameters.get("timeout")
    timeout_s: float | None = None
    if timeout is not None:
        if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0:
            raise InvalidRequest(
                "parameter 'timeout' must be an integer number of microseconds >= 0, "
                f"got {timeout!r}"
            )
        timeout_s = timeout / 1_000_000 or None
    header = headers.get(TIMEOUT_HEADER)
    if header is not None:
        try:
            header_s = float(header) / 1000
        except ValueError:
            header_s = -1.0
        if not header_s >= 0:  # also refuses NaN
            shown = header.decode(errors="replace")
            raise InvalidRequest(
                f"header X-Request-Timeout-Ms must be a number >= 0, got {shown!r}"
            )
        if header_s:
            timeout_s = min(timeout_s, header_s) if timeout_s else header_s
    return priority, timeout_s
