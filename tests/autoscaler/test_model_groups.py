"""A model group (one Deployment, many models) is one scale target sized on its models' demand
summed: the Kubernetes scaler through the real ``kubernetes`` client against the in-process
fake API, and the signals against fake gateways and pods on loopback."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from autoscaler.deployments import KubernetesScaler
from autoscaler.loop import Autoscaler, ScaleTarget
from autoscaler.metrics import AutoscalerMetrics
from autoscaler.policy import Decision, PolicyState, Sample, ScaleConfig
from autoscaler.sources import GatewayStats, PodMetrics, Signals
from tests.autoscaler.test_sources import FakeGateway, dead_url, pod_app
from tests.cluster.fake_kubernetes import FakeKubernetes, cluster_at, deployment, service, serving
from tests.support import serve

PORTS = {"http": 8000, "metrics": 8002}
GROUP_POD_LABELS = {"app.kubernetes.io/name": "bazaar-model", "bazaar.dev/group": "small"}


def add_group(fake: FakeKubernetes, name: str, group: str, replicas: int) -> None:
    """A group Deployment as ``deploy/overlays/model-group`` has it: labelled with the group,
    not with a model."""
    item = deployment(name, "-", "default", replicas, replicas, {}, PORTS["http"])
    labels = {"app.kubernetes.io/name": "bazaar-model", "bazaar.dev/group": group}
    item["metadata"]["labels"] = labels
    item["spec"]["selector"] = {"matchLabels": labels}
    item["spec"]["template"]["metadata"]["labels"] = labels
    fake.deployments["default", name] = item


def add_model_service(fake: FakeKubernetes, model: str, selector: dict[str, str]) -> None:
    name = f"bazaar-model-{model}"
    item = service(name, "default", {"bazaar.dev/model": model}, PORTS)
    item["spec"]["selector"] = selector
    fake.services["default", name] = item


@pytest.fixture
async def fake() -> AsyncIterator[FakeKubernetes]:
    """The model-group overlay's shape: group ``small`` serving digits and mlp_wide (both
    Services select its two pods), and mlp on a Deployment of its own."""
    fake = FakeKubernetes()
    add_group(fake, "bazaar-model-group-small", "small", replicas=2)
    for model in ("digits", "mlp_wide"):
        add_model_service(fake, model, GROUP_POD_LABELS)
        fake.set_slice(
            f"bazaar-model-{model}-a",
            f"bazaar-model-{model}",
            [("10.0.0.1", True), ("10.0.0.2", True)],
            ports=PORTS,
        )
    fake.add_deployment("bazaar-model-mlp", "mlp", replicas=1)
    fake.add_service("bazaar-model-mlp", {"bazaar.dev/model": "mlp"}, ports=PORTS)
    yield fake


@pytest.fixture
async def api_url(fake: FakeKubernetes) -> AsyncIterator[str]:
    async with serving(fake) as url:
        yield url


@pytest.fixture
def kubernetes_scaler(api_url: str) -> Iterator[KubernetesScaler]:
    scaler = KubernetesScaler(cluster_at(api_url, "autoscaler", "autoscaler.deployments"))
    yield scaler
    scaler.close()


def by_name(targets: list[ScaleTarget]) -> dict[str, ScaleTarget]:
    return {target.name: target for target in targets}


async def test_a_model_group_is_one_target_serving_the_models_whose_services_select_it(
    kubernetes_scaler: KubernetesScaler, fake: FakeKubernetes
) -> None:
    targets = by_name(await kubernetes_scaler.targets())
    assert set(targets) == {"small", "mlp"}
    small = targets["small"]
    assert small.models == ("digits", "mlp_wide")
    assert (small.replicas, small.ready_replicas, small.version) == (2, 2, None)
    assert small.config == ScaleConfig()
    # Its pods once each, on the metrics port, though both models' Services list them.
    assert small.pod_urls == ("http://10.0.0.1:8002", "http://10.0.0.2:8002")
    assert targets["mlp"].models == ()
    await kubernetes_scaler.scale("small", 3, "test")
    assert fake.replicas("bazaar-model-group-small") == 3


async def test_a_group_no_service_selects_or_named_as_a_model_is_not_scaled(
    kubernetes_scaler: KubernetesScaler, fake: FakeKubernetes, caplog: pytest.LogCaptureFixture
) -> None:
    add_group(fake, "bazaar-model-group-lonely", "lonely", replicas=1)
    add_group(fake, "bazaar-model-group-mlp", "mlp", replicas=1)
    with caplog.at_level(logging.ERROR, "autoscaler.deployments"):
        assert set(by_name(await kubernetes_scaler.targets())) == {"small", "mlp"}
    messages = sorted(r.getMessage() for r in caplog.records)
    assert len(messages) == 2
    assert "'lonely'" in messages[0] and "no Service labelled bazaar.dev/model" in messages[0]
    assert "'mlp'" in messages[1] and "named as a model is" in messages[1]
    assert fake.replicas("bazaar-model-mlp") == 1


def queued_tenths(sample: Sample, state: PolicyState, config: ScaleConfig, now: float) -> Decision:
    """One replica per 10 queued rows: the demand that reached the decision, made visible."""
    return Decision(int((sample.queued or 0) // 10), state, "queued / 10", "scale_up")


async def test_a_group_is_sized_on_its_models_demand_summed(
    kubernetes_scaler: KubernetesScaler, fake: FakeKubernetes
) -> None:
    gateway = FakeGateway()
    gateway.set("digits", queued=30, inflight=0, admitted=30, completed=0)
    gateway.set("mlp_wide", queued=25, inflight=0, admitted=25, completed=0)
    gateway.set("mlp", queued=10, inflight=0, admitted=10, completed=0)
    async with serve(gateway.app()) as url, aiohttp.ClientSession() as session:
        signals = Signals(GatewayStats([url], session=session), PodMetrics(session=session))
        autoscaler = Autoscaler(
            kubernetes_scaler, signals, AutoscalerMetrics(CollectorRegistry()), decide=queued_tenths
        )
        decisions = dict(await autoscaler.run_once())
    assert (decisions["small"].replicas, decisions["mlp"].replicas) == (5, 1)
    assert fake.replicas("bazaar-model-group-small") == 5


async def test_a_groups_pods_are_as_busy_as_their_models_together() -> None:
    async with (
        aiohttp.ClientSession() as session,
        serve(pod_app({"1": 0.1, "2": 0.6})) as pod_a,  # and "other" at 1.0 in each
        serve(pod_app({"1": 0.2})) as pod_b,
    ):
        pods = PodMetrics(session=session, timeout_s=0.5)
        load = await pods.read_group(("mlp", "other"), [pod_a, pod_b, dead_url()])
        alone = await pods.read_group(("mlp", "absent"), [pod_a, pod_b])
        none = await pods.read_group(("absent",), [pod_a, pod_b])
    # Per pod, each model's busiest version, summed; then the mean over the pods.
    assert load.busy_ratio == pytest.approx(((0.6 + 1.0) + (0.2 + 1.0)) / 2)
    assert alone.busy_ratio == pytest.approx((0.6 + 0.2) / 2)
    assert none.busy_ratio is None


async def test_each_models_busy_ratio_from_one_scrape_of_each_pod() -> None:
    async with (
        aiohttp.ClientSession() as session,
        serve(pod_app({"1": 0.1, "2": 0.6})) as pod_a,
        serve(pod_app({"1": 0.2})) as pod_b,
    ):
        busy = await PodMetrics(session=session).busy_by_model([pod_a, pod_b, dead_url()])
    assert busy == {"mlp": pytest.approx((0.6 + 0.2) / 2), "other": 1.0}
