"""Bodies of every hostile shape sent to the gateway's app, in front of a real pod: each is
answered with a JSON error that names the problem, none reaches the pod, and the normal
request after each is served.

Before the codec bounded its decode, these shapes took 13x to 49x their size in memory and
seconds each (a 252 MiB JSON body took the gateway to 4.5 GB). The sizes here are a few MiB:
past the point where the codec estimates before parsing, and past the allowance. The codec's
own tests (``tests/protocol/test_budget.py``) take each shape apart.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.catalog import ModelCatalog
from gateway.client import HttpModelClient
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from loadtests.decodecost import CASES
from tests.gateway.test_app import json_body, mlp_rows, pod_inference_requests
from tests.support import eventually

SIZE = 8 * 1024 * 1024


@pytest.fixture
async def gateway(model_server: str) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway's app in process, with the pod as the endpoint of ``mlp``."""
    client = HttpModelClient()
    catalog = ModelCatalog(client, GatewayMetrics(CollectorRegistry()), GatewayConfig())
    app = create_app(catalog)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")
    catalog.set_endpoints("mlp", [model_server])
    await eventually(lambda: "mlp" in catalog.models, 10.0, "the gateway to learn mlp")
    yield http
    await http.aclose()
    await catalog.close()
    await client.close()


@pytest.fixture
async def pod(model_server: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=model_server, timeout=30) as client:
        yield client


def mlp_input(**fields: object) -> dict[str, object]:
    return {"name": "input", "datatype": "FP32", "shape": [1, 256], "data": [0.5] * 256} | fields


HOSTILE: dict[str, tuple[bytes, int | None, int, str]] = {
    **{
        name: (*CASES[name](SIZE), 413, r"^the JSON header \(.* would take more than the 64 MiB")
        for name in (
            "json_flat_short", "json_nested_rows", "json_nested_pixels", "json_many_inputs",
            "json_bytes_tiny", "json_parameters_deep", "json_parameters_wide", "json_unknown_key",
        )
    },
    "a million inputs after a repeated one": (
        orjson.dumps({"inputs": [mlp_input(), mlp_input(), *[3] * 1_000_000]}),
        None,
        400,
        "^input 'input' appears more than once$",
    ),
    "data nested deeper than its shape": (
        orjson.dumps({"inputs": [mlp_input(data=[[[0.5] * 256]])]}),
        None,
        400,
        r"^input 'input': 'data' nests deeper than shape \[1,256\]",
    ),
    "a shape of 100,000 dimensions": (
        orjson.dumps({"inputs": [mlp_input(shape=[1] * 100_000)]}),
        None,
        400,
        "^input 'input': 'shape' has 100000 dimensions, more than the 32",
    ),
    "binary claimed as JSON": (*CASES["binary_header_length_lies"](SIZE), 400, "not valid JSON"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_a_hostile_body_is_refused_in_json_and_normal_traffic_is_served(
    gateway: httpx.AsyncClient, pod: httpx.AsyncClient, case: str
) -> None:
    body, header_length, status, message = HOSTILE[case]
    headers = (
        {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
    )
    before = await pod_inference_requests(pod, "mlp")
    answer = await gateway.post("/v2/models/mlp/infer", content=body, headers=headers)
    assert answer.status_code == status, answer.text[:300]
    assert answer.headers["content-type"] == "application/json"
    assert answer.json().keys() == {"error"}
    assert re.search(message, answer.json()["error"]), answer.json()["error"][:300]
    assert await pod_inference_requests(pod, "mlp") == before
    normal = await gateway.post("/v2/models/mlp/infer", json=json_body(mlp_rows(1)))
    assert normal.status_code == 200
