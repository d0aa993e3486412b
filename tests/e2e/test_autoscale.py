"""``bazaar serve`` autoscales its workers: up under a burst, back down after the window."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from protocol.codec import InferenceRequest, encode_request
from tests.support import bazaar_process, free_port, models_ready, post_until, wait_until


@pytest.fixture(scope="module")
def wide_repository(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wide-repository")
    shutil.copytree(demo_repository / "mlp_wide", root / "mlp_wide")
    return root


def _workers(url: str) -> tuple[int, int]:
    """(endpoints, ready endpoints) of mlp_wide, from the gateway's /stats."""
    stats = httpx.get(f"{url}/stats", timeout=5).json()["models"].get("mlp_wide", {})
    return int(stats.get("endpoints", 0)), int(stats.get("ready_endpoints", 0))


def _serve(repository: Path, *options: str) -> tuple[str, list[str]]:
    """The URL and arguments of a ``bazaar serve`` on a free port."""
    port = free_port()
    args = ["serve", "--model-repository", str(repository), "--port", str(port), *options]
    return f"http://127.0.0.1:{port}", args


def test_a_burst_adds_workers_and_the_quiet_after_it_removes_them(
    wide_repository: Path, tmp_path: Path
) -> None:
    # At most two workers: the way back down is then one step, and each step waits for the
    # ready count to have held longer than the signals may lag (about 17 s, docs/autoscaling.md).
    url, args = _serve(
        wide_repository,
        "--workers-per-model",
        "1",
        "--max-workers-per-model",
        "2",
        "--scale-down-window",
        "5",
    )
    with bazaar_process(args, tmp_path / "serve.log", models_ready(url, ["mlp_wide"])):
        assert _workers(url) == (1, 1)
        statuses = post_until(
            f"{url}/v2/models/mlp_wide/infer",
            np.random.default_rng(1).standard_normal((32, 1024), dtype=np.float32),
            12,
            lambda: _workers(url)[1] >= 2,
            90,
            "a second worker under the burst",
        )
        wait_until(lambda: _workers(url) == (1, 1), 90, "back to one worker after the window")
        log = (tmp_path / "serve.log").read_text()
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert "scale_up" in log or "panic" in log
    assert "scale_down" in log


def _version_workers(url: str, version: str) -> tuple[int, int]:
    """(endpoints, ready endpoints) of one version of mlp_wide, from the gateway's /stats."""
    stats = httpx.get(f"{url}/stats", timeout=5).json()["models"].get("mlp_wide", {})
    of_version = (stats.get("versions") or {}).get(version, {})
    return int(of_version.get("endpoints", 0)), int(of_version.get("ready_endpoints", 0))


SHADOWED = 'traffic: {weights: {"1": 100}, shadow: {version: "2", share: 1.0}}\n'


@pytest.mark.parametrize(
    ("traffic", "path", "stays"),
    [
        ("", "/v2/models/mlp_wide/versions/2/infer", "1"),  # version 2's requests alone
        (SHADOWED, "/v2/models/mlp_wide/infer", None),  # version 1's, all shadowed to 2
    ],
    ids=["requests", "shadowed"],
)
def test_each_version_is_its_own_scale_target_sized_on_its_own_traffic(
    wide_repository: Path, tmp_path: Path, traffic: str, path: str, stays: str | None
) -> None:
    """mlp_wide at versions 1 and 2 (the same network twice), one worker each. A burst on
    version 2 alone gives version 2 more workers (``mlp_wide@2``) and version 1 none; a
    burst on version 1 shadowed to version 2 grows version 2 too: the rows shadowed to a
    version are its work."""
    root = tmp_path / "two-versions"
    shutil.copytree(wide_repository / "mlp_wide", root / "mlp_wide")
    shutil.copytree(root / "mlp_wide" / "1", root / "mlp_wide" / "2")
    with (root / "mlp_wide" / "config.yaml").open("a") as config:
        config.write("version_policy: {all: true}\n" + traffic)
    url, args = _serve(root, "--workers-per-model", "1", "--max-workers-per-model", "3")
    rows = np.random.default_rng(2).standard_normal((32, 1024), dtype=np.float32)
    body, header_length = encode_request(
        InferenceRequest(
            id=None, parameters={}, inputs={"input": rows}, outputs=None, binary_output=True
        )
    )
    headers = {"Inference-Header-Content-Length": str(header_length)}
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                response = http.post(f"{url}{path}", content=body, headers=headers)
                assert response.status_code == 200, response.text

    with bazaar_process(args, tmp_path / "serve.log", models_ready(url, ["mlp_wide"])):
        wait_until(
            lambda: _version_workers(url, "1") == _version_workers(url, "2") == (1, 1),
            60,
            "one worker per version",
        )
        with ThreadPoolExecutor(12) as pool:
            clients = [pool.submit(client) for _ in range(12)]
            try:
                wait_until(lambda: _version_workers(url, "2")[1] >= 2, 90, "version 2 to grow")
                if stays is not None:
                    assert _version_workers(url, stays) == (1, 1)
            finally:
                stop.set()
            for future in clients:
                future.result(timeout=120)
        log = (tmp_path / "serve.log").read_text()
    assert "started mlp_wide@1 worker 1" in log
    assert "started mlp_wide@2 worker 2" in log
    if stays is not None:
        assert f"started mlp_wide@{stays} worker 2" not in log


def test_an_idle_model_goes_to_zero_and_its_next_request_brings_a_worker_back(
    wide_repository: Path, tmp_path: Path
) -> None:
    url, args = _serve(wide_repository, "--scale-to-zero-after", "2", "--scale-down-window", "2")
    rows = np.zeros((1, 1024), dtype=np.float32)
    body = {
        "inputs": [
            {"name": "input", "shape": [1, 1024], "datatype": "FP32", "data": rows.ravel().tolist()}
        ]
    }
    # Ready is the gateway's own health, not the model's: with two seconds to zero, a loaded
    # machine may scale the worker away before the gateway has learned the model, and the
    # request below must be held and answered either way.
    with bazaar_process(args, tmp_path / "serve.log", f"{url}/v2/health/ready"):
        wait_until(lambda: _workers(url) == (0, 0), 60, "mlp_wide to scale to zero")
        # Held in the gateway's queue while the autoscaler starts a worker, then answered.
        response = httpx.post(f"{url}/v2/models/mlp_wide/infer", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["shape"] == [1, 1024]
        assert _workers(url)[1] == 1
