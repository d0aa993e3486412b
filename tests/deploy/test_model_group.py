"""The model-group example (``deploy/overlays/model-group``): one Deployment serving several
models, found by the gateway through one labelled Service per model, next to the
one-model-per-Deployment shape. The checks every render gets (schemas, labels, selectors,
ports, pod security, sizing, ingress) run on it through ``RENDERS`` in
``test_manifests.py``; these are the group's own."""

from __future__ import annotations

import pytest

from autoscaler.annotations import scale_config
from bazaar.cli import parser as bazaar_parser
from cluster.deployments import GROUP_LABEL
from gateway.discovery import EndpointSlices
from tests.deploy.test_manifests import (
    MODEL_LABEL,
    Resource,
    container_ports,
    find,
    ingress_peers,
    models,
    of_kind,
    only_container,
    render,
    selected,
)

GROUP = "bazaar-model-group-small"


@pytest.fixture(scope="module")
def stack() -> list[Resource]:
    return render("overlays/model-group")


def test_every_model_of_the_group_has_a_service_selecting_only_the_group(
    stack: list[Resource],
) -> None:
    group = find(stack, "Deployment", GROUP)
    args = bazaar_parser().parse_args(only_container(group)["args"])
    assert args.models == ["digits", "mlp_wide"]
    assert args.memory_budget > 0
    source = EndpointSlices.__init__.__kwdefaults__
    label, port_name, grpc_port_name = (
        source["label"],
        source["port_name"],
        source["grpc_port_name"],
    )
    assert args.grpc_port in container_ports(group)
    discovered = {
        service["metadata"]["labels"][label]: service
        for service in of_kind(stack, "Service")
        if label in service["metadata"].get("labels", {})
    }
    for model in args.models:
        service = discovered[model]
        assert selected(stack, service["spec"]["selector"]) == [group], model
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert ports[port_name]["targetPort"] in container_ports(group)
        assert ports[grpc_port_name]["targetPort"] in container_ports(group)
        assert ports["metrics"]["targetPort"] == "metrics"
    # The one-model shape stays beside it, its Service selecting its own pods only.
    [mlp] = models(stack)
    assert selected(stack, discovered["mlp"]["spec"]["selector"]) == [mlp]


def test_the_group_is_autoscaled_and_drained_one_pod_at_a_time(stack: list[Resource]) -> None:
    group = find(stack, "Deployment", GROUP)
    assert MODEL_LABEL not in group["metadata"]["labels"]  # a group, not a model
    assert group["metadata"]["labels"][GROUP_LABEL] == "small"
    assert "replicas" not in group["spec"]  # the autoscaler's to set
    config = scale_config(group["metadata"]["annotations"], GROUP)
    assert (config.min_replicas, config.max_replicas) == (2, 8)
    [budget] = [
        b
        for b in of_kind(stack, "PodDisruptionBudget")
        if selected(stack, b["spec"]["selector"]["matchLabels"]) == [group]
    ]
    assert budget["spec"]["maxUnavailable"] == 1


def test_group_pods_take_data_from_gateways_and_scrapes_as_model_pods_do(
    stack: list[Resource],
) -> None:
    [mlp] = models(stack)
    assert ingress_peers(stack, find(stack, "Deployment", GROUP)) == ingress_peers(stack, mlp)
