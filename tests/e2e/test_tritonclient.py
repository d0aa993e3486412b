"""Every call ``tritonclient.http`` and ``tritonclient.grpc`` offer
(``tests/tritonclient_calls.py``), against a pod, a gateway in front of it and ``bazaar
serve``: each works, or gets an error that says what is not implemented, never a bare 404 or
"Method not implemented!".
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from tests.support import bazaar_process, free_port, models_ready
from tests.tritonclient_calls import (
    GRPC,
    GRPC_INFER,
    HTTP,
    HTTP_CODEC,
    HTTP_INFER,
    LOCAL,
    MODEL,
    STREAM,
    grpc_call,
    http_call,
    public_calls,
)


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


@pytest.mark.parametrize("name", sorted(HTTP))
def test_http_call(server: Server, name: str) -> None:
    http_call(server.http, name)


@pytest.mark.parametrize("name", sorted(GRPC))
def test_grpc_call(server: Server, name: str) -> None:
    grpc_call(server.grpc, name)


@pytest.mark.parametrize("form", sorted(HTTP_INFER))
def test_http_infer(server: Server, form: str) -> None:
    http_call(server.http, form, HTTP_INFER)


@pytest.mark.parametrize("form", sorted(GRPC_INFER))
def test_grpc_infer(server: Server, form: str) -> None:
    grpc_call(server.grpc, form, GRPC_INFER)
