"""The inference route as a bare ASGI callable in front of Starlette.

``POST /v2/models/{m}[/versions/{v}]/infer`` is the hot path. Profiled at 64 concurrent
clients, Starlette's request objects, router and exception middleware cost about as much
CPU per request as decoding, batching and encoding together, so this route skips them: it
matches the path itself, reads the body from ``receive`` and answers with two ``send``
calls. A gzip or deflate body is decoded before the handler sees it, within the route's body
limit, and the answer compressed when the client accepts it (``protocol.compression``). The
semantics stay those of every other route: the handler raises ``BazaarError``
and the same error table answers (``responses.error_response``). Everything else goes to
the Starlette app unchanged. Gateway and pods alike write their handler as
``decode`` → run → ``answer``.

A client that disconnects while its request is handled cancels the handler (the edge calls
the route back, ``protocol.edge.ON_DISCONNECT``), so work nobody waits for stops: the
gateway's request leaves its queue, the pod's batch its wait for an instance. Nothing is
answered then: nobody is there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from protocol import tracing
from protocol.auth import TENANT
from protocol.classification import classified
from protocol.codec import InferenceRequest, InferenceResponse, decode_request, encode_response
from protocol.compression import compress, decompress, response_coding
from protocol.edge import ON_DISCONNECT
from protocol.errors import InvalidRequest, PayloadTooLarge
from protocol.limits import EdgeLimits
from protocol.responses import error_response, json_response
from protocol.schema import ModelMetadata
from protocol.tensors import Array

Headers = dict[bytes, bytes]
"""Request headers by lower-case name (the last value wins)."""
Answer = tuple[bytes, int | None]
"""An encoded inference response and its ``Inference-Header-Content-Length`` (None: JSON)."""
InferHandler = Callable[[str, str | None, bytes, Headers, str | None], Awaitable[Answer]]
"""(model, version, body, headers, tenant) → answer."""


MAX_BODY_BYTES = EdgeLimits().max_infer_body_bytes
"""The default of ``with_infer_route``'s limit: the edge's, which holds when nothing is
configured."""


def with_infer_route(
    app: ASGIApp, handler: InferHandler, max_body_bytes: int = MAX_BODY_BYTES
) -> ASGIApp:
    """``app`` with the inference route in front. A body over ``max_body_bytes`` is answered
    413 part way; servers pass their configured ``EdgeLimits.max_infer_body_bytes``, which the
    edge enforces first when it is in front."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        target = infer_target(scope["path"]) if scope["type"] == "http" else None
        if target is None:
            await app(scope, receive, send)
        elif scope["method"] != "POST":
            await _method_not_allowed(scope, receive, send)
        else:
            await _infer(handler, target, max_body_bytes, scope, receive, send)

    return asgi


def decode(body: bytes, headers: Headers, metadata: ModelMetadata) -> InferenceRequest:
    """The request body, validated against ``metadata`` (``InvalidRequest`` on any fault)."""
    return decode_request(body, header_length(headers), metadata)


def answer(request: InferenceRequest, metadata: ModelMetadata, outputs: dict[str, Array]) -> Answer:
    """The response to ``request``: its id echoed, the outputs it asked for, as it asked
    (the top classes of those it asked to classify)."""
    response = InferenceResponse(
        model_name=metadata.name,
        model_version=metadata.version,
        id=request.id,
        parameters={},
        outputs=dict(classified(request.outputs, metadata, outputs)),
    )
    return encode_response(response, request.outputs, request.binary_output)


def header_length(headers: Headers) -> int | None:
    """The binary extension's ``Inference-Header-Content-Length``, validated."""
    value = headers.get(b"inference-header-content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        shown = value.decode(errors="replace")
        raise InvalidRequest(
            f"Inference-Header-Content-Length must be an integer, got {shown!r}"
        ) from None


INFER_PATHS = ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer")
"""The inference route's paths (POST), in Starlette's notation."""


def infer_target(path: str) -> tuple[str, str | None] | None:
    """(model, version) for an inference path, else None."""
    parts = path.split("/")
    if parts[-1] != "infer" or parts[:3] != ["", "v2", "models"]:
        return None
    if len(parts) == 5 and parts[3]:
        return parts[3], None
    if len(parts) == 7 and parts[3] and parts[4] == "versions" and parts[5]:
        return parts[3], parts[5]
    return None


async def _infer(
    handler: InferHandler,
    target: tuple[str, str | None],
    max_body_bytes: int,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return  # the client left before its request was complete: nothing to answer
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_body_bytes:
            await error_response(PayloadTooLarge(max_body_bytes))(scope, receive, send)
            return
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    del chunks  # a body that came in pieces must not be held twice while it is handled
    headers: Headers = dict(scope["headers"])
    task = asyncio.current_task()
    assert task is not None
    left = False

    def client_left() -> None:
        nonlocal left
        left = True
        task.cancel()

    scope[ON_DISCONNECT] = client_left
    try:
        encoding = headers.pop(b"content-encoding", None)
        if encoding is not None:
            body = decompress(body, encoding, max_body_bytes)
        if tracing.TRACER is None:
            encoded, header_length = await handler(
                target[0], target[1], body, headers, scope.get(TENANT)
            )
        else:
            with tracing.incoming(headers.get(b"traceparent"), headers.get(b"tracestate")):
                encoded, header_length = await handler(
                    target[0], target[1], body, headers, scope.get(TENANT)
                )
    except asyncio.CancelledError:
        if left and task.uncancel() == 0:
            return  # the client left while its request was handled: nobody to answer
        raise
    except Exception as exc:
        response = error_response(exc)
        await response(scope, receive, send)
        return
    finally:
        del scope[ON_DISCONNECT]
    response_headers: list[tuple[bytes, bytes]] = []
    accept_encoding = headers.get(b"accept-encoding")
    if accept_encoding is not None:
        coding = response_coding(accept_encoding)
        if coding is not None:
            encoded = compress(encoded, coding)
            response_headers.append((b"content-encoding", coding))
    response_headers.append((b"content-length", str(len(encoded)).encode()))
    if header_length is None:
        response_headers.append((b"content-type", b"application/json"))
    else:
        response_headers.append((b"content-type", b"application/octet-stream"))
        response_headers.append((b"inference-header-content-length", str(header_length).encode()))
    start: dict[str, Any] = {
        "type": "http.response.start",
        "status": 200,
        "headers": response_headers,
    }
    await send(start)
    await send({"type": "http.response.body", "body": encoded})


async def _method_not_allowed(scope: Scope, receive: Receive, send: Send) -> None:
    response = json_response({"error": "Method Not Allowed"}, 405, {"Allow": "POST"})
    await response(scope, receive, send)
