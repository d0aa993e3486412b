"""The Kubernetes scaler, through the seam: the real ``kubernetes`` client against an in-process
fake API."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from autoscaler.deployments import REQUIRED_RBAC, KubernetesScaler
from autoscaler.loop import Autoscaler, ScalerError, ScaleTarget
from autoscaler.metrics import AutoscalerMetrics
from autoscaler.policy import Decision, PolicyState, Sample, ScaleConfig, decide
from autoscaler.sources import GatewayStats, PodMetrics, Signals
from cluster.lease import LeaderElection
from tests.autoscaler.test_sources import FakeGateway
from tests.cluster.fake_kubernetes import FakeKubernetes, cluster_at, serving
from tests.support import serve

LIST_DEPLOYMENTS = ("apps", "deployments", "list")
GET_SCALE = ("apps", "deployments/scale", "get")
PATCH_SCALE = ("apps", "deployments/scale", "patch")
LIST_SERVICES = ("", "services", "list")


@pytest.fixture
async def fake() -> AsyncIterator[FakeKubernetes]:
    fake = FakeKubernetes()
    fake.add_deployment(
        "bazaar-model-mlp",
        "mlp",
        replicas=3,
        ready_replicas=2,
        annotations={
            "bazaar.dev/min-replicas": "0",
            "bazaar.dev/max-replicas": "8",
            "bazaar.dev/scale-to-zero-after": "5m",
            "deployment.kubernetes.io/revision": "4",
        },
    )
    # The model's Service and its slices, as the endpointslice controller writes them.
    ports = {"http": 8000, "metrics": 8002}
    fake.add_service("bazaar-model-mlp", {"bazaar.dev/model": "mlp"}, ports=ports)
    fake.set_slice(
        "bazaar-model-mlp-a",
        "bazaar-model-mlp",
        [("10.0.0.1", True), ("10.0.0.2", True), ("10.0.0.3", False)],
        ports=ports,
    )
    fake.add_service("bazaar-model-digits", {"bazaar.dev/model": "digits"}, ports=ports)
    fake.add_deployment("bazaar-model-digits", "digits", replicas=1, ready_replicas=1)
    yield fake


@pytest.fixture
async def api_url(fake: FakeKubernetes) -> AsyncIterator[str]:
    async with serving(fake) as url:
        yield url


class Sleeps:
    """The scaler's backoff sleeps, recorded instead of slept."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def scaler(api_url: str, sleeps: Sleeps) -> Iterator[KubernetesScaler]:
    cluster = cluster_at(
        api_url, "autoscaler", "autoscaler.deployments", request_timeout_s=0.3, sleep=sleeps
    )
    scaler = KubernetesScaler(cluster)
    yield scaler
    scaler.close()


def by_model(targets: list[ScaleTarget]) -> dict[str, ScaleTarget]:
    return {target.model: target for target in targets}


def rbac_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("RBAC")]


async def test_targets_read_annotations_scale_and_ready_pods(
    scaler: KubernetesScaler, fake: FakeKubernetes
) -> None:
    targets = by_model(await scaler.targets())

    assert set(targets) == {"mlp", "digits"}
    mlp = targets["mlp"]
    assert mlp.config == ScaleConfig(min_replicas=0, max_replicas=8, scale_to_zero_after_s=300.0)
    assert (mlp.replicas, mlp.ready_replicas, mlp.starting_replicas) == (3, 2, 1)
    # The Service's ready endpoints, on the port named "metrics".
    assert mlp.pod_urls == ("http://10.0.0.1:8002", "http://10.0.0.2:8002")
    assert targets["digits"].config == ScaleConfig()
    assert targets["digits"].pod_urls == ()
    lists = [r for r in fake.requests if r.permission == LIST_DEPLOYMENTS]
    assert lists[0].path == "/apis/apps/v1/namespaces/default/deployments"
    assert lists[0].query["labelSelector"] == "bazaar.dev/model"
    services = [r for r in fake.requests if r.permission == LIST_SERVICES]
    assert [r.query["labelSelector"] for r in services] == ["bazaar.dev/model"]


async def test_scale_patches_the_scale_subresource(
    scaler: KubernetesScaler, fake: FakeKubernetes
) -> None:
    await scaler.targets()
    await scaler.scale("mlp", 5, "queue 80 rows > 16 per replica")

    [patch] = [r for r in fake.requests if r.method == "PATCH"]
    assert patch.path == "/apis/apps/v1/namespaces/default/deployments/bazaar-model-mlp/scale"
    assert patch.content_type == "application/merge-patch+json"
    assert patch.body == {"spec": {"replicas": 5}}
    assert fake.replicas("bazaar-model-mlp") == 5
    assert by_model(await scaler.targets())["mlp"].replicas == 5


async def test_the_calls_made_are_exactly_the_required_rbac(
    scaler: KubernetesScaler, fake: FakeKubernetes
) -> None:
    election = LeaderElection(scaler.cluster, "bazaar-autoscaler", "me")
    assert await election.try_acquire_or_renew()  # creates the Lease
    assert await election.try_acquire_or_renew()  # renews it
    leading = KubernetesScaler(scaler.cluster, election=election)
    await leading.targets()
    await leading.scale("digits", 2, "test")
    assert fake.permissions() == {(p.api_group, p.resource, p.verb) for p in REQUIRED_RBAC}


async def test_a_replica_that_does_not_lead_lists_nothing_and_scales_nothing(
    scaler: KubernetesScaler, fake: FakeKubernetes
) -> None:
    other = LeaderElection(scaler.cluster, "bazaar-autoscaler", "other")
    assert await other.try_acquire_or_renew()
    follower = LeaderElection(scaler.cluster, "bazaar-autoscaler", "me")
    assert not await follower.try_acquire_or_renew()
    before = len(fake.requests)
    following = KubernetesScaler(scaler.cluster, election=follower)
    assert await following.targets() == []
    with pytest.raises(ScalerError, match="no longer holds the lease"):
        await following.scale("mlp", 5, "test")
    assert len(fake.requests) == before
    assert fake.replicas("bazaar-model-mlp") == 3


async def test_bad_annotations_skip_the_model_and_are_logged_once(
    scaler: KubernetesScaler, fake: FakeKubernetes, caplog: pytest.LogCaptureFixture
) -> None:
    fake.add_deployment("bazaar-model-wide", "wide", annotations={"bazaar.dev/max-replicas": "ten"})
    with caplog.at_level(logging.ERROR, "autoscaler.deployments"):
        for _ in range(3):
            assert set(by_model(await scaler.targets())) == {"mlp", "digits"}
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith(
        "deployment default/bazaar-model-wide: bazaar.dev/max-replicas: "
        "must be an integer >= 1, got 'ten'"
    )


async def test_each_model_keeps_its_own_latency_objective(
    scaler: KubernetesScaler, fake: FakeKubernetes
) -> None:
    fake.add_deployment(
        "bazaar-model-chat", "chat", annotations={"bazaar.dev/latency-objective": "150ms"}
    )
    targets = by_model(await scaler.targets())
    assert targets["chat"].config == ScaleConfig(latency_slo_s=0.15)
    assert targets["digits"].config.latency_slo_s == 0.5
    # The same 1580 rows/s on 10 replicas of 160 rows/s: the tighter objective, more headroom.
    busy = Sample(0.0, 10, 10, 0, 0.0, 16.0, 1580.0, 1580.0, 1.0, 1.0)
    sized = {
        model: decide(
            busy,
            PolicyState(),
            replace(targets[model].config, max_replicas=64, replica_throughput_rps=160.0),
            0.0,
        ).replicas
        for model in ("chat", "digits")
    }
    assert sized == {"chat": 11, "digits": 10}


async def test_a_model_on_two_deployments_is_not_scaled(
    scaler: KubernetesScaler, fake: FakeKubernetes, caplog: pytest.LogCaptureFixture
) -> None:
    fake.add_deployment("bazaar-model-mlp-copy", "mlp")
    with caplog.at_level(logging.ERROR, "autoscaler.deployments"):
        assert set(by_model(await scaler.targets())) == {"digits"}
        await scaler.targets()
    [message] = [r.getMessage() for r in caplog.records]
    assert "bazaar-model-mlp, bazaar-model-mlp-copy" in message
    with pytest.raises(ScalerError, match="no Deployment for model 'mlp'"):
        await scaler.scale("mlp", 2, "test")


async def test_forbidden_patch_is_logged_once_with_the_permission(
    scaler: KubernetesScaler, fake: FakeKubernetes, caplog: pytest.LogCaptureFixture
) -> None:
    await scaler.targets()
    fake.fail(PATCH_SCALE, 403, 403)
    with caplog.at_level(logging.ERROR, "autoscaler.deployments"):
        await scaler.scale("mlp", 4, "test")
        await scaler.scale("mlp", 4, "test")
    assert rbac_errors(caplog) == [
        "RBAC: cannot patch deployments/scale in namespace default; grant verbs [patch] on "
        "deployments/scale (apiGroup apps) to the autoscaler's ServiceAccount"
    ]
    assert fake.replicas("bazaar-model-mlp") == 3
    # Granted again, then refused again: said again.
    await scaler.scale("mlp", 4, "test")
    assert fake.replicas("bazaar-model-mlp") == 4
    fake.fail(PATCH_SCALE, 403)
    with caplog.at_level(logging.ERROR, "autoscaler.deployments"):
        await scaler.scale("mlp", 5, "test")
    assert len(rbac_errors(caplog)) == 2


async def test_forbidden_reads_degrade_without_raising(
    scaler: KubernetesScaler, fake: FakeKubernetes, caplog: pytest.LogCaptureFixture
) -> None:
    fake.fail(LIST_DEPLOYMENTS, 403, 403)
    with caplog.at_level(logging.ERROR, "autoscaler.deployments"):
        assert await scaler.targets() == []
        assert await scaler.targets() == []
        fake.fail(LIST_SERVICES, 403, 403)
        targets = by_model(await scaler.targets())
    assert targets["mlp"].pod_urls == () and targets["digits"].pod_urls == ()
    assert rbac_errors(caplog) == [
        "RBAC: cannot list deployments in namespace default; grant verbs [list] on "
        "deployments (apiGroup apps) to the autoscaler's ServiceAccount",
        "RBAC: cannot list services in namespace default; grant verbs [list] on services "
        '(apiGroup "" (core)) to the autoscaler\'s ServiceAccount',
    ]


async def test_conflict_and_server_errors_are_retried_with_backoff(
    scaler: KubernetesScaler, fake: FakeKubernetes, sleeps: Sleeps
) -> None:
    await scaler.targets()
    fake.fail(PATCH_SCALE, 409, 500)
    await scaler.scale("mlp", 6, "test")
    assert [r.method for r in fake.requests if r.permission == PATCH_SCALE] == ["PATCH"] * 3
    assert sleeps.delays == [0.2, 0.4]
    assert fake.replicas("bazaar-model-mlp") == 6


async def test_errors_that_outlast_the_retries_raise_a_scaler_error(
    scaler: KubernetesScaler, fake: FakeKubernetes, sleeps: Sleeps
) -> None:
    fake.fail(LIST_DEPLOYMENTS, 503, 500, 502)
    with pytest.raises(ScalerError, match="cannot list deployments in namespace default: 502"):
        await scaler.targets()
    assert sleeps.delays == [0.2, 0.4]
    await scaler.targets()  # and the next call starts afresh


async def test_a_failing_deployment_does_not_hide_the_others(
    scaler: KubernetesScaler, fake: FakeKubernetes, caplog: pytest.LogCaptureFixture
) -> None:
    fake.fail(GET_SCALE, 404)  # not retried: it cannot help
    fake.fail(LIST_SERVICES, 500, 500, 500)
    with caplog.at_level(logging.WARNING, "autoscaler.deployments"):
        targets = await scaler.targets()
    assert len(targets) == 1  # the other model, without pod URLs
    assert targets[0].pod_urls == ()
    assert len([r for r in fake.requests if r.permission == GET_SCALE]) == 2
    assert sorted(r.getMessage().split(": ")[1][:3] for r in caplog.records) == ["404", "500"]


async def test_a_timeout_is_retried(scaler: KubernetesScaler, fake: FakeKubernetes) -> None:
    fake.fail(LIST_DEPLOYMENTS, 5.0)  # longer than the client's 0.3 s timeout
    assert set(by_model(await scaler.targets())) == {"mlp", "digits"}
    lists = [r.query["labelSelector"] for r in fake.requests if r.permission == LIST_DEPLOYMENTS]
    assert lists == ["bazaar.dev/model", "bazaar.dev/model", "bazaar.dev/group"]


def sample_of(target: ScaleTarget) -> Sample:
    return Sample(
        time_s=0.0,
        replicas=target.replicas,
        ready_replicas=target.ready_replicas,
        starting_replicas=target.starting_replicas,
        queued=None,
        inflight=None,
        arrival_rate=None,
        completion_rate=None,
        busy_ratio=None,
        gpu_utilization=None,
    )


class NoSignals:
    async def read(self, target: ScaleTarget) -> Sample:
        return sample_of(target)


def four_replicas(sample: Sample, state: PolicyState, config: ScaleConfig, now: float) -> Decision:
    return Decision(4, state, "four, always", "scale_up")


async def test_the_loop_survives_timeouts_and_errors_of_the_api(
    scaler: KubernetesScaler, fake: FakeKubernetes, caplog: pytest.LogCaptureFixture
) -> None:
    autoscaler = Autoscaler(
        scaler, NoSignals(), AutoscalerMetrics(CollectorRegistry()), decide=four_replicas
    )
    fake.fail(LIST_DEPLOYMENTS, 5.0, 5.0, 5.0)  # every attempt times out
    with caplog.at_level(logging.WARNING, "autoscaler.loop"):
        assert await autoscaler.run_once() == []
    [warning] = caplog.records
    assert "cannot list deployments in namespace default" in warning.getMessage()
    assert not warning.exc_info  # a ScalerError explains itself

    fake.fail(PATCH_SCALE, *[500] * 6)  # both models' patches fail for good
    with caplog.at_level(logging.WARNING, "autoscaler.loop"):
        assert await autoscaler.run_once() == []
    assert fake.replicas("bazaar-model-mlp") == 3
    assert len(caplog.records) == 3

    decisions = dict(await autoscaler.run_once())
    assert {model: d.replicas for model, d in decisions.items()} == {"digits": 4, "mlp": 4}
    assert fake.replicas("bazaar-model-mlp") == fake.replicas("bazaar-model-digits") == 4


def by_name(targets: list[ScaleTarget]) -> dict[str, ScaleTarget]:
    return {target.name: target for target in targets}


async def test_two_versions_of_a_model_are_two_targets_scaled_apart(
    scaler: KubernetesScaler, fake: FakeKubernetes
) -> None:
    fake.add_deployment("bazaar-model-news-v1", "news", replicas=3, version="1")
    fake.add_deployment(
        "bazaar-model-news-v2",
        "news",
        replicas=1,
        version="2",
        annotations={"bazaar.dev/max-replicas": "2"},
    )
    targets = by_name(await scaler.targets())

    assert set(targets) == {"mlp", "digits", "news@1", "news@2"}
    assert (targets["news@1"].model, targets["news@1"].version) == ("news", "1")
    assert (targets["news@1"].replicas, targets["news@2"].replicas) == (3, 1)
    assert targets["news@2"].config == ScaleConfig(max_replicas=2)
    await scaler.scale("news@2", 2, "test")
    assert (fake.replicas("bazaar-model-news-v1"), fake.replicas("bazaar-model-news-v2")) == (3, 2)


@pytest.mark.parametrize("versions", [("1", "1"), ("1", None)])
async def test_two_deployments_that_do_not_each_name_a_version_are_not_scaled(
    scaler: KubernetesScaler,
    fake: FakeKubernetes,
    caplog: pytest.LogCaptureFixture,
    versions: tuple[str | None, str | None],
) -> None:
    fake.add_deployment("bazaar-model-news-a", "news", version=versions[0])
    fake.add_deployment("bazaar-model-news-b", "news", version=versions[1])
    with caplog.at_level(logging.ERROR, "autoscaler.deployments"):
        assert set(by_name(await scaler.targets())) == {"mlp", "digits"}
    [message] = [r.getMessage() for r in caplog.records]
    assert "(bazaar-model-news-a, bazaar-model-news-b)" in message
    assert "bazaar.dev/version" in message


def queued_tenths(sample: Sample, state: PolicyState, config: ScaleConfig, now: float) -> Decision:
    """One replica per 10 queued rows: the demand that reached the decision, made visible."""
    return Decision(int((sample.queued or 0) // 10), state, "queued / 10", "scale_up")


async def test_each_version_is_sized_on_its_own_demand(
    scaler: KubernetesScaler, fake: FakeKubernetes
) -> None:
    fake.add_deployment("bazaar-model-news-v1", "news", replicas=1, version="1")
    fake.add_deployment("bazaar-model-news-v2", "news", replicas=1, version="2")
    gateway = FakeGateway()
    gateway.set("news", queued=50, inflight=0, admitted=50, completed=0)
    gateway.set("news", queued=40, inflight=0, admitted=40, completed=0, version="1")
    gateway.set("news", queued=10, inflight=0, admitted=10, completed=0, version="2")
    async with serve(gateway.app()) as url, aiohttp.ClientSession() as session:
        signals = Signals(GatewayStats([url], session=session), PodMetrics(session=session))
        autoscaler = Autoscaler(
            scaler, signals, AutoscalerMetrics(CollectorRegistry()), decide=queued_tenths
        )
        decisions = dict(await autoscaler.run_once())
    assert (decisions["news@1"].replicas, decisions["news@2"].replicas) == (4, 1)
    assert fake.replicas("bazaar-model-news-v1") == 4
    assert fake.replicas("bazaar-model-news-v2") == 1
