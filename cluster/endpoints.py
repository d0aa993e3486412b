"""Each model's ready endpoints, from its Services' EndpointSlices.

Which Services are models: those in the namespace labelled ``<label>=<model>`` (the label
is ``bazaar.dev/model``). A model's endpoints are the addresses of its Services'
EndpointSlices (``discovery.k8s.io/v1``, label ``kubernetes.io/service-name``) whose
``conditions.ready`` is true (unset counts as ready, as the API documents), paired with the
slice's port named ``port_name``: ``http://10.0.0.7:8001``, ``http://[fd00::7]:8001``. An
address in several slices (a dual-stack Service lists a pod in two) is one endpoint. With
``model_services``, an annotation of the model's Services comes along (the first Service by
name that has it), read from the same listing, and so does each endpoint's address on the
slice's port named ``grpc_port_name`` where its slice has one (``10.0.0.7:8001``, a gRPC
target: the gateway's gRPC hop).
``DISCOVERY_RBAC`` is exactly what these calls need; the gateway's Role grants it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubernetes.client import CoreV1Api, DiscoveryV1Api
from kubernetes.client.models import V1EndpointSlice

from cluster.api import Cluster, Permission, pod_address, pod_url

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
LIST_SERVICES = Permission("", "services", "list")
LIST_ENDPOINT_SLICES = Permission("discovery.k8s.io", "endpointslices", "list")
DISCOVERY_RBAC = frozenset({LIST_SERVICES, LIST_ENDPOINT_SLICES})
"""Every (apiGroup, resource, verb) called here; the gateway's Role grants these."""


@dataclass(frozen=True, slots=True)
class ModelService:
    """What a model's Services say: its ready endpoints, and the annotation asked for."""

    urls: list[str]
    """Sorted ready endpoint URLs."""
    annotation: str | None
    """The annotation's value on the first of its Services (by name) that has it."""
    grpc_targets: dict[str, str]
    """Endpoint URL → its gRPC ``host:port``, for the endpoints whose slice has the gRPC port."""


async def model_endpoints(cluster: Cluster, label: str, port_name: str) -> dict[str, list[str]]:
    """Model → sorted ready endpoint URLs, for every model Service in the namespace (two
    LISTs, filtered by label on the server)."""
    services = await model_services(cluster, label, port_name, None, None)
    return {model: service.urls for model, service in services.items()}


async def model_services(
    cluster: Cluster,
    label: str,
    port_name: str,
    annotation: str | None,
    grpc_port_name: str | None,
) -> dict[str, ModelService]:
    """``model_endpoints``, with the value of ``annotation`` on each model's Services and the
    gRPC targets of the endpoints whose slice has a port named ``grpc_port_name``."""
    core = CoreV1Api(cluster.client)
    discovery = DiscoveryV1Api(cluster.client)
    timeout = cluster.request_timeout_s
    services = await cluster.call(
        LIST_SERVICES,
        lambda: core.list_namespaced_service(
            cluster.namespace, label_selector=label, _request_timeout=timeout
        ),
    )
    models: dict[str, str] = {}
    annotations: dict[str, str] = {}
    for service in sorted(services.items, key=lambda s: (s.metadata and s.metadata.name) or ""):
        metadata = service.metadata
        model = metadata and (metadata.labels or {}).get(label)
        if metadata and metadata.name and model:
            models[metadata.name] = model
            value = (metadata.annotations or {}).get(annotation) if annotation else None
            if value is not None:
                annotations.setdefault(model, value)
    if not models:
        return {}
    endpoints: dict[str, dict[str, str | None]] = {model: {} for model in models.values()}
    slices = await cluster.call(
        LIST_ENDPOINT_SLICES,
        lambda: discovery.list_namespaced_endpoint_slice(
            cluster.namespace, label_selector=SERVICE_NAME_LABEL, _request_timeout=timeout
        ),
    )
    for endpoint_slice in slices.items:
        labels = (endpoint_slice.metadata and endpoint_slice.metadata.labels) or {}
        model = models.get(labels.get(SERVICE_NAME_LABEL, ""))
        if model is not None:
            found = endpoints[model]
            for url, target in _ready_endpoints(endpoint_slice, port_name, grpc_port_name):
                if found.get(url) is None:  # a pod listed with a gRPC port keeps it
                    found[url] = target
    return {
        model: ModelService(
            sorted(found),
            annotations.get(model),
            {url: target for url, target in found.items() if target is not None},
        )
        for model, found in endpoints.items()
    }


def _ready_endpoints(
    endpoint_slice: V1EndpointSlice, port_name: str, grpc_port_name: str | None
) -> list[tuple[str, str | None]]:
    """The slice's ready addresses on its port named ``port_name`` (none if it lacks one, or
    if its addresses are FQDNs), each with its gRPC target where the slice has a port named
    ``grpc_port_name``."""
    if endpoint_slice.address_type not in ("IPv4", "IPv6"):
        return []
    port = _port(endpoint_slice, port_name)
    if port is None:
        return []
    grpc_port = _port(endpoint_slice, grpc_port_name) if grpc_port_name else None
    ready = []
    for endpoint in endpoint_slice.endpoints or []:
        conditions = endpoint.conditions
        if conditions is not None and conditions.ready is False:
            continue
        for ip in endpoint.addresses or []:
            target = pod_address(ip, grpc_port) if grpc_port is not None else None
            ready.append((pod_url(ip, port), target))
    return ready


def _port(endpoint_slice: V1EndpointSlice, name: str) -> int | None:
    """The number of the slice's port named ``name``, if it has one."""
    ports = [p.port for p in endpoint_slice.ports or [] if p.name == name]
    return int(ports[0]) if ports and ports[0] is not None else None


async def model_selectors(cluster: Cluster, label: str) -> dict[str, list[dict[str, str]]]:
    """Model → the pod selectors of its Services (one LIST, filtered by label on the
    server): a Deployment whose pod labels a selector matches serves that model."""
    core = CoreV1Api(cluster.client)
    services = await cluster.call(
        LIST_SERVICES,
        lambda: core.list_namespaced_service(
            cluster.namespace, label_selector=label, _request_timeout=cluster.request_timeout_s
        ),
    )
    selectors: dict[str, list[dict[str, str]]] = {}
    for service in services.items:
        model = service.metadata and (service.metadata.labels or {}).get(label)
        selector = service.spec and service.spec.selector
        if model and selector:
            selectors.setdefault(model, []).append(dict(selector))
    return selectors
