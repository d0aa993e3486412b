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
from collections.abc import Callable, Mapping
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
    status: str | None = None
    """The error's status, where it is not the transport's for what is not implemented
    (HTTP 400, gRPC UNIMPLEMENTED)."""


@dataclass(frozen=True)
class Agrees:
    """An ``infer`` in another form, whose answer must agree with the plain ``infer``'s."""

    call: Callable[[Client], Any]
    check: Callable[[Any, np.ndarray], bool]
    """The answer, and the plain answer's ``output``."""


LOCAL = frozenset({"close", "plugin", "register_plugin", "unregister_plugin"})
"""Calls that never reach the server."""
HTTP_CODEC = frozenset({"generate_request_body", "parse_response_body"})
"""tritonclient.http's own codec, for callers that bring their transport: no server call."""
STREAM = frozenset({"start_stream", "stop_stream"})
"""tritonclient.grpc's stream, opened and closed by the ``async_stream_infer`` case."""


def _input(module: Any, rows: np.ndarray = ROWS, binary: bool = True) -> Any:
    tensor = module.InferInput("input", list(rows.shape), "FP32")
    if module is triton_http:
        tensor.set_data_from_numpy(rows, binary_data=binary)
    else:
        tensor.set_data_from_numpy(rows)
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


REFUSED_EXTENSIONS = frozenset(
    {
        "model_repository",
        "system_shared_memory",
        "cuda_shared_memory",
        "sequence",
        "trace",
        "logging",
    }
)
"""Triton's names of the extensions the tables below find refused (load and unload, shared
memory, sequences, trace and log settings): a server must not list them."""


def _lists_what_answers(extensions: Any) -> bool:
    """``/v2``'s extensions name what works (statistics, classification) and nothing that
    is refused."""
    listed = set(extensions)
    return {"statistics", "classification"} <= listed and not listed & REFUSED_EXTENSIONS


SHARED_MEMORY = "shared memory extension"
HANDLE = base64.b64encode(b"cudaIpcMemHandle")
"""A CUDA IPC handle as the clients take it, serialised."""
NO_LOAD = "not load or unload models"

REFUSED_BY_BOTH: dict[str, Works | Refused] = {
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
"""The calls both clients offer alike and every server refuses alike."""

HTTP: dict[str, Works | Refused] = {
    "is_server_live": Works(lambda c: c.is_server_live(), lambda r: r is True),
    "is_server_ready": Works(lambda c: c.is_server_ready(), lambda r: r is True),
    "is_model_ready": Works(lambda c: c.is_model_ready(MODEL), lambda r: r is True),
    "get_server_metadata": Works(
        lambda c: c.get_server_metadata(), lambda r: _lists_what_answers(r["extensions"])
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
    **REFUSED_BY_BOTH,
}

GRPC: dict[str, Works | Refused] = {
    "is_server_live": Works(lambda c: c.is_server_live(), lambda r: r is True),
    "is_server_ready": Works(lambda c: c.is_server_ready(), lambda r: r is True),
    "is_model_ready": Works(lambda c: c.is_model_ready(MODEL), lambda r: r is True),
    "get_server_metadata": Works(
        lambda c: c.get_server_metadata(), lambda r: _lists_what_answers(r.extensions)
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
    **REFUSED_BY_BOTH,
}


def _same(result: Any, plain: np.ndarray) -> bool:
    return bool(np.allclose(result.as_numpy("output"), plain, rtol=1e-5, atol=1e-6))


def _top_three(result: Any, plain: np.ndarray) -> bool:
    """Triton's classification answer: each row's three best ``score:index``, best first."""
    indices = [[int(answer.split(b":")[1]) for answer in row] for row in result.as_numpy("output")]
    return indices == np.argsort(-plain, axis=1, kind="stable")[:, :3].tolist()


def _in_shared_memory(module: Any) -> Any:
    output = module.InferRequestedOutput("output")
    output.set_shared_memory("region", 80)
    return output


WRONG_SHAPE = np.ones((2, 255), dtype=np.float32)
SEQUENCE = "sequence batching extension"

HTTP_INFER: dict[str, Agrees | Refused] = {
    "json": Agrees(
        lambda c: c.infer(
            MODEL,
            [_input(triton_http, binary=False)],
            outputs=[triton_http.InferRequestedOutput("output", binary_data=False)],
        ),
        _same,
    ),
    **{
        algorithm: Agrees(
            lambda c, algorithm=algorithm: c.infer(
                MODEL,
                [_input(triton_http)],
                request_compression_algorithm=algorithm,
                response_compression_algorithm=algorithm,
            ),
            _same,
        )
        for algorithm in ("gzip", "deflate")
    },
    "classification": Agrees(
        lambda c: c.infer(
            MODEL,
            [_input(triton_http)],
            outputs=[triton_http.InferRequestedOutput("output", class_count=3)],
        ),
        _top_three,
    ),
    "output_in_shared_memory": Refused(
        lambda c: c.infer(MODEL, [_input(triton_http)], outputs=[_in_shared_memory(triton_http)]),
        SHARED_MEMORY,
    ),
    "wrong_shape": Refused(
        lambda c: c.infer(MODEL, [_input(triton_http, WRONG_SHAPE)]), "input 'input'"
    ),
    "sequence": Refused(
        lambda c: c.infer(MODEL, [_input(triton_http)], sequence_id=7, sequence_start=True),
        SEQUENCE,
    ),
}
"""``infer`` in each form a v2 request may take: each agrees with the plain one, or is
refused saying why (never silently ignored)."""

GRPC_INFER: dict[str, Agrees | Refused] = {
    "gzip": Agrees(
        lambda c: c.infer(MODEL, [_input(triton_grpc)], compression_algorithm="gzip"), _same
    ),
    "classification": Agrees(
        lambda c: c.infer(
            MODEL,
            [_input(triton_grpc)],
            outputs=[triton_grpc.InferRequestedOutput("output", class_count=3)],
        ),
        _top_three,
    ),
    "output_in_shared_memory": Refused(
        lambda c: c.infer(MODEL, [_input(triton_grpc)], outputs=[_in_shared_memory(triton_grpc)]),
        SHARED_MEMORY,
        "StatusCode.INVALID_ARGUMENT",
    ),
    "wrong_shape": Refused(
        lambda c: c.infer(MODEL, [_input(triton_grpc, WRONG_SHAPE)]),
        "input 'input'",
        "StatusCode.INVALID_ARGUMENT",
    ),
    "sequence": Refused(
        lambda c: c.infer(MODEL, [_input(triton_grpc)], sequence_id=7, sequence_start=True),
        SEQUENCE,
        "StatusCode.INVALID_ARGUMENT",
    ),
}
"""``HTTP_INFER``'s forms, as ``tritonclient.grpc`` sends them (its compression is gRPC's
own; JSON is HTTP's)."""


def public_calls(client_class: type) -> set[str]:
    return {
        name
        for name, member in inspect.getmembers(client_class, callable)
        if not name.startswith("_")
    }


def check_call(case: Works | Agrees | Refused, client: Client, module: Any, status: str) -> None:
    """Make the call with ``client`` (of tritonclient's ``module``) and check its answer, or
    its refusal (with ``status`` unless the case names its own)."""
    if isinstance(case, Works):
        assert case.check(case.call(client))
        return
    if isinstance(case, Agrees):
        plain = client.infer(MODEL, [_input(module)]).as_numpy("output")
        assert case.check(case.call(client), plain)
        return
    with pytest.raises(InferenceServerException) as refused:
        case.call(client)
    assert case.message in refused.value.message()
    assert refused.value.status() == (case.status or status)


def http_call(target: str, name: str, table: Mapping[str, Works | Agrees | Refused] = HTTP) -> None:
    """Call ``name`` of ``table`` with ``tritonclient.http`` at ``target`` (``host:port``)."""
    client = triton_http.InferenceServerClient(target)
    try:
        check_call(table[name], client, triton_http, "400")
    finally:
        client.close()


def grpc_call(target: str, name: str, table: Mapping[str, Works | Agrees | Refused] = GRPC) -> None:
    """Call ``name`` of ``table`` with ``tritonclient.grpc`` at ``target`` (``host:port``)."""
    client = triton_grpc.InferenceServerClient(target)
    try:
        check_call(table[name], client, triton_grpc, "StatusCode.UNIMPLEMENTED")
    finally:
        client.close()
