"""The gateway's HTTP client for model pods (any Open Inference Protocol v2 server).

One pooled aiohttp session for the whole gateway, keep-alive connections per pod. Batches
travel as binary tensors both ways, so a batch costs one JSON header and a memcpy per tensor
instead of formatting thousands of floats; to a server whose ``GET /v2`` does not list the
``binary_tensor_data`` extension (MLServer), as JSON. That is asked once per server, on the
first batch sent to it; a server without the route is sent binary, and one that cannot be
reached is asked again on the next batch. Each call tells the pod how long its answer is
worth waiting for, as ``parameters.timeout`` in microseconds (Triton's semantics: a pod may
drop a batch whose time is up before it starts), and waits no longer itself.

What a pod's answer means to the router: 200 is the outputs; 400 is the client's fault
(``InvalidRequest``, passed through, not retried); anything else, a refused connection or
a timeout is ``UpstreamError``, which the router retries once on another endpoint.

``forward`` sends a request passed through as its client sent it (``gateway.passthrough``)
with the headers that say how to read it, and returns a 200 answer as the pod sent it (at
most ``MAX_ANSWER_BYTES``); its other answers mean the same as ``infer``'s, except that any
4xx but 404, 408 and 429 is the client's: the gateway knew nothing of the request to check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from gateway.router import RawRequest, Tensors
from protocol import tracing
from protocol.codec import InferenceRequest, decode_response, encode_request
from protocol.errors import InvalidRequest, UpstreamError
from protocol.fastpath import Answer

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_ANSWER_BYTES = 256 * 1024 * 1024
"""The largest answer to a passed-through request read into memory (the request's limit)."""
NOT_THE_CLIENTS = frozenset({404, 408, 429})
"""4xx answers that say something of the pod, not of the request."""
POOLED_IDLE_S = 4.0
"""How long an idle connection to a pod is kept for the next call: under the pods' own
keep-alive timeout (``EdgeLimits.keep_alive_timeout_s``, 5 s), so the gateway never sends a
batch down a connection the pod is closing at that moment (the request would be lost, a 502)."""


MAX_READY_BYTES = 4096
"""The longest ready answer read."""


@dataclass(frozen=True, slots=True)
class Readiness:
    """A pod's readiness answer for one model."""

    ready: bool
    loaded: bool = True
    """It holds the model in memory: a batch computes without waiting for a page-in."""


class HttpModelClient:
    """Implements ``router.ModelClient`` over HTTP; create it inside the running loop."""

    def __init__(self, connect_timeout_s: float = 2.0) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=POOLED_IDLE_S),
            timeout=aiohttp.ClientTimeout(sock_connect=connect_timeout_s),
            # aiohttp asks for gzip by default, and pods compress what a caller accepts: the
            # hop would pay for it both ways. The client's own Accept-Encoding is the
            # gateway's to honour.
            headers={"Accept-Encoding": "identity"},
        )
        self._binary: dict[str, bool] = {}
        """Per server URL, whether it speaks the binary tensor extension."""

    async def infer(self, url: str, model: str, inputs: Tensors, timeout_s: float) -> Tensors:
        binary = self._binary.get(url)
        if binary is None:
            binary = await self._speaks_binary(url)
        request = InferenceRequest(
            id=None,
            parameters={"timeout": max(1, int(timeout_s * 1_000_000))},
            inputs=inputs,
            outputs=None,
            binary_output=binary,
        )
        body, header_length = encode_request(request, binary=binary)
        headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
        if header_length is not None:
            headers[HEADER_LENGTH] = str(header_length)
        status, payload, header_length = await self._post(url, model, body, headers, timeout_s)
        if status != 200:
            message = _error_message(payload)
            if status == 400:
                raise InvalidRequest(f"the pod refused the request: {message}")
            raise UpstreamError(f"pod {url} answered {status}: {message}")
        return decode_response(payload, header_length).outputs

    async def forward(self, url: str, model: str, request: RawRequest, timeout_s: float) -> Answer:
        status, payload, header_length = await self._post(
            url, model, request.body, request.headers, timeout_s
        )
        if status != 200:
            message = _error_message(payload)
            if 400 <= status < 500 and status not in NOT_THE_CLIENTS:
                raise InvalidRequest(f"the pod refused the request ({status}): {message}")
            raise UpstreamError(f"pod {url} answered {status}: {message}")
        return payload, header_length

    async def _post(
        self, url: str, model: str, body: bytes, headers: dict[str, str], timeout_s: float
    ) -> tuple[int, bytes, int | None]:
        """An inference body sent to ``url``'s ``model``: the answer's status, body (bounded)
        and, on a 200, its ``Inference-Header-Content-Length``. ``UpstreamError`` if none came."""
        tracer = tracing.TRACER
        if tracer is None or not tracing.recording():
            return await self._send(url, model, body, headers, timeout_s)
        with tracing.client_span(tracer, "pod call"):
            headers = dict(headers)
            tracing.inject(headers)
            return await self._send(url, model, body, headers, timeout_s)

    async def _send(
        self, url: str, model: str, body: bytes, headers: dict[str, str], timeout_s: float
    ) -> tuple[int, bytes, int | None]:
        try:
            async with self._session.post(
                f"{url}/v2/models/{model}/infer",
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as response:
                status = response.status
                length = response.headers.get(HEADER_LENGTH)
                payload = await _bounded_read(response, url)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(f"pod {url} failed: {type(exc).__name__}: {exc}") from None
        if status != 200 or length is None:
            return status, payload, None
        try:
            return status, payload, int(length)
        except ValueError:
            raise UpstreamError(f"pod {url} sent {HEADER_LENGTH}: {length!r}") from None

    async def _speaks_binary(self, url: str) -> bool:
        try:
            server = await self.get_json(url, "/v2", optional=True)
        except UpstreamError:
            return True  # asked again on the next batch
        extensions = server.get("extensions") if isinstance(server, dict) else None
        binary = self._binary[url] = server is None or (
            isinstance(extensions, list) and "binary_tensor_data" in extensions
        )
        return binary

    async def ready(self, url: str, model: str) -> bool:
        return (await self.readiness(url, model)).ready

    async def readiness(self, url: str, model: str) -> Readiness:
        """Whether ``url`` serves ``model`` now, and holds it loaded: a pod that pages models
        says ``"loaded": false`` in its ready answer when it would load it first; any other
        server is taken to hold what it serves."""
        try:
            async with self._session.get(
                f"{url}/v2/models/{model}/ready", timeout=aiohttp.ClientTimeout(total=2.0)
            ) as response:
                if response.status != 200:
                    return Readiness(ready=False)
                # Ours is a few fields of JSON; anything longer, or unsized, is not read.
                length = response.content_length
                body = await response.read() if length and length <= MAX_READY_BYTES else b""
        except (TimeoutError, aiohttp.ClientError, OSError):
            return Readiness(ready=False)
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            answer = None  # Triton answers an empty body
        loaded = answer.get("loaded") if isinstance(answer, dict) else None
        return Readiness(ready=True, loaded=loaded is not False)

    async def get_json(self, url: str, path: str, *, optional: bool = False) -> Any:
        """A control-plane GET (metadata, config); ``UpstreamError`` unless 200 with JSON.
        ``optional``: a route the pod may not have (404, 405) is None."""
        try:
            async with self._session.get(
                f"{url}{path}", timeout=aiohttp.ClientTimeout(total=10.0)
            ) as response:
                payload = await response.read()
                status = response.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(f"pod {url} failed: {type(exc).__name__}: {exc}") from None
        if optional and status in (404, 405):
            return None
        if status != 200:
            raise UpstreamError(f"GET {url}{path} answered {status}: {_error_message(payload)}")
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"GET {url}{path} did not answer JSON") from None

    async def close(self) -> None:
        await self._session.close()


async def _bounded_read(response: aiohttp.ClientResponse, url: str) -> bytes:
    """The whole body, or ``UpstreamError`` past ``MAX_ANSWER_BYTES`` (before reading it all)."""
    if (response.content_length or 0) > MAX_ANSWER_BYTES:
        raise UpstreamError(f"pod {url} answered {response.content_length} bytes, over the limit")
    chunks = []
    size = 0
    async for chunk in response.content.iter_chunked(1 << 20):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise UpstreamError(f"pod {url} answered over {MAX_ANSWER_BYTES} bytes, the limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _error_message(payload: bytes) -> str:
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload[:200].decode("utf-8", "replace")
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])
    return str(data)[:200]
