"""Signal sources against fake gateways, pods and Prometheus served on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from autoscaler.loop import ScaleTarget
from autoscaler.policy import ScaleConfig
from autoscaler.sources import (
    Demand,
    GatewayStats,
    Load,
    PodMetrics,
    PrometheusQuery,
    Signals,
)
from tests.support import free_port, serve


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeGateway:
    """``GET /stats`` as the gateway answers it, with numbers a test sets."""

    def __init__(self) -> None:
        self.models: dict[str, dict[str, int]] = {}
        self.requests = 0

    def set(
        self,
        model: str,
        *,
        queued: int,
        inflight: int,
        admitted: int,
        completed: int,
        version: str | None = None,
    ) -> None:
        """The model's numbers, or one ``version``'s (under the model's ``versions``)."""
        stats = {
            "queued": queued,
            "queued_rows": queued,
            "inflight_batches": 1,
            "inflight_rows": inflight,
            "admitted": admitted,
            "admitted_rows": admitted,
            "completed_rows": completed,
            "endpoints": 1,
            "ready_endpoints": 1,
        }
        if version is None:
            self.models[model] = {
                **stats,
                "versions": self.models.get(model, {}).get("versions", {}),
            }
        else:
            self.models[model]["versions"][version] = stats

    def app(self) -> Starlette:
        async def stats(request: Request) -> Response:
            self.requests += 1
            return JSONResponse({"models": self.models})

        return Starlette(routes=[Route("/stats", stats)])


def pod_app(busy: dict[str, float], gpus: list[float] | None = None) -> Starlette:
    """A pod's ``/metrics``: busy ratio by version of model "mlp", GPU readings if any."""
    registry = CollectorRegistry()
    ratio = Gauge("bazaar_model_busy_ratio", "busy", ["model", "version"], registry=registry)
    for version, value in busy.items():
        ratio.labels("mlp", version).set(value)
    ratio.labels("other", "1").set(1.0)
    if gpus is not None:
        util = Gauge("bazaar_gpu_utilization_ratio", "gpu", ["gpu", "name"], registry=registry)
        for index, value in enumerate(gpus):
            util.labels(str(index), "NVIDIA H100").set(value)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    return Starlette(routes=[Route("/metrics", metrics)])


def prometheus_app(answers: list[dict[str, Any]], queries: list[str]) -> Starlette:
    async def query(request: Request) -> Response:
        queries.append(request.query_params["query"])
        return JSONResponse(answers.pop(0))

    return Starlette(routes=[Route("/api/v1/query", query)])


def vector(*values: float) -> dict[str, Any]:
    result = [{"metric": {"gpu": str(i)}, "value": [1.0, str(v)]} for i, v in enumerate(values)]
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


async def test_gateway_stats_sum_replicas_and_rate_from_counter_deltas(
    session: aiohttp.ClientSession,
) -> None:
    a, b = FakeGateway(), FakeGateway()
    a.set("mlp", queued=10, inflight=4, admitted=1000, completed=900)
    b.set("mlp", queued=5, inflight=2, admitted=500, completed=480)
    clock = FakeClock()
    async with serve(a.app()) as url_a, serve(b.app()) as url_b:
        stats = GatewayStats([url_a, url_b], session=session, clock=clock)
        # First read: levels, but no rate yet (one read of a counter is not a rate).
        assert await stats.read("mlp") == Demand(15.0, 6.0, None, None)
        clock.now += 2.0
        a.set("mlp", queued=0, inflight=8, admitted=1200, completed=1100)
        b.set("mlp", queued=1, inflight=0, admitted=600, completed=590)
        assert await stats.read("mlp") == Demand(1.0, 8.0, (200 + 100) / 2, (200 + 110) / 2)


async def test_gateway_that_is_down_is_missing_not_zero(session: aiohttp.ClientSession) -> None:
    a = FakeGateway()
    a.set("mlp", queued=7, inflight=1, admitted=100, completed=90)
    clock = FakeClock()
    async with serve(a.app()) as url_a:
        stats = GatewayStats([url_a, dead_url()], session=session, clock=clock, timeout_s=0.5)
        assert await stats.read("mlp") == Demand(7.0, 1.0, None, None)
        clock.now += 1.0
        a.set("mlp", queued=3, inflight=1, admitted=150, completed=140)
        assert await stats.read("mlp") == Demand(3.0, 1.0, 50.0, 50.0)
    # Every gateway down: nothing is known, which is not the same as nothing to do.
    clock.now += 1.0
    assert await stats.read("mlp") == Demand(None, None, None, None)


async def test_the_models_of_one_tick_share_one_read_of_each_gateway(
    session: aiohttp.ClientSession,
) -> None:
    a = FakeGateway()
    a.set("mlp", queued=4, inflight=0, admitted=10, completed=10)
    a.set("digits", queued=1, inflight=2, admitted=20, completed=20)
    clock = FakeClock()
    async with serve(a.app()) as url:
        stats = GatewayStats([url], session=session, clock=clock)
        mlp, digits = await asyncio.gather(stats.read("mlp"), stats.read("digits"))
        assert (mlp.queued, digits.queued, digits.inflight) == (4.0, 1.0, 2.0)
        assert a.requests == 1
        await stats.read("mlp")  # the next tick reads again
        assert a.requests == 2


async def test_gateway_restart_gives_no_rate_until_the_next_read(
    session: aiohttp.ClientSession,
) -> None:
    a = FakeGateway()
    a.set("mlp", queued=0, inflight=0, admitted=5000, completed=5000)
    clock = FakeClock()
    async with serve(a.app()) as url:
        stats = GatewayStats([url], session=session, clock=clock)
        await stats.read("mlp")
        clock.now += 1.0
        a.set("mlp", queued=2, inflight=0, admitted=10, completed=8)  # restarted: counters reset
        assert await stats.read("mlp") == Demand(2.0, 0.0, None, None)
        clock.now += 1.0
        a.set("mlp", queued=0, inflight=0, admitted=40, completed=40)
        assert await stats.read("mlp") == Demand(0.0, 0.0, 30.0, 32.0)


async def test_a_model_no_gateway_knows_is_missing(session: aiohttp.ClientSession) -> None:
    a = FakeGateway()
    a.set("mlp", queued=1, inflight=0, admitted=1, completed=1)
    async with serve(a.app()) as url:
        stats = GatewayStats([url], session=session, clock=FakeClock())
        assert await stats.read("digits") == Demand(None, None, None, None)


async def test_a_version_reads_its_own_demand(session: aiohttp.ClientSession) -> None:
    a, b = FakeGateway(), FakeGateway()
    a.set("mlp", queued=35, inflight=6, admitted=1500, completed=1400)
    a.set("mlp", queued=30, inflight=4, admitted=1000, completed=900, version="1")
    a.set("mlp", queued=5, inflight=2, admitted=500, completed=500, version="2")  # shadowed
    b.set("mlp", queued=3, inflight=0, admitted=3, completed=0)  # held: not learned yet
    clock = FakeClock()
    async with serve(a.app()) as url_a, serve(b.app()) as url_b:
        stats = GatewayStats([url_a, url_b], session=session, clock=clock)
        one, two, three = await asyncio.gather(
            stats.read("mlp", "1"), stats.read("mlp", "2"), stats.read("mlp", "3")
        )
        assert (one, two) == (Demand(33.0, 4.0, None, None), Demand(8.0, 2.0, None, None))
        # Version 3 is served by no gateway: only b's held requests may need it.
        assert three == Demand(3.0, 0.0, None, None)
        clock.now += 2.0
        a.set("mlp", queued=1, inflight=2, admitted=700, completed=660, version="2")
        b.set("mlp", queued=3, inflight=0, admitted=5, completed=0)
        one, two = await asyncio.gather(stats.read("mlp", "1"), stats.read("mlp", "2"))
        assert one == Demand(33.0, 4.0, 1.0, 0.0)
        assert two == Demand(4.0, 2.0, 100.0 + 1.0, 80.0)


async def test_pod_metrics_of_one_version(session: aiohttp.ClientSession) -> None:
    async with (
        serve(pod_app({"1": 0.1, "2": 0.6})) as pod_a,
        serve(pod_app({"1": 0.2})) as pod_b,
    ):
        pods = PodMetrics(session=session, timeout_s=0.5)
        assert (await pods.read("mlp", [pod_a, pod_b], "1")).busy_ratio == pytest.approx(0.15)
        assert (await pods.read("mlp", [pod_a, pod_b], "2")).busy_ratio == pytest.approx(0.6)
        assert (await pods.read("mlp", [pod_a, pod_b], "3")).busy_ratio is None


async def test_pod_metrics_mean_busy_ratio_without_gpu(session: aiohttp.ClientSession) -> None:
    async with (
        serve(pod_app({"1": 0.2})) as pod_a,
        serve(pod_app({"1": 0.1, "2": 0.6})) as pod_b,  # the busiest version speaks for the pod
    ):
        pods = PodMetrics(session=session, timeout_s=0.5)
        load = await pods.read("mlp", [pod_a, pod_b, dead_url()])
    assert load.busy_ratio == pytest.approx(0.4)
    assert load.gpu_utilization is None  # no NVML anywhere: absent, not zero


async def test_pod_metrics_gpu_mean_where_present(session: aiohttp.ClientSession) -> None:
    async with (
        serve(pod_app({"1": 0.9}, gpus=[0.5, 0.7])) as pod_a,
        serve(pod_app({"1": 0.5}, gpus=[0.9])) as pod_b,
        serve(pod_app({"1": 0.7})) as pod_c,
    ):
        load = await PodMetrics(session=session).read("mlp", [pod_a, pod_b, pod_c])
    assert load.busy_ratio == pytest.approx(0.7)
    assert load.gpu_utilization == pytest.approx((0.6 + 0.9) / 2)


async def test_pod_metrics_with_no_pod_answering(session: aiohttp.ClientSession) -> None:
    pods = PodMetrics(session=session, timeout_s=0.5)
    assert await pods.read("mlp", [dead_url()]) == Load(None, None)
    assert await pods.read("mlp", []) == Load(None, None)


async def test_prometheus_query_averages_a_vector(session: aiohttp.ClientSession) -> None:
    queries: list[str] = []
    answers = [
        vector(0.5, 0.9),
        vector(),
        {"status": "success", "data": {"resultType": "scalar", "result": [1.0, "0.25"]}},
        {"status": "error", "errorType": "bad_data", "error": "parse error"},
    ]
    async with serve(prometheus_app(answers, queries)) as url:
        dcgm = PrometheusQuery(url, 'avg(DCGM_FI_PROF_SM_ACTIVE{model="{model}"})', session=session)
        assert await dcgm.read("mlp") == pytest.approx(0.7)
        assert await dcgm.read("mlp") is None  # no series: missing
        assert await dcgm.read("mlp") == pytest.approx(0.25)
        assert await dcgm.read("mlp") is None
    assert queries[0] == 'avg(DCGM_FI_PROF_SM_ACTIVE{model="mlp"})'
    assert await dcgm.read("mlp") is None  # Prometheus down


async def test_signals_make_a_sample(session: aiohttp.ClientSession) -> None:
    gateway = FakeGateway()
    gateway.set("mlp", queued=12, inflight=3, admitted=100, completed=90)
    queries: list[str] = []
    clock = FakeClock()
    async with (
        serve(gateway.app()) as gateway_url,
        serve(pod_app({"1": 0.3}, gpus=[0.4])) as pod,
        serve(prometheus_app([vector(0.8), vector()], queries)) as prometheus,
    ):
        signals = Signals(
            GatewayStats([gateway_url], session=session, clock=clock),
            PodMetrics(session=session),
            PrometheusQuery(prometheus, session=session),
            clock=clock,
        )
        target = ScaleTarget("mlp", ScaleConfig(), 3, 1, 2, (pod,))
        sample = await signals.read(target)
        assert (sample.time_s, sample.replicas, sample.ready_replicas) == (100.0, 3, 1)
        assert sample.starting_replicas == 2
        assert (sample.queued, sample.inflight, sample.arrival_rate) == (12.0, 3.0, None)
        assert sample.busy_ratio == pytest.approx(0.3)
        assert sample.gpu_utilization == pytest.approx(0.8)  # DCGM wins over NVML
        # No DCGM series for the model: the pods' NVML readings stand in.
        assert (await signals.read(target)).gpu_utilization == pytest.approx(0.4)
    assert "bazaar-model-mlp-" in queries[0]
