"""How the catalog learns a model from any v2 upstream: fake upstreams on real sockets (a
Starlette app under uvicorn), the gateway app in process in front of them.

An upstream without ``/config`` (MLServer, KServe) is learned from its metadata; one whose
metadata declares no tensors, or that the endpoints file marks unvalidated, has its
requests passed through as sent; learning outlives any failure and recovers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.app import create_app
from gateway.catalog import ModelCatalog
from gateway.client import HttpModelClient
from gateway.config import GatewayConfig, ModelSettings
from gateway.metrics import GatewayMetrics
from protocol.codec import InferenceResponse, decode_request, encode_response
from protocol.errors import InvalidRequest
from protocol.schema import ModelMetadata
from tests.support import eventually, serve

DECLARED = {
    "name": "m",
    "versions": ["1"],
    "platform": "custom",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
}
UNDECLARED = {"name": "m", "versions": [], "platform": "", "inputs": [], "outputs": []}


@dataclass
class FakeUpstream:
    """A v2 server without ``/config`` unless given one. ``metadata`` is what ``GET
    /v2/models/m`` answers: JSON, or bytes as they are. Inference doubles ``x`` when the
    metadata declares it (a 400 naming what does not match), else echoes the body."""

    metadata: Any
    config: dict[str, Any] | None = None
    metadata_reads: int = 0
    received: list[tuple[bytes, Mapping[str, str]]] = field(default_factory=list)

    def app(self) -> Starlette:
        async def ready(request: Request) -> Response:
            return Response(status_code=200)

        async def metadata(request: Request) -> Response:
            self.metadata_reads += 1
            body = (
                self.metadata if isinstance(self.metadata, bytes) else orjson.dumps(self.metadata)
            )
            return Response(body, media_type="application/json")

        async def config(request: Request) -> Response:
            if self.config is None:
                return Response(b'{"detail":"Not Found"}', 404, media_type="application/json")
            return Response(orjson.dumps(self.config), media_type="application/json")

        async def infer(request: Request) -> Response:
            body = await request.body()
            self.received.append((body, dict(request.headers)))
            length = request.headers.get("inference-header-content-length")
            if not (isinstance(self.metadata, dict) and self.metadata["inputs"]):
                headers = {"inference-header-content-length": length} if length else {}
                return Response(body, media_type=request.headers["content-type"], headers=headers)
            declared = ModelMetadata.from_json(self.metadata)
            try:
                decoded = decode_request(body, int(length) if length else None, declared)
            except InvalidRequest as exc:
                return Response(orjson.dumps({"error": exc.message}), 400)
            outputs = {"y": decoded.inputs["x"] * 2}
            answer = InferenceResponse("m", "1", decoded.id, {}, outputs)
            encoded, header_length = encode_response(answer, None, decoded.binary_output)
            headers = (
                {}
                if header_length is None
                else {"inference-header-content-length": str(header_length)}
            )
            return Response(encoded, headers=headers)

        async def server(request: Request) -> Response:
            return Response(b'{"name": "fake", "extensions": ["binary_tensor_data"]}')

        return Starlette(
            routes=[
                Route("/v2", server),
                Route("/v2/models/m/ready", ready),
                Route("/v2/models/m/config", config),
                Route("/v2/models/m/infer", infer, methods=["POST"]),
                Route("/v2/models/m", metadata),
                # The gateway calls and probes a version the upstream names at its own path.
                Route("/v2/models/m/versions/1/ready", ready),
                Route("/v2/models/m/versions/1/infer", infer, methods=["POST"]),
            ]
        )


@contextlib.asynccontextmanager
async def gateway(
    models: Mapping[str, ModelSettings] | None = None,
) -> AsyncIterator[tuple[httpx.AsyncClient, ModelCatalog]]:
    client = HttpModelClient()
    config = GatewayConfig(models=models or {})
    catalog = ModelCatalog(
        client,
        GatewayMetrics(CollectorRegistry()),
        config,
        refresh_s=0.1,
        max_learn_backoff_s=0.1,
    )
    transport = httpx.ASGITransport(app=create_app(catalog))
    http = httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=30)
    try:
        yield http, catalog
    finally:
        await http.aclose()
        await catalog.close()
        await client.close()


async def learned(catalog: ModelCatalog, url: str) -> None:
    catalog.set_endpoints("m", [url])
    await eventually(lambda: "m" in catalog.models, 10.0, "the gateway to learn m")


def doubled(rows: list[list[float]]) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [len(rows), 2], "datatype": "FP32", "data": rows}]}


async def test_a_model_is_learned_from_its_metadata_alone_without_a_config_route() -> None:
    upstream = FakeUpstream(DECLARED)
    async with serve(upstream.app()) as url, gateway() as (http, catalog):
        await learned(catalog, url)
        served = catalog.models["m"]
        assert not served.passthrough
        assert served.dispatcher.policy.max_batch_size == 0  # nothing says it batches
        metadata = (await http.get("/v2/models/m")).json()
        assert [t["name"] for t in metadata["inputs"]] == ["x"]
        assert (await http.get("/v2/models/m/ready")).status_code == 200
        response = await http.post("/v2/models/m/infer", json=doubled([[1.0, 2.0]]))
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["data"] == [2.0, 4.0]
        wrong = await http.post("/v2/models/m/infer", json={"inputs": []})
        assert wrong.status_code == 400  # validated here, never sent
        assert len(upstream.received) == 1


@pytest.mark.parametrize(
    ("parameters", "settings", "max_batch_size"),
    [
        ({"max_batch_size": 3}, None, 3),
        ({"max_batch_size": 3}, ModelSettings(max_batch_size=8), 8),
        ({}, ModelSettings(max_batch_size=4), 4),
    ],
)
async def test_the_batch_limit_comes_from_the_endpoints_file_else_the_metadata(
    parameters: dict[str, int], settings: ModelSettings | None, max_batch_size: int
) -> None:
    upstream = FakeUpstream({**DECLARED, "parameters": parameters})
    models = {"m": settings} if settings else None
    async with serve(upstream.app()) as url, gateway(models) as (http, catalog):
        await learned(catalog, url)
        assert catalog.models["m"].dispatcher.policy.max_batch_size == max_batch_size
        response = await http.post("/v2/models/m/infer", json=doubled([[1.0, 2.0]] * 3))
        assert response.json()["outputs"][0]["data"] == [2.0, 4.0] * 3


async def test_a_model_without_declared_tensors_is_passed_through_as_sent() -> None:
    upstream = FakeUpstream(UNDECLARED)
    async with serve(upstream.app()) as url, gateway() as (http, catalog):
        await learned(catalog, url)
        assert catalog.models["m"].passthrough
        assert (await http.get("/v2/models/m/ready")).status_code == 200
        assert (await http.get("/v2/models/m")).json()["inputs"] == []

        anything = (
            b'{"id": "7", "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", '
            b'"data": ["hi"]}], "anything": "else"}'
        )
        response = await http.post(
            "/v2/models/m/infer", content=anything, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 200, response.text
        assert response.content == anything
        assert upstream.received[-1][0] == anything

        header = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "raw",
                        "shape": [4],
                        "datatype": "UINT8",
                        "parameters": {"binary_data_size": 4},
                    }
                ]
            }
        )
        binary = header + np.arange(4, dtype=np.uint8).tobytes()
        response = await http.post(
            "/v2/models/m/infer",
            content=binary,
            headers={
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(len(header)),
            },
        )
        assert response.status_code == 200, response.text
        assert response.content == binary
        assert response.headers["inference-header-content-length"] == str(len(header))
        sent = upstream.received[-1][1]
        assert sent["inference-header-content-length"] == str(len(header))
        assert sent["content-type"] == "application/octet-stream"

        # The gateway's own checks still apply: the schedule parameters are read.
        bad = await http.post("/v2/models/m/infer", json={"parameters": {"priority": -1}})
        assert bad.status_code == 400
        assert "priority" in bad.json()["error"]
        stats = catalog.stats()["m"]
        assert (stats["queued"], stats["inflight_batches"]) == (0, 0)

        # What the gateway knows of it: no tensors, no batching; one call per request.
        config = (await http.get("/v2/models/m/config")).json()
        assert (config["max_batch_size"], config["input"], config["output"]) == (0, [], [])
        (stat,) = (await http.get("/v2/models/m/stats")).json()["model_stats"]
        assert (stat["inference_count"], stat["execution_count"]) == (2, 2)
        assert stat["inference_stats"]["fail"]["count"] == 1
        assert [b["batch_size"] for b in stat["batch_stats"]] == [1]


async def test_a_model_the_endpoints_file_marks_unvalidated_is_passed_through() -> None:
    upstream = FakeUpstream(DECLARED)
    models = {"m": ModelSettings(validate=False)}
    async with serve(upstream.app()) as url, gateway(models) as (http, catalog):
        await learned(catalog, url)
        assert catalog.models["m"].passthrough
        assert catalog.models["m"].dispatcher.policy.max_batch_size == 0
        response = await http.post("/v2/models/m/infer", json=doubled([[1.0, 2.0]]))
        assert response.json()["outputs"][0]["data"] == [2.0, 4.0]
        # Unchecked here: the upstream's 400 is the client's answer, its message intact.
        wrong = await http.post("/v2/models/m/infer", json={"inputs": [{"name": "z"}]})
        assert wrong.status_code == 400
        assert "the pod refused the request (400)" in wrong.json()["error"]
        assert len(upstream.received) == 2


async def test_learning_outlives_any_failure_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    upstream = FakeUpstream([1, 2])  # a 200 that is not metadata at all
    caplog.set_level(logging.INFO, "gateway.catalog")
    async with serve(upstream.app()) as url, gateway() as (http, catalog):
        catalog.set_endpoints("m", [url])
        for broken in (
            {"name": "m", "inputs": [{"name": "x"}], "outputs": []},  # a KeyError, not ours
            b"{not json",
            None,
        ):
            await retried(upstream)
            if broken is not None:
                upstream.metadata = broken
        assert "m" not in catalog.models
        assert (await http.get("/v2/models/m/ready")).json()["ready"] is False
        upstream.metadata = DECLARED
        await eventually(lambda: "m" in catalog.models, 5.0, "learning to succeed")
        response = await http.post("/v2/models/m/infer", json=doubled([[1.0, 2.0]]))
        assert response.status_code == 200
    problems = [r.getMessage() for r in caplog.records if "cannot learn it" in r.getMessage()]
    assert len(problems) == 3, problems  # each distinct failure once, not once per try
    assert "answered [1, 2]" in problems[0]
    assert "KeyError: 'datatype'" in problems[1]
    assert "did not answer JSON" in problems[2]


async def retried(upstream: FakeUpstream) -> None:
    reads = upstream.metadata_reads
    await eventually(lambda: upstream.metadata_reads >= reads + 3, 5.0, "three more tries")


async def test_learning_starts_again_when_a_model_gets_endpoints_back() -> None:
    upstream = FakeUpstream(DECLARED)
    async with serve(upstream.app()) as url, gateway() as (_, catalog):
        catalog.set_endpoints("m", ["http://127.0.0.1:9"])  # nothing listens there
        await eventually(lambda: "m" in catalog._learning, 1.0, "learning to start")
        catalog.set_endpoints("m", [])
        await eventually(lambda: "m" not in catalog._learning, 5.0, "learning to stop")
        await learned(catalog, url)


@pytest.mark.parametrize(
    ("tensors", "extension"),
    [
        (
            {"outputs": [{"name": "y", "parameters": {"classification": 2}}]},
            "classification extension",
        ),
        (
            {"outputs": [{"name": "y", "parameters": {"shared_memory_region": "r"}}]},
            "shared memory extension",
        ),
        (
            {"inputs": [{"name": "x", "parameters": {"shared_memory_byte_size": 8}}]},
            "shared memory extension",
        ),
        ({"parameters": {"sequence_id": 7, "sequence_start": True}}, "sequence batching"),
    ],
    ids=["classification", "output-shared-memory", "input-shared-memory", "sequence"],
)
async def test_a_request_passed_through_is_refused_what_the_gateway_cannot_honour(
    tensors: dict[str, Any], extension: str
) -> None:
    """An upstream may ignore an extension silently (MLServer answers the raw scores to a
    classification): the gateway, which cannot apply it to an answer it does not decode,
    refuses it by name and sends nothing."""
    upstream = FakeUpstream(UNDECLARED)
    async with serve(upstream.app()) as url, gateway() as (http, catalog):
        await learned(catalog, url)
        body = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
        for binary in (False, True):
            header = orjson.dumps({**body, **tensors})
            headers = {"Content-Type": "application/json"}
            if binary:
                headers["Inference-Header-Content-Length"] = str(len(header))
            response = await http.post(
                "/v2/models/m/infer", content=header + b"\0" * binary, headers=headers
            )
            assert response.status_code == 400, response.text
            assert extension in response.json()["error"]
        # Asked for nothing (classification 0), the same request passes.
        unasked = {"outputs": [{"name": "y", "parameters": {"classification": 0}}]}
        response = await http.post("/v2/models/m/infer", json={**body, **unasked})
        assert response.status_code == 200, response.text
        assert len(upstream.received) == 1
