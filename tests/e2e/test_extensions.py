"""Triton's extensions as ``tritonclient.http`` uses them, against a pod and ``bazaar serve``:
each implemented one works, the shared memory one is refused by name."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.support import bazaar_process, free_port, models_ready

LABELS = [f"class-{index}" for index in range(10)]


@pytest.fixture(scope="module")
def repository(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mlp (10 scores a row) with a labels file."""
    root = tmp_path_factory.mktemp("labelled-repository")
    shutil.copytree(demo_repository / "mlp", root / "mlp")
    (root / "mlp" / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return root


@pytest.fixture(scope="module", params=["pod", "serve"])
def server(
    request: pytest.FixtureRequest, repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A pod (``bazaar model-server``) or ``bazaar serve``; yields host:port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("extensions") / f"{request.param}.log"
    if request.param == "pod":
        args = ["model-server", "--model-repository", str(repository), "--port", str(port)]
        ready = [f"{url}/v2/health/ready"]
    else:
        args = ["serve", "--model-repository", str(repository), "--port", str(port)]
        ready = models_ready(url, ["mlp"])
    with bazaar_process([*args, "--grpc-port", "0"], log, ready):
        yield f"127.0.0.1:{port}"


@pytest.fixture
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server)
    yield client
    client.close()


def _rows(repository: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = np.random.default_rng(7).standard_normal((3, 256)).astype(np.float32)
    session = ort.InferenceSession(str(repository / "mlp" / "1" / "model.onnx"))
    (scores,) = session.run(None, {"input": rows})
    return rows, np.asarray(scores)


def _input(rows: np.ndarray, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    return tensor.set_data_from_numpy(rows, binary_data=binary)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_compressed_requests_and_answers(
    client: triton.InferenceServerClient, repository: Path, algorithm: str, binary: bool
) -> None:
    rows, expected = _rows(repository)
    result = client.infer(
        "mlp",
        [_input(rows, binary)],
        outputs=[triton.InferRequestedOutput("output", binary_data=binary)],
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-4, atol=1e-5)


def test_classification_answers_the_top_classes_with_labels(
    client: triton.InferenceServerClient, repository: Path
) -> None:
    rows, scores = _rows(repository)
    result = client.infer(
        "mlp", [_input(rows)], outputs=[triton.InferRequestedOutput("output", class_count=3)]
    )
    top = result.as_numpy("output")
    assert top.shape == (3, 3)
    for row, answers in zip(scores, top, strict=True):
        best = np.argsort(-row, kind="stable")[:3]
        indices = [int(answer.decode().split(":")[1]) for answer in answers]
        assert indices == best.tolist()
        assert [answer.decode().split(":")[2] for answer in answers] == [LABELS[i] for i in best]
        np.testing.assert_allclose(
            [float(answer.decode().split(":")[0]) for answer in answers], row[best], atol=1e-5
        )


def test_shared_memory_is_refused_by_name(
    client: triton.InferenceServerClient, repository: Path
) -> None:
    rows, _ = _rows(repository)
    output = triton.InferRequestedOutput("output")
    output.set_shared_memory("region", 120)
    with pytest.raises(InferenceServerException, match="shared memory extension"):
        client.infer("mlp", [_input(rows)], outputs=[output])
    for call in (
        lambda: client.get_system_shared_memory_status(),
        lambda: client.register_system_shared_memory("region", "/key", 120),
        lambda: client.unregister_system_shared_memory(),
        lambda: client.get_cuda_shared_memory_status(),
        lambda: client.unregister_cuda_shared_memory("region"),
    ):
        with pytest.raises(InferenceServerException, match="shared memory extension"):
            call()


def test_server_metadata_lists_what_is_implemented(client: triton.InferenceServerClient) -> None:
    extensions = set(client.get_server_metadata()["extensions"])
    assert "classification" in extensions
    assert not {"system_shared_memory", "cuda_shared_memory"} & extensions
