"""The repository API of a real ``bazaar model-server`` with model control: what a load or
unload request may and may not do to a pod that serves traffic."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.models.test_server import _infer_body, post_json
from tests.support import bazaar_process, free_port


def _index(url: str) -> dict[str, dict[str, str]]:
    return {e["name"]: e for e in httpx.post(f"{url}/v2/repository/index").json()}


def _load(url: str, model: str, config: str | None = None) -> httpx.Response:
    body = {} if config is None else {"parameters": {"config": config}}
    return httpx.post(f"{url}/v2/repository/models/{model}/load", json=body, timeout=60)


@pytest.fixture
def digits_pod(demo_repository: Path, tmp_path: Path) -> Iterator[str]:
    """A pod started to serve ``digits`` only, with ``mlp`` also in its repository."""
    root = tmp_path / "repository"
    for model in ("digits", "mlp"):
        shutil.copytree(demo_repository / model, root / model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["model-server", "--model-repository", str(root), "--port", str(port)]
    args += ["--model", "digits", "--enable-model-control"]
    with bazaar_process(args, tmp_path / "server.log", f"{url}/v2/health/ready"):
        yield url


def test_loading_a_model_not_in_the_repository_is_404_and_changes_nothing(
    own_server: str,
) -> None:
    before = _index(own_server)
    response = _load(own_server, "zz")
    assert response.status_code == 404
    assert "zz" in response.json()["error"]
    assert httpx.get(f"{own_server}/v2/health/ready").status_code == 200
    assert _index(own_server) == before
    assert httpx.get(f"{own_server}/v2/models/zz/ready").status_code == 404


@pytest.mark.parametrize(
    "name,words",
    [("a" * 256, ["256", "255"]), ("no~tilde", ["invalid model name", "no~tilde"])],
)
def test_an_invalid_name_is_400_before_the_disk_is_touched(
    own_server: str, name: str, words: list[str]
) -> None:
    for action in ("load", "unload"):
        response = httpx.post(f"{own_server}/v2/repository/models/{name}/{action}")
        assert response.status_code == 400, response.text
        for word in words:
            assert word in response.json()["error"]
    assert name not in _index(own_server)
    assert httpx.get(f"{own_server}/v2/health/ready").status_code == 200


def test_a_failed_api_load_is_reported_and_leaves_the_pod_ready(digits_pod: str) -> None:
    response = _load(digits_pod, "mlp", '{"max_batch_size": "lots"}')
    assert response.status_code == 400
    entry = _index(digits_pod)["mlp"]
    assert entry["state"] == "UNAVAILABLE"
    assert "max_batch_size" in entry["reason"]
    assert httpx.get(f"{digits_pod}/v2/health/ready").status_code == 200
    body = _infer_body([1, 64], [0.0] * 64)
    assert post_json(f"{digits_pod}/v2/models/digits/infer", body).status_code == 200
    # A good load afterwards serves it; the failure is forgotten.
    assert _load(digits_pod, "mlp").status_code == 200
    assert _index(digits_pod)["mlp"] == {
        "name": "mlp",
        "state": "READY",
        "reason": "",
        "version": "1",
    }


@pytest.mark.parametrize(
    "config,key,value",
    [
        ('{"max_batch_size": 4194304}', "max_batch_size", "4194304"),
        ('{"intra_op_threads": 1000}', "intra_op_threads", "1000"),
        ('{"inter_op_threads": 1000}', "inter_op_threads", "1000"),
        ('{"instances": 9}', "instances", "9"),
    ],
)
def test_config_overrides_over_the_pods_limits_are_refused(
    digits_pod: str, config: str, key: str, value: str
) -> None:
    for model in ("digits", "mlp"):  # a reload of a served model, and a first load
        response = _load(digits_pod, model, config)
        assert response.status_code == 400, response.text
        message = response.json()["error"]
        assert f"{key}: {value} is over this pod's limit of" in message
    assert _index(digits_pod)["digits"]["state"] == "READY"
    assert httpx.get(f"{digits_pod}/v2/health/ready").status_code == 200
    body = _infer_body([1, 64], [0.0] * 64)
    assert post_json(f"{digits_pod}/v2/models/digits/infer", body).status_code == 200


def test_overrides_within_the_limits_load(digits_pod: str) -> None:
    response = _load(digits_pod, "mlp", '{"max_batch_size": 1024, "instances": 8}')
    assert response.status_code == 200, response.text
    config = httpx.get(f"{digits_pod}/v2/models/mlp/config").json()
    assert (config["max_batch_size"], config["instances"]) == (1024, 8)


def test_unloading_a_start_up_model_and_failing_to_reload_it_keeps_the_pod_ready(
    digits_pod: str,
) -> None:
    assert httpx.post(f"{digits_pod}/v2/repository/models/digits/unload").status_code == 200
    assert _load(digits_pod, "digits", '{"max_batch_size": -1}').status_code == 400
    assert _index(digits_pod)["digits"]["state"] == "UNAVAILABLE"
    assert httpx.get(f"{digits_pod}/v2/health/ready").status_code == 200


def test_the_operator_sets_the_limits_on_the_command_line(
    demo_repository: Path, tmp_path: Path
) -> None:
    root = tmp_path / "repository"
    shutil.copytree(demo_repository / "digits", root / "digits")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["model-server", "--model-repository", str(root), "--port", str(port)]
    args += ["--enable-model-control", "--max-override-batch-size", "8"]
    with bazaar_process(args, tmp_path / "server.log", f"{url}/v2/health/ready"):
        refused = _load(url, "digits", '{"max_batch_size": 16}')
        assert refused.status_code == 400
        assert "max_batch_size: 16 is over this pod's limit of 8" in refused.json()["error"]
        assert _load(url, "digits", '{"max_batch_size": 8}').status_code == 200
