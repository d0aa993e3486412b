"""Rollouts' progress kept in the model Service and decided by one gateway
(``gateway.rollout_record``), through the real ``kubernetes`` client against the in-process
fake API, with gateways in front of real pods (``tests.gateway.scale``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import CollectorRegistry

from cluster.lease import LeaderElection
from gateway.app import create_app
from gateway.catalog import ModelCatalog
from gateway.client import HttpModelClient
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.rollout import SavedRollout
from gateway.rollout_peers import RolloutPeers
from gateway.rollout_record import (
    LEASE_NAME,
    ROLLOUT_ANNOTATION,
    ROLLOUT_RBAC,
    ServiceRolloutRecord,
)
from protocol.traffic import TrafficPolicy
from tests.cluster.fake_kubernetes import FakeKubernetes, cluster_at, serving
from tests.gateway.scale import answered, body
from tests.gateway.test_rollout import rollout_policy
from tests.gateway.test_shadow import pick_body, pick_pod
from tests.support import eventually, free_port, serve

__all__ = ["pick_pod"]  # a fixture, used by name

POLICY = rollout_policy({"steps": [10, 50, 100], "step_s": 0, "min_requests": 10})
SERVICE = ("default", "bazaar-model-scale")


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeKubernetes, str]]:
    fake = FakeKubernetes()
    fake.add_service(SERVICE[1], {"bazaar.dev/model": "scale"})
    async with serving(fake) as url:
        yield fake, url


def record_at(url: str, identity: str) -> ServiceRolloutRecord:
    cluster = cluster_at(url, "gateway", "gateway.rollout_record", request_timeout_s=1.0)
    election = LeaderElection(
        cluster,
        LEASE_NAME,
        identity,
        lease_duration_s=3.0,
        renew_deadline_s=2.0,
        retry_period_s=0.05,
    )
    return ServiceRolloutRecord(cluster, election)


@contextlib.asynccontextmanager
async def gateway(
    url: str, identity: str
) -> AsyncIterator[tuple[httpx.AsyncClient, ModelCatalog, ServiceRolloutRecord]]:
    """A gateway as ``bazaar gateway --leader-election-id`` wires it, judging every 20 ms."""
    record = record_at(url, identity)
    client = HttpModelClient()
    catalog = ModelCatalog(
        client,
        GatewayMetrics(CollectorRegistry()),
        GatewayConfig(),
        refresh_s=0.1,
        rollout_check_s=0.02,
        rollout_record=record,
    )
    await record.start()
    transport = httpx.ASGITransport(app=create_app(catalog))
    http = httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=60)
    try:
        yield http, catalog, record
    finally:
        await http.aclose()
        await catalog.close()
        await record.stop()
        await client.close()


@contextlib.asynccontextmanager
async def served_gateway(
    url: str, identity: str
) -> AsyncIterator[tuple[httpx.AsyncClient, ModelCatalog, ServiceRolloutRecord]]:
    """``gateway``, served by a real uvicorn on a free port (its peers read its ``/stats``
    over HTTP); the client is bound to it."""
    async with gateway(url, identity) as (_, catalog, record), serve(create_app(catalog)) as base:
        http = httpx.AsyncClient(base_url=base, timeout=60)
        try:
            yield http, catalog, record
        finally:
            await http.aclose()


@contextlib.asynccontextmanager
async def deciding_and_other(
    url: str, model: str, pods: list[str], policy: TrafficPolicy
) -> AsyncIterator[tuple[httpx.AsyncClient, ModelCatalog, httpx.AsyncClient, ModelCatalog]]:
    """Two served gateways routing ``model``: the first holds the Lease and reads the
    samples of both (itself included, as a headless Service lists it), the second follows."""
    async with served_gateway(url, "decider") as (decider_http, decider, deciding):
        await eventually(lambda: deciding.deciding, 10, "the first gateway to hold the lease")
        async with served_gateway(url, "other") as (other_http, other, _):
            urls = [str(decider_http.base_url), str(other_http.base_url)]
            decider.rollout_peers = RolloutPeers(urls)
            for catalog in (decider, other):
                catalog.set_endpoints(model, pods, policy)
            await eventually(
                lambda: all("2" in c.versions.get(model, {}) for c in (decider, other)),
                10,
                "both gateways to serve the candidate",
            )
            await eventually(
                lambda: model in decider.rollouts and model in other.rollouts, 10, "rollouts"
            )
            yield decider_http, decider, other_http, other


async def test_the_deciding_gateway_advances_on_good_samples_summed_over_both(
    api: tuple[FakeKubernetes, str], scale_pods: list[str]
) -> None:
    """Each gateway answers 6 of the 10 candidate requests a step needs: only their sum
    advances the step (judged on its own samples, the decider held for ever)."""
    _, url = api
    async with deciding_and_other(url, "scale", scale_pods, POLICY) as (
        decider_http,
        decider,
        other_http,
        other,
    ):

        async def send(http: httpx.AsyncClient) -> None:
            path = "/v2/models/scale/versions/2/infer"
            answers = await asyncio.gather(*(http.post(path, json=body(1.0)) for _ in range(6)))
            assert all(answered(a) for a in answers)

        await send(decider_http)
        assert decider.rollouts["scale"].step == 0  # 6 of 10 are not enough to say
        await send(other_http)
        await eventually(lambda: decider.rollouts["scale"].step == 1, 10, "the step summed")
        await eventually(lambda: other.rollouts["scale"].step == 1, 10, "the other to follow")
        published = (await other_http.get("/stats")).json()["models"]["scale"]["rollout"]
        assert (published["sample"]["step"], published["sample"]["requests"]) == (1, 0)


async def test_the_deciding_gateway_rolls_back_on_bad_samples_that_only_the_other_saw(
    api: tuple[FakeKubernetes, str], pick_pod: str
) -> None:
    """The decider's own samples are good and too few to judge; the rows that disagree all
    arrive at the other gateway, and the decider rolls the candidate back for them."""
    fake, url = api
    fake.add_service("bazaar-model-pick", {"bazaar.dev/model": "pick"})
    policy = rollout_policy(
        {"steps": [1, 100], "step_s": 0, "min_requests": 10, "min_agreement": 0.95},
        shadow=True,
    )
    async with deciding_and_other(url, "pick", [pick_pod], policy) as (
        decider_http,
        decider,
        other_http,
        other,
    ):

        async def send(http: httpx.AsyncClient, path: str, leads: list[float]) -> None:
            answers = await asyncio.gather(*(http.post(path, json=pick_body(x)) for x in leads))
            assert all(a.status_code == 200 for a in answers)

        # 5 candidate requests and 5 agreeing rows at the decider: it holds.
        await send(decider_http, "/v2/models/pick/versions/2/infer", [2.0] * 5)
        await send(decider_http, "/v2/models/pick/infer", [2.0] * 5)
        # At the other: 10 candidate requests, then 10 rows that disagree and 20 that agree.
        await send(other_http, "/v2/models/pick/versions/2/infer", [2.0] * 10)
        await send(other_http, "/v2/models/pick/infer", [0.5] * 10)
        await send(other_http, "/v2/models/pick/infer", [2.0] * 20)
        rollout = decider.rollouts["pick"]
        await eventually(lambda: rollout.state == "rolled_back", 10, "the rollback")
        assert (rollout.step, rollout.reason) == (0, "agreement")
        assert "agreement" in rollout.detail
        await eventually(
            lambda: other.rollouts["pick"].state == "rolled_back", 10, "the other to follow"
        )
        stats = (await decider_http.get("/stats")).json()["models"]["pick"]["rollout"]
        assert (stats["state"], stats["reason"], stats["sample"]) == (
            "rolled_back",
            "agreement",
            None,
        )


async def test_a_peer_that_does_not_answer_holds_the_judgement(
    api: tuple[FakeKubernetes, str], scale_pods: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway whose samples are missing may hold the candidate's failures: the decider
    does not judge on the rest, and says so once."""
    _, url = api

    def peers_logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "gateway.rollout_peers"]

    async with served_gateway(url, "decider") as (http, catalog, record):
        await eventually(lambda: record.deciding, 10, "the gateway to hold the lease")
        catalog.rollout_peers = RolloutPeers(
            [str(http.base_url), f"http://127.0.0.1:{free_port()}"]
        )
        catalog.set_endpoints("scale", scale_pods, POLICY)
        await eventually(lambda: "2" in catalog.versions.get("scale", {}), 10, "the candidate")
        await eventually(lambda: "scale" in catalog.rollouts, 10, "the rollout to start")
        with caplog.at_level(logging.WARNING, "gateway.rollout_peers"):
            answers = await asyncio.gather(
                *(http.post("/v2/models/scale/versions/2/infer", json=body(1.0)) for _ in range(20))
            )
            assert all(answered(a) for a in answers)
            await eventually(lambda: bool(peers_logged()), 10, "the missing peer logged")
            stats = (await http.get("/stats")).json()["models"]["scale"]["rollout"]
            assert stats["sample"]["requests"] == 20  # enough to advance, but held
            assert catalog.rollouts["scale"].step == 0
        [message] = peers_logged()
        assert "no rollout samples, rollouts hold meanwhile" in message


def saved(fake: FakeKubernetes) -> SavedRollout | None:
    value = fake.services[SERVICE]["metadata"].get("annotations", {}).get(ROLLOUT_ANNOTATION)
    return None if value is None else SavedRollout.from_json(json.loads(value))


async def until_step(http: httpx.AsyncClient, catalog: ModelCatalog, step: int) -> None:
    """Send requests until the model's rollout is at ``step`` (0-based), then stop."""
    for _ in range(200):
        if catalog.rollouts["scale"].step >= step:
            return
        answers = await asyncio.gather(
            *(http.post("/v2/models/scale/infer", json=body(1.0)) for _ in range(20))
        )
        assert all(answered(a) for a in answers)
    raise AssertionError(f"the rollout never reached step {step + 1}")


async def test_a_gateway_restarted_mid_rollout_resumes_at_its_step(
    api: tuple[FakeKubernetes, str], scale_pods: list[str]
) -> None:
    fake, url = api
    async with gateway(url, "gateway-a") as (http, catalog, record):
        await eventually(lambda: record.deciding, 10, "the gateway to hold the lease")
        catalog.set_endpoints("scale", scale_pods, POLICY)
        await eventually(lambda: "scale" in catalog.rollouts, 10, "the rollout to start")
        await until_step(http, catalog, 1)
        await eventually(lambda: (s := saved(fake)) is not None and s.step == 1, 10, "a save")
    assert catalog.rollouts["scale"].percent == 50.0  # no traffic since: it holds there

    async with gateway(url, "gateway-b") as (http, catalog, record):
        catalog.set_endpoints("scale", scale_pods, POLICY)
        await eventually(lambda: "scale" in catalog.rollouts, 10, "the rollout to start")
        rollout = catalog.rollouts["scale"]
        await eventually(lambda: rollout.step == 1, 10, "the rollout to resume at step 2")
        assert (rollout.state, rollout.percent) == ("running", 50.0)
        stats = (await http.get("/stats")).json()["models"]["scale"]["rollout"]
        assert (stats["step"], stats["percent"]) == (2, 50.0)
        # It decides from there (the first gateway handed its Lease over when it stopped).
        await eventually(lambda: record.deciding, 10, "the restarted gateway to lead")
        await until_step(http, catalog, 2)
        await eventually(lambda: saved(fake) == catalog.rollouts["scale"].saved(), 10, "a save")
    assert saved(fake) == SavedRollout(POLICY.rollout.to_json(), 2, "running")  # type: ignore[union-attr]


async def test_one_gateway_decides_and_the_others_follow_its_steps(
    api: tuple[FakeKubernetes, str], scale_pods: list[str]
) -> None:
    _, url = api
    async with gateway(url, "leader") as (leader_http, leader, leading):
        await eventually(lambda: leading.deciding, 10, "the first gateway to hold the lease")
        async with gateway(url, "follower") as (_, follower, following):
            for catalog in (leader, follower):
                catalog.set_endpoints("scale", scale_pods, POLICY)
            await eventually(
                lambda: "scale" in leader.rollouts and "scale" in follower.rollouts, 10, "rollouts"
            )
            # Only the leader sees traffic; the follower, with no samples, moves with it.
            await until_step(leader_http, leader, 1)
            await eventually(lambda: follower.rollouts["scale"].step == 1, 10, "the follower")
            assert follower.rollouts["scale"].percent == 50.0
            assert not following.deciding


async def test_a_rollback_is_saved_with_its_reason_and_a_restart_stays_rolled_back(
    api: tuple[FakeKubernetes, str], scale_pods: list[str]
) -> None:
    fake, url = api
    # Every answer of the candidate is slower than 0 ms: rolled back at the first step.
    policy = rollout_policy({"steps": [50, 100], "step_s": 0, "min_requests": 10, "max_p99_ms": 0})
    async with gateway(url, "gateway-a") as (http, catalog, record):
        await eventually(lambda: record.deciding, 10, "the gateway to hold the lease")
        catalog.set_endpoints("scale", scale_pods, policy)
        await eventually(lambda: "scale" in catalog.rollouts, 10, "the rollout to start")
        rollout = catalog.rollouts["scale"]
        for _ in range(100):
            if rollout.state != "running":
                break
            await asyncio.gather(
                *(http.post("/v2/models/scale/infer", json=body(1.0)) for _ in range(20))
            )
        assert (rollout.state, rollout.reason) == ("rolled_back", "latency")
        await eventually(lambda: saved(fake) == rollout.saved(), 10, "the rollback saved")
    assert saved(fake) == SavedRollout(
        policy.rollout.to_json(), 0, "rolled_back", "latency", rollout.detail
    )  # type: ignore[union-attr]

    async with gateway(url, "gateway-b") as (http, catalog, record):
        catalog.set_endpoints("scale", scale_pods, policy)
        await eventually(lambda: "scale" in catalog.rollouts, 10, "the rollout to start")
        rollout = catalog.rollouts["scale"]
        await eventually(lambda: rollout.state == "rolled_back", 10, "the rollback to hold")
        answers = await asyncio.gather(
            *(http.post("/v2/models/scale/infer", json=body(1.0)) for _ in range(20))
        )
        assert {a.json()["model_version"] for a in answers} == {"1"}


async def test_the_record_calls_exactly_its_rbac_and_ignores_an_annotation_it_cannot_read(
    api: tuple[FakeKubernetes, str], caplog: pytest.LogCaptureFixture
) -> None:
    fake, url = api
    record = record_at(url, "me")
    progress = SavedRollout(POLICY.rollout.to_json(), 1, "running")  # type: ignore[union-attr]
    try:
        assert await record.election.try_acquire_or_renew()  # creates the Lease
        assert await record.election.try_acquire_or_renew()  # renews it
        assert await record.load("scale") is None
        assert await record.save("scale", progress)
        assert await record.load("scale") == progress
        [patch] = [r for r in fake.requests if r.method == "PATCH"]
        assert patch.path == "/api/v1/namespaces/default/services/bazaar-model-scale"
        assert list(patch.body["metadata"]["annotations"]) == [ROLLOUT_ANNOTATION]
        assert fake.permissions() == {(p.api_group, p.resource, p.verb) for p in ROLLOUT_RBAC}
        fake.services[SERVICE]["metadata"]["annotations"][ROLLOUT_ANNOTATION] = "{step: "
        with caplog.at_level(logging.WARNING, "gateway.rollout_record"):
            assert await record.load("scale") is None
            assert await record.load("scale") is None
        [message] = [r.getMessage() for r in caplog.records]
        assert "is not a rollout's progress" in message
        fake.fail(("", "services", "patch"), 403)
        assert not await record.save("scale", progress)
    finally:
        record.cluster.close()
