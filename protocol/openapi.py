"""The OpenAPI 3.1 description of a v2 server, generated from what the server runs.

``openapi_route(models)`` answers ``GET /openapi.json`` with a document built on each
request from four sources, none of them a copy of another:

- the route table: every Starlette ``Route`` of the app answering (``request.app.routes``),
  its path and methods, plus ``fastpath.INFER_PATHS`` (POST), which ``with_infer_route``
  serves in front of the table. A route added to the table is in the document at once.
- the protocol: what each path takes and answers (``OPERATIONS``, keyed by route path as
  the v2 spec and its extensions are). Error statuses are those of the error classes a
  handler raises and of their subclasses, read from the error tree, plus the HTTP edge's
  refusals and the 500 that answers a bug, each with the ``{"error": ...}`` body. A route
  the protocol does not describe (the gateway's ``/stats``) is listed with an undescribed 200.
- the tensor schema: the inference bodies' JSON Schemas (``protocol.jsonschemas``).
- the models served now: every route under ``/v2/models/{model}`` is listed once more per
  model, its name and version filled in, and there the inference request and response name
  that model's tensors, datatypes and shapes, with a one-row request as the example.
  Concrete paths rather than an enum of names: the body then goes with its model, so a
  client or a fuzzer knows what each model takes.

The binary tensor extension is the inference routes' ``application/octet-stream`` body, with
the ``Inference-Header-Content-Length`` header; its layout is in the operation's description.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from protocol import __version__
from protocol.errors import (
    BazaarError,
    DeadlineExceeded,
    InferenceFailed,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    UnsupportedEncoding,
    UpstreamError,
)
from protocol.fastpath import INFER_PATHS
from protocol.jsonschemas import (
    BOOLEAN,
    ERROR,
    MODEL_METADATA,
    OBJECT,
    STRING,
    Schema,
    array,
    example_request,
    inference_request,
    inference_response,
    record,
)
from protocol.responses import LOGGING_PATH, SHARED_MEMORY_PATHS, TRACE_PATHS, json_response
from protocol.schema import ModelMetadata

OPENAPI_PATH = "/openapi.json"
MODEL_PATH = "/v2/models/{model}"
"""Routes under it are listed once more per model served."""


@dataclass(frozen=True, slots=True)
class Operation:
    """What a route takes and answers, as the protocol defines it."""

    summary: str
    answers: dict[int, Schema]
    """The statuses a call gets when nothing goes wrong, and their bodies."""
    errors: tuple[type[BazaarError], ...] = ()
    """What the handler raises: these classes' statuses and their subclasses' are listed."""
    body: Schema | None = None
    """The JSON request body, if the route reads one (optional: empty means ``{}``)."""
    media_type: str = "application/json"


MODEL_STATS = record({"model_stats": array(OBJECT)})
"""Triton's ``$stats_model_response``: one ``$model_stat`` object per model version."""


def _model_operations(prefix: str) -> dict[str, Operation]:
    """A model's routes, at ``/v2/models/{model}`` or at one of its versions."""
    model_ready = record({"name": STRING, "ready": BOOLEAN})
    return {
        prefix: Operation("Model metadata", {200: MODEL_METADATA}, (ModelNotFound, ModelNotReady)),
        prefix + "/ready": Operation(
            "Model readiness (503 when not ready)",
            {200: model_ready, 503: model_ready},
            (ModelNotFound,),
        ),
        prefix + "/config": Operation(
            "Model configuration", {200: OBJECT}, (ModelNotFound, ModelNotReady)
        ),
        prefix + "/stats": Operation(
            "Statistics of the model's versions (Triton's statistics extension)",
            {200: MODEL_STATS},
            (ModelNotFound, ModelNotReady),
        ),
    }


READY = record({"ready": BOOLEAN})
OPERATIONS: dict[str, Operation] = {
    "/v2/models/stats": Operation(
        "Statistics of every model version (Triton's statistics extension)", {200: MODEL_STATS}
    ),
    "/v2": Operation(
        "Server metadata",
        {200: record({"name": STRING, "version": STRING, "extensions": array(STRING)})},
    ),
    "/v2/health/live": Operation("Liveness", {200: record({"live": BOOLEAN})}),
    "/v2/health/ready": Operation("Readiness (503 when not ready)", {200: READY, 503: READY}),
    **_model_operations(MODEL_PATH),
    **_model_operations(MODEL_PATH + "/versions/{version}"),
    "/v2/repository/index": Operation(
        "The repository's models and their state",
        {200: array(record({"name": STRING, "state": STRING}, {"version": STRING}))},
        (InvalidRequest,),
        body=record({}, {"ready": BOOLEAN}),
    ),
    "/v2/repository/models/{model}/load": Operation(
        "Load or reload a model (parameters.config: a model config over the repository's); "
        "400 naming why where this server does not load models (the gateway, a pod without "
        "model control)",
        {200: OBJECT},
        (BazaarError,),
        body=record({}, {"parameters": record({}, {"config": {"type": ["string", "object"]}})}),
    ),
    "/v2/repository/models/{model}/unload": Operation(
        "Unload a model; 400 naming why where this server does not unload models",
        {200: OBJECT},
        (InvalidRequest, ModelNotFound),
    ),
    **{
        path: Operation("Shared memory: not implemented, always refused", {}, (InvalidRequest,))
        for path in SHARED_MEMORY_PATHS
    },
    **{
        path: Operation("Tracing: not implemented, always refused", {}, (InvalidRequest,))
        for path in TRACE_PATHS
    },
    LOGGING_PATH: Operation("Log settings: not implemented, always refused", {}, (InvalidRequest,)),
    "/metrics": Operation("Prometheus metrics", {200: STRING}, media_type="text/plain"),
    OPENAPI_PATH: Operation("This document, for the models served now", {200: OBJECT}),
}
"""What each path of the protocol and its extensions takes and answers, by route path."""

INFER_ERRORS = (
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedEncoding,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    DeadlineExceeded,
    UpstreamError,
    InferenceFailed,
)
EDGE_REFUSALS = {
    400: "The HTTP request itself is malformed.",
    408: "The request's head or body did not arrive in time.",
    413: "The request body is over the server's limit.",
    414: "The URL is over the server's limit.",
    431: "The request headers are over the server's limits.",
    503: "More requests are in progress than the server takes (with Retry-After).",
}
"""What ``protocol.edge`` answers before any route, whatever the path."""
BUG = "A fault of the server's (a bug), answered like any other error."

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY: Schema = {"type": "string", "format": "binary"}
INFER_DESCRIPTION = f"""\
The request names each input of the model once, in any order. `data` is row-major, flat or
nested; its element count must match `shape`. When the model batches (`max_batch_size` >
0), the first dimension of every input is the batch, from 1 to `max_batch_size`, the same
for every input. `outputs` picks the outputs returned (default: all).

Binary tensor extension (`application/octet-stream`): the body is the JSON request, then
the bytes of each tensor that has `parameters.binary_data_size` instead of `data`, in the
order the tensors appear in the JSON: little-endian, row-major, a BYTES element as a
4-byte little-endian length and its bytes. `{HEADER_LENGTH}` is the JSON part's length.
Outputs come back binary when asked (`binary_data_output`, or an output's `binary_data`),
in the same layout and with the same header.

`Content-Encoding: gzip` or `deflate` bodies are decoded (the body limit holds for the
decoded body); answers are compressed when `Accept-Encoding` accepts gzip or deflate. An
output's `parameters.classification: k` answers its top k classes as BYTES
`"score:index[:label]"` strings, as Triton does. `shared_memory_*` parameters are refused,
and so are `sequence_id`, `sequence_start` and `sequence_end` (no sequence batching)."""
INFER_HEADERS = [
    {
        "name": HEADER_LENGTH,
        "in": "header",
        "schema": {"type": "integer", "minimum": 1},
        "description": "The length in bytes of the JSON part, when binary tensors follow it",
    },
    {
        "name": "X-Request-Timeout-Ms",
        "in": "header",
        "schema": {"type": "number", "minimum": 0},
        "description": "The gateway's deadline for the request, in milliseconds (0: none); "
        "the earlier of it and parameters.timeout applies",
    },
]


def openapi_route(models: Callable[[], Iterable[ModelMetadata]]) -> Route:
    """``GET /openapi.json``: the app's routes, for ``models()``, the models served now."""

    async def openapi(request: Request) -> Response:
        return json_response(document(request.app.routes, models()))

    return Route(OPENAPI_PATH, openapi)


def document(routes: Iterable[BaseRoute], models: Iterable[ModelMetadata]) -> Schema:
    """The OpenAPI document of an app with these routes and the inference route in front,
    serving these models."""
    methods: dict[str, set[str]] = {}
    for route in routes:
        if isinstance(route, Route) and route.methods:
            # HEAD is Starlette's companion of every GET: the same answer without a body.
            methods.setdefault(route.path, set()).update(route.methods - {"HEAD"})
    methods |= {path: {"POST"} for path in INFER_PATHS}
    paths = {path: _path_item(path, verbs, None) for path, verbs in methods.items()}
    for model in models:
        for path, verbs in methods.items():
            if path.startswith(MODEL_PATH) and (model.version or "{version}" not in path):
                concrete = path.replace("{model}", quote(model.name, safe=""))
                concrete = concrete.replace("{version}", quote(model.version, safe=""))
                paths[concrete] = _path_item(path, verbs, model)
    statuses = {cls.status for cls in _subclasses((BazaarError,))} | set(EDGE_REFUSALS) | {500}
    return {
        "openapi": "3.1.0",
        "info": {"title": "bazaar: Open Inference Protocol (v2)", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR},
            "responses": {f"Error{status}": _error_response(status) for status in statuses},
        },
    }


def _path_item(path: str, methods: set[str], model: ModelMetadata | None) -> Schema:
    """``path``'s operations; with ``model``, for that model at its concrete path."""
    item: Schema = {}
    for method in sorted(methods):
        if path in INFER_PATHS:
            item[method.lower()] = _infer(model)
        else:
            item[method.lower()] = _operation(path, OPERATIONS.get(path))
    names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
    if names and model is None:
        item["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": STRING} for name in names
        ]
    return item


def _operation(path: str, operation: Operation | None) -> Schema:
    if operation is None:
        return {"summary": f"{path} (not described)", "responses": {"200": {"description": "OK"}}}
    responses: Schema = {}
    for status, schema in operation.answers.items():
        content = {operation.media_type: {"schema": schema}}
        responses[str(status)] = {"description": HTTPStatus(status).phrase, "content": content}
    _add_errors(responses, operation.errors)
    result: Schema = {"summary": operation.summary, "responses": responses}
    if operation.body is not None:
        content = {"application/json": {"schema": operation.body}}
        result["requestBody"] = {"required": False, "content": content}
    return result


def _infer(model: ModelMetadata | None) -> Schema:
    """The inference operation, for ``model``'s tensors or for any model's (None)."""
    request: Schema = {"schema": inference_request(model)}
    example = example_request(model) if model is not None else None
    if example is not None:
        request["example"] = example
    content = {
        "application/json": {"schema": inference_response(model)},
        "application/octet-stream": {"schema": BINARY},
    }
    header = {HEADER_LENGTH: {"schema": {"type": "integer", "minimum": 1}}}
    answer = {"description": "The outputs asked for, JSON or binary as asked"}
    responses: Schema = {"200": {**answer, "headers": header, "content": content}}
    _add_errors(responses, INFER_ERRORS)
    return {
        "summary": "Inference" + ("" if model is None else f" on {model.name}"),
        "description": INFER_DESCRIPTION,
        "parameters": INFER_HEADERS,
        "requestBody": {
            "required": True,
            "content": {
                "application/json": request,
                "application/octet-stream": {"schema": BINARY},
            },
        },
        "responses": responses,
    }


def _add_errors(responses: Schema, errors: Iterable[type[BazaarError]]) -> None:
    """The statuses of ``errors``, of the edge's refusals and of a bug, each with its body."""
    statuses = {cls.status for cls in _subclasses(errors)} | set(EDGE_REFUSALS) | {500}
    for status in sorted(statuses):
        answer = responses.get(str(status))
        if answer is None:
            responses[str(status)] = {"$ref": f"#/components/responses/Error{status}"}
        else:  # readiness answers 503 with its own body; a refusal with an error
            content = answer["content"]["application/json"]
            content["schema"] = {"anyOf": [content["schema"], ERROR]}


def _subclasses(roots: Iterable[type[BazaarError]]) -> set[type[BazaarError]]:
    """``roots`` and their subclasses, those of every module imported so far."""
    found: set[type[BazaarError]] = set()
    pending = list(roots)
    while pending:
        cls = pending.pop()
        if cls not in found:
            found.add(cls)
            pending += cls.__subclasses__()
    return found


def _error_response(status: int) -> Schema:
    """The error answer with ``status``, described by the errors that answer it."""
    reasons = sorted(
        (cls.__doc__ or cls.__name__).strip().splitlines()[0]
        for cls in _subclasses((BazaarError,))
        if cls.status == status and cls is not BazaarError
    )
    reasons += [EDGE_REFUSALS[status]] if status in EDGE_REFUSALS else []
    reasons += [BUG] if status == 500 else []
    response: Schema = {
        "description": " ".join(reasons),
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if status == 503:
        response["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}}
    return response
