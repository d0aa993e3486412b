"""The model-versions example (``deploy/overlays/versions``): one model at two versions, two
Deployments behind one Service with a traffic policy. The checks every render gets (schemas,
labels, selectors, ports, pod security, sizing, ingress) run on it through ``RENDERS`` in
``test_manifests.py``; these are its own, down to the autoscaler listing the two Deployments
as two targets through the real Kubernetes client."""

from __future__ import annotations

import pytest
import yaml

from autoscaler.annotations import scale_config
from autoscaler.deployments import KubernetesScaler
from bazaar.cli import parser as bazaar_parser
from cluster.deployments import VERSION_LABEL
from gateway.discovery import TRAFFIC_ANNOTATION
from protocol.traffic import parse_traffic
from tests.cluster.fake_kubernetes import FakeKubernetes, cluster_at, serving
from tests.deploy.test_manifests import (
    MODEL_LABEL,
    Resource,
    find,
    models,
    only_container,
    render,
    selected,
)


@pytest.fixture(scope="module")
def stack() -> list[Resource]:
    return render("overlays/versions")


def digits_versions(stack: list[Resource]) -> dict[str, Resource]:
    found = [d for d in models(stack) if d["metadata"]["labels"][MODEL_LABEL] == "digits"]
    return {d["metadata"]["labels"][VERSION_LABEL]: d for d in found}


def test_each_version_has_a_deployment_that_builds_and_serves_only_it(
    stack: list[Resource],
) -> None:
    versions = digits_versions(stack)
    assert set(versions) == {"1", "2"}
    for version, deployment in versions.items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector[VERSION_LABEL] == version  # the two never claim each other's pods
        assert selected(stack, selector) == [deployment]
        [init] = deployment["spec"]["template"]["spec"]["initContainers"]
        built = bazaar_parser().parse_args(init["args"])
        assert built.model_version == int(version)
        served = bazaar_parser().parse_args(only_container(deployment)["args"])
        assert served.models == ["digits"]
        scale_config(deployment["metadata"]["annotations"], deployment["metadata"]["name"])
        assert "replicas" not in deployment["spec"]
        assert find(stack, "PodDisruptionBudget", deployment["metadata"]["name"])


def test_one_service_selects_both_versions_with_a_rollout_of_the_candidate(
    stack: list[Resource],
) -> None:
    service = find(stack, "Service", "bazaar-model-digits")
    assert service["metadata"]["labels"][MODEL_LABEL] == "digits"
    versions = digits_versions(stack)
    assert selected(stack, service["spec"]["selector"]) == sorted(
        versions.values(), key=lambda d: d["metadata"]["name"]
    )
    annotation = yaml.safe_load(service["metadata"]["annotations"][TRAFFIC_ANNOTATION])
    policy = parse_traffic(annotation, "digits", TRAFFIC_ANNOTATION)
    assert policy.rollout is not None and policy.shadow is not None
    assert policy.rollout.version == policy.shadow.version == "2"
    assert {version for version, _ in policy.weights} == {"1"}
    assert policy.rollout.steps[-1] == 100


async def test_the_autoscaler_scales_the_two_deployments_as_two_targets(
    stack: list[Resource],
) -> None:
    fake = FakeKubernetes()
    for deployment in digits_versions(stack).values():
        metadata = deployment["metadata"]
        fake.add_deployment(
            metadata["name"],
            "digits",
            annotations=metadata["annotations"],
            version=metadata["labels"][VERSION_LABEL],
        )
    async with serving(fake) as url:
        scaler = KubernetesScaler(cluster_at(url, "autoscaler", "autoscaler.deployments"))
        try:
            targets = {target.name: target for target in await scaler.targets()}
            await scaler.scale("digits@2", 3, "test")
        finally:
            scaler.close()
    assert set(targets) == {"digits@1", "digits@2"}
    assert targets["digits@2"].config.max_replicas == 4
    assert fake.replicas("bazaar-model-digits-v2") == 3
    assert fake.replicas("bazaar-model-digits-v1") == 1
