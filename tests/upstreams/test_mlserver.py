"""The gateway in front of a real MLServer (PyPI ``mlserver``, from its own venv:
tests/upstreams/mlserver.sh): ``bazaar gateway --endpoints FILE``, tritonclient (HTTP and
gRPC) and plain HTTP at the gateway.

MLServer has no ``/config`` route and no binary tensor extension. ``doubler`` declares its
tensors in its model settings: the gateway learns it from the metadata alone, validates
and batches its requests (the endpoints file gives ``max_batch_size``) and sends them as
JSON. ``echo``'s runtime declares none: its requests pass through as sent. ``mlp`` has the
demo mlp's tensors, for every tritonclient call (``tests/tritonclient_calls.py``) at the
gateway: what MLServer lacks (config, statistics) the gateway answers of its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.support import bazaar_process, free_port, models_ready
from tests.tritonclient_calls import GRPC, GRPC_INFER, HTTP, HTTP_INFER, grpc_call, http_call
from tests.upstreams.support import upstream_process, venv

RUNTIMES = """
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput


class Doubler(MLModel):
    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        y = NumpyCodec.encode_output("y", (x * 2).astype(np.float32))
        return InferenceResponse(model_name=self.name, outputs=[y])


class Echo(MLModel):
    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        outputs = [
            ResponseOutput(name=t.name, shape=t.shape, datatype=t.datatype, data=t.data)
            for t in payload.inputs
        ]
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=outputs)


class Head(MLModel):
    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        y = NumpyCodec.encode_output("output", np.ascontiguousarray(x[:, :10]))
        return InferenceResponse(model_name=self.name, outputs=[y])
"""


@pytest.fixture(scope="module")
def gateway(serving: tuple[str, str]) -> str:
    return serving[0]


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """MLServer serving ``doubler`` and ``echo``, and a gateway in front; yields its URL
    and its gRPC target."""
    mlserver = venv("mlserver-1.7.1", "mlserver.sh") / "bin" / "mlserver"
    root = tmp_path_factory.mktemp("mlserver")
    port = free_port()
    settings = {
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": 0,
    }
    (root / "settings.json").write_text(json.dumps(settings))
    (root / "runtimes.py").write_text(RUNTIMES)
    tensors = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
    }
    models = {
        "doubler": {"implementation": "runtimes.Doubler", **tensors},
        "echo": {"implementation": "runtimes.Echo"},
        "mlp": {
            "implementation": "runtimes.Head",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 256]}],
            "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}],
        },
    }
    for name, model_settings in models.items():
        (root / name).mkdir()
        (root / name / "model-settings.json").write_text(
            json.dumps({"name": name, **model_settings})
        )
    upstream = f"http://127.0.0.1:{port}"
    endpoints = root / "endpoints.yaml"
    endpoints.write_text(
        "models:\n"
        f"  doubler: {{endpoints: [{upstream}], max_batch_size: 4}}\n"
        f"  echo: [{upstream}]\n"
        f"  mlp: {{endpoints: [{upstream}], max_batch_size: 32}}\n"
    )
    gateway_port = free_port()
    url = f"http://127.0.0.1:{gateway_port}"
    grpc_port = free_port()
    args = ["gateway", "--endpoints", str(endpoints), "--port", str(gateway_port)]
    args += ["--grpc-port", str(grpc_port)]
    logs = tmp_path_factory.mktemp("logs")
    with (
        upstream_process(
            [str(mlserver), "start", str(root)],
            root,
            logs / "mlserver.log",
            f"{upstream}/v2/models/echo/ready",
        ),
        bazaar_process(args, logs / "gateway.log", models_ready(url, list(models))),
    ):
        yield url, f"127.0.0.1:{grpc_port}"


def test_a_model_declared_in_its_settings_is_validated_and_batched(gateway: str) -> None:
    metadata = httpx.get(f"{gateway}/v2/models/doubler").json()
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}]
    assert metadata["parameters"] == {"max_batch_size": 4}
    client = triton.InferenceServerClient(gateway.removeprefix("http://"), concurrency=8)
    assert client.is_model_ready("doubler")

    def infer(row: int, binary: bool) -> triton.InferAsyncRequest:
        x = np.array([[row, row + 1]], dtype=np.float32)
        tensor = triton.InferInput("x", [1, 2], "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        wanted = [triton.InferRequestedOutput("y", binary_data=binary)]
        return client.async_infer("doubler", [tensor], outputs=wanted)

    # Sixteen at once, JSON and binary: they queue at the gateway and leave in batches.
    pending = [infer(row, binary=row % 2 == 0) for row in range(16)]
    for row, request in enumerate(pending):
        np.testing.assert_array_equal(request.get_result().as_numpy("y"), [[2 * row, 2 * row + 2]])
    client.close()
    wrong = httpx.post(f"{gateway}/v2/models/doubler/infer", json={"inputs": []})
    assert wrong.status_code == 400  # refused at the gateway: MLServer never sees it


def test_a_runtime_that_declares_no_tensors_is_passed_through(gateway: str) -> None:
    assert httpx.get(f"{gateway}/v2/models/echo/ready").status_code == 200
    body = {
        "id": "42",
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}],
    }
    response = httpx.post(f"{gateway}/v2/models/echo/infer", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["model_name"], answer["id"]) == ("echo", "42")
    assert answer["outputs"][0]["data"] == ["a", "b"]
    refused = httpx.post(f"{gateway}/v2/models/echo/infer", json={"inputs": "none"})
    assert refused.status_code == 400  # MLServer's refusal, the client's answer
    # MLServer ignores the classification and shared memory parameters (it answers the
    # tensor as if not asked): the gateway refuses them by name instead of passing them.
    for parameters, extension in (
        ({"classification": 1}, "classification extension"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": 8}, "shared memory extension"),
    ):
        asked = {**body, "outputs": [{"name": "text", "parameters": parameters}]}
        refused = httpx.post(f"{gateway}/v2/models/echo/infer", json=asked)
        assert refused.status_code == 400, refused.text
        assert extension in refused.json()["error"]


def test_tritonclient_grpc_at_the_gateway_in_front_of_mlserver(serving: tuple[str, str]) -> None:
    client = triton_grpc.InferenceServerClient(serving[1])
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("doubler") and client.is_model_ready("echo")
        metadata = client.get_model_metadata("doubler", as_json=True)
        assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "2"]}]
        index = client.get_model_repository_index(as_json=True)["models"]
        assert {model["name"] for model in index} == {"doubler", "echo", "mlp"}
        tensor = triton_grpc.InferInput("x", [2, 2], "FP32")
        tensor.set_data_from_numpy(np.array([[1, 2], [3, 4]], dtype=np.float32))
        answer = client.infer("doubler", [tensor], request_id="7")
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
def test_tritonclient_http_call_at_the_gateway_in_front_of_mlserver(
    serving: tuple[str, str], name: str
) -> None:
    http_call(serving[0].removeprefix("http://"), name)


@pytest.mark.parametrize("name", sorted(GRPC))
def test_tritonclient_grpc_call_at_the_gateway_in_front_of_mlserver(
    serving: tuple[str, str], name: str
) -> None:
    grpc_call(serving[1], name)


@pytest.mark.parametrize("form", sorted(HTTP_INFER))
def test_tritonclient_http_infer_at_the_gateway_in_front_of_mlserver(
    serving: tuple[str, str], form: str
) -> None:
    http_call(serving[0].removeprefix("http://"), form, HTTP_INFER)


@pytest.mark.parametrize("form", sorted(GRPC_INFER))
def test_tritonclient_grpc_infer_at_the_gateway_in_front_of_mlserver(
    serving: tuple[str, str], form: str
) -> None:
    grpc_call(serving[1], form, GRPC_INFER)
