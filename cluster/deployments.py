"""Model Deployments: listed, their ``/scale`` read and patched, their ready pods found.

What the autoscaler needs from Kubernetes, as plain values: ``ModelDeployment`` carries what
a scaler reads (name, model, annotations, ready count) without the client's types. Scaling
goes through the ``deployments/{name}/scale`` subresource with a JSON merge patch
``{"spec": {"replicas": N}}``, so the autoscaler needs no write access to the Deployment.
``SCALING_RBAC`` is exactly what these calls need; the autoscaler's Role in ``deploy/``
grants it and a test holds the two together.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubernetes.client import AppsV1Api, CoreV1Api
from kubernetes.client.models import V1Deployment, V1LabelSelector, V1Pod

from cluster.api import Cluster, Permission, pod_url

MERGE_PATCH = "application/merge-patch+json"

LIST_DEPLOYMENTS = Permission("apps", "deployments", "list")
GET_SCALE = Permission("apps", "deployments/scale", "get")
PATCH_SCALE = Permission("apps", "deployments/scale", "patch")
LIST_PODS = Permission("", "pods", "list")
SCALING_RBAC = frozenset({LIST_DEPLOYMENTS, GET_SCALE, PATCH_SCALE, LIST_PODS})
"""Every (apiGroup, resource, verb) called here; the autoscaler's Role grants these."""


@dataclass(frozen=True, slots=True)
class ModelDeployment:
    """A Deployment labelled with a model, as the API server last listed it."""

    name: str
    model: str
    annotations: dict[str, str]
    ready_replicas: int
    pod_selector: str | None
    """Its pods' label selector in query syntax; None if it has none."""
    http_port: int | None
    """Its container port named ``http``, else its first container port."""


async def model_deployments(cluster: Cluster, label: str) -> list[ModelDeployment]:
    """The namespace's Deployments that carry ``label``, its value naming the model."""
    apps = AppsV1Api(cluster.client)
    listing = await cluster.call(
        LIST_DEPLOYMENTS,
        lambda: apps.list_namespaced_deployment(
            cluster.namespace, label_selector=label, _request_timeout=cluster.request_timeout_s
        ),
    )
    found = []
    for deployment in listing.items:
        metadata = deployment.metadata
        model = ((metadata and metadata.labels) or {}).get(label)
        if not model:
            continue
        spec = deployment.spec
        found.append(
            ModelDeployment(
                name=(metadata and metadata.name) or "?",
                model=model,
                annotations=dict((metadata and metadata.annotations) or {}),
                ready_replicas=(deployment.status and deployment.status.ready_replicas) or 0,
                pod_selector=_selector_string(spec.selector) if spec else None,
                http_port=_http_port(deployment),
            )
        )
    return found


async def replicas(cluster: Cluster, name: str) -> int:
    """The replicas asked for now: ``spec.replicas`` of the Deployment's scale."""
    apps = AppsV1Api(cluster.client)
    scale = await cluster.call(
        GET_SCALE,
        lambda: apps.read_namespaced_deployment_scale(
            name, cluster.namespace, _request_timeout=cluster.request_timeout_s
        ),
    )
    return (scale.spec and scale.spec.replicas) or 0


async def scale(cluster: Cluster, name: str, replicas: int) -> None:
    apps = AppsV1Api(cluster.client)
    await cluster.call(
        PATCH_SCALE,
        lambda: apps.patch_namespaced_deployment_scale(
            name,
            cluster.namespace,
            {"spec": {"replicas": replicas}},
            _content_type=MERGE_PATCH,
            _request_timeout=cluster.request_timeout_s,
        ),
    )


async def ready_pod_urls(cluster: Cluster, deployment: ModelDeployment) -> tuple[str, ...]:
    """``http://ip:port`` of the Deployment's ready pods, sorted."""
    selector, port = deployment.pod_selector, deployment.http_port
    if selector is None or port is None:
        return ()
    core = CoreV1Api(cluster.client)
    pods = await cluster.call(
        LIST_PODS,
        lambda: core.list_namespaced_pod(
            cluster.namespace, label_selector=selector, _request_timeout=cluster.request_timeout_s
        ),
    )
    urls = [pod_url(ip, port) for ip in map(_ready_ip, pods.items) if ip is not None]
    return tuple(sorted(urls))


def _http_port(deployment: V1Deployment) -> int | None:
    pod_spec = deployment.spec and deployment.spec.template.spec
    containers = pod_spec.containers if pod_spec else []
    ports = [port for container in containers for port in container.ports or []]
    for port in ports:
        if port.name == "http":
            return int(port.container_port)
    return int(ports[0].container_port) if ports else None


def _selector_string(selector: V1LabelSelector) -> str:
    """A LabelSelector in the ``labelSelector`` query syntax."""
    terms = [f"{key}={value}" for key, value in sorted((selector.match_labels or {}).items())]
    for expression in selector.match_expressions or []:
        values = ",".join(expression.values or [])
        terms.append(
            {
                "In": f"{expression.key} in ({values})",
                "NotIn": f"{expression.key} notin ({values})",
                "Exists": expression.key,
                "DoesNotExist": f"!{expression.key}",
            }[expression.operator]
        )
    return ",".join(terms)


def _ready_ip(pod: V1Pod) -> str | None:
    """The pod's IP if it is serving: not terminating, and its Ready condition is True."""
    if pod.metadata is not None and pod.metadata.deletion_timestamp is not None:
        return None
    status = pod.status
    if status is None or not status.pod_ip:
        return None
    ready = any(
        condition.type == "Ready" and condition.status == "True"
        for condition in status.conditions or []
    )
    return str(status.pod_ip) if ready else None
