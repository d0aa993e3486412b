"""Model Deployments: listed, and their ``/scale`` read and patched.

What the autoscaler needs from Kubernetes, as plain values: ``ModelDeployment`` carries what
a scaler reads (name, model, version, annotations, ready count) without the client's types;
the version is the Deployment's ``bazaar.dev/version`` label, set when its pods serve one
version of the model and are scaled on that version's own traffic; a
model's serving pods are its Service's ready endpoints (``cluster.endpoints``), the same set
the gateway routes to. Scaling
goes through the ``deployments/{name}/scale`` subresource with a JSON merge patch
``{"spec": {"replicas": N}}``, so the autoscaler needs no write access to the Deployment.
``SCALING_RBAC`` is exactly what these calls need; the autoscaler's Role in ``deploy/``
grants it and a test holds the two together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kubernetes.client import AppsV1Api
from kubernetes.client.models import V1Deployment

from cluster.api import Cluster, Permission

MERGE_PATCH = "application/merge-patch+json"
VERSION_LABEL = "bazaar.dev/version"
"""The label whose value names the model version a Deployment's pods serve."""
GROUP_LABEL = "bazaar.dev/group"
"""The label whose value names a model group: one Deployment whose pods serve several
models, each found through its own model Service selecting the group's pods."""

LIST_DEPLOYMENTS = Permission("apps", "deployments", "list")
GET_SCALE = Permission("apps", "deployments/scale", "get")
PATCH_SCALE = Permission("apps", "deployments/scale", "patch")
SCALING_RBAC = frozenset({LIST_DEPLOYMENTS, GET_SCALE, PATCH_SCALE})
"""Every (apiGroup, resource, verb) called here; the autoscaler's Role grants these."""


@dataclass(frozen=True, slots=True)
class ModelDeployment:
    """A Deployment labelled with a model, as the API server last listed it."""

    name: str
    model: str
    version: str | None
    """Its ``VERSION_LABEL``; None: it serves the model, whatever versions."""
    annotations: dict[str, str]
    ready_replicas: int
    pod_labels: dict[str, str] = field(default_factory=dict)
    """Its pod template's labels: what a Service selecting its pods matches."""


async def model_deployments(cluster: Cluster, label: str) -> list[ModelDeployment]:
    """The namespace's Deployments that carry ``label``, its value naming the model (or,
    with the group label, the model group)."""
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
        labels = (metadata and metadata.labels) or {}
        model = labels.get(label)
        if not model:
            continue
        found.append(
            ModelDeployment(
                name=(metadata and metadata.name) or "?",
                model=model,
                version=labels.get(VERSION_LABEL) or None,
                annotations=dict((metadata and metadata.annotations) or {}),
                ready_replicas=(deployment.status and deployment.status.ready_replicas) or 0,
                pod_labels=_pod_labels(deployment),
            )
        )
    return found


def _pod_labels(deployment: V1Deployment) -> dict[str, str]:
    template = deployment.spec and deployment.spec.template
    return dict((template and template.metadata and template.metadata.labels) or {})


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
