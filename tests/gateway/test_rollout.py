"""Progressive rollouts: the verdict and the steps alone, on samples a test sets, and at a
gateway in front of real pods (``tests.gateway.scale``): a good candidate reaches 100 %, one
that disagrees with the primary beyond the bound is rolled back at the first step."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.catalog import ModelCatalog
from gateway.client import HttpModelClient
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.rollout import (
    LATENCY_BUCKETS_S,
    Rollout,
    StepCounts,
    StepSample,
    judge,
    latency_bucket,
    rollout_weights,
)
from protocol.traffic import RolloutPolicy, TrafficPolicy, parse_traffic
from tests.gateway.scale import answered, body
from tests.gateway.test_shadow import pick_body, pick_pod
from tests.support import eventually

__all__ = ["pick_pod"]  # a fixture, used by name

BOUNDED = RolloutPolicy(
    "2",
    (1.0, 10.0, 50.0, 100.0),
    step_s=60.0,
    min_requests=100,
    max_p99_ms=200.0,
    max_error_rate=0.01,
    min_agreement=0.95,
)


def sample(**changes: float) -> StepSample:
    """A step of 100 good requests, 100 agreeing shadowed rows, 60 s: one that advances."""
    values = {
        "elapsed_s": 60.0,
        "requests": 100,
        "errors": 0,
        "p99_s": 0.05,
        "shadowed_rows": 100,
        "agreed_rows": 100,
    }
    values.update(changes)
    return StepSample(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"p99_s": 0.3}, "latency"),
        ({"errors": 2}, "errors"),
        ({"agreed_rows": 90}, "agreement"),
    ],
)
def test_a_candidate_outside_a_bound_is_rolled_back_with_the_reason(
    changes: dict[str, float], reason: str
) -> None:
    verdict = judge(sample(**changes), BOUNDED)
    assert (verdict.action, verdict.reason) == ("rollback", reason)


def test_a_step_holds_until_it_has_its_evidence_and_its_time() -> None:
    assert judge(sample(), BOUNDED).action == "advance"
    assert judge(sample(requests=99, p99_s=9.0), BOUNDED).action == "hold"  # too few to say
    assert judge(sample(shadowed_rows=50, agreed_rows=0), BOUNDED).action == "hold"
    assert judge(sample(elapsed_s=59.0), BOUNDED).action == "hold"


def test_a_slower_candidate_is_rolled_back_at_the_first_step_and_a_good_one_reaches_100() -> None:
    slow = Rollout("m", BOUNDED, now=0.0)
    for _ in range(100):
        slow.record("2", 0.250, 200)
        slow.record("1", 9.0, 200)  # the primary's time is not the candidate's
    assert slow.tick(60.0, 100, 100).reason == "latency"
    assert (slow.state, slow.step, slow.percent) == ("rolled_back", 0, 0.0)
    # The p99 is its histogram bucket's upper bound: at most 5 % over the true 250 ms.
    assert f"p99 {latency_bucket(0.250) * 1000:.1f} ms over 200 ms" in slow.detail

    good = Rollout("m", BOUNDED, now=0.0)
    percents = [good.percent]
    for step in range(1, 5):
        for _ in range(100):
            good.record("2", 0.010, 200)
        assert good.tick(60.0 * step, 100 * step, 100 * step).action == "advance"
        percents.append(good.percent)
    assert percents == [1.0, 10.0, 50.0, 100.0, 100.0]
    assert good.state == "done"


def test_the_last_step_completes_without_shadowed_rows() -> None:
    """At 100 % the candidate serves everything and nothing is shadowed to it: agreement
    cannot hold the last step (it held it for ever)."""
    rollout = Rollout("m", dataclasses.replace(BOUNDED, steps=(50.0, 100.0)), now=0.0)
    for step, rows in [(1, 100), (2, 100)]:  # no row shadowed during the second step
        for _ in range(100):
            rollout.record("2", 0.010, 200)
        assert rollout.tick(60.0 * step, rows, rows).action == "advance"
    assert (rollout.state, rollout.percent) == ("done", 100.0)


def test_the_p99_of_summed_histograms_is_the_p99_of_every_latency() -> None:
    """Gateways' counts add, latencies included: the p99 of the sum is the bucket of the p99
    of all their latencies, whatever share each gateway saw (an average of their p99s is
    not: here it is under half the true one)."""
    rng = np.random.default_rng(12)
    shares = [
        rng.lognormal(np.log(0.02), 0.3, 2000),  # a gateway that saw only fast answers
        np.concatenate([rng.lognormal(np.log(0.02), 0.3, 80), np.full(40, 0.9)]),
        rng.lognormal(np.log(0.05), 0.5, 500),
    ]
    counts = []
    for latencies in shares:
        rollout = Rollout("m", BOUNDED, now=0.0)
        for seconds in latencies:
            rollout.record("2", float(seconds), 200)
        # Through JSON, as a peer's counts arrive.
        counts.append(StepCounts.from_json(json.loads(json.dumps(rollout.counts(0, 0).to_json()))))
    total = counts[0] + counts[1] + counts[2]
    every = np.sort(np.concatenate(shares))
    true_p99 = every[int(np.ceil(0.99 * every.size)) - 1]
    assert total.requests == every.size
    assert total.p99_s is not None
    assert true_p99 <= total.p99_s <= true_p99 * 1.05
    assert total.p99_s == latency_bucket(true_p99)
    averaged = sum(c.p99_s or 0.0 for c in counts) / len(counts)
    assert averaged < true_p99 / 2
    # Beyond the last bucket, a latency counts in the last.
    assert latency_bucket(1e6) == LATENCY_BUCKETS_S[-1]


def test_only_peers_at_the_same_rollout_and_step_are_summed() -> None:
    rollout = Rollout("m", BOUNDED, now=0.0)
    rollout.record("2", 0.010, 500)
    published = rollout.published(7, 6)
    assert published is not None
    other_policy = {**published, "policy": dataclasses.replace(BOUNDED, step_s=1.0).to_json()}
    samples = [
        published,
        published,
        {**published, "step": 1},  # a gateway still (or already) at another step
        other_policy,
        {**published, "requests": -1},  # nonsense
        "nonsense",
    ]
    assert rollout.peer_counts(samples) == StepCounts(
        requests=2,
        errors=2,
        latency_s={latency_bucket(0.010): 2},
        shadowed_rows=14,
        agreed_rows=12,
    )
    verdict = rollout.tick(60.0, 0, 0, rollout.peer_counts([published] * 99))
    assert (verdict.action, verdict.reason) == ("rollback", "errors")
    assert rollout.published(7, 6) is None  # over: nothing left to sum


def test_the_other_versions_share_what_the_candidate_does_not_take() -> None:
    weights = (("1", 3.0), ("2", 0.0), ("3", 1.0))
    assert rollout_weights(weights, "2", 20.0, {"1", "2", "3"}) == (
        ("1", 60.0),
        ("2", 20.0),
        ("3", 20.0),
    )
    # Rolled back with only the candidate weighed: the highest other version takes it all.
    assert rollout_weights((("2", 1.0),), "2", 0.0, {"1", "2"}) == (("1", 100.0), ("2", 0.0))


# -- at a gateway ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def gateway() -> AsyncIterator[tuple[httpx.AsyncClient, ModelCatalog]]:
    client = HttpModelClient()
    catalog = ModelCatalog(
        client,
        GatewayMetrics(CollectorRegistry()),
        GatewayConfig(),
        refresh_s=0.1,
        rollout_check_s=0.02,
    )
    transport = httpx.ASGITransport(app=create_app(catalog))
    http = httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=60)
    try:
        yield http, catalog
    finally:
        await http.aclose()
        await catalog.close()
        await client.close()


def rollout_policy(rollout: dict[str, object], shadow: bool = False) -> TrafficPolicy:
    data: dict[str, object] = {"weights": {"1": 1}, "rollout": {"version": "2", **rollout}}
    if shadow:
        data["shadow"] = {"version": "2", "share": 1.0, "compare": "top1"}
    return parse_traffic(data, "test")


async def test_a_good_candidate_reaches_100_percent_step_by_step(
    scale_pods: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    policy = rollout_policy(
        {"steps": [10, 50, 100], "step_s": 0, "min_requests": 10, "max_error_rate": 0.0}
    )
    caplog.set_level(logging.INFO)
    async with gateway() as (http, catalog):
        catalog.set_endpoints("scale", scale_pods, policy)
        await eventually(lambda: "scale" in catalog.rollouts, 10, "the rollout to start")
        rollout = catalog.rollouts["scale"]
        for _ in range(200):
            if rollout.state == "done":
                break
            answers = await asyncio.gather(
                *(http.post("/v2/models/scale/infer", json=body(1.0)) for _ in range(20))
            )
            assert all(answered(a) for a in answers)
        assert rollout.state == "done"
        # Every step, in order, as the gateway logged it: sampling rollout.percent between
        # rounds could miss a step that passed within one round (it did, on a loaded machine).
        steps = re.findall(r"rollout of version 2 at step \d+(?:/\d+)?: ([\d.]+) %", caplog.text)
        seen = [float(percent) for percent in steps]
        assert seen == sorted(seen)
        assert sorted(set(seen)) == [10.0, 50.0, 100.0]
        answers = await asyncio.gather(
            *(http.post("/v2/models/scale/infer", json=body(1.0)) for _ in range(20))
        )
        assert Counter(a.json()["model_version"] for a in answers) == {"2": 20}
        stats = (await http.get("/stats")).json()["models"]["scale"]["rollout"]
        assert (stats["state"], stats["percent"], stats["reason"]) == ("done", 100.0, None)


async def test_a_candidate_that_disagrees_is_rolled_back_at_the_first_step(
    pick_pod: str,
) -> None:
    policy = rollout_policy(
        {"steps": [20, 100], "step_s": 0, "min_requests": 10, "min_agreement": 0.95},
        shadow=True,
    )
    leads = [0.5, 2.0, 2.0] * 10  # version 2 flips the top-1 of a third of them
    async with gateway() as (http, catalog):
        catalog.set_endpoints("pick", [pick_pod], policy)
        await eventually(lambda: "pick" in catalog.rollouts, 10, "the rollout to start")
        rollout = catalog.rollouts["pick"]
        for _ in range(100):
            if rollout.state != "running":
                break
            await asyncio.gather(
                *(http.post("/v2/models/pick/infer", json=pick_body(lead)) for lead in leads)
            )
            await eventually(lambda: catalog.shadows["pick"].inflight == 0, 10, "comparisons")
            await asyncio.sleep(0.05)  # a judgement
        assert (rollout.state, rollout.step, rollout.reason) == ("rolled_back", 0, "agreement")
        answers = await asyncio.gather(
            *(http.post("/v2/models/pick/infer", json=pick_body(2.0)) for _ in range(20))
        )
        assert Counter(a.json()["model_version"] for a in answers) == {"1": 20}
        stats = (await http.get("/stats")).json()["models"]["pick"]["rollout"]
        assert (stats["state"], stats["percent"], stats["reason"]) == (
            "rolled_back",
            0.0,
            "agreement",
        )
        assert "agreement" in stats["detail"]
        rolled_back = catalog.metrics.registry.get_sample_value(
            "bazaar_gateway_rollbacks_total",
            {"model": "pick", "version": "2", "reason": "agreement"},
        )
        assert rolled_back == 1.0
