"""A model's Service as a place to keep state: one annotation read and written.

A model's Services are those labelled ``<label>=<model>``; the one that holds its state is
the first of them by name, the same one whose annotations the gateway's discovery reads
first (``cluster.endpoints``). Reading lists them (filtered by label on the server); writing
patches that one Service's annotation with a JSON merge patch, which touches nothing else
of the Service, so it never conflicts with ``kubectl apply`` of the other fields.
``SERVICE_ANNOTATION_RBAC`` is exactly what these calls need.
"""

from __future__ import annotations

from kubernetes.client import CoreV1Api

from cluster.api import Cluster, KubernetesError, Permission
from cluster.deployments import MERGE_PATCH
from cluster.endpoints import LIST_SERVICES

PATCH_SERVICES = Permission("", "services", "patch")
SERVICE_ANNOTATION_RBAC = frozenset({LIST_SERVICES, PATCH_SERVICES})
"""Every (apiGroup, resource, verb) called here."""


async def model_service_annotation(
    cluster: Cluster, label: str, model: str, key: str
) -> tuple[str, str | None]:
    """The model's Service (the first by name) and its annotation ``key`` (None: unset).
    ``KubernetesError`` (404) when the model has no Service."""
    core = CoreV1Api(cluster.client)
    services = await cluster.call(
        LIST_SERVICES,
        lambda: core.list_namespaced_service(
            cluster.namespace,
            label_selector=f"{label}={model}",
            _request_timeout=cluster.request_timeout_s,
        ),
    )
    named = sorted(
        (s.metadata.name, (s.metadata.annotations or {}).get(key))
        for s in services.items
        if s.metadata is not None and s.metadata.name
    )
    if not named:
        raise KubernetesError(
            f"no Service labelled {label}={model} in namespace {cluster.namespace}", 404
        )
    return named[0]


async def annotate_model_service(
    cluster: Cluster, label: str, model: str, key: str, value: str
) -> None:
    """Set annotation ``key`` of the model's Service (the first by name) to ``value``."""
    name, current = await model_service_annotation(cluster, label, model, key)
    if current == value:
        return
    core = CoreV1Api(cluster.client)
    await cluster.call(
        PATCH_SERVICES,
        lambda: core.patch_namespaced_service(
            name,
            cluster.namespace,
            {"metadata": {"annotations": {key: value}}},
            _content_type=MERGE_PATCH,
            _request_timeout=cluster.request_timeout_s,
        ),
    )
