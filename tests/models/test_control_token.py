"""A real ``bazaar model-server`` with model control and a control token: load and unload
answer only the token's holder, the data plane stays as it was, the token file is re-read,
and control without a token is refused off loopback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.protocol.test_auth import new_token
from tests.support import bazaar_process, free_port, wait_until

CONTROL_ROUTES = ["/v2/repository/models/mlp/load", "/v2/repository/models/mlp/unload"]


@pytest.fixture
def pod(demo_repository: Path, tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    """A pod serving the demo repository with a control token; yields (url, token file,
    token)."""
    token = new_token()
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["model-server", "--model-repository", str(demo_repository), "--port", str(port)]
    args += ["--enable-model-control", "--control-token-file", str(token_file)]
    with bazaar_process(args, tmp_path / "server.log", f"{url}/v2/health/ready"):
        yield url, token_file, token


def control(url: str, path: str, token: str | None) -> httpx.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.post(url + path, headers=headers, timeout=60)


def test_control_routes_answer_only_the_token(pod: tuple[str, Path, str]) -> None:
    url, _, token = pod
    for path in CONTROL_ROUTES:
        for wrong in (None, new_token()):
            refused = control(url, path, wrong)
            assert refused.status_code == 401, refused.text
            assert refused.headers["www-authenticate"].startswith('Bearer realm="bazaar"')
    assert httpx.get(f"{url}/v2/models/mlp/ready").status_code == 200  # nothing was unloaded
    assert control(url, "/v2/repository/models/mlp/unload", token).status_code == 200
    assert httpx.get(f"{url}/v2/models/mlp/ready").status_code == 503
    assert control(url, "/v2/repository/models/mlp/load", token).status_code == 200
    assert httpx.get(f"{url}/v2/models/mlp/ready").status_code == 200


def test_the_data_plane_and_metrics_need_no_token(pod: tuple[str, Path, str]) -> None:
    url, _, _ = pod
    assert httpx.get(f"{url}/v2/models/mlp").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200
    assert httpx.post(f"{url}/v2/repository/index").status_code == 200
    assert httpx.post(f"{url}/v2/models/mlp/infer", json={}).status_code == 400


def test_a_new_token_in_the_file_replaces_the_old(pod: tuple[str, Path, str]) -> None:
    url, token_file, old = pod
    new = new_token()
    token_file.write_text(new)
    load = "/v2/repository/models/mlp/load"
    wait_until(lambda: control(url, load, new).status_code == 200, 10, "the new token")
    assert control(url, load, old).status_code == 401


def model_server(demo_repository: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["model-server", "--model-repository", str(demo_repository), "--port", "1", *extra]
    return subprocess.run(
        [sys.executable, "-m", "bazaar", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
def test_control_off_loopback_without_a_token_is_refused_at_start(
    demo_repository: Path, host: str
) -> None:
    done = model_server(demo_repository, "--host", host, "--enable-model-control")
    assert done.returncode == 2
    assert "needs --control-token-file" in done.stderr


def test_a_bad_token_file_or_a_token_without_control_is_refused_at_start(
    demo_repository: Path, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text("short")
    done = model_server(
        demo_repository, "--enable-model-control", "--control-token-file", str(tmp_path / "token")
    )
    assert done.returncode == 2
    assert "at least 32 visible ASCII characters" in done.stderr
    done = model_server(demo_repository, "--control-token-file", str(tmp_path / "token"))
    assert done.returncode == 2
    assert "--control-token-file: goes with --enable-model-control" in done.stderr
