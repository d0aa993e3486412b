"""The catalog follows what its pods serve: two real ``bazaar model-server`` processes whose
models are unloaded and reloaded with another config over the repository API, the gateway
app in process in front of them."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.catalog import ModelCatalog
from gateway.client import HttpModelClient
from gateway.config import GatewayConfig
from gateway.dispatcher import BatchPolicy
from gateway.metrics import GatewayMetrics
from gateway.readings import NOT_SERVING, UNREAD, Reading, reconcile
from protocol.schema import ModelMetadata, TensorSpec
from tests.support import bazaar_process, eventually, free_port

REFRESH_S = 0.1


@pytest.fixture
def pods(demo_repository: Path, tmp_path: Path) -> Iterator[list[str]]:
    """Two pods serving ``digits``, with model control."""
    root = tmp_path / "repository"
    shutil.copytree(demo_repository / "digits", root / "digits")
    urls = []
    with contextlib.ExitStack() as stack:
        for i in range(2):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            args = ["model-server", "--model-repository", str(root), "--port", str(port)]
            args.append("--enable-model-control")
            log = tmp_path / f"pod{i}.log"
            stack.enter_context(bazaar_process(args, log, f"{url}/v2/health/ready"))
            urls.append(url)
        yield urls


@pytest.fixture
async def gateway(pods: list[str]) -> AsyncIterator[tuple[httpx.AsyncClient, ModelCatalog]]:
    client = HttpModelClient()
    catalog = ModelCatalog(
        client, GatewayMetrics(CollectorRegistry()), GatewayConfig(), refresh_s=REFRESH_S
    )
    transport = httpx.ASGITransport(app=create_app(catalog))
    http = httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=30)
    catalog.set_endpoints("digits", pods)
    await eventually(lambda: "digits" in catalog.models, 10.0, "the gateway to learn digits")
    yield http, catalog
    await http.aclose()
    await catalog.close()
    await client.close()


def _pooled(catalog: ModelCatalog) -> list[str]:
    return [e.url for e in catalog.models["digits"].dispatcher.pool.endpoints]


def _body(rows: int) -> dict[str, object]:
    return {
        "inputs": [
            {"name": "input", "shape": [rows, 64], "datatype": "FP32", "data": [0.0] * rows * 64}
        ]
    }


async def _control(pod: str, action: str, config: str | None = None) -> None:
    body = {} if config is None else {"parameters": {"config": config}}
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(f"{pod}/v2/repository/models/digits/{action}", json=body)
    assert response.status_code == 200, response.text


async def test_a_pod_that_unloads_the_model_leaves_its_endpoints_and_rejoins(
    gateway: tuple[httpx.AsyncClient, ModelCatalog], pods: list[str]
) -> None:
    http, catalog = gateway
    first, second = pods
    await _control(first, "unload")
    await eventually(lambda: _pooled(catalog) == [second], 5.0, "the pod to leave")
    answers = await asyncio.gather(
        *(http.post("/v2/models/digits/infer", json=_body(1)) for _ in range(20))
    )
    assert [a.status_code for a in answers] == [200] * 20
    endpoint = catalog.models["digits"].dispatcher.pool.endpoints[0]
    assert (endpoint.failures, endpoint.ejected) == (0, False)

    # Reloaded with a smaller max_batch_size: it rejoins, and the gateway batches to fit it.
    await _control(first, "load", '{"max_batch_size": 4}')
    await eventually(lambda: _pooled(catalog) == pods, 5.0, "the pod to rejoin")
    assert catalog.models["digits"].metadata.max_batch_size == 4
    assert catalog.models["digits"].dispatcher.policy.max_batch_size == 4
    too_big = await http.post("/v2/models/digits/infer", json=_body(8))
    assert too_big.status_code == 400
    assert "4" in too_big.json()["error"]
    answers = await asyncio.gather(
        *(http.post("/v2/models/digits/infer", json=_body(4)) for _ in range(20))
    )
    assert [a.status_code for a in answers] == [200] * 20


async def test_requests_wait_while_no_pod_serves_the_model(
    gateway: tuple[httpx.AsyncClient, ModelCatalog], pods: list[str]
) -> None:
    http, catalog = gateway
    for pod in pods:
        await _control(pod, "unload")
    await eventually(lambda: _pooled(catalog) == [], 5.0, "both pods to leave")
    waiting = asyncio.create_task(http.post("/v2/models/digits/infer", json=_body(1)))
    await asyncio.sleep(5 * REFRESH_S)
    assert not waiting.done()
    await _control(pods[1], "load")
    response = await waiting
    assert response.status_code == 200, response.text


def _metadata(version: str, width: int = 64, max_batch_size: int = 64) -> ModelMetadata:
    inputs = (TensorSpec("input", "FP32", (-1, width)),)
    outputs = (TensorSpec("label", "INT64", (-1,)),)
    return ModelMetadata("m", version, "onnx", inputs, outputs, max_batch_size)


def _reading(metadata: ModelMetadata) -> Reading:
    return Reading(metadata, BatchPolicy(max_batch_size=metadata.max_batch_size))


def test_reconcile_keeps_the_served_tensors_until_no_pod_serves_them() -> None:
    served, reloaded = _metadata("1"), _metadata("1", width=32)
    readings = {
        "a": _reading(served),
        "b": _reading(_metadata("1", max_batch_size=8)),
        "c": _reading(reloaded),
    }
    result = reconcile(served, readings, ["a", "b", "c"])
    assert result.urls == ["a", "b"]
    assert result.metadata == _metadata("1", max_batch_size=8)

    result = reconcile(served, {"c": _reading(reloaded), "d": NOT_SERVING}, ["a", "b", "c", "d"])
    assert (result.urls, result.metadata) == (["c"], reloaded)


def test_reconcile_keeps_an_unread_endpoint_where_it_was() -> None:
    v1 = _metadata("1")
    readings = {"a": UNREAD, "b": UNREAD, "c": NOT_SERVING}
    result = reconcile(v1, readings, ["a", "c"])
    assert (result.urls, result.metadata) == (["a"], v1)
