"""The gateway's gRPC API: Triton's ``inference.GRPCInferenceService`` on the dispatchers.

``ModelInfer`` takes the HTTP route's path (``gateway.inference``, the same instance, so
tenants' quotas count both transports together) with the protobuf codec: the dispatcher's
admission sees the call's deadline before the message is decoded, the request's timeout is
the sooner of ``parameters.timeout`` and that deadline, and a call that is cancelled or runs
out of time cancels its wait, which frees its place in the queue. A request that names no
version follows the model's traffic policy as over HTTP, its sticky key taken from the call's
metadata of the sticky header's name. Answers carry raw outputs.
Health, metadata, readiness, the config, the repository index and statistics read the catalog
as the HTTP routes do.
"""

from __future__ import annotations

from typing import Any

from gateway.catalog import ModelCatalog
from gateway.inference import GatewayInference, model_config, statistics
from protocol.codec import InferenceRequest
from protocol.errors import DeadlineExceeded
from protocol.fastpath import Headers
from protocol.grpc import codec
from protocol.grpc import grpc_service_pb2 as pb
from protocol.schema import ModelMetadata


class GatewayGrpcBackend:
    """Implements ``protocol.grpc.service.InferenceBackend`` for the gateway."""

    def __init__(
        self, inference: GatewayInference, server_name: str, extensions: list[str]
    ) -> None:
        self.inference = inference
        self.catalog: ModelCatalog = inference.catalog
        self.server_name = server_name
        self.extensions = extensions

    def ready(self) -> bool:
        return True  # as over HTTP: the gateway takes requests whatever the models' replicas

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        return self.catalog.metadata(name, version)

    def model_ready(self, name: str, version: str | None) -> bool:
        return self.catalog.is_ready(name, version)

    def index(self, ready_only: bool) -> list[dict[str, str]]:
        return self.catalog.index(ready_only)

    def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        return model_config(self.catalog, name, version)

    def statistics(self, name: str | None, version: str | None) -> list[dict[str, Any]]:
        return statistics(self.catalog, name, version)

    async def infer(
        self,
        message: pb.ModelInferRequest,
        limit_s: float | None,
        tenant: str | None,
        headers: Headers,
    ) -> pb.ModelInferResponse:
        if limit_s is not None and limit_s <= 0:
            raise DeadlineExceeded("the call's deadline passed before it reached the gateway")

        def decode(metadata: ModelMetadata) -> tuple[InferenceRequest, float | None]:
            return codec.decode_request(message, metadata), limit_s

        return await self.inference.run(
            message.model_name,
            message.model_version or None,
            tenant,
            limit_s,
            decode,
            codec.answer,
            headers=headers,
        )
