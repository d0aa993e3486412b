"""deploy/: the manifests are valid Kubernetes objects and agree with each other and the code.

Every render users can apply is checked: the base, both overlays, the cpu overlay with each
component of deploy/components/, and the load test (deploy/locust). They are rendered by a
small subset of kustomize (resources, components, namespace, labels, images, strategic-merge
patches by path, and JSON patches by path that add to a target); a kustomization using
anything else fails here, so the subset cannot silently drift. Where ``kubectl`` is
installed, its ``kustomize`` output must equal ours. Each rendered object is validated
against the Kubernetes schemas of ``K8S_VERSION`` (kubernetes-validate, strict: unknown
fields are errors), or the newest the package has for a kind that version lacks; the
Prometheus operator's kinds are checked by shape.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, latest_version

from autoscaler.annotations import scale_config
from autoscaler.command import add_parser
from autoscaler.deployments import REQUIRED_RBAC as AUTOSCALER_RBAC
from bazaar.cli import parser as bazaar_parser
from cluster.api import Permission
from gateway.discovery import REQUIRED_RBAC as DISCOVERY_RBAC
from gateway.discovery import EndpointSlices
from gateway.rollout_record import LEASE_NAME as GATEWAY_LEASE
from gateway.rollout_record import ROLLOUT_RBAC
from protocol.auth import parse_keys_file, parse_token
from protocol.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.33.0"
COMPONENTS = [
    "prometheus-operator",
    "models-pvc",
    "models-image",
    "models-image-volume",
    "models-fetch",
    "api-keys",
    "model-control",
    "keda",
]
# What `kubectl apply -k` takes: a directory, or the cpu overlay with one component.
STACKS = ["base", "overlays/cpu", "overlays/gpu"] + [f"overlays/cpu+{c}" for c in COMPONENTS]
RENDERS = [*STACKS, "locust", "overlays/model-group", "overlays/versions"]
KUSTOMIZE_SUBSET = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "components",
    "labels",
    "images",
    "patches",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
MONITORING_KINDS = {"PodMonitor", "ServiceMonitor"}
OPERATOR_KINDS = {*MONITORING_KINDS, "PrometheusRule", "ScaledObject"}
"""The Prometheus operator's CRDs (the PrometheusRule: tests/deploy/test_rules.py) and KEDA's."""
MODEL_LABEL = "bazaar.dev/model"
GATEWAY_RBAC = DISCOVERY_RBAC | ROLLOUT_RBAC
"""The gateway's calls: discovery, and rollouts decided by one (``--leader-election-id``)."""
NAMESPACE = "bazaar"
IMAGE = "ghcr.io/bazaar-dev/bazaar"
VERSION = "0.1.0"
COMPONENT_LABELS = {"gateway", "model-server", "autoscaler", "loadtest", "monitoring"}
MONITORING_NAMESPACE = {"kubernetes.io/metadata.name": "monitoring"}
KEDA_NAMESPACE = {"kubernetes.io/metadata.name": "keda"}
# Pod Security Standards, restricted: the volume types it admits (image: Kubernetes 1.33+).
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "image",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
PRESTOP_S = 5
# The gateway's longest request: --max-queue-time (30 s) + the pod call (60 s).
POD_CALL_S = 60
STARTUP_BUDGET_S = 300

Resource = dict[str, Any]


def load_all(path: Path) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization_of(name: str) -> tuple[Path, Resource]:
    """The kustomization a render name stands for: a directory's own, or an overlay with
    one component (``overlays/cpu+models-pvc``), as a user's overlay would list it."""
    overlay, _, component = name.partition("+")
    if not component:
        [kustomization] = load_all(DEPLOY / overlay / "kustomization.yaml")
        return DEPLOY / overlay, kustomization
    return DEPLOY, {"resources": [overlay], "components": [f"components/{component}"]}


def render(name: str) -> list[Resource]:
    return build(*kustomization_of(name))


def build(directory: Path, kustomization: Resource) -> list[Resource]:
    """``kustomize build``, for the features bazaar's kustomizations use, in kustomize's
    order: resources, then components (each transforms what came before), then this
    kustomization's patches, namespace, labels and images."""
    unsupported = set(kustomization) - KUSTOMIZE_SUBSET
    assert not unsupported, f"{directory}: this test's kustomize subset lacks {unsupported}"
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            [child] = load_all(path / "kustomization.yaml")
            assert child["kind"] == "Kustomization", path
            resources += build(path, child)
        else:
            resources += load_all(path)
    for entry in kustomization.get("components", []):
        [component] = load_all(directory / entry / "kustomization.yaml")
        assert component["kind"] == "Component", entry
        resources += build(directory / entry, {"resources": component.get("resources", [])})
        transform(directory / entry, component, resources)
    transform(directory, kustomization, resources)
    return resources


def transform(directory: Path, kustomization: Resource, resources: list[Resource]) -> None:
    for patch in kustomization.get("patches", []):
        if "target" in patch:
            assert set(patch["target"]) == {"kind", "name"}, f"{directory}: {patch}"
            target = find(resources, patch["target"]["kind"], patch["target"]["name"])
            [operations] = load_all(directory / patch["path"])
            for operation in operations:
                json_patch_add(target, operation)
            continue
        assert set(patch) == {"path"}, f"{directory}: only patches by path are supported"
        for change in load_all(directory / patch["path"]):
            merge(find(resources, change["kind"], change["metadata"]["name"]), change)
    if "namespace" in kustomization:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = kustomization["namespace"]
    for labels in kustomization.get("labels", []):
        assert labels.get("includeSelectors") is False, "selectors are immutable: keep them"
        for resource in resources:
            resource["metadata"].setdefault("labels", {}).update(labels["pairs"])
            if labels.get("includeTemplates") and resource["kind"] == "Deployment":
                resource["spec"]["template"]["metadata"]["labels"].update(labels["pairs"])
    for image in kustomization.get("images", []):
        for container in containers(resources):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                new_name = image.get("newName", name)
                container["image"] = f"{new_name}:{image.get('newTag', tag)}".rstrip(":")


def merge(target: Any, patch: Any) -> Any:
    """Strategic merge, as far as bazaar uses it: maps merge (a null value deletes the key),
    lists of named maps merge by name (``$patch: delete`` removes one; new ones go first),
    any other list is replaced."""
    if isinstance(target, dict) and isinstance(patch, dict):
        for key, value in patch.items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = merge(target[key], value) if key in target else copy.deepcopy(value)
        return target
    if isinstance(target, list) and isinstance(patch, list) and _named(target + patch):
        added = 0
        for item in patch:
            [*found] = [t for t in target if t["name"] == item["name"]]
            if item.get("$patch") == "delete":
                target[:] = [t for t in target if t["name"] != item["name"]]
            elif found:
                merge(found[0], item)
            else:  # first, in the patch's order, as kustomize puts them
                target.insert(added, copy.deepcopy(item))
                added += 1
        return target
    return copy.deepcopy(patch)


def json_patch_add(target: Any, operation: dict[str, Any]) -> None:
    """A JSON patch (RFC 6902) ``add``, the one operation bazaar uses: ``-`` appends."""
    assert set(operation) == {"op", "path", "value"} and operation["op"] == "add", operation
    *parents, last = operation["path"].removeprefix("/").split("/")
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    if isinstance(target, list):
        target.insert(len(target) if last == "-" else int(last), copy.deepcopy(operation["value"]))
    else:
        target[last] = copy.deepcopy(operation["value"])


def _named(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(item, dict) and "name" in item for item in items)


def find(resources: list[Resource], kind: str, name: str) -> Resource:
    [found] = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def of_kind(resources: list[Resource], kind: str) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind]


def pod_specs(resources: list[Resource]) -> Iterator[dict[str, Any]]:
    for deployment in of_kind(resources, "Deployment"):
        yield deployment["spec"]["template"]["spec"]


def containers(resources: list[Resource]) -> Iterator[dict[str, Any]]:
    for spec in pod_specs(resources):
        yield from spec.get("initContainers", [])
        yield from spec["containers"]


def container_ports(deployment: Resource) -> set[int | str]:
    ports: set[int | str] = set()
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        for port in container.get("ports", []):
            ports |= {port["containerPort"], port.get("name", port["containerPort"])}
    return ports


def port_number(deployment: Resource, name: str) -> int:
    [number] = [
        p["containerPort"]
        for c in deployment["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
        if p.get("name") == name
    ]
    return int(number)


def selected(resources: list[Resource], selector: dict[str, str]) -> list[Resource]:
    return [
        d
        for d in of_kind(resources, "Deployment")
        if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]


def models(resources: list[Resource]) -> list[Resource]:
    found = [d for d in of_kind(resources, "Deployment") if MODEL_LABEL in d["metadata"]["labels"]]
    assert found, "no model Deployment"
    return found


def only_container(deployment: Resource) -> dict[str, Any]:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def service_port(resources: list[Resource], url: str) -> Resource:
    """The Service a cluster-internal URL (http://name:port) points at; fails if none."""
    parts = urlsplit(url)
    service = find(resources, "Service", str(parts.hostname))
    assert parts.port in {p["port"] for p in service["spec"]["ports"]}, url
    return service


def flag(args: list[str], name: str) -> str:
    [value] = [arg.partition("=")[2] for arg in args if arg.startswith(f"{name}=")]
    return value


@pytest.fixture(scope="module", params=RENDERS)
def rendered(request: pytest.FixtureRequest) -> list[Resource]:
    return render(request.param)


@pytest.fixture(scope="module", params=STACKS)
def stack(request: pytest.FixtureRequest) -> list[Resource]:
    return render(request.param)


# Files and rendering


def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 20
    for path in files:
        assert load_all(path), f"{path} is empty"


def test_kustomizations_list_files_that_exist_inside_their_root() -> None:
    kustomizations = list(DEPLOY.rglob("kustomization.yaml"))
    assert {k.parent.name for k in kustomizations} >= {"base", "cpu", "gpu", "locust", *COMPONENTS}
    for kustomization in kustomizations:
        [data] = load_all(kustomization)
        entries = data.get("resources", []) + [p["path"] for p in data.get("patches", [])]
        for entry in entries:
            path = (kustomization.parent / entry).resolve()
            assert path.is_file() or (path / "kustomization.yaml").is_file(), f"{path}"
            if path.is_file():  # kustomize's load restrictor: files only from inside the root
                assert path.is_relative_to(kustomization.parent), f"{kustomization}: {entry}"


def test_every_component_is_rendered_here() -> None:
    assert {p.name for p in (DEPLOY / "components").iterdir()} == set(COMPONENTS)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("name", RENDERS)
def test_our_render_is_what_kustomize_renders(name: str, tmp_path: Path) -> None:
    directory, kustomization = kustomization_of(name)
    if "+" in name:  # a user's overlay: a kustomization of its own, outside deploy/
        relative = {
            key: [os.path.relpath(directory / entry, tmp_path) for entry in kustomization[key]]
            for key in ("resources", "components")
        }
        (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(relative))
        directory = tmp_path
    output = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout

    def key(r: Resource) -> tuple[str, str]:
        return r["kind"], r["metadata"]["name"]

    theirs = sorted((r for r in yaml.safe_load_all(output) if r), key=key)
    assert sorted(render(name), key=key) == theirs


def test_resources_are_valid_kubernetes_objects(rendered: list[Resource]) -> None:
    for resource in rendered:
        if resource["kind"] in OPERATOR_KINDS:
            continue  # a CRD, no schema here: test_monitors_*, test_rules.py, test_keda_*
        try:
            kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
        except SchemaNotFoundError:
            kubernetes_validate.validate(resource, latest_version(), strict=True)


def test_every_object_is_namespaced_and_labelled(rendered: list[Resource]) -> None:
    for resource in rendered:
        metadata = resource["metadata"]
        where = f"{resource['kind']}/{metadata['name']}"
        if resource["kind"] not in CLUSTER_SCOPED:
            assert metadata["namespace"] == NAMESPACE, where
        labels = metadata["labels"]
        assert labels["app.kubernetes.io/part-of"] == "bazaar", where
        assert labels["app.kubernetes.io/version"] == VERSION, where
        assert labels["app.kubernetes.io/name"], where
        if (resource["kind"], metadata["name"]) in {
            ("Namespace", NAMESPACE),
            ("NetworkPolicy", "default-deny-ingress"),
        }:
            continue  # the namespace's own, no one component's
        assert labels["app.kubernetes.io/component"] in COMPONENT_LABELS, where
    for deployment in of_kind(rendered, "Deployment"):
        pod = deployment["spec"]["template"]["metadata"]["labels"]
        for key in ("name", "component", "part-of", "version"):
            key = f"app.kubernetes.io/{key}"
            assert pod[key] == deployment["metadata"]["labels"][key], deployment["metadata"]


# Consistency: selectors, ports, probes


def test_deployment_selectors_match_their_pod_labels(rendered: list[Resource]) -> None:
    for deployment in of_kind(rendered, "Deployment"):
        match = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert match.items() <= labels.items(), deployment["metadata"]["name"]


def test_services_select_pods_and_target_their_ports(rendered: list[Resource]) -> None:
    for service in of_kind(rendered, "Service"):
        name = service["metadata"]["name"]
        deployments = selected(rendered, service["spec"]["selector"])
        assert deployments, f"Service {name} selects no pods"
        for port in service["spec"]["ports"]:
            for deployment in deployments:
                assert port["targetPort"] in container_ports(deployment), (name, port)


def test_probes_use_declared_ports(rendered: list[Resource]) -> None:
    for container in containers(rendered):
        declared = {p.get("name") for p in container.get("ports", [])}
        declared |= {p["containerPort"] for p in container.get("ports", [])}
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in container:
                assert container[probe]["httpGet"]["port"] in declared, (container["name"], probe)


def test_prometheus_annotations_name_a_metrics_port(rendered: list[Resource]) -> None:
    for deployment in of_kind(rendered, "Deployment"):
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        if deployment["metadata"]["labels"]["app.kubernetes.io/component"] == "loadtest":
            assert "prometheus.io/scrape" not in annotations
            continue
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
        assert int(annotations["prometheus.io/port"]) in container_ports(deployment)
    for model in of_kind(rendered, "Deployment"):
        if MODEL_LABEL in model["metadata"]["labels"]:
            annotations = model["spec"]["template"]["metadata"]["annotations"]
            assert int(annotations["prometheus.io/port"]) == port_number(model, "metrics")


# Pod security: the namespace enforces restricted, and every pod meets it


def test_the_namespace_enforces_the_restricted_pod_security_standard(
    stack: list[Resource],
) -> None:
    [namespace] = of_kind(stack, "Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE
    labels = namespace["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"


def test_every_pod_meets_the_restricted_pod_security_standard(rendered: list[Resource]) -> None:
    for deployment in of_kind(rendered, "Deployment"):
        name = deployment["metadata"]["name"]
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        }, name
        for host in ("hostNetwork", "hostPID", "hostIPC", "hostUsers"):
            assert host not in spec, (name, host)
        for volume in spec.get("volumes", []):
            assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, (name, volume)
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = (name, container["name"])
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            }, where
            assert "ports" not in container or all("hostPort" not in p for p in container["ports"])
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            if container["name"] != "copy-models":  # cp writes nowhere but its target
                assert "/tmp" in mounts, where


def test_every_container_is_sized_and_pulls_a_qualified_image(rendered: list[Resource]) -> None:
    for container in containers(rendered):
        resources = container["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys(), container["name"]
        assert {"cpu", "memory"} <= resources["limits"].keys(), container["name"]
        registry, _, rest = container["image"].partition("/")
        assert "." in registry and ":" in rest, container["image"]
        assert container["imagePullPolicy"] == "Always", container["name"]


def test_bazaar_images_carry_the_release_tag(stack: list[Resource]) -> None:
    images = {c["image"] for c in containers(stack)}
    assert f"{IMAGE}:{VERSION}" in images
    assert images - {f"{IMAGE}:{VERSION}", f"{IMAGE}:{VERSION}-gpu", f"{IMAGE}:{VERSION}-demo"} <= {
        "registry.example.com/bazaar-models:1.0"
    }
    # The demo image (serving + the `demo` extra) builds the demo repository, nothing else.
    for spec in pod_specs(stack):
        for container in spec["containers"]:
            assert not container["image"].endswith("-demo"), container["name"]
        for init in spec.get("initContainers", []):
            assert init["image"].endswith("-demo") is (init["name"] == "build-demo")


def test_long_running_containers_have_probes(rendered: list[Resource]) -> None:
    for deployment in of_kind(rendered, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            if deployment["metadata"]["name"] == "locust-worker":
                assert not container.get("ports"), "a worker with a port should be probed"
                continue
            assert "livenessProbe" in container and "readinessProbe" in container


def test_command_lines_parse_with_the_bazaar_command(stack: list[Resource]) -> None:
    """The image's entry point is ``bazaar``: every container that passes it arguments
    must pass ones its parser takes (flags renamed in the code fail here)."""
    parser = bazaar_parser()
    parsed = 0
    for container in containers(stack):
        if container["image"].startswith(f"{IMAGE}:") and "command" not in container:
            parser.parse_args(container["args"])
            parsed += 1
    assert parsed >= 1


# The gateway, the models and the autoscaler


def test_the_gateway_discovers_every_model_through_a_labelled_service(
    stack: list[Resource],
) -> None:
    deployment = find(stack, "Deployment", "bazaar-gateway")
    container = only_container(deployment)
    assert "--kubernetes-namespace=$(POD_NAMESPACE)" in container["args"]
    assert not [arg for arg in container["args"] if arg.startswith(("--endpoints", "--max-b"))]
    [env] = [env for env in container["env"] if env["name"] == "POD_NAMESPACE"]
    assert env["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert not of_kind(stack, "ConfigMap")

    source = EndpointSlices.__init__.__kwdefaults__
    label, port_name, grpc_port_name = (
        source["label"],
        source["port_name"],
        source["grpc_port_name"],
    )
    for model_deployment in models(stack):
        model = model_deployment["metadata"]["labels"][label]
        services = [
            s
            for s in of_kind(stack, "Service")
            if s["metadata"].get("labels", {}).get(label) == model
        ]
        assert services, f"model {model} has no Service labelled {label}={model}"
        for service in services:
            assert selected(stack, service["spec"]["selector"]) == [model_deployment]
            ports = {p["name"]: p for p in service["spec"]["ports"]}
            assert ports[port_name]["targetPort"] in container_ports(model_deployment)
            # The batches go over gRPC: the slices carry the port the pods serve it on.
            grpc = ports[grpc_port_name]
            assert grpc["appProtocol"] == "grpc"
            assert grpc["targetPort"] in container_ports(model_deployment)
            # The autoscaler reads the same endpoints' metrics port.
            assert ports["metrics"]["targetPort"] == "metrics"


def test_the_gateway_runs_two_replicas_and_answers_http_and_grpc(stack: list[Resource]) -> None:
    deployment = find(stack, "Deployment", "bazaar-gateway")
    assert deployment["spec"]["replicas"] == 2
    container = only_container(deployment)
    assert container["ports"] == [
        {"name": "http", "containerPort": 8000},
        {"name": "grpc", "containerPort": 8001},
    ]
    assert flag(container["args"], "--port") == "8000"
    assert flag(container["args"], "--grpc-port") == "8001"
    service = find(stack, "Service", "bazaar-gateway")
    assert {"name": "grpc", "port": 8001, "targetPort": "grpc", "appProtocol": "grpc"} in (
        service["spec"]["ports"]
    )
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}


def test_model_servers_split_the_data_plane_from_metrics(stack: list[Resource]) -> None:
    for deployment in models(stack):
        server = only_container(deployment)
        args = server["args"]
        assert args[0] == "model-server"
        assert flag(args, "--model-repository") == "/models"
        assert flag(args, "--port") == str(port_number(deployment, "http")) == "8000"
        assert flag(args, "--grpc-port") == str(port_number(deployment, "grpc")) == "8001"
        assert flag(args, "--control-port") == str(port_number(deployment, "metrics")) == "8002"
        # Model control only with its token (components/model-control): the pods listen on
        # every address.
        assert ("--enable-model-control" in args) is any(
            arg.startswith("--control-token-file=") for arg in args
        )
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert server[probe]["httpGet"]["port"] == "metrics", probe
        [models_mount] = [m for m in server["volumeMounts"] if m["name"] == "models"]
        assert models_mount == {"name": "models", "mountPath": "/models", "readOnly": True}


def test_a_model_that_never_loads_fails_its_startup_probe(stack: list[Resource]) -> None:
    for deployment in models(stack):
        probe = only_container(deployment)["startupProbe"]
        assert probe["httpGet"] == {"path": "/v2/health/ready", "port": "metrics"}
        budget = probe["failureThreshold"] * probe["periodSeconds"]
        assert budget == STARTUP_BUDGET_S, "about 5 minutes to load, then liveness takes over"


def test_model_deployments_carry_valid_scaling_annotations(stack: list[Resource]) -> None:
    for deployment in models(stack):
        metadata = deployment["metadata"]
        scale_config(metadata.get("annotations", {}), metadata["name"])  # raises if bad
        model = metadata["labels"][MODEL_LABEL]
        assert f"--model={model}" in only_container(deployment)["args"]
        assert deployment["spec"]["template"]["metadata"]["labels"][MODEL_LABEL] == model


def test_model_deployments_leave_replicas_to_the_autoscaler(stack: list[Resource]) -> None:
    for deployment in models(stack):
        assert "replicas" not in deployment["spec"], deployment["metadata"]["name"]


def test_autoscaler_arguments_parse_and_point_at_the_gateways(stack: list[Resource]) -> None:
    deployment = find(stack, "Deployment", "bazaar-autoscaler")
    container = only_container(deployment)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(container["args"])
    assert args.namespace == "$(POD_NAMESPACE)"
    assert {env["name"] for env in container["env"]} >= {"POD_NAMESPACE"}
    for url in args.gateways:
        service = service_port(stack, url)
        assert service["spec"]["clusterIP"] == "None", "headless: one address per gateway pod"
    assert args.metrics_port in container_ports(deployment)


def test_two_autoscalers_elect_one_leader(stack: list[Resource]) -> None:
    deployment = find(stack, "Deployment", "bazaar-autoscaler")
    assert deployment["spec"]["replicas"] == 2
    assert "strategy" not in deployment["spec"], "leader election makes Recreate unneeded"
    container = only_container(deployment)
    assert flag(container["args"], "--leader-election-id") == "$(POD_NAME)"
    [env] = [env for env in container["env"] if env["name"] == "POD_NAME"]
    assert env["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}


# Drain and availability


@pytest.mark.parametrize(
    ("name", "longest_request_s"),
    [("bazaar-gateway", None), ("bazaar-model-mlp", POD_CALL_S)],
)
def test_pods_drain_within_their_grace_period(
    stack: list[Resource], name: str, longest_request_s: int | None
) -> None:
    deployment = find(stack, "Deployment", name)
    spec = deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", str(PRESTOP_S)]}}
    if longest_request_s is None:  # the gateway: its own drain timeout bounds it
        drain_s = int(flag(container["args"], "--drain-timeout"))
        assert drain_s >= 30 + POD_CALL_S, "queue time + pod call"
    else:
        drain_s = longest_request_s
    assert spec["terminationGracePeriodSeconds"] > PRESTOP_S + drain_s
    assert spec["terminationGracePeriodSeconds"] <= PRESTOP_S + drain_s + 15, "a margin, no more"


@pytest.mark.parametrize("name", ["bazaar-gateway", "bazaar-model-mlp"])
def test_replicas_spread_over_nodes(stack: list[Resource], name: str) -> None:
    deployment = find(stack, "Deployment", name)
    [constraint] = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert constraint["topologyKey"] == "kubernetes.io/hostname"
    assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
    assert (
        constraint["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    )


def test_disruption_budgets_cover_gateways_and_models(stack: list[Resource]) -> None:
    budgets = of_kind(stack, "PodDisruptionBudget")
    covered = {}
    for budget in budgets:
        [deployment] = selected(stack, budget["spec"]["selector"]["matchLabels"])
        covered[deployment["metadata"]["name"]] = budget["spec"]
    gateway = covered.pop("bazaar-gateway")
    assert gateway == {"minAvailable": 1, "selector": gateway["selector"]}
    assert find(stack, "Deployment", "bazaar-gateway")["spec"]["replicas"] > 1
    assert set(covered) == {m["metadata"]["name"] for m in models(stack)}
    for spec in covered.values():
        assert spec == {"maxUnavailable": 1, "selector": spec["selector"]}


# NetworkPolicy


def policies_for(resources: list[Resource], deployment: Resource) -> list[Resource]:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return [
        p
        for p in of_kind(resources, "NetworkPolicy")
        if p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
    ]


def ingress_peers(resources: list[Resource], deployment: Resource) -> dict[str, list[Any]]:
    """Each port name (or number) of the pods, and who may connect to it ("*": anyone)."""
    peers: dict[str, list[Any]] = {}
    for policy in policies_for(resources, deployment):
        for rule in policy["spec"].get("ingress", []):
            for port in rule["ports"]:
                assert port["protocol"] == "TCP"
                peers.setdefault(port["port"], []).extend(rule.get("from", ["*"]))
    return peers


def test_ingress_is_denied_unless_a_policy_opens_it(rendered: list[Resource]) -> None:
    for deployment in of_kind(rendered, "Deployment"):
        policies = policies_for(rendered, deployment)
        assert any("Ingress" in p["spec"]["policyTypes"] for p in policies), deployment
        for port in ingress_peers(rendered, deployment):
            assert port in container_ports(deployment), (deployment["metadata"]["name"], port)


def test_the_namespace_denies_ingress_by_default(stack: list[Resource]) -> None:
    policy = find(stack, "NetworkPolicy", "default-deny-ingress")
    assert policy["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}


def test_model_pods_take_data_from_gateways_and_scrapes_from_autoscaler_and_monitoring(
    stack: list[Resource],
) -> None:
    gateway = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "bazaar-gateway"}}}
    autoscaler = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "bazaar-autoscaler"}}}
    monitoring = {"namespaceSelector": {"matchLabels": MONITORING_NAMESPACE}}
    for deployment in models(stack):
        assert ingress_peers(stack, deployment) == {
            "http": [gateway],
            "grpc": [gateway],
            "metrics": [autoscaler, monitoring],
        }
    # ...and the peers are the pods they name.
    assert selected(stack, gateway["podSelector"]["matchLabels"]) == [
        find(stack, "Deployment", "bazaar-gateway")
    ]
    assert selected(stack, autoscaler["podSelector"]["matchLabels"]) == [
        find(stack, "Deployment", "bazaar-autoscaler")
    ]


def test_model_pods_reach_out_only_to_fetch_their_models(stack: list[Resource]) -> None:
    fetching = any(c["name"] == "fetch-models" for c in containers(stack))
    for deployment in models(stack):
        egress = [
            rule
            for p in policies_for(stack, deployment)
            if "Egress" in p["spec"]["policyTypes"]
            for rule in p["spec"].get("egress", [])
        ]
        assert any("Egress" in p["spec"]["policyTypes"] for p in policies_for(stack, deployment))
        ports = {(port["port"], port["protocol"]) for rule in egress for port in rule["ports"]}
        assert ports == ({(53, "UDP"), (53, "TCP"), (443, "TCP")} if fetching else set())


def test_the_gateway_is_open_to_clients_and_the_autoscaler_to_monitoring(
    stack: list[Resource],
) -> None:
    gateway = find(stack, "Deployment", "bazaar-gateway")
    assert ingress_peers(stack, gateway) == {"http": ["*"], "grpc": ["*"]}
    autoscaler = find(stack, "Deployment", "bazaar-autoscaler")
    peers = {"metrics": [{"namespaceSelector": {"matchLabels": MONITORING_NAMESPACE}}]}
    if of_kind(stack, "ScaledObject"):  # components/keda: KEDA's operator calls the scaler
        peers["keda"] = [{"namespaceSelector": {"matchLabels": KEDA_NAMESPACE}}]
    assert ingress_peers(stack, autoscaler) == peers


# RBAC


@pytest.mark.parametrize(
    ("name", "required"), [("bazaar-autoscaler", AUTOSCALER_RBAC), ("bazaar-gateway", GATEWAY_RBAC)]
)
def test_the_roles_grant_exactly_what_the_code_calls(
    stack: list[Resource], name: str, required: frozenset[Permission]
) -> None:
    role = find(stack, "Role", name)
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == {(p.api_group, p.resource, p.verb) for p in required}
    assert not of_kind(stack, "ClusterRole") and not of_kind(stack, "ClusterRoleBinding")

    [binding] = [b for b in of_kind(stack, "RoleBinding") if b["roleRef"]["name"] == name]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    [subject] = binding["subjects"]
    account = find(stack, "ServiceAccount", subject["name"])
    assert subject["namespace"] == account["metadata"].get("namespace", NAMESPACE)
    deployment = find(stack, "Deployment", name)
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == subject["name"]


@pytest.mark.parametrize(
    ("name", "lease"),
    [("bazaar-autoscaler", "bazaar-autoscaler"), ("bazaar-gateway", GATEWAY_LEASE)],
)
def test_each_may_renew_only_its_own_lease(stack: list[Resource], name: str, lease: str) -> None:
    role = find(stack, "Role", name)
    for rule in role["rules"]:
        if rule["resources"] == ["leases"] and rule["verbs"] != ["create"]:
            assert rule["resourceNames"] == [lease]
        else:
            assert "resourceNames" not in rule, rule


def test_the_gateways_take_part_in_the_rollouts_election(stack: list[Resource]) -> None:
    container = only_container(find(stack, "Deployment", "bazaar-gateway"))
    assert flag(container["args"], "--leader-election-id") == "$(POD_NAME)"
    [env] = [e for e in container["env"] if e["name"] == "POD_NAME"]
    assert env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_only_the_gateway_and_the_autoscaler_talk_to_the_api_server(
    rendered: list[Resource],
) -> None:
    talking = {"bazaar-autoscaler", "bazaar-gateway"}
    assert {r["metadata"]["name"] for r in of_kind(rendered, "Role")} <= talking
    assert len(of_kind(rendered, "RoleBinding")) == len(of_kind(rendered, "Role"))
    for deployment in of_kind(rendered, "Deployment"):
        if deployment["metadata"]["name"] not in talking:
            assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


# Overlays and components


def test_only_the_gpu_overlay_asks_for_gpus_and_only_for_model_pods() -> None:
    for overlay, gpu in [("overlays/cpu", False), ("overlays/gpu", True)]:
        resources = render(overlay)
        for deployment in of_kind(resources, "Deployment"):
            spec = deployment["spec"]["template"]["spec"]
            server = spec["containers"][0]
            on_gpu = gpu and MODEL_LABEL in deployment["metadata"]["labels"]
            where = (overlay, deployment["metadata"]["name"])
            assert (server["resources"]["limits"].get("nvidia.com/gpu") == 1) is on_gpu, where
            assert server["image"].endswith("-gpu") is on_gpu, where
            assert ("--device=cuda" in server["args"]) is on_gpu, where
            assert (spec.get("runtimeClassName") == "nvidia") is on_gpu, where
            tolerations = spec.get("tolerations", [])
            gpu_taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            assert (tolerations == [gpu_taint]) is on_gpu, where
            for init in spec.get("initContainers", []):
                assert not init["image"].endswith("-gpu"), where


def model_volume(resources: list[Resource]) -> dict[str, Any]:
    spec = find(resources, "Deployment", "bazaar-model-mlp")["spec"]["template"]["spec"]
    [volume] = [v for v in spec["volumes"] if v["name"] == "models"]
    return volume


def init_containers(resources: list[Resource]) -> list[dict[str, Any]]:
    spec = find(resources, "Deployment", "bazaar-model-mlp")["spec"]["template"]["spec"]
    return list(spec.get("initContainers", []))


def test_the_base_builds_the_demo_into_a_bounded_empty_dir() -> None:
    resources = render("overlays/cpu")
    assert model_volume(resources) == {"name": "models", "emptyDir": {"sizeLimit": "256Mi"}}
    [init] = init_containers(resources)
    assert init["args"] == ["models", "build-demo", "/models"]


def test_models_from_a_read_only_claim() -> None:
    resources = render("overlays/cpu+models-pvc")
    volume = model_volume(resources)
    assert volume == {
        "name": "models",
        "persistentVolumeClaim": {"claimName": "bazaar-models", "readOnly": True},
    }
    find(resources, "PersistentVolumeClaim", "bazaar-models")
    assert init_containers(resources) == []


def test_models_copied_from_a_model_image() -> None:
    resources = render("overlays/cpu+models-image")
    assert model_volume(resources)["emptyDir"]["sizeLimit"] == "4Gi"
    [init] = init_containers(resources)
    assert init["command"] == ["cp", "-r", "/models/.", "/repository/"]
    assert init["volumeMounts"] == [{"name": "models", "mountPath": "/repository"}]
    assert not init["image"].startswith(IMAGE)


def test_models_mounted_as_an_image_volume() -> None:
    resources = render("overlays/cpu+models-image-volume")
    assert set(model_volume(resources)["image"]) == {"reference", "pullPolicy"}
    assert init_containers(resources) == []


def test_models_downloaded_and_checked() -> None:
    resources = render("overlays/cpu+models-fetch")
    assert model_volume(resources)["emptyDir"]["sizeLimit"] == "4Gi"
    [init] = init_containers(resources)
    assert init["image"] == f"{IMAGE}:{VERSION}"
    command, url, sha_flag, digest, target = init["args"][1:]
    assert (init["args"][0], command, sha_flag, target) == (
        "models",
        "fetch",
        "--sha256",
        "/models",
    )
    assert url.startswith("https://") and url.endswith(".tar.gz")
    assert re.fullmatch(r"[0-9a-f]{64}", digest)


def secret_behind(deployment: Resource, option: str) -> tuple[str, str]:
    """(Secret name, key) of the file a container's ``option=PATH`` names, checking that it
    is mounted read-only as a directory: a subPath mount never sees the Secret's updates."""
    container = only_container(deployment)
    path = Path(flag(container["args"], option))
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    assert mount == {"name": mount["name"], "mountPath": str(path.parent), "readOnly": True}
    spec = deployment["spec"]["template"]["spec"]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return volume["secret"]["secretName"], path.name


def test_api_keys_from_secrets_for_the_gateway_and_the_autoscaler() -> None:
    resources = render("overlays/cpu+api-keys")
    gateway = find(resources, "Deployment", "bazaar-gateway")
    assert secret_behind(gateway, "--api-keys") == ("bazaar-api-keys", "keys.json")
    autoscaler = find(resources, "Deployment", "bazaar-autoscaler")
    stats_token = ("bazaar-autoscaler-gateway-token", "token")
    assert secret_behind(autoscaler, "--gateway-token-file") == stats_token
    # The gateway deciding rollouts reads the others' /stats with the same token.
    assert secret_behind(gateway, "--rollout-peers-token-file") == stats_token
    base = render("overlays/cpu")
    for name, added in (("bazaar-gateway", 2), ("bazaar-autoscaler", 1)):  # appended to
        before = only_container(find(base, "Deployment", name))["args"]
        assert only_container(find(resources, "Deployment", name))["args"][:-added] == before


def test_model_control_takes_its_token_from_a_secret_on_either_overlay() -> None:
    for overlay in ("overlays/cpu", "overlays/gpu"):
        resources = build(
            DEPLOY, {"resources": [overlay], "components": ["components/model-control"]}
        )
        [model] = models(resources)
        args = only_container(model)["args"]
        assert args[: len(args) - 2] == only_container(models(render(overlay))[0])["args"]
        assert "--enable-model-control" in args
        assert secret_behind(model, "--control-token-file") == (
            "bazaar-model-control-token",
            "token",
        )


@pytest.mark.parametrize("component", ["api-keys", "model-control"])
def test_the_example_secrets_are_what_the_code_reads_and_fail_closed(component: str) -> None:
    """Each example Secret is valid, holds the files the component mounts, in the format
    the code reads; its placeholders grant nothing (no token has a digest of zeros) or are
    refused at start."""
    [example] = (DEPLOY / "components" / component).glob("*.example.yaml")
    secrets = load_all(example)
    mounted = {
        secret_behind(deployment, option)
        for deployment in of_kind(render(f"overlays/cpu+{component}"), "Deployment")
        for option in ("--api-keys", "--gateway-token-file", "--control-token-file")
        if any(arg.startswith(f"{option}=") for arg in only_container(deployment)["args"])
    }
    assert mounted == {(s["metadata"]["name"], key) for s in secrets for key in s["stringData"]}
    for secret in secrets:
        kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
        assert secret["metadata"]["namespace"] == NAMESPACE
        for key, text in secret["stringData"].items():
            if key == "keys.json":
                keys = parse_keys_file(text.encode(), key)
                assert {digest.hex().lstrip("0") for digest in keys} == {"1", "2", "3"}
            else:
                with pytest.raises(ConfigError, match="at least 32"):
                    parse_token(text.encode(), key)


def test_monitors_scrape_the_metrics_ports() -> None:
    resources = render("overlays/cpu+prometheus-operator")
    monitors = [r for r in resources if r["kind"] in MONITORING_KINDS]
    assert {(m["kind"], m["metadata"]["name"]) for m in monitors} == {
        ("PodMonitor", "bazaar-gateway"),
        ("PodMonitor", "bazaar-model"),
        ("ServiceMonitor", "bazaar-autoscaler"),
    }
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selector = monitor["spec"]["selector"]["matchLabels"]
        if monitor["kind"] == "PodMonitor":
            [endpoint] = monitor["spec"]["podMetricsEndpoints"]
            pods = selected(resources, selector)
        else:
            [endpoint] = monitor["spec"]["endpoints"]
            services = [
                s
                for s in of_kind(resources, "Service")
                if selector.items() <= s["metadata"]["labels"].items()
            ]
            [service] = services
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
            pods = selected(resources, service["spec"]["selector"])
        assert pods and endpoint["path"] == "/metrics"
        for deployment in pods:
            annotations = deployment["spec"]["template"]["metadata"]["annotations"]
            assert port_number(deployment, endpoint["port"]) == int(
                annotations["prometheus.io/port"]
            )


# KEDA


def test_keda_scales_each_model_on_the_autoscalers_answers() -> None:
    """components/keda: the autoscaler answers KEDA's external scaler and patches nothing; each
    ScaledObject names a model Deployment, that model, the scaler's Service port, bounds equal
    to the model's annotations, and an HPA behaviour that adds no window of its own."""
    resources = render("overlays/cpu+keda")
    autoscaler = find(resources, "Deployment", "bazaar-autoscaler")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(only_container(autoscaler)["args"])
    assert args.keda and port_number(autoscaler, "keda") == args.keda_port
    scaled = of_kind(resources, "ScaledObject")
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} == {
        d["metadata"]["name"] for d in models(resources)
    }
    for scaled_object in scaled:
        assert scaled_object["apiVersion"] == "keda.sh/v1alpha1"
        spec = scaled_object["spec"]
        deployment = find(resources, "Deployment", spec["scaleTargetRef"]["name"])
        config = scale_config(deployment["metadata"]["annotations"], "test")
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (
            config.min_replicas,
            config.max_replicas,
        )
        [trigger] = spec["triggers"]
        assert trigger["type"] == "external-push"
        assert trigger["metadata"]["model"] == deployment["metadata"]["labels"][MODEL_LABEL]
        host, _, port = trigger["metadata"]["scalerAddress"].partition(":")
        name, namespace, _ = host.split(".", 2)
        assert namespace == NAMESPACE
        service = service_port(resources, f"http://{name}:{port}")
        [service_port_spec] = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
        assert service_port_spec["targetPort"] == "keda"
        assert selected(resources, service["spec"]["selector"]) == [autoscaler]
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        for direction in ("scaleUp", "scaleDown"):
            assert behavior[direction]["stabilizationWindowSeconds"] == 0


# The load test


def test_the_load_test_drives_the_deployed_gateway_and_models() -> None:
    resources = render("locust")
    stack = render("overlays/cpu")
    master = only_container(find(resources, "Deployment", "locust-master"))
    args = master["args"]
    assert "--master" in args
    service_port(stack, args[args.index("--host") + 1])
    mix = args[args.index("--model-mix") + 1]
    names = {entry.partition(":")[0] for entry in mix.split(",")}
    assert names == {m["metadata"]["labels"][MODEL_LABEL] for m in models(stack)} == {"mlp"}
    results = args[args.index("--csv") + 1]
    mounts = {m["mountPath"] for m in master["volumeMounts"]}
    assert str(Path(results).parent) in mounts, "the CSV goes to a writable volume"
    worker = only_container(find(resources, "Deployment", "locust-worker"))
    assert worker["args"][worker["args"].index("--master-host") + 1] == "locust-master"


def test_the_load_test_runs_the_locustfile_from_the_documented_config_map() -> None:
    """The ConfigMap is made by a `kubectl create configmap` in the kustomization's comment
    and the README: it must carry the locustfile and every loadtests module it imports."""
    imported = set(
        re.findall(
            r"^from loadtests\.(\w+) import", (ROOT / "loadtests/locustfile.py").read_text(), re.M
        )
    )
    assert imported
    for document in (DEPLOY / "locust/kustomization.yaml", DEPLOY / "README.md"):
        text = document.read_text()
        [command] = re.findall(r"create configmap locustfile[^|]*\|", text)
        files = set(re.findall(r"--from-file=loadtests/(\w+)\.py", command))
        assert files == imported | {"locustfile"}, document
        assert "--from-literal=__init__.py=" in command, document
    for deployment in of_kind(render("locust"), "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        container = only_container(deployment)
        assert container["args"][:2] == ["-f", "/mnt/locust/loadtests/locustfile.py"]
        assert {"name": "PYTHONPATH", "value": "/mnt/locust"} in container["env"]
        [mount] = [m for m in container["volumeMounts"] if m["name"] == "locustfile"]
        assert mount == {
            "name": "locustfile",
            "mountPath": "/mnt/locust/loadtests",
            "readOnly": True,
        }
        [volume] = [v for v in spec["volumes"] if v["name"] == "locustfile"]
        assert volume["configMap"] == {"name": "locustfile"}
