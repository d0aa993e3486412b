"""Every call ``tritonclient.http`` and ``tritonclient.grpc`` offer, as a table: what each
call sends and what its answer must be (``Works``), or what its refusal must say
(``Refused``), against a server serving the model ``mlp``: input ``input`` FP32 [-1, 256],
output ``output`` FP32 [-1, 10], ``max_batch_size`` 32 (the demo's, or a model of that
shape on another server). ``tests/e2e/test_tritonclient.py`` runs it against a pod, a
gateway and ``bazaar serve``; ``tests/upstreams`` against gateways in front of MLServer and
Triton.

The calls are read from the client classes, so a call a new ``tritonclient`` adds fails
``test_every_call_is_classified`` until it is put in a table here: ``Works`` (called, its
answer checked), ``Refused`` (called, its error checked), or client-side only (``LOCAL``).
"""

from __future__ import annotations

import base64
import inspect
import queue
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

MODEL = "mlp"
ROWS = np.linspace(-1, 1, 2 * 256, dtype=np.float32).reshape(2, 256)

Client = Any
"""A ``tritonclient.http`` or ``tritonclient.grpc`` ``InferenceServerClient``."""


@dataclass(frozen=True)
class Works:
    call: Callable[[Client], Any]
    check: Callable[[Any], bool]


@dataclass(frozen=True)
class Refused:
    call: Callable[[Client], Any]
    message: str
    """Part of the error's message: what is not implemented."""


LOCAL = frozenset({"close", "plugin", "register_plugin", "unregister_plugin"})
"""Calls that never reach the server."""
HTTP_CODEC = frozenset({"generate_request_body", "parse_response_body"})
"""tritonclient.http's own codec, for callers that bring their transport: no server call."""
STREAM = frozenset({"start_stream", "stop_stream"})
"""tritonclient.grpc's stream, opened and closed by the ``async_stream_infer`` case."""


def _input(module: Any) -> Any:
    tensor = module.InferInput("input", list(ROWS.shape), "FP32")
    tensor.set_data_from_numpy(ROWS)
    return tensor


def _http_async(client: Client) -> Any:
    return client.async_infer(MODEL, [_input(triton_http)]).get_result()


def _grpc_async(client: Client) -> Any:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.async_infer(
        MODEL, [_input(triton_grpc)], lambda result, error: answers.put((result, error))
    )
    result, error = answers.get(timeout=30)
    if error is not None:
        raise error
    return result


def _grpc_stream(client: Client) -> Any:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(MODEL, [_input(triton_grpc)])
        result, error = answers.get(timeout=30)
    finally:
        client.stop_stream()
    if error is not None:
        raise error
    return result


def _output_shape(result: Any) -> bool:
    return bool(result.as_numpy("output").shape == (2, 10))


SHARED_MEMORY = "shared memory extension"
HANDLE = base64.b64encode(b"cudaIpcMemHandle")
"""A CUDA IPC handle as the clients take it, serialised."""
NO_LOAD = "not load or unload models"

HTTP: dict[str, Works | Refused] = {
    "is_server_live": Works(lambda c: c.is_server_live(), lambda r: r is True),
    "is_server_ready": Works(lambda c: c.is_server_ready(), lambda r: r is True),
    "is_model_ready": Works(lambda c: c.is_model_ready(MODEL), lambda r: r is True),
    "get_server_metadata": Works(
        lambda c: c.get_server_metadata(), lambda r: "statistics" in r["extensions"]
    ),
    "get_model_metadata": Works(
        lambda c: c.get_model_metadata(MODEL), lambda r: r["name"] == MODEL
    ),
    "get_model_config": Works(
        lambda c: c.get_model_config(MODEL), lambda r: r["max_batch_size"] == 32
    ),
    "get_model_repository_index": Works(
        lambda c: c.get_model_repository_index(), lambda r: MODEL in {m["name"] for m in r}
    ),
    "get_inference_statistics": Works(
        lambda c: c.get_inference_statistics(MODEL),
        lambda r: [s["name"] for s in r["model_stats"]] == [MODEL],
    ),
    "infer": Works(lambda c: c.infer(MODEL, [_input(triton_http)]), _output_shape),
    "async_infer": Works(_http_async, _output_shape),
    "load_model": Refused(lambda c: c.load_model(MODEL), NO_LOAD),
    "unload_model": Refused(lambda c: c.unload_model(MODEL), NO_LOAD),
    "get_system_shared_memory_status": Refused(
        lambda c: c.get_system_shared_memory_status(), SHARED_MEMORY
    ),
    "register_system_shared_memory": Refused(
        lambda c: c.register_system_shared_memory("r", "/key", 8), SHARED_MEMORY
    ),
    "unregister_system_shared_memory": Refused(
        lambda c: c.unregister_system_shared_memory("r"), SHARED_MEMORY
    ),
    "get_cuda_shared_memory_status": Refused(
        lambda c: c.get_cuda_shared_memory_status(), SHARED_MEMORY
    ),
    "register_cuda_shared_memory": Refused(
        lambda c: c.register_cuda_shared_memory("r", HANDLE, 0, 8), SHARED_MEMORY
    ),
    "unregister_cuda_shared_memory": Refused(
        lambda c: c.unregister_cuda_shared_memory("r"), SHARED_MEMORY
    ),
    "get_trace_settings": Refused(lambda c: c.get_trace_settings(MODEL), "trace extension"),
    "update_trace_settings": Refused(
        lambda c: c.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
        "trace extension",
    ),
    "get_log_settings": Refused(lambda c: c.get_log_settings(), "logging extension"),
    "update_log_settings": Refused(
        lambda c: c.update_log_settings({"log_verbose_level": 1}), "logging extension"
    ),
}

GRPC: dict[str, Works | Refused] = {
    "is_server_live": Works(lambda c: c.is_server_live(), lambda r: r is True),
    "is_server_ready": Works(lambda c: c.is_server_ready(), lambda r: r is True),
    "is_model_ready": Works(lambda c: c.is_model_ready(MODEL), lambda r: r is True),
    "get_server_metadata": Works(
        lambda c: c.get_server_metadata(), lambda r: "statistics" in r.extensions
    ),
    "get_model_metadata": Works(lambda c: c.get_model_metadata(MODEL), lambda r: r.name == MODEL),
    "get_model_config": Works(
        lambda c: c.get_model_config(MODEL), lambda r: r.config.max_batch_size == 32
    ),
    "get_model_repository_index": Works(
        lambda c: c.get_model_repository_index(), lambda r: MODEL in {m.name for m in r.models}
    ),
    "get_inference_statistics": Works(
        lambda c: c.get_inference_statistics(MODEL),
        lambda r: [s.name for s in r.model_stats] == [MODEL],
    ),
    "infer": Works(lambda c: c.infer(MODEL, [_input(triton_grpc)]), _output_shape),
    "async_infer": Works(_grpc_async, _output_shape),
    "async_stream_infer": Works(_grpc_stream, _output_shape),
    "load_model": Refused(lambda c: c.load_model(MODEL), "loading models over gRPC"),
    "unload_model": Refused(lambda c: c.unload_model(MODEL), "unloading models over gRPC"),
    "get_system_shared_memory_status": Refused(
        lambda c: c.get_system_shared_memory_status(), SHARED_MEMORY
    ),
    "register_system_shared_memory": Refused(
        lambda c: c.register_system_shared_memory("r", "/key", 8), SHARED_MEMORY
    ),
    "unregister_system_shared_memory": Refused(
        lambda c: c.unregister_system_shared_memory("r"), SHARED_MEMORY
    ),
    "get_cuda_shared_memory_status": Refused(
        lambda c: c.get_cuda_shared_memory_status(), SHARED_MEMORY
    ),
    "register_cuda_shared_memory": Refused(
        lambda c: c.register_cuda_shared_memory("r", HANDLE, 0, 8), SHARED_MEMORY
    ),
    "unregister_cuda_shared_memory": Refused(
        lambda c: c.unregister_cuda_shared_memory("r"), SHARED_MEMORY
    ),
    "get_trace_settings": Refused(lambda c: c.get_trace_settings(MODEL), "trace extension"),
    "update_trace_settings": Refused(
        lambda c: c.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
        "trace extension",
    ),
    "get_log_settings": Refused(lambda c: c.get_log_settings(), "logging extension"),
    "update_log_settings": Refused(
        lambda c: c.update_log_settings({"log_verbose_level": 1}), "logging extension"
    ),
}


def public_calls(client_class: type) -> set[str]:
    return {
        name
        for name, member in inspect.getmembers(client_class, callable)
        if not name.startswith("_")
    }


def check_call(case: Works | Refused, client: Client, grpc_status: str) -> None:
    if isinstance(case, Works):
        assert case.check(case.call(client))
        return
    with pytest.raises(InferenceServerException) as refused:
        case.call(client)
    assert case.message in refused.value.message()
    assert refused.value.status() == grpc_status


def http_call(target: str, name: str) -> None:
    """Call ``name`` with ``tritonclient.http`` at ``target`` (``host:port``) and check it."""
    client = triton_http.InferenceServerClient(target)
    try:
        check_call(HTTP[name], client, "400")
    finally:
        client.close()


def grpc_call(target: str, name: str) -> None:
    """Call ``name`` with ``tritonclient.grpc`` at ``target`` (``host:port``) and check it."""
    client = triton_grpc.InferenceServerClient(target)
    try:
        check_call(GRPC[name], client, "StatusCode.UNIMPLEMENTED")
    finally:
        client.close()
