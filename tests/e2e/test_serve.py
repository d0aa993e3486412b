"""The whole system as a user runs it: ``bazaar serve`` with real worker processes."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from protocol import __version__ as bazaar_version
from tests.support import bazaar_process, free_port, http_ok, models_ready, wait_until


@pytest.fixture(scope="module")
def small_repository(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits and mlp only: the e2e tests need fast-loading workers."""
    root = tmp_path_factory.mktemp("small-repository")
    for model in ("digits", "mlp"):
        shutil.copytree(demo_repository / model, root / model)
    return root


@pytest.fixture(scope="module")
def serve(
    small_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, int]]:
    """``bazaar serve`` with two workers per model; yields (URL, pid)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = [
        "serve",
        "--model-repository",
        str(small_repository),
        "--port",
        str(port),
        "--workers-per-model",
        "2",
    ]
    with bazaar_process(args, log, models_ready(url, ["digits", "mlp"])) as process:
        wait_until(lambda: _ready_endpoints(url, "mlp") == 2, 60, "two mlp workers")
        yield url, process.pid


def _ready_endpoints(url: str, model: str) -> int:
    try:
        stats = httpx.get(f"{url}/stats", timeout=2).json()
    except httpx.HTTPError:
        return -1
    return int(stats["models"].get(model, {}).get("ready_endpoints", 0))


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


def _worker_pids(pid: int, model: str) -> list[int]:
    pids = []
    for child in _children(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"--model" in argv and argv[argv.index(b"--model") + 1] == model.encode():
            pids.append(child)
    return pids


def _mlp_expected(repository: Path, rows: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(repository / "mlp" / "1" / "model.onnx"))
    (output,) = session.run(None, {"input": rows})
    return np.asarray(output)


def test_tritonclient_through_the_gateway(serve: tuple[str, int], small_repository: Path) -> None:
    url, _ = serve
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("mlp")
        metadata = client.get_model_metadata("mlp")
        assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 256]}]
        rows = np.random.default_rng(5).standard_normal((3, 256), dtype=np.float32)
        expected = _mlp_expected(small_repository, rows)
        for binary in (False, True):
            infer_input = triton.InferInput("input", [3, 256], "FP32")
            infer_input.set_data_from_numpy(rows, binary_data=binary)
            output = triton.InferRequestedOutput("output", binary_data=binary)
            result = client.infer("mlp", [infer_input], outputs=[output], request_id="r1")
            assert result.get_response()["id"] == "r1"
            np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-5, atol=1e-5)
        from models.demo import digits_samples

        digits, labels = digits_samples(20)
        infer_input = triton.InferInput("input", [20, 64], "FP32")
        infer_input.set_data_from_numpy(digits)
        result = client.infer("digits", [infer_input])
        assert np.mean(result.as_numpy("label") == labels) >= 0.9
    finally:
        client.close()


def _infer_one(url: str, value: float, client: httpx.Client) -> tuple[int, object]:
    row = [value] * 256
    body = {"inputs": [{"name": "input", "shape": [1, 256], "datatype": "FP32", "data": row}]}
    response = client.post(f"{url}/v2/models/mlp/infer", json=body, timeout=30)
    if response.status_code == 200:
        return 200, response.json()["outputs"][0]["data"]
    return response.status_code, response.json()["error"]


def test_64_concurrent_clients_each_get_their_own_rows(
    serve: tuple[str, int], small_repository: Path
) -> None:
    url, _ = serve
    values = [i / 64 - 0.5 for i in range(64)]
    expected = _mlp_expected(small_repository, np.array([[v] * 256 for v in values], np.float32))
    with (
        httpx.Client(limits=httpx.Limits(max_connections=64)) as client,
        ThreadPoolExecutor(64) as pool,
    ):
        results = list(pool.map(lambda v: _infer_one(url, v, client), values * 4))
    for index, (status, data) in enumerate(results):
        assert status == 200, data
        np.testing.assert_allclose(data, expected[index % 64], rtol=1e-5, atol=1e-5)
    metrics = httpx.get(f"{url}/metrics").text
    assert 'bazaar_gateway_requests_total{model="mlp",outcome="success",version="1"}' in metrics


def _families(text: str) -> dict[str, list[Sample]]:
    """Family name -> samples; parsing fails the test unless ``text`` is a valid exposition."""
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_the_gateway_exports_process_and_build_metrics_and_no_created_series(
    serve: tuple[str, int],
) -> None:
    url, _ = serve
    text = httpx.get(f"{url}/metrics", timeout=10).text
    families = _families(text)
    assert "_created" not in text
    (build,) = families["bazaar_build_info"]
    assert build.labels["component"] == "gateway"
    assert build.labels["version"] == bazaar_version
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info"} <= set(families)


def test_metrics_workers_serves_every_worker_labelled_by_worker(serve: tuple[str, int]) -> None:
    url, _ = serve
    answer = httpx.get(f"{url}/metrics/workers", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    assert "_created" not in answer.text
    families = _families(answer.text)
    workers = {"digits/1", "digits/2", "mlp/1", "mlp/2"}
    up = {sample.labels["worker"]: sample.value for sample in families["bazaar_worker_up"]}
    assert up == dict.fromkeys(workers, 1.0)
    build = families["bazaar_build_info"]
    assert {sample.labels["worker"] for sample in build} == workers
    assert {sample.labels["component"] for sample in build} == {"pod"}
    # Each worker's own process and its own model's series, told apart by the label.
    started = [s.labels["worker"] for s in families["process_start_time_seconds"]]
    assert sorted(started) == sorted(workers)
    served = {
        (s.labels["worker"], s.labels["model"]) for s in families["bazaar_model_busy_seconds"]
    }
    assert served == {(worker, worker.partition("/")[0]) for worker in workers}


def test_killing_a_worker_under_load_loses_no_request(
    serve: tuple[str, int], small_repository: Path
) -> None:
    url, pid = serve
    values = [((i % 97) / 97) - 0.5 for i in range(1500)]
    expected = _mlp_expected(
        small_repository, np.array([[v] * 256 for v in sorted(set(values))], np.float32)
    )
    by_value = dict(zip(sorted(set(values)), expected, strict=True))
    victims = _worker_pids(pid, "mlp")
    assert len(victims) == 2
    with (
        httpx.Client(limits=httpx.Limits(max_connections=16)) as client,
        ThreadPoolExecutor(16) as pool,
    ):
        futures = [pool.submit(_infer_one, url, v, client) for v in values]
        wait_until(lambda: sum(f.done() for f in futures) >= 300, 60, "300 answers before the kill")
        os.kill(victims[0], signal.SIGKILL)
        results = [f.result(timeout=60) for f in futures]
    assert len(results) == len(values)  # every request answered
    failures = [(status, data) for status, data in results if status != 200]
    for status, data in failures:
        assert status in (502, 503, 504), (status, data)
        assert isinstance(data, str) and data
    for value, (status, data) in zip(values, results, strict=True):
        if status == 200:
            np.testing.assert_allclose(data, by_value[value], rtol=1e-5, atol=1e-5)
    assert len(failures) < 50, failures[:5]
    # The supervisor brings the worker back.
    wait_until(lambda: _ready_endpoints(url, "mlp") == 2, 60, "the killed worker to come back")
    assert victims[0] not in _worker_pids(pid, "mlp")
    assert len(_worker_pids(pid, "mlp")) == 2


def test_sigterm_drains_requests_in_flight_and_stops_every_worker(
    small_repository: Path, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--model-repository", str(small_repository), "--port", str(port)]
    with bazaar_process(
        args, tmp_path / "serve.log", models_ready(url, ["digits", "mlp"])
    ) as process:
        workers = _children(process.pid)
        assert len(workers) == 2
        with (
            httpx.Client(limits=httpx.Limits(max_connections=32)) as client,
            ThreadPoolExecutor(32) as pool,
        ):
            futures = [pool.submit(_infer_one, url, i / 200, client) for i in range(200)]
            wait_until(lambda: any(f.done() for f in futures), 30, "the first answer")
            process.send_signal(signal.SIGTERM)
            results = []
            for future in futures:
                try:
                    results.append(future.result(timeout=30)[0])
                except httpx.TransportError:
                    # Sent after the gateway stopped listening, or on a keep-alive
                    # connection it closed: never admitted, so never owed an answer.
                    results.append("refused")
        assert process.wait(timeout=30) == 0
        accepted = [status for status in results if status != "refused"]
        assert accepted and all(status == 200 for status in accepted), results
        assert not http_ok(f"{url}/v2/health/live")
        for worker in workers:
            wait_until(
                lambda w=worker: not Path(f"/proc/{w}").exists() or _zombie(w),
                15,
                f"worker {worker} to exit",
            )


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def _worker_args(pid: int, model: str) -> list[list[str]]:
    return [
        Path(f"/proc/{worker}/cmdline").read_bytes().decode().split("\0")
        for worker in _worker_pids(pid, model)
    ]


def test_the_gateway_sends_batches_over_binary_http_by_default(
    serve: tuple[str, int], small_repository: Path
) -> None:
    url, pid = serve
    assert _worker_args(pid, "mlp") and all(
        "--grpc-port" not in args for args in _worker_args(pid, "mlp")
    )
    rows = np.random.default_rng(5).random((3, 256), dtype=np.float32)
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    tensor = triton.InferInput("input", [3, 256], "FP32")
    tensor.set_data_from_numpy(rows, binary_data=True)
    (output,) = client.get_model_metadata("mlp")["outputs"]
    answer = client.infer("mlp", [tensor]).as_numpy(output["name"])
    np.testing.assert_allclose(answer, _mlp_expected(small_repository, rows), rtol=1e-5, atol=1e-5)


def test_hop_grpc_sends_batches_over_grpc(small_repository: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--model-repository", str(small_repository), "--port", str(port)]
    args += ["--hop", "grpc", "--no-autoscale"]
    with bazaar_process(args, tmp_path / "serve.log", models_ready(url, ["digits", "mlp"])) as p:
        assert _worker_args(p.pid, "mlp") and all(
            "--grpc-port" in args for args in _worker_args(p.pid, "mlp")
        )
        rows = np.random.default_rng(6).random((2, 256), dtype=np.float32)
        body = {"inputs": [{"name": "input", "shape": [2, 256], "datatype": "FP32"}]}
        body["inputs"][0]["data"] = rows.ravel().tolist()
        answer = httpx.post(f"{url}/v2/models/mlp/infer", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        (output,) = answer.json()["outputs"]
        np.testing.assert_allclose(
            np.array(output["data"], np.float32).reshape(output["shape"]),
            _mlp_expected(small_repository, rows),
            rtol=1e-5,
            atol=1e-5,
        )
