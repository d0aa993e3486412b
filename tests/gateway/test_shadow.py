"""Shadow traffic: the comparison alone, and at a gateway in front of real pods
(``tests.gateway.scale``): agreement measured on a candidate that disagrees on a known
fraction of inputs, and primaries answered at once while the candidate's pod is stopped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.catalog import ModelCatalog
from gateway.client import HttpModelClient
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.shadow import MAX_INFLIGHT, compare
from protocol.traffic import ShadowPolicy, parse_traffic
from tests.gateway.scale import answered, body, model_server, pod_url, write_scale
from tests.support import eventually

TOP1 = ShadowPolicy("2", 1.0, "top1")
CLOSE = ShadowPolicy("2", 1.0, "close", atol=0.01, rtol=0.0)


def test_top1_agrees_on_rows_with_the_same_argmax_and_close_within_tolerance() -> None:
    primary = {"scores": np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dtype=np.float32)}
    candidate = {"scores": np.array([[0.8, 0.2], [0.7, 0.3], [0.6, 0.405]], dtype=np.float32)}
    top1 = compare(primary, candidate, 3, TOP1)
    assert (top1.rows, top1.agreed) == (3, 2)
    assert top1.max_abs_diff == pytest.approx(0.5)
    assert top1.max_rel_diff == pytest.approx(0.5 / 0.7)  # of the larger magnitude
    close = compare(primary, candidate, 3, CLOSE)
    assert close.agreed == 1  # only the last row is within 0.01 everywhere
    missing = compare(primary, {"other": candidate["scores"]}, 3, CLOSE)
    assert missing.agreed == 0


# -- at a gateway ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def gateway(refresh_s: float = 0.1) -> AsyncIterator[tuple[httpx.AsyncClient, ModelCatalog]]:
    client = HttpModelClient()
    catalog = ModelCatalog(
        client, GatewayMetrics(CollectorRegistry()), GatewayConfig(), refresh_s=refresh_s
    )
    transport = httpx.ASGITransport(app=create_app(catalog))
    http = httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=60)
    try:
        yield http, catalog
    finally:
        await http.aclose()
        await catalog.close()
        await client.close()


@pytest.fixture(scope="module")
def pick_pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A pod serving ``pick`` 1 and 2, its config shadowing every request to 2 (top-1)."""
    traffic = "traffic:\n  weights: {'1': 1}\n  shadow: {version: '2', share: 1.0, compare: top1}\n"
    root = write_scale(tmp_path_factory.mktemp("pick"), [1, 2], traffic, model="pick")
    url = pod_url()
    with model_server(root, url, tmp_path_factory.mktemp("logs") / "pick.log"):
        yield url


async def test_agreement_is_measured_on_a_candidate_that_disagrees_on_a_known_fraction(
    pick_pod: str,
) -> None:
    # Version 2 adds 1 to the second score: a first score leading by 0.5 loses its top-1
    # there (30 rows), one leading by 2 keeps it (70 rows).
    leads = [0.5, 2.0, 2.0, 0.5, 2.0, 2.0, 0.5, 2.0, 2.0, 2.0] * 10
    async with gateway() as (http, catalog):
        catalog.set_endpoints("pick", [pick_pod])
        await eventually(lambda: "pick" in catalog.shadows, 10, "the shadow to start")
        shadow = catalog.shadows["pick"]
        for wave in range(0, len(leads), 25):  # within the bound on shadows in flight
            answers = await asyncio.gather(
                *(
                    http.post("/v2/models/pick/infer", json=pick_body(lead))
                    for lead in leads[wave : wave + 25]
                )
            )
            assert {a.json()["model_version"] for a in answers} == {"1"}
            await eventually(lambda: shadow.inflight == 0, 10, "the wave's comparisons")
        assert shadow.stats.compared == 100
        stats = (await http.get("/stats")).json()["models"]["pick"]["shadow"]
        assert stats["agreement"] == 0.7
        assert (stats["sent"], stats["dropped"], stats["failed"]) == (100, 0, 0)
        assert (stats["rows"], stats["agreed_rows"], stats["max_abs_diff"]) == (100, 70, 1.0)
        # The candidate's queue and batches are its own, and its work is counted there.
        version_2 = (await http.get("/stats")).json()["models"]["pick"]["versions"]["2"]
        assert version_2["admitted"] == 100
        registry = catalog.metrics.registry
        rows = {
            result: registry.get_sample_value(
                "bazaar_gateway_shadow_rows_total",
                {"model": "pick", "version": "2", "result": result},
            )
            for result in ("agreed", "disagreed")
        }
        assert rows == {"agreed": 70.0, "disagreed": 30.0}
        assert (
            registry.get_sample_value(
                "bazaar_gateway_shadow_seconds_count", {"model": "pick", "version": "2"}
            )
            == 100
        )


def pick_body(lead: float) -> dict[str, object]:
    """One row whose first score leads the second by ``lead``."""
    return {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [lead, 0.0]}]}


@pytest.fixture
def split_pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Two pods of ``scale``: the first serves version 1, the second version 2; yields the
    processes, whose URLs are ``process.args``' port."""
    with contextlib.ExitStack() as stack:
        processes = []
        for version in (1, 2):
            root = write_scale(tmp_path_factory.mktemp(f"split{version}"), [version])
            url = pod_url()
            log = tmp_path_factory.mktemp("logs") / f"split{version}.log"
            process = stack.enter_context(model_server(root, url, log))
            process.url = url  # type: ignore[attr-defined]
            processes.append(process)
        yield processes


async def test_primaries_answer_at_once_while_the_shadow_pod_is_stopped(
    split_pods: list[subprocess.Popen[bytes]],
) -> None:
    primary, candidate = split_pods
    urls = [primary.url, candidate.url]  # type: ignore[attr-defined]
    policy = parse_traffic({"weights": {"1": 1}, "shadow": {"version": "2", "share": 1.0}}, "test")
    async with gateway(refresh_s=60) as (http, catalog):
        catalog.set_endpoints("scale", urls, policy)
        await eventually(lambda: "scale" in catalog.shadows, 10, "the shadow to start")
        os.kill(candidate.pid, signal.SIGSTOP)
        try:
            requests = MAX_INFLIGHT + 36
            answers = await asyncio.wait_for(
                asyncio.gather(
                    *(http.post("/v2/models/scale/infer", json=body(1.0)) for _ in range(requests))
                ),
                30,
            )
            assert [answered(a) for a in answers] == [[1.0]] * requests
            shadow = catalog.shadows["scale"]
            # Every primary answered with every shadow still waiting on the stopped pod; the
            # ones beyond the bound were dropped, not queued.
            assert (shadow.inflight, shadow.stats.compared) == (MAX_INFLIGHT, 0)
            assert (shadow.stats.sent, shadow.stats.dropped) == (MAX_INFLIGHT, 36)
        finally:
            os.kill(candidate.pid, signal.SIGCONT)
        await eventually(lambda: shadow.stats.compared == MAX_INFLIGHT, 30, "the shadows")
        # Version 2 doubles what version 1 answers: no row agrees.
        assert (shadow.stats.rows, shadow.stats.agreed_rows) == (MAX_INFLIGHT, 0)
        assert shadow.stats.max_abs_diff == 1.0
