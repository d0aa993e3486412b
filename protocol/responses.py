"""HTTP responses shared by the gateway and the pods: JSON bodies and the error table.

Every error leaves as ``{"error": "..."}``. A ``BazaarError`` carries its own status and
headers; anything else is a bug, logged with its traceback and answered 500 so the client
still gets exactly one answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from protocol import __version__
from protocol.errors import BazaarError, InvalidRequest

log = logging.getLogger(__name__)


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


def error_response(exc: Exception) -> Response:
    if isinstance(exc, BazaarError):
        return json_response({"error": exc.message}, exc.status, exc.headers())
    log.exception("unhandled error", exc_info=exc)
    return json_response({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500)


async def _handle_error(request: Request, exc: Exception) -> Response:
    return error_response(exc)


async def _handle_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return json_response({"error": exc.detail}, exc.status_code, exc.headers)


# Starlette's own 404/405 become v2 error bodies too.
EXCEPTION_HANDLERS = {
    HTTPException: _handle_http_error,
    BazaarError: _handle_error,
    Exception: _handle_error,
}


async def json_body(request: Request) -> dict[str, Any]:
    """A small JSON object body (control endpoints); empty means ``{}``."""
    body = await request.body()
    if not body.strip():
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data


async def index_ready_only(request: Request) -> bool:
    """The repository index's ``{"ready": bool}`` body: list only ready models?"""
    ready_only = (await json_body(request)).get("ready", False)
    if not isinstance(ready_only, bool):
        raise InvalidRequest("'ready' must be a boolean")
    return ready_only


def server_routes(name: str, extensions: list[str], ready: Callable[[], bool]) -> list[Route]:
    """``/v2``, ``/v2/health/live`` and ``/v2/health/ready``: the same on gateway and pods.

    Readiness answers 503 as well as ``{"ready": false}``, so both kinds of client (those
    that read the status, like Kubernetes probes, and those that read the body) agree.
    """

    async def metadata(request: Request) -> Response:
        return json_response({"name": name, "version": __version__, "extensions": extensions})

    async def live(request: Request) -> Response:
        return json_response({"live": True})

    async def is_ready(request: Request) -> Response:
        ok = ready()
        return json_response({"ready": ok}, 200 if ok else 503)

    return [
        Route("/v2", metadata),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", is_ready),
    ]


SHARED_MEMORY_PATHS = tuple(
    prefix + tail
    for prefix in ("/v2/systemsharedmemory", "/v2/cudasharedmemory")
    for tail in (
        "/status",
        "/region/{region}/status",
        "/region/{region}/register",
        "/unregister",
        "/region/{region}/unregister",
    )
)
"""Triton's shared memory routes, system and CUDA: status (GET), register and unregister."""


def shared_memory_routes() -> list[Route]:
    """Triton's shared memory extension (status, register, unregister), refused by name: 400
    as Triton answers when it is not built in, not a 404 a client could read as a typo."""

    async def refuse(request: Request) -> Response:
        kind = "system" if request.url.path.startswith("/v2/system") else "CUDA"
        raise InvalidRequest(f"this server does not implement the {kind} shared memory extension")

    return [
        Route(path, refuse, methods=["GET"] if path.endswith("/status") else ["POST"])
        for path in SHARED_MEMORY_PATHS
    ]


StatisticsView = Callable[[str | None, str | None], list[dict[str, Any]]]
"""Triton's ``model_stats`` by (model, version), either None for all; raises ``BazaarError``."""


def statistics_routes(statistics: StatisticsView) -> list[Route]:
    """Triton's statistics extension: ``GET /v2/models/stats`` (every model),
    ``/v2/models/{m}/stats`` (its versions) and ``/v2/models/{m}/versions/{v}/stats``, as
    ``{"model_stats": [...]}``. They go before ``model_routes``, where ``/v2/models/stats``
    would be the metadata of a model named ``stats`` (as in Triton, which has the same
    paths)."""

    async def stats(request: Request) -> Response:
        name = request.path_params.get("model")
        version = request.path_params.get("version")
        return json_response({"model_stats": statistics(name, version)})

    return [
        Route("/v2/models/stats", stats),
        Route("/v2/models/{model}/stats", stats),
        Route("/v2/models/{model}/versions/{version}/stats", stats),
    ]


TRACE_PATHS = ("/v2/trace/setting", "/v2/models/{model}/trace/setting")
"""Triton's trace extension: the settings, server-wide and per model (GET, POST)."""
LOGGING_PATH = "/v2/logging"
"""Triton's logging extension: the log settings (GET, POST)."""
REPOSITORY_CONTROL_PATHS = (
    "/v2/repository/models/{model}/load",
    "/v2/repository/models/{model}/unload",
)
"""The model repository extension's load and unload (POST)."""


def unimplemented_routes(load_refusal: str | None) -> list[Route]:
    """Triton's trace and logging extensions, and, given ``load_refusal`` (why this server
    does not load models), load and unload: refused by name with 400, as shared memory is,
    so that ``tritonclient``'s calls get a reason instead of a bare 404."""

    async def trace(request: Request) -> Response:
        raise InvalidRequest("this server does not implement the trace extension")

    async def logging(request: Request) -> Response:
        raise InvalidRequest("this server does not implement the logging extension")

    async def control(request: Request) -> Response:
        assert load_refusal is not None
        raise InvalidRequest(load_refusal)

    routes = [Route(path, trace, methods=["GET", "POST"]) for path in TRACE_PATHS]
    routes.append(Route(LOGGING_PATH, logging, methods=["GET", "POST"]))
    if load_refusal is not None:
        routes += [Route(path, control, methods=["POST"]) for path in REPOSITORY_CONTROL_PATHS]
    return routes


ModelView = Callable[[str, str | None], dict[str, Any]]
"""A model's JSON view (metadata, config) by (model, version); raises ``BazaarError``."""


def model_routes(
    metadata: ModelView,
    ready: Callable[[str, str | None], bool],
    config: ModelView | None = None,
    loaded: Callable[[str], bool] | None = None,
) -> list[Route]:
    """``/v2/models/{m}[/versions/{v}]`` and ``.../ready`` (and ``.../config``), both forms.

    ``ready`` raises ``ModelNotFound`` for a model or version the server does not know;
    a known model that is not ready answers 503 with ``{"ready": false}``. With ``loaded``
    (a server that pages models in and out) a ready answer also says whether the model is
    in memory now, ``{"loaded": false}`` when its next request would wait for a load.
    """

    async def model_metadata(request: Request) -> Response:
        return json_response(metadata(*_model_path(request)))

    async def model_ready(request: Request) -> Response:
        name, version = _model_path(request)
        ok = ready(name, version)
        if ok and loaded is not None:
            return json_response({"name": name, "ready": ok, "loaded": loaded(name)})
        return json_response({"name": name, "ready": ok}, 200 if ok else 503)

    async def model_config(request: Request) -> Response:
        assert config is not None
        return json_response(config(*_model_path(request)))

    routes = []
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [Route(prefix, model_metadata), Route(prefix + "/ready", model_ready)]
        if config is not None:
            routes.append(Route(prefix + "/config", model_config))
    return routes


def _model_path(request: Request) -> tuple[str, str | None]:
    """(model, version) from a ``/v2/models/{model}[/versions/{version}]`` route."""
    return request.path_params["model"], request.path_params.get("version")
