"""The HTTP client to pods against a real server on loopback: what a pod receives."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.sdk.trace import TracerProvider

from gateway.client import HEADER_LENGTH, POOLED_IDLE_S, HttpModelClient
from protocol import tracing
from protocol.limits import EdgeLimits


async def test_the_pod_is_told_the_calls_timeout_in_microseconds() -> None:
    received: list[dict[str, Any]] = []
    accepted: list[str | None] = []

    async def infer(request: web.Request) -> web.Response:
        payload = await request.read()
        accepted.append(request.headers.get("Accept-Encoding"))
        received.append(orjson.loads(payload[: int(request.headers[HEADER_LENGTH])]))
        outputs = [{"name": "out", "shape": [1, 1], "datatype": "FP32", "data": [2.0]}]
        return web.json_response({"model_name": "m", "outputs": outputs})

    app = web.Application()
    app.router.add_post("/v2/models/m/infer", infer)
    async with TestServer(app, host="127.0.0.1") as server:
        client = HttpModelClient()
        try:
            url = str(server.make_url("")).rstrip("/")
            inputs = {"x": np.ones((1, 1), np.float32)}
            outputs = await client.infer(url, "m", inputs, timeout_s=0.25)
        finally:
            await client.close()
    assert outputs["out"].tolist() == [[2.0]]
    assert received[0]["parameters"]["timeout"] == 250_000
    # aiohttp's default asks for gzip, which pods now answer: the hop would compress.
    assert accepted == ["identity"]


async def test_the_pod_call_sends_its_own_span_as_traceparent_only_when_tracing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[str | None] = []

    async def infer(request: web.Request) -> web.Response:
        await request.read()
        seen.append(request.headers.get("traceparent"))
        outputs = [{"name": "out", "shape": [1, 1], "datatype": "FP32", "data": [2.0]}]
        return web.json_response({"model_name": "m", "outputs": outputs})

    app = web.Application()
    app.router.add_post("/v2/models/m/infer", infer)
    inputs = {"x": np.ones((1, 1), np.float32)}
    async with TestServer(app, host="127.0.0.1") as server:
        client = HttpModelClient()
        url = str(server.make_url("")).rstrip("/")
        try:
            await client.infer(url, "m", inputs, timeout_s=1)  # not tracing: nothing sent
            tracer = TracerProvider().get_tracer("test")
            monkeypatch.setattr(tracing, "TRACER", tracer)
            with tracer.start_as_current_span("batch") as batch:
                await client.infer(url, "m", inputs, timeout_s=1)
        finally:
            await client.close()
    assert seen[0] is None
    assert seen[1] is not None
    version, trace_id, span_id, flags = seen[1].split("-")
    context = batch.get_span_context()
    assert (version, trace_id) == ("00", f"{context.trace_id:032x}")
    assert int(flags, 16) & 1  # sampled
    assert span_id != f"{context.span_id:016x}"  # the pod call's own span, under the batch


async def test_an_idle_pod_connection_is_not_reused_once_the_pod_may_be_closing_it() -> None:
    # Kept for 60 s while pods close theirs after 5 s, a batch could go down a connection as
    # the pod closed it: about 1 request in 4,000 answered 502 in the many-models benchmark.
    assert EdgeLimits().keep_alive_timeout_s > POOLED_IDLE_S
    connections: list[object] = []

    async def infer(request: web.Request) -> web.Response:
        await request.read()
        if request.transport not in connections:
            connections.append(request.transport)
        outputs = [{"name": "out", "shape": [1, 1], "datatype": "FP32", "data": [2.0]}]
        return web.json_response({"model_name": "m", "outputs": outputs})

    app = web.Application()
    app.router.add_post("/v2/models/m/infer", infer)
    inputs = {"x": np.ones((1, 1), np.float32)}
    async with TestServer(app, host="127.0.0.1") as server:  # it never closes a connection
        client = HttpModelClient()
        url = str(server.make_url("")).rstrip("/")
        try:
            await client.infer(url, "m", inputs, timeout_s=1)
            await client.infer(url, "m", inputs, timeout_s=1)
            assert len(connections) == 1  # reused at once
            await asyncio.sleep(POOLED_IDLE_S + 0.5)  # idle past the pool's bound
            await client.infer(url, "m", inputs, timeout_s=1)
        finally:
            await client.close()
    assert len(connections) == 2


async def test_readiness_says_whether_a_pod_holds_the_model_loaded() -> None:
    answers = {
        "paged-out": lambda: web.json_response({"ready": True, "loaded": False}),
        "paged-in": lambda: web.json_response({"ready": True, "loaded": True}),
        "triton": lambda: web.Response(status=200),  # empty: taken to hold what it serves
        "unready": lambda: web.json_response({"ready": False}, status=503),
    }

    async def ready(request: web.Request) -> web.Response:
        return answers[request.match_info["model"]]()

    app = web.Application()
    app.router.add_get("/v2/models/{model}/ready", ready)
    async with TestServer(app, host="127.0.0.1") as server:
        client = HttpModelClient()
        try:
            url = str(server.make_url("")).rstrip("/")
            seen = {model: await client.readiness(url, model) for model in answers}
            ready_at_all = await client.ready(url, "paged-out")
        finally:
            await client.close()
    assert {model: (r.ready, r.loaded) for model, r in seen.items()} == {
        "paged-out": (True, False),
        "paged-in": (True, True),
        "triton": (True, True),
        "unready": (False, True),
    }
    assert ready_at_all
