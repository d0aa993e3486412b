"""The gateway's ``/openapi.json``: exactly its route table, and each model it has learned.

The routes are enumerated from ``routes(catalog)`` and ``INFER_PATHS``, the ones the app
serves, so a route added there and missing from the document fails here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import schemathesis
from prometheus_client import CollectorRegistry
from starlette.routing import Route

from gateway.app import create_app, routes
from gateway.catalog import ModelCatalog
from gateway.client import HttpModelClient
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from protocol.fastpath import INFER_PATHS, infer_target
from protocol.openapi import MODEL_PATH, OPERATIONS
from tests.support import eventually


@pytest.fixture
async def catalog() -> AsyncIterator[ModelCatalog]:
    client = HttpModelClient()
    catalog = ModelCatalog(client, GatewayMetrics(CollectorRegistry()), GatewayConfig())
    yield catalog
    await catalog.close()
    await client.close()


async def openapi(catalog: ModelCatalog) -> dict[str, Any]:
    transport = httpx.ASGITransport(app=create_app(catalog))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
        response = await http.get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def route_table(catalog: ModelCatalog) -> dict[str, set[str]]:
    """Every path the gateway serves and its methods (HEAD is GET's, without a body)."""
    table: dict[str, set[str]] = {path: {"POST"} for path in INFER_PATHS}
    for route in routes(catalog):
        assert isinstance(route, Route), f"{route!r} is no Route: the document misses it"
        assert route.methods is not None
        table.setdefault(route.path, set()).update(route.methods - {"HEAD"})
    return table


def methods(item: dict[str, Any]) -> set[str]:
    return {key.upper() for key in item if key != "parameters"}


async def test_the_document_is_the_route_table_and_valid(catalog: ModelCatalog) -> None:
    document = await openapi(catalog)
    schemathesis.openapi.from_dict(document).validate()
    paths = document["paths"]
    assert {path: methods(item) for path, item in paths.items()} == route_table(catalog)
    for path in route_table(catalog):
        if path.startswith("/v2"):
            assert path in OPERATIONS or path in INFER_PATHS, f"{path} is not described"


async def test_each_learned_model_is_at_its_own_paths(
    catalog: ModelCatalog, model_server: str
) -> None:
    catalog.set_endpoints("mlp", [model_server])
    await eventually(lambda: "mlp" in catalog.models, 10.0, "the gateway to learn mlp")
    paths = (await openapi(catalog))["paths"]
    table = route_table(catalog)
    per_model = {path for path in table if path.startswith(MODEL_PATH)}
    concrete = {path for path in paths if path not in table}
    assert concrete == {
        path.replace("{model}", "mlp").replace("{version}", "1") for path in per_model
    }
    for path in concrete:
        served = [r for r in routes(catalog) if isinstance(r, Route) and r.path_regex.match(path)]
        target = infer_target(path)
        assert len(served) == 1 or (target is not None and target[0] == "mlp"), path
    infer = paths["/v2/models/mlp/infer"]["post"]
    request = infer["requestBody"]["content"]["application/json"]
    tensor = request["schema"]["properties"]["inputs"]["items"]["oneOf"][0]["properties"]
    assert (tensor["name"], tensor["datatype"]) == ({"const": "input"}, {"const": "FP32"})
    assert tensor["shape"]["prefixItems"][1] == {"const": 256}
    assert request["example"]["inputs"][0]["shape"] == [1, 256]
    assert "application/octet-stream" in infer["requestBody"]["content"]
