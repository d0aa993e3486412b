"""The gateway's HTTP app: the Open Inference Protocol v2 API in front of the dispatchers.

Handlers decode, submit, encode. ``infer`` validates the body against the model's metadata
(a bad request is answered 400 here and never reaches a pod), reads the schedule
parameters (``priority``, ``timeout`` in µs as in Triton, or the ``X-Request-Timeout-Ms``
header), waits on the dispatcher's future and encodes the caller's own rows as it asked
(JSON or binary, only the outputs it named). A request for a model the gateway knows but has
not yet seen an endpoint of (scaled to zero before the gateway started) is held until one
appears, up to the queue time.

Routes: ``/v2``, ``/v2/health/{live,ready}``, ``/v2/models/{m}[/versions/{v}]`` with
``/ready`` and ``POST /infer``, ``POST /v2/repository/index``, ``/metrics`` and ``/stats``
(queue depth and in-flight work per model, for the autoscaler).
"""

from __future__ import annotations

import dataclasses
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
from gateway.codec import InferenceResponse, decode_request, encode_response
from gateway.dispatcher import DispatcherStats
from gateway.errors import BazaarError, InvalidRequest
from gateway.fastpath import Answer, Headers, header_length, with_infer_route
from gateway.metrics import outcome_of
from gateway.responses import (
    EXCEPTION_HANDLERS,
    index_ready_only,
    json_response,
    model_path,
    server_routes,
)

SERVER_NAME = "bazaar"
EXTENSIONS = ["binary_tensor_data", "model_repository", "schedule_policy", "parameters"]
TIMEOUT_HEADER = b"x-request-timeout-ms"


def create_app(catalog: ModelCatalog) -> ASGIApp:
    async def model_metadata(request: Request) -> Response:
        served = catalog.get(*model_path(request))
        return json_response(served.metadata.to_json())

    async def model_ready(request: Request) -> Response:
        name, version = model_path(request)
        try:
            served = catalog.get(name, version)
        except BazaarError as exc:
            if exc.status == 404:
                raise
            return json_response({"name": name, "ready": False}, 503)
        is_ready = served.dispatcher.pool.ready_endpoints > 0
        return json_response({"name": name, "ready": is_ready}, 200 if is_ready else 503)

    async def infer(model: str, version: str | None, body: bytes, headers: Headers) -> Answer:
        started = time.perf_counter()
        served = await catalog.serving(model, version, catalog.config.max_queue_time_s)
        status = 500
        try:
            metadata = served.metadata
            inference = decode_request(body, header_length(headers), metadata)
            priority, timeout_s = _schedule(inference.parameters, headers)
            future = served.dispatcher.submit(
                inference.inputs, inference.rows(metadata.max_batch_size), priority, timeout_s
            )
            outputs = await future
            response = InferenceResponse(
                model_name=metadata.name,
                model_version=metadata.version,
                id=inference.id,
                parameters={},
                outputs=outputs,
            )
            answer = encode_response(response, inference.outputs, inference.binary_output)
            status = 200
            return answer
        except BazaarError as exc:
            status = exc.status
            raise
        finally:
            served.metrics.requests[outcome_of(status)].inc()
            served.metrics.request_seconds.observe(time.perf_counter() - started)

    async def repository_index(request: Request) -> Response:
        ready_only = await index_ready_only(request)
        entries = []
        for name in catalog.names():
            served = catalog.models.get(name)
            is_ready = served is not None and served.dispatcher.pool.ready_endpoints > 0
            if ready_only and not is_ready:
                continue
            entry = {"name": name, "state": "READY" if is_ready else "UNAVAILABLE"}
            if served is not None:
                entry["version"] = served.metadata.version
            entries.append(entry)
        return json_response(entries)

    async def stats(request: Request) -> Response:
        models = {}
        for name in catalog.names():
            served = catalog.models.get(name)
            if served is None:
                # Not learned yet: the requests held for it are its whole demand.
                held = catalog.waiting.get(name, 0)
                models[name] = {
                    **_asdict(DispatcherStats(held, held, 0, 0, 0, 0, 0)),
                    "endpoints": 0,
                    "ready_endpoints": 0,
                }
                continue
            pool = served.dispatcher.pool
            models[name] = {
                **_asdict(served.dispatcher.stats()),
                "endpoints": len(pool.endpoints),
                "ready_endpoints": pool.ready_endpoints,
            }
        return json_response({"models": models})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(catalog.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        *server_routes(SERVER_NAME, EXTENSIONS, catalog.ready),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/metrics", prometheus),
        Route("/stats", stats),
    ]
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [
            Route(prefix, model_metadata),
            Route(prefix + "/ready", model_ready),
        ]
    return with_infer_route(Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS), infer)


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


def _asdict(stats: DispatcherStats) -> dict[str, Any]:
    return {field.name: getattr(stats, field.name) for field in dataclasses.fields(stats)}
