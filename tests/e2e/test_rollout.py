"""A rollout and a rollback as a user runs them: ``bazaar serve`` over the demo's digits and
mlp at versions 1 and 2 (``bazaar models build-demo --model-version 2``), each config asking
to shadow and roll out version 2. Digits' candidate agrees with version 1 on most rows and
reaches 100 %; mlp's agrees on few and is rolled back at its first step, by its reason."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from models.demo import build_demo_repository, digits_samples
from tests.support import bazaar_process, free_port, models_ready

POLICY = """\
version_policy: {all: true}
traffic:
  weights: {"1": 100}
  shadow: {version: "2", share: 1.0, compare: top1}
  rollout: {version: "2", steps: [20, 100], step_s: 0, min_requests: 20, min_agreement: 0.9}
"""


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("two-versions")
    for version in (1, 2):
        build_demo_repository(root, version)
    shutil.rmtree(root / "mlp_wide")  # not needed here, and slow to load
    for model in ("digits", "mlp"):
        with (root / model / "config.yaml").open("a") as config:
            config.write(POLICY)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ["serve", "--model-repository", str(root), "--port", str(port), "--no-autoscale"]
    with bazaar_process(args, log, models_ready(url, ["digits", "mlp"])):
        yield url


def rollout(http: httpx.Client, model: str) -> dict[str, Any]:
    return dict(http.get("/stats").json()["models"][model]["rollout"])


def infer(http: httpx.Client, model: str, row: np.ndarray) -> str:
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, row.size], "data": row.tolist()}
    answer = http.post(f"/v2/models/{model}/infer", json={"inputs": [tensor]})
    answer.raise_for_status()
    return str(answer.json()["model_version"])


def test_a_good_candidate_is_rolled_out_and_a_disagreeing_one_rolled_back(serve: str) -> None:
    images, _ = digits_samples(360)
    rows = np.random.default_rng(0).standard_normal((360, 256), dtype=np.float32)
    with httpx.Client(base_url=serve, timeout=30) as http, ThreadPoolExecutor(8) as pool:
        for start in range(0, 3600, 40):
            states = {rollout(http, model)["state"] for model in ("digits", "mlp")}
            if "running" not in states:
                break
            batch = [i % 360 for i in range(start, start + 40)]
            list(pool.map(lambda i: infer(http, "digits", images[i]), batch))
            list(pool.map(lambda i: infer(http, "mlp", rows[i]), batch))
        digits, mlp = rollout(http, "digits"), rollout(http, "mlp")
        assert {infer(http, "digits", images[0]) for _ in range(10)} == {"2"}
        assert {infer(http, "mlp", rows[0]) for _ in range(10)} == {"1"}
        metrics = http.get("/metrics").text
    assert (digits["state"], digits["percent"]) == ("done", 100.0)
    assert (mlp["state"], mlp["step"], mlp["percent"], mlp["reason"]) == (
        "rolled_back",
        1,
        0.0,
        "agreement",
    )
    assert 'bazaar_gateway_rollbacks_total{model="mlp",reason="agreement",version="2"} 1.0' in (
        metrics
    )
