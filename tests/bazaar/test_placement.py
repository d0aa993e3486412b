"""Small models share ``bazaar serve`` workers, and the gateway routes each model only to the
workers that hold it."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bazaar.placement import SESSION_BYTES, estimated_bytes, place
from models.repository import ModelRepository
from tests.support import bazaar_process, free_port, models_ready

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
