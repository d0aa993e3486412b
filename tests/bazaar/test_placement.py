"""Small models share ``bazaar serve`` workers, the gateway routes each model only to the
workers that hold it, and a busy model moves to a worker of its own."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bazaar.placement import SESSION_BYTES, busy_alone, estimated_bytes, place
from models.repository import ModelRepository
from tests.models.test_paging import SLOW_WIDTH, _slow
from tests.support import bazaar_process, free_port, models_ready, post_until, wait_until

DIGITS = ("a", "b", "c", "d")


def test_small_models_share_and_a_large_one_is_alone() -> None:
    sizes = {"big": 90, "a": 30, "b": 30, "c": 30, "d": 20, "huge": 500}
    workers = place(sizes, 100)
    assert workers == [("huge",), ("big",), ("a", "b", "c"), ("d",)]
    assert sorted(m for w in workers for m in w) == sorted(sizes)  # each exactly once
    assert place({}, 100) == []


def test_a_models_estimate_is_its_served_files_and_a_session_each(demo_repository: Path) -> None:
    repository = ModelRepository(demo_repository)
    onnx_file = demo_repository / "mlp" / "1" / "model.onnx"
    assert estimated_bytes(repository, "mlp") == SESSION_BYTES + onnx_file.stat().st_size


def test_each_model_is_routed_only_to_the_workers_that_hold_it(
    demo_repository: Path, tmp_path: Path
) -> None:
    root = tmp_path / "repository"
    shutil.copytree(demo_repository / "mlp", root / "mlp")  # 5 MB of weights: alone
    for name in DIGITS:
        shutil.copytree(demo_repository / "digits", root / name)
    worker_bytes = 2 * SESSION_BYTES + 100_000  # two digits classifiers to a worker
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [
        "serve",
        "--model-repository",
        str(root),
        "--port",
        str(port),
        "--grpc-port",
        "0",
        "--no-autoscale",
        "--worker-memory",
        str(worker_bytes),
    ]
    models = ["mlp", *DIGITS]
    with bazaar_process(args, tmp_path / "serve.log", models_ready(url, models)):
        digits_body = {
            "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [8] * 64}]
        }
        mlp_body = {
            "inputs": [{"name": "input", "shape": [1, 256], "datatype": "FP32", "data": [0] * 256}]
        }
        sent = Counter[str]()
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(5):
                for model in models:
                    body = mlp_body if model == "mlp" else digits_body
                    answer = client.post(f"/v2/models/{model}/infer", json=body)
                    assert answer.status_code == 200, (model, answer.text)
                    sent[model] += 1
            stats = client.get("/stats").json()["models"]
            exposition = client.get("/metrics/workers").text
            workers = {u for model in models for u in stats[model]["endpoint_urls"]}
            held = [
                sorted(
                    entry["name"]
                    for entry in client.post(
                        f"{u}/v2/repository/index", json={"ready": True}
                    ).json()
                )
                for u in workers
            ]
    urls = {model: stats[model]["endpoint_urls"] for model in models}
    assert len(urls["mlp"]) == 1 and urls["mlp"] != urls["a"]
    assert urls["a"] == urls["b"] and urls["c"] == urls["d"] and urls["a"] != urls["c"]
    served: dict[str, Counter[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "bazaar_model_inference_requests_total":
                worker = served.setdefault(sample.labels["worker"], Counter())
                worker[sample.labels["model"]] += int(sample.value)
    assert set(served) == {"mlp/1", "shared-1/1", "shared-2/1"}
    assert sum(served.values(), Counter()) == sent  # every request answered once
    assert set(served["shared-1/1"]) == {"a", "b"} and set(served["shared-2/1"]) == {"c", "d"}
    # Each worker holds exactly the models it was sent: a batch elsewhere could not be served.
    assert sorted(held) == [["a", "b"], ["c", "d"], ["mlp"]]


def test_a_shared_workers_group_is_autoscaled_on_its_models_demand_together(
    demo_repository: Path, tmp_path: Path
) -> None:
    # a and b share a worker. Idle, the group goes to zero as a model alone would; a request
    # for either is held until the group's worker is back, which only the group's demand
    # (a's queue counts for it) can ask for.
    root = tmp_path / "repository"
    for name in ("a", "b"):
        shutil.copytree(demo_repository / "digits", root / name)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--model-repository", str(root), "--port", str(port), "--grpc-port", "0"]
    args += ["--worker-memory", str(3 * SESSION_BYTES), "--scale-to-zero-after", "2"]
    args += ["--scale-down-window", "2"]
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [8] * 64}]}

    def endpoints() -> tuple[list[str], list[str]]:
        stats = httpx.get(f"{url}/stats", timeout=5).json()["models"]
        return stats["a"]["endpoint_urls"], stats["b"]["endpoint_urls"]

    log = tmp_path / "serve.log"
    # Ready is the gateway's own health: with two seconds to zero, a loaded machine may
    # scale the group away before its worker is ready, and the request below must be held
    # and answered either way.
    with bazaar_process(args, log, f"{url}/v2/health/ready"):
        wait_until(
            lambda: "model shared-1: to_zero 1 -> 0" in log.read_text(),
            60,
            "the shared worker to scale to zero",
        )
        assert endpoints() == ([], [])
        answer = httpx.post(f"{url}/v2/models/b/infer", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        again = endpoints()
        assert again[0] == again[1] and len(again[0]) == 1
    assert "model shared-1: from_zero 0 -> 1" in log.read_text()


def test_paging_workers_serve_more_models_than_they_hold(
    demo_repository: Path, tmp_path: Path
) -> None:
    # Eight digits classifiers packed into one worker that holds about three at once.
    names = [f"m{i}" for i in range(8)]
    root = tmp_path / "repository"
    for name in names:
        shutil.copytree(demo_repository / "digits", root / name)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--model-repository", str(root), "--port", str(port), "--grpc-port", "0"]
    args += ["--no-autoscale", "--worker-memory", str(9 * SESSION_BYTES)]
    args += ["--memory-budget", "4000000"]
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [8] * 64}]}
    with (
        bazaar_process(args, tmp_path / "serve.log", models_ready(url, names)),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        stats = client.get("/stats").json()["models"]
        [worker] = {u for name in names for u in stats[name]["endpoint_urls"]}
        held = [
            e["name"]
            for e in client.post(f"{worker}/v2/repository/index").json()
            if e["state"] == "READY"
        ]
        for name in names:
            answer = client.post(f"/v2/models/{name}/infer", json=body)
            assert answer.status_code == 200, (name, answer.text)
        exposition = client.get("/metrics/workers").text
    assert 1 <= len(held) <= 3, held
    samples = [
        sample for family in text_string_to_metric_families(exposition) for sample in family.samples
    ]
    budgets = {s.value for s in samples if s.name == "bazaar_model_memory_budget_bytes"}
    assert budgets == {4_000_000}
    evictions = sum(s.value for s in samples if s.name == "bazaar_model_eviction_seconds_count")
    assert evictions >= len(names) - 3  # the start-up sweep's, and the requests' page-ins


def test_a_busy_model_of_a_shared_worker_moves_to_a_worker_of_its_own(
    demo_repository: Path, tmp_path: Path
) -> None:
    root = tmp_path / "repository"
    shutil.copytree(demo_repository / "digits", root / "digits")
    _slow(root, "slow", 64)  # 4 MB of weights: it shares a worker of 8 MB with digits
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--model-repository", str(root), "--port", str(port), "--grpc-port", "0"]
    args += ["--no-autoscale", "--worker-memory", "8000000"]

    def endpoints(model: str) -> list[str]:
        stats = httpx.get(f"{url}/stats", timeout=5).json()["models"]
        return list(stats[model]["endpoint_urls"])

    log = tmp_path / "serve.log"
    with bazaar_process(args, log, models_ready(url, ["digits", "slow"])):
        shared = endpoints("digits")
        assert endpoints("slow") == shared and len(shared) == 1
        statuses = post_until(
            f"{url}/v2/models/slow/infer",
            np.ones((64, SLOW_WIDTH), dtype=np.float32),
            3,
            lambda: endpoints("slow") not in ([], shared),
            120,
            "slow's own worker",
        )
        assert endpoints("digits") == shared  # the others stay where they were
        digits = {
            "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [8] * 64}]
        }
        assert (
            httpx.post(f"{url}/v2/models/digits/infer", json=digits, timeout=30).status_code == 200
        )
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert "slow is busy for" in log.read_text()


def test_a_model_busy_for_half_its_shared_workers_time_goes_alone() -> None:
    group = ("a", "b", "c")
    assert busy_alone(group, {"a": 0.1, "b": 0.2}) == []
    assert busy_alone(group, {"a": 0.5, "b": 0.2}) == ["a"]
    assert busy_alone(group, {"a": 0.6, "b": 0.9, "c": 0.1}) == ["b", "a"]
    # The group keeps one model, the least busy.
    assert busy_alone(group, {"a": 0.6, "b": 0.9, "c": 0.7}) == ["b", "c"]
    assert busy_alone(("a",), {"a": 1.0}) == []
