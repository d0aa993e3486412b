"""The gateway in front of a real Triton Inference Server: the ``tritonserver`` binary that
the PyTriton wheel ships (its own venv: tests/upstreams/triton.sh), on CPU, with two Python
backend models; ``bazaar gateway --endpoints FILE`` and tritonclient (HTTP and gRPC) at the
gateway.

PyTriton's own ``Triton().bind`` cannot run here: its model proxy starts a multiprocessing
manager inside the Python backend stub, whose embedded interpreter is older than this
machine's Python 3.11 standard library (``'_thread.RLock' object has no attribute
'_recursion_count'``). The server and its stub run fine given a model repository, which is
how Triton users run it anyway.

``doubler`` is learned from Triton's metadata and ``/config`` (its max_batch_size and
dynamic batching), validated, batched and sent over gRPC (the endpoints file gives Triton's
gRPC port: ``gateway.grpc_client``). ``echo`` is marked ``validate:
false`` in the endpoints file: tritonclient's binary requests pass through to Triton as
sent, and Triton's answer comes back as it sent it. ``mlp`` has the demo mlp's tensors and
batch limit, sent over binary HTTP, for every tritonclient call
(``tests/tritonclient_calls.py``) at the gateway.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.support import bazaar_process, free_port, models_ready
from tests.tritonclient_calls import GRPC, GRPC_INFER, HTTP, HTTP_INFER, grpc_call, http_call
from tests.upstreams.support import upstream_process, venv

MODELS = {
    "doubler": (
        """
name: "doubler"
backend: "python"
max_batch_size: 8
input [{ name: "x", data_type: TYPE_FP32, dims: [2] }]
output [{ name: "y", data_type: TYPE_FP32, dims: [2] }]
dynamic_batching { max_queue_delay_microseconds: 1000 }
instance_group [{ kind: KIND_CPU, count: 1 }]
""",
        """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", x * 2)]))
        return responses
""",
    ),
    "echo": (
        """
name: "echo"
backend: "python"
max_batch_size: 0
input [{ name: "text", data_type: TYPE_STRING, dims: [-1] }]
output [{ name: "text", data_type: TYPE_STRING, dims: [-1] }]
instance_group [{ kind: KIND_CPU, count: 1 }]
""",
        """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.get_input_tensor_by_name(request, "text")])
            for request in requests
        ]
""",
    ),
    "mlp": (
        """
name: "mlp"
backend: "python"
max_batch_size: 32
input [{ name: "input", data_type: TYPE_FP32, dims: [256] }]
output [{ name: "output", data_type: TYPE_FP32, dims: [10] }]
dynamic_batching { }
instance_group [{ kind: KIND_CPU, count: 1 }]
""",
        """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "input").as_numpy()
            head = pb_utils.Tensor("output", np.ascontiguousarray(x[:, :10]))
            responses.append(pb_utils.InferenceResponse([head]))
        return responses
""",
    ),
}


def _backends(site: Path, root: Path) -> Path:
    """Triton's Python backend with the stub for this Python, as PyTriton lays it out."""
    server = site / "pytriton" / "tritonserver"
    python = root / "backends" / "python"
    python.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (python / name).symlink_to(server / "backends" / "python" / name)
    stub = server / "python_backend_stubs" / "3.11" / "triton_python_backend_stub"
    (python / "triton_python_backend_stub").symlink_to(stub)
    return root / "backends"


@pytest.fixture(scope="module")
def gateway(serving: tuple[str, str]) -> str:
    return serving[0]


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Triton serving ``doubler`` and ``echo``, and a gateway in front; yields its URL and
    its gRPC target."""
    env_root = venv("pytriton-0.7.0", "triton.sh")
    site = env_root / "lib" / "python3.11" / "site-packages"
    root = tmp_path_factory.mktemp("triton")
    repository = root / "repository"
    for name, (config, model) in MODELS.items():
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "config.pbtxt").write_text(config)
        (repository / name / "1" / "model.py").write_text(model)
    port, triton_grpc_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{port}"
    command = [
        str(site / "pytriton" / "tritonserver" / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={_backends(site, root)}",
        f"--http-port={port}",
        f"--grpc-port={triton_grpc_port}",
        f"--metrics-port={free_port()}",
    ]
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": str(site / "nvidia_pytriton.libs"),
        "PATH": f"{env_root / 'bin'}:{os.environ['PATH']}",
        "PYTHONPATH": str(site),
    }
    endpoints = root / "endpoints.yaml"
    endpoints.write_text(
        "models:\n"
        f"  doubler: [{{url: {upstream}, grpc: '127.0.0.1:{triton_grpc_port}'}}]\n"
        f"  echo: {{endpoints: [{upstream}], validate: false}}\n"
        f"  mlp: [{upstream}]\n"
    )
    gateway_port = free_port()
    url = f"http://127.0.0.1:{gateway_port}"
    grpc_port = free_port()
    args = ["gateway", "--endpoints", str(endpoints), "--port", str(gateway_port)]
    args += ["--grpc-port", str(grpc_port)]
    logs = tmp_path_factory.mktemp("logs")
    with (
        upstream_process(
            command, root, logs / "triton.log", f"{upstream}/v2/health/ready", env=env
        ),
        bazaar_process(args, logs / "gateway.log", models_ready(url, list(MODELS))),
    ):
        yield url, f"127.0.0.1:{grpc_port}"


def test_a_triton_model_is_learned_with_its_config_and_batched(gateway: str) -> None:
    metadata = httpx.get(f"{gateway}/v2/models/doubler").json()
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]
    assert metadata["parameters"] == {"max_batch_size": 8}
    client = triton.InferenceServerClient(gateway.removeprefix("http://"), concurrency=8)
    assert client.is_server_ready() and client.is_model_ready("doubler")

    def infer(row: int, binary: bool) -> triton.InferAsyncRequest:
        tensor = triton.InferInput("x", [1, 2], "FP32")
        tensor.set_data_from_numpy(np.array([[row, row + 1]], np.float32), binary_data=binary)
        wanted = [triton.InferRequestedOutput("y", binary_data=binary)]
        return client.async_infer("doubler", [tensor], outputs=wanted)

    pending = [infer(row, binary=row % 2 == 0) for row in range(16)]
    for row, request in enumerate(pending):
        np.testing.assert_array_equal(request.get_result().as_numpy("y"), [[2 * row, 2 * row + 2]])
    client.close()


def test_a_model_marked_unvalidated_is_passed_through_to_triton(gateway: str) -> None:
    client = triton.InferenceServerClient(gateway.removeprefix("http://"))
    text = np.array([b"hello", b"bazaar"], dtype=object)
    for binary in (True, False):
        tensor = triton.InferInput("text", [2], "BYTES")
        tensor.set_data_from_numpy(text, binary_data=binary)
        wanted = [triton.InferRequestedOutput("text", binary_data=binary)]
        result = client.infer("echo", [tensor], outputs=wanted, request_id="9")
        echoed = [v if isinstance(v, bytes) else v.encode() for v in result.as_numpy("text")]
        assert echoed == [b"hello", b"bazaar"]  # JSON strings come back as str
        assert result.get_response()["id"] == "9"
    refused = httpx.post(f"{gateway}/v2/models/echo/infer", json={"inputs": [{"name": "x"}]})
    assert refused.status_code == 400  # Triton's refusal, the client's answer
    client.close()


def test_tritonclient_grpc_at_the_gateway_in_front_of_triton(serving: tuple[str, str]) -> None:
    client = triton_grpc.InferenceServerClient(serving[1])
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("doubler") and client.is_model_ready("echo")
        metadata = client.get_model_metadata("doubler", as_json=True)
        assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "2"]}]
        config = client.get_model_config("doubler", as_json=True)["config"]
        assert config["max_batch_size"] == 8
        tensor = triton_grpc.InferInput("x", [2, 2], "FP32")
        tensor.set_data_from_numpy(np.array([[1, 2], [3, 4]], dtype=np.float32))
        answer = client.infer("doubler", [tensor], request_id="7", client_timeout=30)
        np.testing.assert_array_equal(answer.as_numpy("y"), [[2, 4], [6, 8]])
        assert answer.get_response().id == "7"
        wrong = triton_grpc.InferInput("x", [1, 3], "FP32")
        wrong.set_data_from_numpy(np.ones((1, 3), dtype=np.float32))
        with pytest.raises(InferenceServerException, match="input 'x'") as refused:
            client.infer("doubler", [wrong])
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        text = triton_grpc.InferInput("text", [2], "BYTES")
        text.set_data_from_numpy(np.array([b"a", b"b"], dtype=np.object_))
        # A passed-through model has no tensors to decode a gRPC message against: refused,
        # saying so, where HTTP passes it through (above).
        with pytest.raises(InferenceServerException, match="over HTTP only") as refused:
            client.infer("echo", [text])
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        client.close()


@pytest.mark.parametrize("name", sorted(HTTP))
def test_tritonclient_http_call_at_the_gateway_in_front_of_triton(
    serving: tuple[str, str], name: str
) -> None:
    http_call(serving[0].removeprefix("http://"), name)


@pytest.mark.parametrize("name", sorted(GRPC))
def test_tritonclient_grpc_call_at_the_gateway_in_front_of_triton(
    serving: tuple[str, str], name: str
) -> None:
    grpc_call(serving[1], name)


@pytest.mark.parametrize("form", sorted(HTTP_INFER))
def test_tritonclient_http_infer_at_the_gateway_in_front_of_triton(
    serving: tuple[str, str], form: str
) -> None:
    http_call(serving[0].removeprefix("http://"), form, HTTP_INFER)


@pytest.mark.parametrize("form", sorted(GRPC_INFER))
def test_tritonclient_grpc_infer_at_the_gateway_in_front_of_triton(
    serving: tuple[str, str], form: str
) -> None:
    grpc_call(serving[1], form, GRPC_INFER)
