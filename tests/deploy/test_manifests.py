"""deploy/: the manifests are valid Kubernetes objects and agree with each other and the code.

Overlays are rendered by a small subset of kustomize (resources, namespace, images, and
strategic-merge patches by path); a kustomization using anything else fails here, so the
subset cannot silently drift. Where ``kubectl`` is installed, its ``kustomize`` output must
equal ours. Each rendered object is validated against the Kubernetes schemas of
``K8S_VERSION`` (kubernetes-validate, strict: unknown fields are errors).
"""

from __future__ import annotations

import argparse
import copy
import json
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

from autoscaler.annotations import scale_config
from autoscaler.command import add_parser
from autoscaler.deployments import REQUIRED_RBAC as AUTOSCALER_RBAC
from cluster.api import Permission
from gateway.discovery import REQUIRED_RBAC as GATEWAY_RBAC
from gateway.discovery import EndpointSlices

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.33.0"
RENDERS = ["base", "overlays/cpu", "overlays/gpu"]
KUSTOMIZE_SUBSET = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
MODEL_LABEL = "bazaar.dev/model"

Resource = dict[str, Any]


def load_all(path: Path) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def render(directory: Path) -> list[Resource]:
    """``kustomize build directory``, for the features bazaar's kustomizations use."""
    [kustomization] = load_all(directory / "kustomization.yaml")
    unsupported = set(kustomization) - KUSTOMIZE_SUBSET
    assert not unsupported, f"{directory}: this test's kustomize subset lacks {unsupported}"
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        resources += render(path) if path.is_dir() else load_all(path)
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path"}, f"{directory}: only patches by path are supported"
        for change in load_all(directory / patch["path"]):
            merge(find(resources, change["kind"], change["metadata"]["name"]), change)
    for image in kustomization.get("images", []):
        for container in containers(resources):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                new_name = image.get("newName", name)
                container["image"] = f"{new_name}:{image.get('newTag', tag)}".rstrip(":")
    if "namespace" in kustomization:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = kustomization["namespace"]
    return resources


def merge(target: Any, patch: Any) -> Any:
    """Strategic merge, as far as bazaar uses it: maps merge, lists of named maps merge by
    name (containers, ports), any other list is replaced."""
    if isinstance(target, dict) and isinstance(patch, dict):
        for key, value in patch.items():
            target[key] = merge(target[key], value) if key in target else copy.deepcopy(value)
        return target
    if isinstance(target, list) and isinstance(patch, list) and _named(target + patch):
        by_name = {item["name"]: item for item in target}
        for item in patch:
            if item["name"] in by_name:
                merge(by_name[item["name"]], item)
            else:
                target.append(copy.deepcopy(item))
        return target
    return copy.deepcopy(patch)


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


def selected(resources: list[Resource], selector: dict[str, str]) -> list[Resource]:
    return [
        d
        for d in of_kind(resources, "Deployment")
        if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]


def service_port(resources: list[Resource], url: str) -> Resource:
    """The Service a cluster-internal URL (http://name:port) points at; fails if none."""
    parts = urlsplit(url)
    service = find(resources, "Service", str(parts.hostname))
    assert parts.port in {p["port"] for p in service["spec"]["ports"]}, url
    return service


@pytest.fixture(scope="module", params=RENDERS)
def rendered(request: pytest.FixtureRequest) -> list[Resource]:
    return render(DEPLOY / request.param)


def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 8
    for path in files:
        assert load_all(path), f"{path} is empty"


def test_kustomizations_list_files_that_exist() -> None:
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        [data] = load_all(kustomization)
        entries = data.get("resources", []) + [p["path"] for p in data.get("patches", [])]
        for entry in entries:
            path = kustomization.parent / entry
            assert path.is_file() or (path / "kustomization.yaml").is_file(), f"{path}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("directory", RENDERS)
def test_our_render_is_what_kustomize_renders(directory: str) -> None:
    output = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / directory)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout

    def key(r: Resource) -> tuple[str, str]:
        return r["kind"], r["metadata"]["name"]

    theirs = sorted((r for r in yaml.safe_load_all(output) if r), key=key)
    assert sorted(render(DEPLOY / directory), key=key) == theirs


def test_resources_are_valid_kubernetes_objects(rendered: list[Resource]) -> None:
    for resource in rendered:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


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


def test_the_gateway_discovers_every_model_through_a_labelled_service(
    rendered: list[Resource],
) -> None:
    deployment = find(rendered, "Deployment", "bazaar-gateway")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert "--kubernetes-namespace=$(POD_NAMESPACE)" in container["args"]
    assert not [arg for arg in container["args"] if arg.startswith(("--endpoints", "--max-b"))]
    [env] = [env for env in container["env"] if env["name"] == "POD_NAMESPACE"]
    assert env["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert not of_kind(rendered, "ConfigMap")

    source = EndpointSlices.__init__.__kwdefaults__
    label, port_name = source["label"], source["port_name"]
    models = [d for d in of_kind(rendered, "Deployment") if label in d["metadata"]["labels"]]
    assert models
    for model_deployment in models:
        model = model_deployment["metadata"]["labels"][label]
        services = [
            s
            for s in of_kind(rendered, "Service")
            if s["metadata"].get("labels", {}).get(label) == model
        ]
        assert services, f"model {model} has no Service labelled {label}={model}"
        for service in services:
            assert selected(rendered, service["spec"]["selector"]) == [model_deployment]
            [port] = [p for p in service["spec"]["ports"] if p.get("name") == port_name]
            assert port["targetPort"] in container_ports(model_deployment)


def test_model_deployments_carry_valid_scaling_annotations(rendered: list[Resource]) -> None:
    models = [d for d in of_kind(rendered, "Deployment") if MODEL_LABEL in d["metadata"]["labels"]]
    assert models
    for deployment in models:
        metadata = deployment["metadata"]
        scale_config(metadata.get("annotations", {}), metadata["name"])  # raises if bad
        model = metadata["labels"][MODEL_LABEL]
        [server] = deployment["spec"]["template"]["spec"]["containers"]
        assert f"--model={model}" in server["args"]
        assert deployment["spec"]["template"]["metadata"]["labels"][MODEL_LABEL] == model


def test_autoscaler_arguments_parse_and_point_at_the_gateways(rendered: list[Resource]) -> None:
    deployment = find(rendered, "Deployment", "bazaar-autoscaler")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(container["args"])
    assert args.namespace == "$(POD_NAMESPACE)"
    assert {env["name"] for env in container["env"]} >= {"POD_NAMESPACE"}
    for url in args.gateways:
        service = service_port(rendered, url)
        assert service["spec"]["clusterIP"] == "None", "headless: one address per gateway pod"
    assert args.metrics_port in container_ports(deployment)


@pytest.mark.parametrize(
    ("name", "required"), [("bazaar-autoscaler", AUTOSCALER_RBAC), ("bazaar-gateway", GATEWAY_RBAC)]
)
def test_the_roles_grant_exactly_what_the_code_calls(
    rendered: list[Resource], name: str, required: frozenset[Permission]
) -> None:
    role = find(rendered, "Role", name)
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == {(p.api_group, p.resource, p.verb) for p in required}
    assert not of_kind(rendered, "ClusterRole") and not of_kind(rendered, "ClusterRoleBinding")

    [binding] = [b for b in of_kind(rendered, "RoleBinding") if b["roleRef"]["name"] == name]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    [subject] = binding["subjects"]
    account = find(rendered, "ServiceAccount", subject["name"])
    assert subject["namespace"] == account["metadata"].get("namespace", "bazaar")
    deployment = find(rendered, "Deployment", name)
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == subject["name"]


def test_only_the_gateway_and_the_autoscaler_talk_to_the_api_server(
    rendered: list[Resource],
) -> None:
    assert {r["metadata"]["name"] for r in of_kind(rendered, "Role")} == {
        "bazaar-autoscaler",
        "bazaar-gateway",
    }
    assert len(of_kind(rendered, "RoleBinding")) == 2
    for deployment in of_kind(rendered, "Deployment"):
        if deployment["metadata"]["name"] not in {"bazaar-autoscaler", "bazaar-gateway"}:
            assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_only_the_gpu_overlay_asks_for_gpus() -> None:
    for directory, gpus in [("overlays/cpu", None), ("overlays/gpu", 1)]:
        model = find(render(DEPLOY / directory), "Deployment", "bazaar-model-mlp")
        [server] = model["spec"]["template"]["spec"]["containers"]
        assert server["resources"]["limits"].get("nvidia.com/gpu") == gpus, directory


def test_dashboard_queries_metrics_the_code_exports() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {
        re.sub(r"_(bucket|total|count|sum)$", "", name)
        for expr in exprs
        for name in re.findall(r"\bbazaar_\w+", expr)
    }
    source = "\n".join(
        path.read_text()
        for package in ("gateway", "models", "autoscaler")
        for path in (ROOT / package).glob("*.py")
    )
    assert used and {name for name in used if f'"{name}"' not in source} == set()
