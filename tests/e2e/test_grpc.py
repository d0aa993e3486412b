"""Triton's gRPC API as a ``tritonclient.grpc`` user meets it, at a pod and at ``bazaar serve``:
health, metadata, readiness, the repository index, inference with raw and typed tensors,
errors as gRPC status codes; and at a gateway, the protections HTTP has: deadlines,
cancellation, keys, quotas."""

from __future__ import annotations

import queue
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from tritonclient.grpc import model_config_pb2, service_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from models.demo import digits_samples
from protocol.auth import HEALTH, INFER, STATS
from tests.protocol.test_auth import key_entry, new_token, write_keys
from tests.support import bazaar_process, free_port, models_ready, wait_until

Target = tuple[str, str]
"""(gRPC address, HTTP URL) of one server."""


@pytest.fixture(scope="module")
def small_repository(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("grpc-repository")
    for model in ("digits", "mlp"):
        shutil.copytree(demo_repository / model, root / model)
    return root


@pytest.fixture(scope="module")
def pod(small_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["model-server", "--model-repository", str(small_repository), "--port", str(port)]
    args += ["--grpc-port", str(grpc_port)]
    log = tmp_path_factory.mktemp("grpc-pod") / "pod.log"
    with bazaar_process(args, log, f"{url}/v2/health/ready"):
        yield f"127.0.0.1:{grpc_port}", url


@pytest.fixture(scope="module")
def serve(small_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--model-repository", str(small_repository), "--port", str(port)]
    args += ["--grpc-port", str(grpc_port), "--no-autoscale"]
    log = tmp_path_factory.mktemp("grpc-serve") / "serve.log"
    with bazaar_process(args, log, models_ready(url, ["digits", "mlp"])):
        yield f"127.0.0.1:{grpc_port}", url


@pytest.fixture(params=["pod", "serve"])
def target(request: pytest.FixtureRequest) -> Target:
    value: Target = request.getfixturevalue(request.param)
    return value


def test_health_metadata_and_index(target: Target) -> None:
    client = triton.InferenceServerClient(target[0])
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata().name.startswith("bazaar")
    assert client.is_model_ready("digits")
    metadata = client.get_model_metadata("digits")
    assert metadata.name == "digits"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("input", "FP32", [-1, 64])
    ]
    assert {t.name: t.datatype for t in metadata.outputs} == {
        "label": "INT64",
        "probabilities": "FP32",
    }
    index = client.get_model_repository_index()
    assert {model.name for model in index.models} == {"digits", "mlp"}


def test_infer_raw_tensors_matches_http(target: Target) -> None:
    rows, labels = digits_samples(8)
    infer_input = triton.InferInput("input", list(rows.shape), "FP32")
    infer_input.set_data_from_numpy(rows)
    result = triton.InferenceServerClient(target[0]).infer(
        "digits", [infer_input], request_id="r-1"
    )
    assert result.get_response().id == "r-1"
    http_input = triton_http.InferInput("input", list(rows.shape), "FP32")
    http_input.set_data_from_numpy(rows)
    expected = triton_http.InferenceServerClient(target[1].removeprefix("http://")).infer(
        "digits", [http_input]
    )
    np.testing.assert_array_equal(result.as_numpy("label"), expected.as_numpy("label"))
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), expected.as_numpy("probabilities"), rtol=1e-6
    )
    assert result.as_numpy("label").dtype == np.int64
    assert (result.as_numpy("label") == labels).mean() >= 0.75


def test_infer_only_the_outputs_asked_for(target: Target) -> None:
    rows, _ = digits_samples(2)
    infer_input = triton.InferInput("input", list(rows.shape), "FP32")
    infer_input.set_data_from_numpy(rows)
    result = triton.InferenceServerClient(target[0]).infer(
        "digits", [infer_input], outputs=[triton.InferRequestedOutput("label")]
    )
    assert [output.name for output in result.get_response().outputs] == ["label"]
    assert result.as_numpy("probabilities") is None


def test_infer_typed_contents(target: Target) -> None:
    rows, _ = digits_samples(3)
    request = pb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(rows.shape))
    tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    with grpc.insecure_channel(target[0]) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    result = triton.InferResult(response)
    assert result.as_numpy("label").shape == (3,)
    raw_input = triton.InferInput("input", list(rows.shape), "FP32")
    raw_input.set_data_from_numpy(rows)
    raw = triton.InferenceServerClient(target[0]).infer("digits", [raw_input])
    np.testing.assert_array_equal(result.as_numpy("label"), raw.as_numpy("label"))


def test_classification_answers_as_over_http(target: Target) -> None:
    rows, _ = digits_samples(4)
    infer_input = triton.InferInput("input", list(rows.shape), "FP32")
    infer_input.set_data_from_numpy(rows)
    result = triton.InferenceServerClient(target[0]).infer(
        "digits",
        [infer_input],
        outputs=[triton.InferRequestedOutput("probabilities", class_count=3)],
    )
    http_input = triton_http.InferInput("input", list(rows.shape), "FP32")
    http_input.set_data_from_numpy(rows)
    expected = triton_http.InferenceServerClient(target[1].removeprefix("http://")).infer(
        "digits",
        [http_input],
        outputs=[triton_http.InferRequestedOutput("probabilities", class_count=3)],
    )
    top = result.as_numpy("probabilities")
    assert top.shape == (4, 3)
    assert top.tolist() == expected.as_numpy("probabilities").tolist()
    assert all(len(answer.split(b":")) >= 2 for answer in top.ravel())


def test_a_stream_answers_each_request_and_each_failure_by_id(target: Target) -> None:
    rows, _ = digits_samples(6)
    client = triton.InferenceServerClient(target[0])
    answers: queue.Queue[tuple[triton.InferResult | None, InferenceServerException | None]] = (
        queue.Queue()
    )
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for index in range(3):
            tensor = triton.InferInput("input", [2, 64], "FP32")
            tensor.set_data_from_numpy(rows[2 * index : 2 * index + 2])
            client.async_stream_infer("digits", [tensor], request_id=f"r{index}")
        wrong = triton.InferInput("input", [1, 63], "FP32")
        wrong.set_data_from_numpy(np.zeros((1, 63), dtype=np.float32))
        client.async_stream_infer("digits", [wrong], request_id="bad")
        got = [answers.get(timeout=30) for _ in range(4)]
    finally:
        client.stop_stream()
    results = {result.get_response().id: result for result, error in got if result is not None}
    errors = [error for result, error in got if error is not None]
    assert sorted(results) == ["r0", "r1", "r2"]
    expected = client.infer("digits", [_input(rows)]).as_numpy("label")
    for index in range(3):
        labels = results[f"r{index}"].as_numpy("label")
        np.testing.assert_array_equal(labels, expected[2 * index : 2 * index + 2])
    (error,) = errors
    assert "input 'input': shape [1,63] does not match [-1,64]" in error.message()


def _input(rows: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    return tensor


def test_statistics_answer_as_over_http(target: Target) -> None:
    rows, _ = digits_samples(3)
    infer_input = triton.InferInput("input", list(rows.shape), "FP32")
    infer_input.set_data_from_numpy(rows)
    client = triton.InferenceServerClient(target[0])
    client.infer("digits", [infer_input])
    (stat,) = client.get_inference_statistics("digits").model_stats
    http = triton_http.InferenceServerClient(target[1].removeprefix("http://"))
    (expected,) = http.get_inference_statistics("digits", "1")["model_stats"]
    assert (stat.name, stat.version) == ("digits", "1")
    assert stat.inference_count == expected["inference_count"] >= 3
    assert stat.execution_count == expected["execution_count"] >= 1
    assert stat.last_inference == expected["last_inference"] > 0
    for phase in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        duration = getattr(stat.inference_stats, phase)
        assert (duration.count, duration.ns) == tuple(
            expected["inference_stats"][phase].values()
        ), phase
    assert stat.inference_stats.compute_infer.ns > 0
    assert {b.batch_size for b in stat.batch_stats} == {
        b["batch_size"] for b in expected["batch_stats"]
    }
    every = client.get_inference_statistics().model_stats
    assert {s.name for s in every} == {"digits", "mlp"}
    with pytest.raises(InferenceServerException) as unknown:
        client.get_inference_statistics("nope")
    assert unknown.value.status() == "StatusCode.NOT_FOUND"


def test_model_config_is_tritons(target: Target) -> None:
    client = triton.InferenceServerClient(target[0])
    config = client.get_model_config("mlp").config
    assert (config.name, config.platform, config.max_batch_size) == ("mlp", "onnxruntime_onnx", 32)
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("input", model_config_pb2.TYPE_FP32, [256])
    ]
    assert [(t.name, list(t.dims)) for t in config.output] == [("output", [10])]
    assert config.dynamic_batching.default_queue_policy.max_queue_size > 0
    assert client.get_model_config("mlp", "1").config == config
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_config("nope")
    assert unknown.value.status() == "StatusCode.NOT_FOUND"


def test_errors_are_grpc_status_codes(target: Target) -> None:
    client = triton.InferenceServerClient(target[0])
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("nope")
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    assert "unknown model 'nope'" in unknown.value.message()
    wrong = triton.InferInput("input", [1, 63], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 63), dtype=np.float32))
    with pytest.raises(InferenceServerException) as bad_shape:
        client.infer("digits", [wrong])
    assert bad_shape.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'input': shape [1,63] does not match [-1,64]" in bad_shape.value.message()
    with pytest.raises(InferenceServerException) as unknown_infer:
        client.infer("nope", [wrong])
    assert unknown_infer.value.status() == "StatusCode.NOT_FOUND"


# A gateway in front of one mlp pod it may send one batch at a time, so that a stopped pod
# holds every later request in the gateway's queue: deadlines and cancellation are seen there.


@pytest.fixture
def guarded_gateway(
    small_repository: Path, tmp_path: Path
) -> Iterator[tuple[str, str, str, subprocess.Popen[bytes]]]:
    """(gRPC address, HTTP URL, token, the pod's process)."""
    pod_port, port, grpc_port = free_port(), free_port(), free_port()
    pod_url = f"http://127.0.0.1:{pod_port}"
    token = new_token()
    write_keys(tmp_path / "keys.json", key_entry(token, "team-a", INFER, HEALTH, STATS))
    (tmp_path / "tenants.yaml").write_text(
        "tenants:\n  team-a: {requests_per_second: 0.001, burst: 4}\n"
    )
    (tmp_path / "endpoints.yaml").write_text(f"models:\n  mlp: [{pod_url}]\n")
    pod_args = ["model-server", "--model-repository", str(small_repository), "--model", "mlp"]
    pod_args += ["--port", str(pod_port)]
    args = ["gateway", "--endpoints", str(tmp_path / "endpoints.yaml"), "--port", str(port)]
    args += ["--grpc-port", str(grpc_port), "--max-batches-per-endpoint", "1"]
    args += ["--api-keys", str(tmp_path / "keys.json"), "--tenants", str(tmp_path / "tenants.yaml")]
    url = f"http://127.0.0.1:{port}"
    with (
        bazaar_process(pod_args, tmp_path / "pod.log", f"{pod_url}/v2/models/mlp/ready") as pod,
        bazaar_process(args, tmp_path / "gateway.log", f"{url}/v2/health/ready"),
    ):
        try:
            yield f"127.0.0.1:{grpc_port}", url, token, pod
        finally:
            pod.send_signal(signal.SIGCONT)


def _mlp_input() -> triton.InferInput:
    infer_input = triton.InferInput("input", [1, 256], "FP32")
    infer_input.set_data_from_numpy(np.zeros((1, 256), dtype=np.float32))
    return infer_input


def _queued(url: str, token: str) -> int:
    stats = httpx.get(f"{url}/stats", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    return int(stats.json()["models"]["mlp"]["queued"])


def test_keys_deadlines_cancellation_and_quotas_at_the_gateway(
    guarded_gateway: tuple[str, str, str, subprocess.Popen[bytes]],
) -> None:
    address, url, token, pod = guarded_gateway
    client = triton.InferenceServerClient(address)
    headers = {"authorization": f"Bearer {token}"}
    wait_until(lambda: client.is_model_ready("mlp", headers=headers), 30, "mlp at the gateway")

    with pytest.raises(InferenceServerException) as anonymous:
        client.infer("mlp", [_mlp_input()])
    assert anonymous.value.status() == "StatusCode.UNAUTHENTICATED"
    assert client.is_server_live()  # health is open, as over HTTP

    assert client.infer("mlp", [_mlp_input()], headers=headers).as_numpy("output").shape == (1, 10)
    # Statistics need the stats scope, as over HTTP (this key has it).
    (stat,) = client.get_inference_statistics("mlp", headers=headers).model_stats
    assert stat.inference_count == 1
    with pytest.raises(InferenceServerException) as anonymous_stats:
        client.get_inference_statistics("mlp")
    assert anonymous_stats.value.status() == "StatusCode.UNAUTHENTICATED"

    # The stopped pod holds the one batch the gateway may send it; the next waits in the queue.
    pod.send_signal(signal.SIGSTOP)
    held = client.async_infer(
        "mlp", [_mlp_input()], callback=lambda result, error: None, headers=headers,
        client_timeout=30,
    )  # fmt: skip
    wait_until(lambda: _queued(url, token) == 0, 10, "the first request to reach the pod")
    queued = client.async_infer(
        "mlp", [_mlp_input()], callback=lambda result, error: None, headers=headers,
        client_timeout=30,
    )  # fmt: skip
    wait_until(lambda: _queued(url, token) == 1, 10, "the second request in the queue")
    queued.cancel()
    wait_until(lambda: _queued(url, token) == 0, 10, "the cancelled request to leave the queue")

    started = time.monotonic()
    with pytest.raises(InferenceServerException) as late:
        client.infer("mlp", [_mlp_input()], headers=headers, client_timeout=1.0)
    assert late.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert time.monotonic() - started < 3
    wait_until(lambda: _queued(url, token) == 0, 10, "the expired request to leave the queue")

    # The rate quota (burst 4, then one request in 1000 s): the fifth request is refused.
    with pytest.raises(InferenceServerException) as over:
        client.infer("mlp", [_mlp_input()], headers=headers)
    assert over.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    held.cancel()


def test_a_stream_cancelled_takes_its_requests_out_of_the_queue(
    guarded_gateway: tuple[str, str, str, subprocess.Popen[bytes]],
) -> None:
    address, url, token, pod = guarded_gateway
    client = triton.InferenceServerClient(address)
    headers = {"authorization": f"Bearer {token}"}
    wait_until(lambda: client.is_model_ready("mlp", headers=headers), 30, "mlp at the gateway")
    pod.send_signal(signal.SIGSTOP)  # the pod holds the first batch; the second queues
    client.start_stream(callback=lambda result, error: None, headers=headers)
    try:
        client.async_stream_infer("mlp", [_mlp_input()], request_id="held")
        wait_until(lambda: _queued(url, token) == 0, 10, "the first request to reach the pod")
        client.async_stream_infer("mlp", [_mlp_input()], request_id="queued")
        wait_until(lambda: _queued(url, token) == 1, 10, "the second request in the queue")
    finally:
        client.stop_stream(cancel_requests=True)
    wait_until(lambda: _queued(url, token) == 0, 10, "the cancelled stream's request to leave")
