"""Every call ``tritonclient.http`` and ``tritonclient.grpc`` offer, against a pod, a gateway in
front of it and ``bazaar serve``: each works, or gets an error that says what is not
implemented, never a bare 404 or "Method not implemented!".

The calls are read from the client classes, so a call a new ``tritonclient`` adds fails
``test_every_call_is_classified`` until it is put in a table here: ``Works`` (called, its
answer checked), ``Refused`` (called, its error checked), or client-side only (``LOCAL``).
"""

from __future__ import annotations

import base64
import inspect
import queue
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from tests.support import bazaar_process, free_port, models_ready

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


def test_every_call_is_classified() -> None:
    assert public_calls(triton_http.InferenceServerClient) == set(HTTP) | LOCAL | HTTP_CODEC
    assert public_calls(triton_grpc.InferenceServerClient) == set(GRPC) | LOCAL | STREAM


@dataclass(frozen=True)
class Server:
    http: str
    """host:port"""
    grpc: str
    """host:port"""


@pytest.fixture(scope="module")
def repository(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tritonclient-repository")
    shutil.copytree(demo_repository / MODEL, root / MODEL)
    return root


@pytest.fixture(scope="module")
def pod(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port, grpc_port = free_port(), free_port()
    args = ["model-server", "--model-repository", str(repository), "--port", str(port)]
    args += ["--grpc-port", str(grpc_port)]
    log = tmp_path_factory.mktemp("tritonclient-pod") / "pod.log"
    with bazaar_process(args, log, f"http://127.0.0.1:{port}/v2/health/ready"):
        yield Server(f"127.0.0.1:{port}", f"127.0.0.1:{grpc_port}")


@pytest.fixture(scope="module", params=["pod", "gateway", "serve"])
def server(
    request: pytest.FixtureRequest, repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    if request.param == "pod":
        yield request.getfixturevalue("pod")
        return
    root = tmp_path_factory.mktemp(f"tritonclient-{request.param}")
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    if request.param == "gateway":
        pod: Server = request.getfixturevalue("pod")
        (root / "endpoints.yaml").write_text(f"models:\n  {MODEL}: [http://{pod.http}]\n")
        args = ["gateway", "--endpoints", str(root / "endpoints.yaml")]
    else:
        args = ["serve", "--model-repository", str(repository), "--no-autoscale"]
    args += ["--port", str(port), "--grpc-port", str(grpc_port)]
    with bazaar_process(args, root / "server.log", models_ready(url, [MODEL])):
        yield Server(f"127.0.0.1:{port}", f"127.0.0.1:{grpc_port}")


def _check(case: Works | Refused, client: Client, grpc_status: str) -> None:
    if isinstance(case, Works):
        assert case.check(case.call(client))
        return
    with pytest.raises(InferenceServerException) as refused:
        case.call(client)
    assert case.message in refused.value.message()
    assert refused.value.status() == grpc_status


@pytest.mark.parametrize("name", sorted(HTTP))
def test_http_call(server: Server, name: str) -> None:
    client = triton_http.InferenceServerClient(server.http)
    try:
        _check(HTTP[name], client, "400")
    finally:
        client.close()


@pytest.mark.parametrize("name", sorted(GRPC))
def test_grpc_call(server: Server, name: str) -> None:
    client = triton_grpc.InferenceServerClient(server.grpc)
    try:
        _check(GRPC[name], client, "StatusCode.UNIMPLEMENTED")
    finally:
        client.close()
