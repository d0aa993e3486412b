"""The ``bazaar autoscaler`` process's HTTP side: /healthz follows the loop, /stats explains."""

from __future__ import annotations

import httpx
from prometheus_client import CollectorRegistry

from autoscaler.command import _app
from autoscaler.metrics import AutoscalerMetrics


async def test_healthz_fails_once_the_loop_stops_ticking() -> None:
    ticking = [True]
    app = _app(AutoscalerMetrics(CollectorRegistry()), lambda: ticking[0])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://a"
    ) as http:
        healthy = await http.get("/healthz")
        assert (healthy.status_code, healthy.json()) == (200, {"ticking": True})
        ticking[0] = False
        stuck = await http.get("/healthz")
        assert (stuck.status_code, stuck.json()) == (503, {"ticking": False})
        assert (await http.get("/stats")).json() == {"models": {}}
        assert (await http.get("/metrics")).status_code == 200
