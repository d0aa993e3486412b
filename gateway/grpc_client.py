"""The gateway's gRPC hop to model pods: batches as ``ModelInfer`` calls with raw contents.

``GrpcModelClient`` is the HTTP client (``gateway.client``) with ``infer`` sent over gRPC
to every pod whose gRPC address ``targets`` knows (an endpoint's HTTP URL → ``host:port``);
a pod it does not know is called over HTTP, and passthrough, readiness and learning stay
on HTTP everywhere. One ``grpc.aio`` channel per pod, opened on its first batch (it
reconnects by itself after a pod restarts on the same address). Opening one closes those
whose endpoints ``targets`` no longer maps to them (a retired worker, an edited endpoints
file), so a gateway whose pods come and go for months holds a channel per live pod, not per
pod it ever called.

A call means to the router what an HTTP call means (``gateway.client``): it carries the
batch's time left both as its gRPC deadline and as ``parameters.timeout`` in microseconds
(the pod may drop a batch whose time is up before it starts); INVALID_ARGUMENT, the pod's
400, is the client's fault (``InvalidRequest``, not retried); any other status, a refused
connection or a deadline is ``UpstreamError``, which the router retries once on another
endpoint. A cancelled wait (every member of the batch left) cancels the call, and the pod
sees it cancelled. With tracing on, the call is the "pod call" span and carries its
``traceparent`` as metadata, as the HTTP hop carries it as a header.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from gateway.client import MAX_ANSWER_BYTES, HttpModelClient
from gateway.router import Tensors
from protocol import tracing
from protocol.errors import InvalidRequest, UpstreamError
from protocol.grpc import codec
from protocol.grpc.grpc_service_pb2 import ModelInferRequest, ModelInferResponse
from protocol.grpc.grpc_service_pb2_grpc import GRPCInferenceServiceStub

GrpcTargets = Callable[[str], str | None]
"""An endpoint's HTTP URL → its pod's gRPC ``host:port``, or None to call it over HTTP."""


class GrpcModelClient(HttpModelClient):
    """Implements ``router.ModelClient``, batches over gRPC; create it inside the running loop."""

    def __init__(self, targets: GrpcTargets, connect_timeout_s: float = 2.0) -> None:
        super().__init__(connect_timeout_s)
        self._targets = targets
        self._channels: dict[str, tuple[grpc.aio.Channel, GRPCInferenceServiceStub]] = {}
        self._urls: dict[str, str] = {}
        """gRPC target -> the endpoint URL its channel was opened for."""

    async def infer(self, url: str, model: str, inputs: Tensors, timeout_s: float) -> Tensors:
        target = self._targets(url)
        if target is None:
            return await super().infer(url, model, inputs, timeout_s)
        name, _, version = model.partition("/versions/")
        message = codec.encode_request(
            name, inputs, {"timeout": max(1, int(timeout_s * 1_000_000))}
        )
        message.model_version = version
        tracer = tracing.TRACER
        if tracer is None:
            answer = await self._call(url, target, message, timeout_s, None)
        else:
            with tracing.client_span(tracer, "pod call"):
                headers: dict[str, str] = {}
                tracing.inject(headers)
                metadata = tuple(headers.items())
                answer = await self._call(url, target, message, timeout_s, metadata)
        return codec.decode_response(answer)

    async def _call(
        self,
        url: str,
        target: str,
        message: ModelInferRequest,
        timeout_s: float,
        metadata: tuple[tuple[str, str], ...] | None,
    ) -> ModelInferResponse:
        stub = await self._stub(url, target)
        try:
            answer: ModelInferResponse = await stub.ModelInfer(
                message, timeout=timeout_s, metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequest(f"the pod refused the request: {exc.details()}") from None
            raise UpstreamError(
                f"pod {target} answered {exc.code().name}: {exc.details()}"
            ) from None
        return answer

    async def _stub(self, url: str, target: str) -> GRPCInferenceServiceStub:
        opened = self._channels.get(target)
        if opened is not None:
            return opened[1]
        channel = grpc.aio.insecure_channel(
            target,
            options=[
                # A batch as large as the HTTP hop would carry, both ways; the pod's own
                # limit refuses a larger one (RESOURCE_EXHAUSTED, as HTTP's 413).
                ("grpc.max_send_message_length", MAX_ANSWER_BYTES),
                ("grpc.max_receive_message_length", MAX_ANSWER_BYTES),
            ],
        )
        stub = GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        self._channels[target], self._urls[target] = (channel, stub), url
        # Taken out before the first await, so a concurrent call neither uses nor closes
        # them twice.
        gone = [t for t, u in self._urls.items() if self._targets(u) != t]
        closing = [self._channels.pop(t)[0] for t in gone]
        for t in gone:
            del self._urls[t]
        for old in closing:
            await old.close()
        return stub

    async def close(self) -> None:
        for channel, _ in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._urls.clear()
        await super().close()
