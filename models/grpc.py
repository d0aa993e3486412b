"""The pod's gRPC server: Triton's ``inference.GRPCInferenceService`` on the pod's store.

The same steps as the HTTP route (``models.inference``) with the protobuf codec
(``protocol.grpc.codec``): raw or typed inputs in, raw outputs back. The call's deadline
bounds the request's wait for an instance, as ``parameters.timeout`` does. It serves the data
plane only (health, metadata, readiness, the config in Triton's format, the repository index,
statistics, inference): loading and unloading stay on the HTTP control port, behind its token.
"""

from __future__ import annotations

from typing import Any

from models.inference import PodInference
from protocol.codec import InferenceRequest
from protocol.fastpath import Headers
from protocol.grpc import codec
from protocol.grpc import grpc_service_pb2 as pb
from protocol.modelconfig import triton_config
from protocol.schema import ModelMetadata


class PodGrpcBackend:
    """Implements ``protocol.grpc.service.InferenceBackend`` for one pod."""

    def __init__(self, inference: PodInference, server_name: str, extensions: list[str]) -> None:
        self.inference = inference
        self.store = inference.store
        self.server_name = server_name
        self.extensions = extensions

    def ready(self) -> bool:
        return self.store.ready()

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        return self.inference.model_metadata(name, version)

    def model_ready(self, name: str, version: str | None) -> bool:
        return self.store.is_ready(name, version)

    def index(self, ready_only: bool) -> list[dict[str, str]]:
        return self.store.index(ready_only)

    def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        runtime = self.store.get(name, version)
        batching = runtime.config.dynamic_batching
        kind = "KIND_GPU" if runtime.providers[0] == "CUDAExecutionProvider" else "KIND_CPU"
        return triton_config(
            runtime.metadata,
            max_queue_delay_s=batching.max_queue_delay_ms / 1000,
            preferred_batch_sizes=batching.preferred_batch_sizes,
            max_queue_size=batching.max_queue_size,
            default_timeout_s=batching.default_timeout_ms / 1000,
            priority_levels=batching.priority_levels,
            default_priority_level=batching.default_priority_level,
            instance_group=[{"count": runtime.config.instances, "kind": kind}],
        )

    def statistics(self, name: str | None, version: str | None) -> list[dict[str, Any]]:
        return self.inference.statistics(name, version)

    async def infer(
        self,
        message: pb.ModelInferRequest,
        limit_s: float | None,
        tenant: str | None,
        headers: Headers,
    ) -> pb.ModelInferResponse:
        def decode(metadata: ModelMetadata) -> InferenceRequest:
            return codec.decode_request(message, metadata)

        return await self.inference.run(
            message.model_name, message.model_version or None, decode, codec.answer, limit_s
        )
