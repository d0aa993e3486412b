"""Cache affinity with real paging pods: two ``bazaar model-server --memory-budget`` processes
that serve the same models and hold only some; the catalog and dispatcher in process in
front of them. A model's batches go to the pod that holds it, and spread to the other (which
loads it) only under a backlog."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.catalog import ModelCatalog
from gateway.client import HttpModelClient
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.router import EndpointPool
from tests.support import bazaar_process, eventually, free_port

MODELS = [f"d{i}" for i in range(1, 5)]
BUDGET_BYTES = 4_000_000
"""About three digits classifiers (1.2 MB each; the first load in a process is larger)."""
BATCH_ROWS = 64
"""The digits classifier's max_batch_size."""


@pytest.fixture
def pods(demo_repository: Path, tmp_path: Path) -> Iterator[list[str]]:
    """Two paging pods serving d1..d4, copies of the digits classifier; d1 is paged in on the
    first only."""
    root = tmp_path / "repository"
    for name in MODELS:
        shutil.copytree(demo_repository / "digits", root / name)
    urls = []
    with contextlib.ExitStack() as stack:
        for i in range(2):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            args = ["model-server", "--model-repository", str(root), "--port", str(port)]
            args += ["--memory-budget", str(BUDGET_BYTES)]
            stack.enter_context(
                bazaar_process(args, tmp_path / f"pod{i}.log", f"{url}/v2/health/ready")
            )
            urls.append(url)
        with httpx.Client(timeout=30) as http:
            # The start-up sweep leaves the last models in: d1 is evicted on both.
            assert [_loaded(http, url) for url in urls] == [False, False]
            body = {"inputs": [_input(1)]}
            assert http.post(f"{urls[0]}/v2/models/d1/infer", json=body).status_code == 200
            assert [_loaded(http, url) for url in urls] == [True, False]
        yield urls


@pytest.fixture
async def pool(pods: list[str]) -> AsyncIterator[tuple[ModelCatalog, EndpointPool]]:
    """The catalog serving d1 from both pods, once it has read which one holds it."""
    client = HttpModelClient()
    catalog = ModelCatalog(
        client, GatewayMetrics(CollectorRegistry()), GatewayConfig(), refresh_s=0.1
    )
    catalog.set_endpoints("d1", pods)
    await eventually(lambda: "d1" in catalog.models, 10.0, "the gateway to learn d1")
    pool = catalog.models["d1"].dispatcher.pool
    await eventually(
        lambda: [(e.url, e.cold) for e in pool.endpoints] == [(pods[0], False), (pods[1], True)],
        10.0,
        "the gateway to read that only the first pod holds d1",
    )
    yield catalog, pool
    await catalog.close()
    await client.close()


def _input(rows: int) -> dict[str, object]:
    return {"name": "input", "shape": [rows, 64], "datatype": "FP32", "data": [8.0] * rows * 64}


def _loaded(http: httpx.Client, url: str) -> bool:
    answer = http.get(f"{url}/v2/models/d1/ready")
    assert answer.status_code == 200, answer.text
    return bool(answer.json()["loaded"])


async def _d1_counts(url: str) -> tuple[float, float]:
    """The pod's successful d1 requests, and its loads of d1."""
    async with httpx.AsyncClient(timeout=30) as http:
        text = (await http.get(f"{url}/metrics")).text
    requests = loads = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != "d1":
                continue
            if sample.name == "bazaar_model_inference_requests_total":
                requests += sample.value if sample.labels["outcome"] == "success" else 0
            elif sample.name == "bazaar_model_load_seconds_count":
                loads = sample.value
    return requests, loads


def _rows(rows: int) -> dict[str, np.ndarray]:
    return {"input": np.full((rows, 64), 8.0, dtype=np.float32)}


async def test_a_models_batches_go_to_the_pod_holding_it_while_it_is_not_backlogged(
    pods: list[str], pool: tuple[ModelCatalog, EndpointPool]
) -> None:
    catalog, _ = pool
    dispatcher = catalog.models["d1"].dispatcher
    before = await asyncio.gather(*(_d1_counts(url) for url in pods))
    for _ in range(10):  # one at a time: the pod holding d1 is never busy
        outputs = await dispatcher.submit(_rows(1), 1)
        assert outputs["label"].shape == (1,)
    after = await asyncio.gather(*(_d1_counts(url) for url in pods))
    assert after[0] == (before[0][0] + 10, before[0][1])
    assert after[1] == before[1], "the pod that does not hold d1 got a batch of it"


async def test_under_a_backlog_a_second_pod_takes_the_model_and_loads_it(
    pods: list[str], pool: tuple[ModelCatalog, EndpointPool]
) -> None:
    catalog, endpoints = pool
    dispatcher = catalog.models["d1"].dispatcher
    before = await asyncio.gather(*(_d1_counts(url) for url in pods))
    # Four full batches at once, before the collector runs: two fill the first pod's slots,
    # and the two queued behind them are a full round for it, so the third goes to the
    # second pod, which pages d1 in for it.
    futures = [dispatcher.submit(_rows(BATCH_ROWS), BATCH_ROWS) for _ in range(4)]
    answers = await asyncio.gather(*futures)
    assert all(outputs["label"].shape == (BATCH_ROWS,) for outputs in answers)
    after = await asyncio.gather(*(_d1_counts(url) for url in pods))
    assert after[1][0] - before[1][0] >= 1, "no batch of d1 went to the second pod"
    assert after[1][1] == before[1][1] + 1, "the second pod did not load d1"
    assert sum(a[0] - b[0] for a, b in zip(after, before, strict=True)) == 4
    # Both hold it now (a re-read that began during the page-in may say otherwise for one
    # round).
    await eventually(
        lambda: not any(e.cold for e in endpoints.endpoints), 10.0, "both pods to hold d1"
    )
