"""Every version a pod serves is routable at the gateway, with its own endpoints, queue and
batches: two real ``bazaar model-server`` processes, one serving version 1 of ``scale`` and
the other versions 1 and 2 (``tests.gateway.scale``: an answer says which version computed
it), the gateway app in process in front of them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import EXTENSIONS, SERVER_NAME, create_app
from gateway.catalog import ModelCatalog
from gateway.client import HttpModelClient
from gateway.config import GatewayConfig
from gateway.grpc import GatewayGrpcBackend
from gateway.inference import GatewayInference
from gateway.metrics import GatewayMetrics
from gateway.readings import default_version, reconcile_versions
from protocol.grpc import codec
from protocol.grpc import grpc_service_pb2 as pb
from tests.gateway.scale import WIDTH, answered, body
from tests.gateway.test_catalog import _metadata, _reading
from tests.support import eventually

REFRESH_S = 0.1


@pytest.fixture
async def gateway(scale_pods: list[str]) -> AsyncIterator[tuple[httpx.AsyncClient, ModelCatalog]]:
    client = HttpModelClient()
    catalog = ModelCatalog(
        client, GatewayMetrics(CollectorRegistry()), GatewayConfig(), refresh_s=REFRESH_S
    )
    transport = httpx.ASGITransport(app=create_app(catalog))
    http = httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=30)
    catalog.set_endpoints("scale", scale_pods)
    await eventually(
        lambda: _pooled(catalog) == {"1": scale_pods, "2": scale_pods[1:]},
        10.0,
        "both versions' pools",
    )
    yield http, catalog
    await http.aclose()
    await catalog.close()
    await client.close()


def _pooled(catalog: ModelCatalog) -> dict[str, list[str]]:
    return {
        version: [endpoint.url for endpoint in served.dispatcher.pool.endpoints]
        for version, served in catalog.versions.get("scale", {}).items()
    }


async def test_a_version_a_pod_serves_is_routable_and_unversioned_requests_get_the_highest(
    gateway: tuple[httpx.AsyncClient, ModelCatalog],
) -> None:
    http, _ = gateway
    one = await http.post("/v2/models/scale/versions/1/infer", json=body(3.0))
    assert answered(one) == [3.0]
    assert one.json()["model_version"] == "1"
    two = await http.post("/v2/models/scale/versions/2/infer", json=body(3.0))
    assert (answered(two), two.json()["model_version"]) == ([6.0], "2")
    default = await http.post("/v2/models/scale/infer", json=body(3.0))
    assert (answered(default), default.json()["model_version"]) == ([6.0], "2")
    unknown = await http.post("/v2/models/scale/versions/3/infer", json=body(3.0))
    assert unknown.status_code == 404
    assert "version '3'" in unknown.json()["error"]


async def test_metadata_readiness_and_index_per_version(
    gateway: tuple[httpx.AsyncClient, ModelCatalog],
) -> None:
    http, _ = gateway
    model = (await http.get("/v2/models/scale")).json()
    assert model["versions"] == ["1", "2"]
    one = await http.get("/v2/models/scale/versions/1")
    assert one.json()["versions"] == ["1"]
    assert one.json()["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, WIDTH]}]
    for path in ("/v2/models/scale/versions/1/ready", "/v2/models/scale/versions/2/ready"):
        assert (await http.get(path)).status_code == 200
    assert (await http.get("/v2/models/scale/versions/3/ready")).status_code == 404
    assert (await http.get("/v2/models/scale/versions/3")).status_code == 404
    index = (await http.post("/v2/repository/index", json={})).json()
    assert index == [
        {"name": "scale", "state": "READY", "version": "1"},
        {"name": "scale", "state": "READY", "version": "2"},
    ]


async def test_versions_never_share_a_batch_and_are_counted_apart(
    gateway: tuple[httpx.AsyncClient, ModelCatalog], scale_pods: list[str]
) -> None:
    http, _ = gateway
    versions = ["1", "2"] * 40
    answers = await asyncio.gather(
        *(
            http.post(f"/v2/models/scale/versions/{version}/infer", json=body(float(i)))
            for i, version in enumerate(versions)
        )
    )
    # A batch of both versions would have answered some rows with the other's factor.
    assert [answered(a) for a in answers] == [[i * float(v)] for i, v in enumerate(versions)]

    stats = (await http.get("/stats")).json()["models"]["scale"]
    assert stats["default_version"] == "2"
    assert {v: s["admitted"] for v, s in stats["versions"].items()} == {"1": 40, "2": 40}
    assert stats["versions"]["2"]["endpoint_urls"] == scale_pods[1:]
    assert (stats["admitted"], stats["endpoints"]) == (80, 2)

    metrics = (await http.get("/metrics")).text
    successes = {
        sample.labels["version"]: sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "bazaar_gateway_requests_total" and sample.labels["outcome"] == "success"
    }
    assert successes == {"1": 40.0, "2": 40.0}
    assert 'bazaar_gateway_queue_depth{model="scale",version="1"} 0.0' in metrics


async def test_grpc_routes_by_model_version(
    gateway: tuple[httpx.AsyncClient, ModelCatalog],
) -> None:
    _, catalog = gateway
    backend = GatewayGrpcBackend(GatewayInference(catalog), SERVER_NAME, EXTENSIONS)
    x = {"x": np.full((1, WIDTH), 3.0, dtype=np.float32)}
    for version, expected in (("1", 3.0), ("2", 6.0), ("", 6.0)):
        message = codec.encode_request("scale", x, {})
        message.model_version = version
        response = await backend.infer(message, None, None, {})
        assert isinstance(response, pb.ModelInferResponse)
        assert response.model_version == (version or "2")
        assert codec.decode_response(response)["y"][0, 0] == expected
    assert backend.model_metadata("scale", None)["versions"] == ["1", "2"]
    assert backend.model_ready("scale", "1")


def test_reconcile_versions_gives_each_version_the_endpoints_that_serve_it() -> None:
    v1, v2 = _metadata("1"), _metadata("2", width=32)
    readings = {
        "a": {"1": _reading(v1)},
        "b": {"1": _reading(_metadata("1", max_batch_size=8)), "2": _reading(v2)},
        "c": "unread",
    }
    results = reconcile_versions({"1": v1}, readings, {"1": ["a", "c"]})
    assert {version: r.urls for version, r in results.items()} == {"1": ["a", "b", "c"], "2": ["b"]}
    assert results["1"].max_batch_size == 8
    assert results["2"].metadata == v2


def test_the_default_version_is_the_highest_with_endpoints() -> None:
    assert default_version({"1": ["a"], "2": ["b"], "10": ["c"]}) == "10"
    assert default_version({"1": ["a"], "2": []}) == "1"
    assert default_version({"1": [], "2": []}) == "2"
