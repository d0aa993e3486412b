"""Triton's ``inference.GRPCInferenceService`` over ``grpc.aio``, for the gateway and the pods.

``InferenceService`` answers every RPC a v2 server answers from an ``InferenceBackend`` (the
gateway's catalog and dispatchers, or the pod's store and runtimes): health, server and model
metadata, readiness, the model config and statistics (Triton's JSON, ``protocol.modelconfig``
and ``protocol.statistics``, parsed into the messages), the repository index, and
``ModelInfer``, whose decoding, scheduling and encoding are the backend's.
``ModelStreamInfer`` serves each request of a stream as ``ModelInfer`` would, up to
``MAX_STREAM_IN_FLIGHT`` at once, and writes each answer when it is ready (the client matches
them by ``id``); a request that fails gets its ``error_message`` and the stream goes on, as in
Triton. The RPCs bazaar does not implement (shared memory, load/unload, trace and log
settings) answer ``UNIMPLEMENTED`` with a message naming what is missing
(``NOT_IMPLEMENTED``), not the generated "Method not implemented!". ``grpc_server`` runs it
in the calling event loop (the one uvicorn serves HTTP in), behind the same edge as HTTP:

- errors: a ``BazaarError`` is answered with the gRPC code Triton gives its HTTP status
  (``GRPC_CODES``) and its message; ``Retry-After`` goes into the trailing metadata;
  anything else is a bug, logged and answered ``INTERNAL``;
- keys: with a ``KeyFile``, the token in ``authorization: Bearer`` or ``x-api-key`` metadata,
  with ``protocol.auth``'s scopes (health RPCs are ``health``, statistics ``stats``, every
  other ``infer``);
- limits: messages up to the inference body limit, metadata up to the header limit, at most
  ``max_concurrent_requests`` RPCs in progress (beyond, ``RESOURCE_EXHAUSTED``), a bounded
  number of streams per connection, keepalive pings answered and sent;
- deadlines and cancellation: the backend is given the call's remaining time, and grpc.aio
  cancels the handler when the client cancels or its deadline passes, which cancels the
  backend's wait (at the gateway, the request's place in the queue);
- metadata: the backend is given the call's metadata as HTTP headers (``call_headers``), so
  what a client sends as a header over HTTP (the gateway's sticky key) it can send as
  metadata of the same name over gRPC.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import json_format

from protocol import __version__, tracing
from protocol.auth import HEALTH, INFER, OPEN_BY_DEFAULT, STATS, KeyFile, presented_token
from protocol.errors import BazaarError
from protocol.fastpath import Headers
from protocol.grpc import grpc_service_pb2 as pb
from protocol.grpc.grpc_service_pb2_grpc import (
    GRPCInferenceServiceServicer,
    add_GRPCInferenceServiceServicer_to_server,
)
from protocol.limits import EdgeLimits
from protocol.support import cancel_and_wait
from protocol.tls import ServerTls

log = logging.getLogger(__name__)

GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
"""gRPC status code by ``BazaarError.status``; any other status is ``INTERNAL``."""

MAX_STREAMS_PER_CONNECTION = 128
"""Concurrent RPCs one HTTP/2 connection may carry (``grpc.max_concurrent_streams``)."""
MAX_STREAM_IN_FLIGHT = MAX_STREAMS_PER_CONNECTION
"""Requests of one ``ModelStreamInfer`` stream in progress at once: a stream may cost what a
connection's RPCs may; the next request is read when one is answered."""
KEEPALIVE_S = 60
"""Idle connections are pinged this often, and dropped 20 s after an unanswered ping."""
MIN_CLIENT_PING_INTERVAL_S = 10
"""A client pinging more often than this is sent GOAWAY (ping floods cost the server)."""
MAX_CONNECTION_IDLE_S = 300
"""A connection without an RPC this long is closed (a channel reconnects when it needs to)."""


class InferenceBackend(Protocol):
    """What a v2 server serves, for ``InferenceService``. Views raise ``BazaarError``."""

    server_name: str
    extensions: list[str]

    def ready(self) -> bool: ...

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        """The model's v2 metadata JSON (``ModelMetadata.to_json``)."""
        ...

    def model_ready(self, name: str, version: str | None) -> bool: ...

    def index(self, ready_only: bool) -> list[dict[str, str]]:
        """The repository index: ``name``, ``version``, ``state``, ``reason`` per model."""
        ...

    def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        """Triton's ``ModelConfig`` JSON (``protocol.modelconfig``)."""
        ...

    def statistics(self, name: str | None, version: str | None) -> list[dict[str, Any]]:
        """Triton's ``model_stats`` JSON (``protocol.statistics``); None: every model, or
        every version of the model."""
        ...

    async def infer(
        self,
        message: pb.ModelInferRequest,
        limit_s: float | None,
        tenant: str | None,
        headers: Headers,
    ) -> pb.ModelInferResponse:
        """Serve one inference; ``limit_s`` is the time left until the call's deadline,
        ``headers`` the call's metadata (``call_headers``)."""
        ...


Response = TypeVar("Response")

NOT_IMPLEMENTED = {
    "RepositoryModelLoad": "loading models over gRPC (pods load over HTTP, on the control port)",
    "RepositoryModelUnload": "unloading models over gRPC (pods unload over HTTP, on the control "
    "port)",
    "SystemSharedMemoryStatus": "the system shared memory extension",
    "SystemSharedMemoryRegister": "the system shared memory extension",
    "SystemSharedMemoryUnregister": "the system shared memory extension",
    "CudaSharedMemoryStatus": "the CUDA shared memory extension",
    "CudaSharedMemoryRegister": "the CUDA shared memory extension",
    "CudaSharedMemoryUnregister": "the CUDA shared memory extension",
    "TraceSetting": "the trace extension (TraceSetting)",
    "LogSettings": "the logging extension (LogSettings)",
}
"""The RPCs bazaar does not serve, and what each message says is not implemented."""


def _unimplemented(rpc: str) -> Callable[..., Awaitable[None]]:
    async def refuse(self: InferenceService, request: Any, context: Any) -> None:
        await self._authorize(context, INFER)  # a caller without a key learns nothing
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"this server does not implement {NOT_IMPLEMENTED[rpc]}",
        )

    return refuse


class InferenceService(GRPCInferenceServiceServicer):
    """The servicer: the backend's answers, behind keys (when given) and the error table."""

    def __init__(
        self,
        backend: InferenceBackend,
        keys: KeyFile | None = None,
        open_scopes: frozenset[str] = OPEN_BY_DEFAULT,
    ) -> None:
        self.backend = backend
        self.keys = keys
        self.open_scopes = open_scopes

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerLiveResponse:
        await self._authorize(context, HEALTH)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerReadyResponse:
        await self._authorize(context, HEALTH)
        return pb.ServerReadyResponse(ready=self.backend.ready())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerMetadataResponse:
        await self._authorize(context, HEALTH)
        backend = self.backend
        return pb.ServerMetadataResponse(
            name=backend.server_name, version=__version__, extensions=backend.extensions
        )

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelReadyResponse:
        await self._authorize(context, INFER)
        ready = await self._answer(
            context, lambda: self.backend.model_ready(request.name, request.version or None)
        )
        return pb.ModelReadyResponse(ready=ready)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelMetadataResponse:
        await self._authorize(context, INFER)
        view = await self._answer(
            context, lambda: self.backend.model_metadata(request.name, request.version or None)
        )
        return metadata_response(view)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RepositoryIndexResponse:
        await self._authorize(context, INFER)
        models = await self._answer(context, lambda: self.backend.index(request.ready))
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**model) for model in models]
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelConfigResponse:
        await self._authorize(context, INFER)
        config = await self._answer(
            context, lambda: self.backend.model_config(request.name, request.version or None)
        )
        response = pb.ModelConfigResponse()
        json_format.ParseDict({"config": config}, response)
        return response

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelStatisticsResponse:
        await self._authorize(context, STATS)
        stats = await self._answer(
            context,
            lambda: self.backend.statistics(request.name or None, request.version or None),
        )
        response = pb.ModelStatisticsResponse()
        json_format.ParseDict({"model_stats": stats}, response)
        return response

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInferResponse:
        tenant = await self._authorize(context, INFER)
        headers = call_headers(context)
        try:
            if tracing.TRACER is None:
                return await self.backend.infer(request, context.time_remaining(), tenant, headers)
            with tracing.incoming(headers.get(b"traceparent"), headers.get(b"tracestate")):
                return await self.backend.infer(request, context.time_remaining(), tenant, headers)
        except Exception as exc:
            await _abort(context, exc)
            raise  # unreachable: abort raises

    RepositoryModelLoad = _unimplemented("RepositoryModelLoad")
    RepositoryModelUnload = _unimplemented("RepositoryModelUnload")
    SystemSharedMemoryStatus = _unimplemented("SystemSharedMemoryStatus")
    SystemSharedMemoryRegister = _unimplemented("SystemSharedMemoryRegister")
    SystemSharedMemoryUnregister = _unimplemented("SystemSharedMemoryUnregister")
    CudaSharedMemoryStatus = _unimplemented("CudaSharedMemoryStatus")
    CudaSharedMemoryRegister = _unimplemented("CudaSharedMemoryRegister")
    CudaSharedMemoryUnregister = _unimplemented("CudaSharedMemoryUnregister")
    TraceSetting = _unimplemented("TraceSetting")
    LogSettings = _unimplemented("LogSettings")

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        tenant = await self._authorize(context, INFER)
        headers = call_headers(context)
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(MAX_STREAM_IN_FLIGHT)
        running: set[asyncio.Task[None]] = set()

        async def serve(request: pb.ModelInferRequest) -> None:
            try:
                limit_s = context.time_remaining()
                response = await self.backend.infer(request, limit_s, tenant, headers)
                answer = pb.ModelStreamInferResponse(infer_response=response)
            except BazaarError as exc:
                answer = _stream_error(request, exc.message)
            except Exception as exc:
                log.exception("unhandled error", exc_info=exc)
                answer = _stream_error(request, f"internal error: {type(exc).__name__}: {exc}")
            finally:
                slots.release()
            answers.put_nowait(answer)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(serve(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                await asyncio.gather(*running)
            finally:
                answers.put_nowait(None)  # the stream's end, or its reader's failure

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                await context.write(answer)
            await reader
        finally:
            # The client left or the call ended: what it sent and nobody will read stops.
            await cancel_and_wait(reader, *running)

    async def _answer(
        self, context: grpc.aio.ServicerContext[Any, Any], view: Callable[[], Response]
    ) -> Response:
        try:
            return view()
        except Exception as exc:
            await _abort(context, exc)
            raise  # unreachable: abort raises

    async def _authorize(
        self, context: grpc.aio.ServicerContext[Any, Any], scope: str
    ) -> str | None:
        """The caller's tenant, or the call aborted (UNAUTHENTICATED, PERMISSION_DENIED)."""
        if self.keys is None or scope in self.open_scopes:
            return None
        metadata = context.invocation_metadata() or ()
        token = presented_token(
            (str(key).encode(), value if isinstance(value, bytes) else str(value).encode())
            for key, value in metadata
        )
        if token is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "this RPC needs an API key")
            raise AssertionError("unreachable: abort raises")
        key = self.keys.lookup(token)
        if key is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the API key is not valid")
            raise AssertionError("unreachable: abort raises")
        if scope not in key.scopes:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the API key does not grant the '{scope}' scope",
            )
        return key.tenant


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    """A stream's answer to a request that failed: Triton's ``error_message``, with the
    request's id so the client knows which."""
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    return pb.ModelStreamInferResponse(error_message=message, infer_response=response)


def call_headers(context: grpc.aio.ServicerContext[Any, Any]) -> Headers:
    """The call's metadata as HTTP headers: lower-case names (gRPC's already are) as bytes,
    the last value of a name winning; binary (``-bin``) entries are no header, left out."""
    return {
        str(key).encode(): value.encode()
        for key, value in context.invocation_metadata() or ()
        if isinstance(value, str)
    }


def metadata_response(view: Mapping[str, Any]) -> pb.ModelMetadataResponse:
    """A model's v2 metadata JSON as the gRPC message."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=view["name"],
        versions=view["versions"],
        platform=view["platform"],
        inputs=[tensor(**spec) for spec in view["inputs"]],
        outputs=[tensor(**spec) for spec in view["outputs"]],
    )


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
    if isinstance(exc, BazaarError):
        code = GRPC_CODES.get(exc.status, grpc.StatusCode.INTERNAL)
        trailing = tuple((key.lower(), value) for key, value in exc.headers().items())
        await context.abort(code, exc.message, trailing_metadata=trailing)
    log.exception("unhandled error", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def grpc_server(
    service: InferenceService,
    host: str,
    port: int,
    limits: EdgeLimits,
    tls: ServerTls | None = None,
) -> tuple[grpc.aio.Server, int]:
    """The server (not started; start and stop it in the serving loop) and its bound port
    (``port`` 0 binds a free one)."""
    options = [
        ("grpc.max_receive_message_length", limits.max_infer_body_bytes),
        ("grpc.max_send_message_length", limits.max_infer_body_bytes),
        ("grpc.max_metadata_size", limits.max_header_bytes),
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_S * 1000),
        ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_S * 1000),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(
        options=options, maximum_concurrent_rpcs=limits.max_concurrent_requests
    )
    add_GRPCInferenceServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, _credentials(tls))
    return server, bound


def _credentials(tls: ServerTls) -> grpc.ServerCredentials:
    with open(tls.certfile, "rb") as cert, open(tls.keyfile or tls.certfile, "rb") as key:
        pair = (key.read(), cert.read())
    root = None
    if tls.ca_certs is not None:
        with open(tls.ca_certs, "rb") as ca:
            root = ca.read()
    return grpc.ssl_server_credentials(
        [pair], root_certificates=root, require_client_auth=tls.client_cert == "required"
    )
