"""Triton's model configuration (``model_config.proto``) as JSON, for the clients that read it.

``tritonclient``'s ``get_model_config``, perf_analyzer and Model Analyzer read Triton's
config: ``max_batch_size``, ``input``/``output`` with ``data_type`` (``TYPE_FP32``) and
``dims`` (without the batch dimension when the model batches), ``dynamic_batching``. The
gateway answers ``GET .../config`` and gRPC ``ModelConfig`` with the config it enforces (the
tensors it validates against, the batching it does), the pods gRPC ``ModelConfig`` with
theirs; the pods' HTTP ``/config`` stays bazaar's own (``config.yaml`` as resolved), which
the gateway reads. The gRPC answer is this JSON parsed into the message.
"""

from __future__ import annotations

from typing import Any

from protocol.schema import ModelMetadata, TensorSpec


def triton_config(
    metadata: ModelMetadata,
    *,
    max_queue_delay_s: float,
    preferred_batch_sizes: tuple[int, ...],
    max_queue_size: int,
    default_timeout_s: float | None,
    priority_levels: int,
    default_priority_level: int,
    instance_group: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Triton's ``ModelConfig`` JSON for a model version served with this batching."""
    batched = metadata.max_batch_size > 0
    config: dict[str, Any] = {
        "name": metadata.name,
        "platform": metadata.platform,
        "max_batch_size": metadata.max_batch_size,
        "input": [_tensor(spec, batched) for spec in metadata.inputs],
        "output": [_tensor(spec, batched) for spec in metadata.outputs],
        "dynamic_batching": {
            "preferred_batch_size": list(preferred_batch_sizes),
            "max_queue_delay_microseconds": round(max_queue_delay_s * 1_000_000),
            "priority_levels": priority_levels,
            "default_priority_level": default_priority_level,
            "default_queue_policy": {
                "max_queue_size": max_queue_size,
                "default_timeout_microseconds": round((default_timeout_s or 0) * 1_000_000),
            },
        },
    }
    if instance_group is not None:
        config["instance_group"] = instance_group
    return config


def triton_datatype(datatype: str) -> str:
    """A v2 datatype as Triton's config names it: ``FP32`` is ``TYPE_FP32``, ``BYTES``
    ``TYPE_STRING``."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def _tensor(spec: TensorSpec, batched: bool) -> dict[str, Any]:
    dims = spec.shape[1:] if batched else spec.shape
    return {"name": spec.name, "data_type": triton_datatype(spec.datatype), "dims": list(dims)}
