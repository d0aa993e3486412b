"""One definition of a model's serving pods: the gateway routes to, and the autoscaler reads the
metrics of, the same set (the ready endpoints of the model's Services)."""

from __future__ import annotations

from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry

from autoscaler.deployments import KubernetesScaler
from gateway.discovery import EndpointSlices
from tests.cluster.fake_kubernetes import FakeKubernetes, cluster_at, serving

PORTS = {"http": 8000, "metrics": 8002}


async def test_the_autoscaler_reads_exactly_the_pods_the_gateway_routes_to() -> None:
    fake = FakeKubernetes()
    fake.add_deployment("bazaar-model-mlp", "mlp", replicas=4, ready_replicas=3)
    fake.add_service("bazaar-model-mlp", {"bazaar.dev/model": "mlp"}, ports=PORTS)
    # Dual stack: one pod in an IPv4 and an IPv6 slice, a pod not ready, a pod in two slices.
    fake.set_slice(
        "mlp-v4",
        "bazaar-model-mlp",
        [("10.0.0.1", True), ("10.0.0.2", True), ("10.0.0.3", False)],
        ports=PORTS,
    )
    fake.set_slice("mlp-v4-b", "bazaar-model-mlp", [("10.0.0.2", True)], ports=PORTS)
    fake.set_slice(
        "mlp-v6", "bazaar-model-mlp", [("fd00::4", None)], ports=PORTS, address_type="IPv6"
    )
    routed: dict[str, list[str]] = {}
    async with serving(fake) as url:
        source = EndpointSlices(cluster_at(url, "gateway", "gateway"))
        await source.start(
            lambda model, urls, traffic=None: routed.__setitem__(model, urls), CollectorRegistry()
        )
        await source.stop()
        scaler = KubernetesScaler(cluster_at(url, "autoscaler", "autoscaler"))
        [target] = await scaler.targets()
        scaler.close()

    def hosts(urls: list[str] | tuple[str, ...]) -> list[str | None]:
        return sorted(urlsplit(u).hostname for u in urls)

    assert hosts(routed["mlp"]) == hosts(target.pod_urls) == ["10.0.0.1", "10.0.0.2", "fd00::4"]
    assert {urlsplit(u).port for u in routed["mlp"]} == {8000}
    assert {urlsplit(u).port for u in target.pod_urls} == {8002}
