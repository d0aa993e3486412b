"""The pod's v2 server, as a real ``bazaar model-server`` process on loopback."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton

from tests.support import bazaar_process, free_port, wait_until


def direct(repository: Path, model: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The same model run by ONNX Runtime in this process."""
    session = ort.InferenceSession(str(repository / model / "1" / "model.onnx"))
    return list(session.run(None, inputs))


def post_json(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url, json=body, timeout=30)


@pytest.fixture
def client(model_server: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(model_server.removeprefix("http://"))
    yield client
    client.close()


def test_health_and_server_metadata(model_server: str) -> None:
    assert httpx.get(f"{model_server}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{model_server}/v2/health/ready").json() == {"ready": True}
    metadata = httpx.get(f"{model_server}/v2").json()
    assert set(metadata["extensions"]) == {"binary_tensor_data", "classification", "statistics"}


def test_model_metadata_describes_the_demo_models(model_server: str) -> None:
    digits = httpx.get(f"{model_server}/v2/models/digits").json()
    assert digits["name"] == "digits"
    assert digits["versions"] == ["1"]
    assert digits["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    outputs = {o["name"]: o for o in digits["outputs"]}
    assert outputs["label"]["datatype"] == "INT64"
    assert outputs["probabilities"]["shape"] == [-1, 10]
    mlp = httpx.get(f"{model_server}/v2/models/mlp/versions/1").json()
    assert mlp["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 256]}]
    assert httpx.get(f"{model_server}/v2/models/mlp_wide/ready").json() == {
        "name": "mlp_wide",
        "ready": True,
        "loaded": True,
    }


def test_digits_json_inference_equals_onnx_runtime(
    model_server: str, demo_repository: Path
) -> None:
    from models.demo import digits_samples

    rows, labels = digits_samples(16)
    response = post_json(
        f"{model_server}/v2/models/digits/infer",
        {
            "id": "req-7",
            "inputs": [
                {
                    "name": "input",
                    "shape": list(rows.shape),
                    "datatype": "FP32",
                    "data": rows.tolist(),
                }
            ],
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "req-7"
    assert body["model_name"] == "digits"
    assert body["model_version"] == "1"
    outputs = {o["name"]: o for o in body["outputs"]}
    label, probabilities = direct(demo_repository, "digits", {"input": rows})
    assert outputs["label"]["datatype"] == "INT64"
    assert outputs["label"]["data"] == label.tolist()
    np.testing.assert_allclose(
        np.array(outputs["probabilities"]["data"]).reshape(16, 10), probabilities, rtol=1e-6
    )
    assert np.mean(np.array(outputs["label"]["data"]) == labels) >= 0.9


def test_requested_outputs_are_honoured(model_server: str) -> None:
    from models.demo import digits_samples

    rows, _ = digits_samples(2)
    response = post_json(
        f"{model_server}/v2/models/digits/infer",
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 64],
                    "datatype": "FP32",
                    "data": rows.ravel().tolist(),
                }
            ],
            "outputs": [{"name": "label"}],
        },
    )
    assert response.status_code == 200, response.text
    assert [o["name"] for o in response.json()["outputs"]] == ["label"]
    assert "id" not in response.json()


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("model,width", [("mlp", 256), ("mlp_wide", 1024)])
def test_tritonclient_infers_like_onnx_runtime(
    client: triton.InferenceServerClient,
    demo_repository: Path,
    model: str,
    width: int,
    binary: bool,
) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(model)
    metadata = client.get_model_metadata(model)
    output_name = metadata["outputs"][0]["name"]
    rows = np.random.default_rng(3).standard_normal((8, width), dtype=np.float32)
    infer_input = triton.InferInput("input", list(rows.shape), "FP32")
    infer_input.set_data_from_numpy(rows, binary_data=binary)
    requested = [triton.InferRequestedOutput(output_name, binary_data=binary)]
    result = client.infer(model, [infer_input], outputs=requested, request_id="abc")
    assert result.get_response()["id"] == "abc"
    (expected,) = direct(demo_repository, model, {"input": rows})
    np.testing.assert_allclose(result.as_numpy(output_name), expected, rtol=1e-5, atol=1e-5)


def test_tritonclient_digits_binary_labels(
    client: triton.InferenceServerClient, demo_repository: Path
) -> None:
    from models.demo import digits_samples

    rows, _ = digits_samples(32)
    infer_input = triton.InferInput("input", list(rows.shape), "FP32")
    infer_input.set_data_from_numpy(rows)
    result = client.infer("digits", [infer_input])
    label, probabilities = direct(demo_repository, "digits", {"input": rows})
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, rtol=1e-6)


def _infer_body(
    shape: list[int], data: Any, name: str = "input", datatype: str = "FP32"
) -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


@pytest.mark.parametrize(
    "path,body,status,words",
    [
        ("/v2/models/nope/infer", _infer_body([1, 256], [0.0] * 256), 404, ["nope"]),
        ("/v2/models/mlp/versions/9/infer", _infer_body([1, 256], [0.0] * 256), 404, ["9", "mlp"]),
        ("/v2/models/mlp/infer", _infer_body([1, 255], [0.0] * 255), 400, ["input", "256"]),
        ("/v2/models/mlp/infer", _infer_body([1, 256], [0.0] * 255), 400, ["input", "256", "255"]),
        (
            "/v2/models/mlp/infer",
            _infer_body([1, 256], [0] * 256, datatype="INT32"),
            400,
            ["input", "FP32"],
        ),
        ("/v2/models/mlp/infer", _infer_body([1, 256], [0.0] * 256, name="x"), 400, ["x", "input"]),
        ("/v2/models/mlp/infer", _infer_body([33, 256], [0.0] * 33 * 256), 400, ["32"]),
    ],
)
def test_bad_requests_get_clear_errors(
    model_server: str, path: str, body: dict[str, Any], status: int, words: list[str]
) -> None:
    response = post_json(model_server + path, body)
    assert response.status_code == status, response.text
    message = response.json()["error"]
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "content,headers",
    [
        (b"{not json", {}),
        (b"[1, 2, 3]", {}),
        (b'{"inputs": []}', {}),
        (
            b'{"inputs": [{"name": "input", "shape": [1, 256], "datatype": "FP32", '
            b'"parameters": {"binary_data_size": 1024}}]}',
            {},
        ),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "many"}),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "9999"}),
    ],
)
def test_malformed_bodies_are_400(
    model_server: str, content: bytes, headers: dict[str, str]
) -> None:
    response = httpx.post(f"{model_server}/v2/models/mlp/infer", content=content, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]


def test_unknown_routes_answer_v2_errors(model_server: str) -> None:
    response = httpx.get(f"{model_server}/v2/nothing/here")
    assert response.status_code == 404
    assert "error" in response.json()
    response = httpx.get(f"{model_server}/v2/models/mlp/infer")
    assert response.status_code == 405
    assert "error" in response.json()


def test_metrics_count_requests_batches_and_busy_time(model_server: str) -> None:
    rows = np.zeros((4, 256), dtype=np.float32)
    for _ in range(3):
        response = post_json(
            f"{model_server}/v2/models/mlp/infer", _infer_body([4, 256], rows.ravel().tolist())
        )
        assert response.status_code == 200
    post_json(f"{model_server}/v2/models/mlp/infer", _infer_body([4, 256], [1.0]))
    text = httpx.get(f"{model_server}/metrics").text
    samples = _samples(text)
    assert samples['bazaar_model_inference_requests_total{model="mlp",outcome="success"}'] >= 3
    assert samples['bazaar_model_inference_requests_total{model="mlp",outcome="client_error"}'] >= 1
    assert samples['bazaar_model_inference_batches_total{model="mlp",outcome="success"}'] >= 3
    assert samples['bazaar_model_batch_size_bucket{le="4.0",model="mlp"}'] >= 3
    assert samples['bazaar_model_compute_seconds_count{model="mlp"}'] >= 3
    assert samples['bazaar_model_busy_seconds_total{model="mlp",version="1"}'] > 0
    assert 0 < samples['bazaar_model_busy_ratio{model="mlp",version="1"}'] <= 1
    assert samples['bazaar_model_inflight_batches{model="mlp",version="1"}'] == 0
    # No GPU here: the GPU series are absent, not zero.
    assert "bazaar_gpu_utilization_ratio" not in text


def _samples(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def test_repository_index_unload_and_load(own_server: str) -> None:
    assert "model_repository" in httpx.get(f"{own_server}/v2").json()["extensions"]
    index = httpx.post(f"{own_server}/v2/repository/index").json()
    assert {(e["name"], e["state"]) for e in index} >= {("digits", "READY"), ("mlp", "READY")}

    assert httpx.post(f"{own_server}/v2/repository/models/digits/unload").status_code == 200
    assert httpx.get(f"{own_server}/v2/models/digits/ready").status_code == 503
    response = post_json(f"{own_server}/v2/models/digits/infer", _infer_body([1, 64], [0.0] * 64))
    assert response.status_code == 503
    assert "unloaded" in response.json()["error"]
    ready_only = httpx.post(f"{own_server}/v2/repository/index", json={"ready": True}).json()
    assert "digits" not in {e["name"] for e in ready_only}
    wrong = httpx.post(f"{own_server}/v2/repository/index", json={"ready": "no"})
    assert (wrong.status_code, wrong.json()) == (400, {"error": "'ready' must be a boolean"})
    assert httpx.get(f"{own_server}/v2/health/ready").status_code == 200  # unloading is not failing

    assert httpx.post(f"{own_server}/v2/repository/models/digits/load").status_code == 200
    assert httpx.get(f"{own_server}/v2/models/digits/ready").json()["ready"] is True


def test_load_with_config_override_and_bad_override(own_server: str) -> None:
    config = '{"max_batch_size": 4}'
    response = httpx.post(
        f"{own_server}/v2/repository/models/mlp/load", json={"parameters": {"config": config}}
    )
    assert response.status_code == 200, response.text
    assert httpx.get(f"{own_server}/v2/models/mlp/config").json()["max_batch_size"] == 4
    response = post_json(
        f"{own_server}/v2/models/mlp/infer", _infer_body([5, 256], [0.0] * 5 * 256)
    )
    assert response.status_code == 400
    assert "4" in response.json()["error"]

    response = httpx.post(
        f"{own_server}/v2/repository/models/mlp/load",
        json={"parameters": {"config": '{"max_batch_size": "lots"}'}},
    )
    assert response.status_code == 400
    assert "max_batch_size" in response.json()["error"]
    assert "lots" in response.json()["error"]
    # A failed reload keeps the loaded version serving, and says why in the index.
    index = {e["name"]: e for e in httpx.post(f"{own_server}/v2/repository/index").json()}
    assert index["mlp"]["state"] == "READY"
    assert "max_batch_size" in index["mlp"]["reason"]
    assert httpx.get(f"{own_server}/v2/models/mlp/config").json()["max_batch_size"] == 4
    assert httpx.get(f"{own_server}/v2/health/ready").status_code == 200

    response = httpx.post(f"{own_server}/v2/repository/models/ghost/load")
    assert response.status_code == 404


def test_a_model_that_fails_to_load_keeps_the_server_unready(
    demo_repository: Path, tmp_path: Path
) -> None:
    root = tmp_path / "repository"
    shutil.copytree(demo_repository / "digits", root / "digits")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"not a model")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["model-server", "--model-repository", str(root), "--port", str(port)]
    with bazaar_process(args, tmp_path / "server.log", f"{url}/v2/models/digits/ready"):
        wait_until(
            lambda: httpx.post(f"{url}/v2/repository/index").json()[0]["state"] == "UNAVAILABLE",
            30,
            "the broken model's load to fail",
        )
        broken = httpx.post(f"{url}/v2/repository/index").json()[0]
        assert broken["name"] == "broken"
        assert "model.onnx" in broken["reason"]
        assert httpx.get(f"{url}/v2/health/ready").status_code == 503
        assert httpx.get(f"{url}/v2/health/live").status_code == 200
        response = post_json(f"{url}/v2/models/broken/infer", _infer_body([1, 64], [0.0] * 64))
        assert response.status_code == 503
        assert "model.onnx" in response.json()["error"]


def test_a_control_port_splits_the_data_plane_from_metrics_and_control(
    demo_repository: Path, tmp_path: Path
) -> None:
    """A NetworkPolicy filters ports, not paths: the gateway may reach the data port only."""
    root = tmp_path / "repository"
    shutil.copytree(demo_repository / "digits", root / "digits")
    data, control = free_port(), free_port()
    args = [
        "model-server",
        "--model-repository",
        str(root),
        "--port",
        str(data),
        "--control-port",
        str(control),
        "--enable-model-control",
    ]
    data_url, control_url = f"http://127.0.0.1:{data}", f"http://127.0.0.1:{control}"
    with bazaar_process(args, tmp_path / "server.log", f"{control_url}/v2/health/ready"):
        for url in (data_url, control_url):
            assert httpx.get(f"{url}/v2/health/ready").status_code == 200
            assert httpx.get(f"{url}/v2/health/live").status_code == 200
        body = _infer_body([1, 64], [0.0] * 64)
        assert post_json(f"{data_url}/v2/models/digits/infer", body).status_code == 200
        assert httpx.get(f"{data_url}/v2/models/digits").status_code == 200
        assert httpx.get(f"{control_url}/metrics").status_code == 200
        assert httpx.post(f"{control_url}/v2/repository/index").status_code == 200
        refused = [
            httpx.post(f"{control_url}/v2/models/digits/infer", json=body),
            httpx.get(f"{control_url}/v2/models/digits"),
            httpx.get(f"{data_url}/metrics"),
            httpx.post(f"{data_url}/v2/repository/index"),
            httpx.post(f"{data_url}/v2/repository/models/digits/unload"),
        ]
        for response in refused:
            assert response.status_code == 404, response.request.url
            assert "port" in response.json()["error"]


def test_device_cuda_without_cuda_fails_to_load_instead_of_computing_on_the_cpu(
    demo_repository: Path, tmp_path: Path
) -> None:
    root = tmp_path / "repository"
    shutil.copytree(demo_repository / "digits", root / "digits")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["model-server", "--model-repository", str(root), "--port", str(port)]
    with bazaar_process(
        [*args, "--device", "cuda"], tmp_path / "cuda.log", f"{url}/v2/health/live"
    ):
        wait_until(
            lambda: httpx.post(f"{url}/v2/repository/index").json()[0]["state"] == "UNAVAILABLE",
            30,
            "the load on cuda to fail",
        )
        [entry] = httpx.post(f"{url}/v2/repository/index").json()
        assert "CUDAExecutionProvider" in entry["reason"]
        assert httpx.get(f"{url}/v2/health/ready").status_code == 503


def test_the_execution_provider_is_exported(model_server: str) -> None:
    metrics = _samples(httpx.get(f"{model_server}/metrics").text)
    key = (
        'bazaar_model_execution_provider{model="digits",provider="CPUExecutionProvider",'
        'version="1"}'
    )
    assert metrics[key] == 1.0


def test_model_control_is_off_unless_enabled(model_server: str) -> None:
    for action in ("load", "unload"):
        response = httpx.post(f"{model_server}/v2/repository/models/digits/{action}")
        assert response.status_code == 400
        assert "model control is off" in response.json()["error"]
    assert "model_repository" not in httpx.get(f"{model_server}/v2").json()["extensions"]
    assert httpx.get(f"{model_server}/v2/models/digits/ready").status_code == 200
    assert httpx.post(f"{model_server}/v2/repository/index").status_code == 200


def _model_stats(url: str) -> list[dict[str, Any]]:
    answer = httpx.get(url, timeout=10)
    assert answer.status_code == 200, answer.text
    stats: list[dict[str, Any]] = answer.json()["model_stats"]
    return stats


def test_statistics_count_requests_rows_and_batches_per_version(model_server: str) -> None:
    (before,) = _model_stats(f"{model_server}/v2/models/mlp/stats")
    started_ms = time.time() * 1000
    for rows in (2, 3):
        body = {"inputs": [{"name": "input", "shape": [rows, 256], "datatype": "FP32",
                            "data": [0.5] * (rows * 256)}]}  # fmt: skip
        assert post_json(f"{model_server}/v2/models/mlp/infer", body).status_code == 200
    wrong = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    assert post_json(f"{model_server}/v2/models/mlp/infer", wrong).status_code == 400

    (after,) = _model_stats(f"{model_server}/v2/models/mlp/stats")
    assert (after["name"], after["version"]) == ("mlp", "1")
    assert after["last_inference"] >= started_ms
    assert after["inference_count"] - before["inference_count"] == 5
    assert after["execution_count"] - before["execution_count"] == 2
    stats, earlier = after["inference_stats"], before["inference_stats"]
    for phase, count in [("success", 2), ("fail", 1), ("queue", 2), ("compute_input", 2),
                         ("compute_infer", 2), ("compute_output", 2)]:  # fmt: skip
        assert stats[phase]["count"] - earlier[phase]["count"] == count, phase
    for phase in ("success", "fail", "compute_infer"):
        assert stats[phase]["ns"] > earlier[phase]["ns"], phase
    # Infer time is within the request's time.
    assert stats["compute_infer"]["ns"] < stats["success"]["ns"]
    sizes = {batch["batch_size"]: batch for batch in after["batch_stats"]}
    assert {2, 3} <= set(sizes)
    assert sizes[3]["compute_infer"]["count"] >= 1 and sizes[3]["compute_infer"]["ns"] > 0

    assert _model_stats(f"{model_server}/v2/models/mlp/versions/1/stats") == [after]
    every = _model_stats(f"{model_server}/v2/models/stats")
    assert [(stat["name"], stat["version"]) for stat in every] == sorted(
        (name, "1") for name in ("digits", "mlp", "mlp_wide")
    )
    assert after in every
    for path in ("/v2/models/nope/stats", "/v2/models/mlp/versions/9/stats"):
        answer = httpx.get(f"{model_server}{path}")
        assert answer.status_code == 404
        assert "unknown" in answer.json()["error"]
