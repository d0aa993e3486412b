"""An in-process Kubernetes API for the real ``kubernetes`` client: the few paths bazaar calls.

A Starlette app on a real uvicorn server on a loopback port. It serves, for one or more
namespaces:

- ``GET  /apis/apps/v1/namespaces/{ns}/deployments?labelSelector=...``
- ``GET  /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale``
- ``PATCH /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`` (JSON merge patch)
- ``GET  /api/v1/namespaces/{ns}/services?labelSelector=...``
- ``PATCH /api/v1/namespaces/{ns}/services/{name}`` (a JSON merge patch of its annotations)
- ``GET  /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=...``
- ``GET``, ``PUT`` (guarded by resourceVersion) and ``POST`` of
  ``/apis/coordination.k8s.io/v1/namespaces/{ns}/leases[/{name}]``

Every request is recorded (method, path, query, content type, body) with the RBAC
permission it needs, and faults can be queued per permission: a status (403, 409, 500...)
answered as a Kubernetes ``Status``, or a stall that holds the answer past the client's
timeout. Anything else answers 404, so a call the fake does not know fails loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client import ApiClient, Configuration
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cluster.api import Cluster
from tests.support import serve


@dataclass(frozen=True, slots=True)
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    content_type: str | None
    body: Any
    permission: tuple[str, str, str]
    """(apiGroup, resource, verb) the request needs."""


@dataclass
class FakeKubernetes:
    deployments: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    services: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    endpoint_slices: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    leases: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    faults: dict[tuple[str, str, str], deque[int | float]] = field(default_factory=dict)
    """Per permission, what the next requests get: an int status, or a float stall in s."""
    released: asyncio.Event = field(default_factory=asyncio.Event)
    lease_version: int = 0

    def add_deployment(
        self,
        name: str,
        model: str,
        *,
        namespace: str = "default",
        replicas: int = 1,
        ready_replicas: int = 1,
        annotations: dict[str, str] | None = None,
        port: int = 8001,
        version: str | None = None,
    ) -> None:
        self.deployments[namespace, name] = deployment(
            name, model, namespace, replicas, ready_replicas, annotations or {}, port, version
        )

    def add_service(
        self,
        name: str,
        labels: dict[str, str],
        *,
        namespace: str = "default",
        ports: dict[str, int] | None = None,
    ) -> None:
        self.services[namespace, name] = service(name, namespace, labels, ports or {"http": 8001})

    def set_slice(
        self,
        name: str,
        service_name: str,
        endpoints: list[tuple[str, bool | None]],
        *,
        namespace: str = "default",
        ports: dict[str, int] | None = None,
        address_type: str = "IPv4",
    ) -> None:
        """Add or replace an EndpointSlice of ``service_name``: ``(address, ready)`` pairs
        (``ready=None`` leaves the condition unset)."""
        self.endpoint_slices[namespace, name] = endpoint_slice(
            name, namespace, service_name, endpoints, ports or {"http": 8001}, address_type
        )

    def fail(self, permission: tuple[str, str, str], *outcomes: int | float) -> None:
        """The next requests needing ``permission`` get these statuses (int) or stalls (s)."""
        self.faults.setdefault(permission, deque()).extend(outcomes)

    def replicas(self, name: str, namespace: str = "default") -> int:
        return int(self.deployments[namespace, name]["spec"]["replicas"])

    def permissions(self) -> set[tuple[str, str, str]]:
        return {request.permission for request in self.requests}

    def app(self) -> Starlette:
        prefix = "/apis/apps/v1/namespaces/{namespace}/deployments"
        leases = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        return Starlette(
            routes=[
                Route(prefix, self._list_deployments),
                Route(prefix + "/{name}/scale", self._scale, methods=["GET", "PATCH"]),
                Route("/api/v1/namespaces/{namespace}/services", self._list_services),
                Route(
                    "/api/v1/namespaces/{namespace}/services/{name}",
                    self._patch_service,
                    methods=["PATCH"],
                ),
                Route(
                    "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
                    self._list_endpoint_slices,
                ),
                Route(leases, self._create_lease, methods=["POST"]),
                Route(leases + "/{name}", self._lease, methods=["GET", "PUT"]),
            ]
        )

    async def _list_deployments(self, request: Request) -> Response:
        namespace = request.path_params["namespace"]
        if (fault := await self._record(request, ("apps", "deployments", "list"))) is not None:
            return fault
        selector = request.query_params.get("labelSelector", "")
        items = [
            item
            for (item_namespace, _), item in sorted(self.deployments.items())
            if item_namespace == namespace and matches(item["metadata"]["labels"], selector)
        ]
        return JSONResponse({"apiVersion": "apps/v1", "kind": "DeploymentList", "items": items})

    async def _scale(self, request: Request) -> Response:
        namespace, name = request.path_params["namespace"], request.path_params["name"]
        verb = "get" if request.method == "GET" else "patch"
        if (fault := await self._record(request, ("apps", "deployments/scale", verb))) is not None:
            return fault
        item = self.deployments.get((namespace, name))
        if item is None:
            return _status(404, "NotFound", f'deployments.apps "{name}" not found')
        if verb == "patch":
            replicas = self.requests[-1].body["spec"]["replicas"]
            item["spec"]["replicas"] = replicas
            item["status"]["replicas"] = replicas
        return JSONResponse(
            {
                "apiVersion": "autoscaling/v1",
                "kind": "Scale",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"replicas": item["spec"]["replicas"]},
                "status": {"replicas": item["status"]["replicas"], "selector": "app=" + name},
            }
        )

    async def _list_services(self, request: Request) -> Response:
        namespace = request.path_params["namespace"]
        if (fault := await self._record(request, ("", "services", "list"))) is not None:
            return fault
        items = _selected(self.services, namespace, request.query_params.get("labelSelector"))
        return JSONResponse({"apiVersion": "v1", "kind": "ServiceList", "items": items})

    async def _patch_service(self, request: Request) -> Response:
        """A JSON merge patch of the Service's annotations (what bazaar sends)."""
        key = (request.path_params["namespace"], request.path_params["name"])
        if (fault := await self._record(request, ("", "services", "patch"))) is not None:
            return fault
        item = self.services.get(key)
        if item is None:
            return _status(404, "NotFound", f'services "{key[1]}" not found')
        if self.requests[-1].content_type != "application/merge-patch+json":
            return _status(415, "UnsupportedMediaType", "expected a merge patch")
        patch = self.requests[-1].body["metadata"]["annotations"]
        annotations = item["metadata"].setdefault("annotations", {})
        for name, value in patch.items():
            if value is None:
                annotations.pop(name, None)
            else:
                annotations[name] = value
        return JSONResponse(item)

    async def _list_endpoint_slices(self, request: Request) -> Response:
        namespace = request.path_params["namespace"]
        permission = ("discovery.k8s.io", "endpointslices", "list")
        if (fault := await self._record(request, permission)) is not None:
            return fault
        selector = request.query_params.get("labelSelector")
        items = _selected(self.endpoint_slices, namespace, selector)
        return JSONResponse(
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList", "items": items}
        )

    async def _create_lease(self, request: Request) -> Response:
        namespace = request.path_params["namespace"]
        permission = ("coordination.k8s.io", "leases", "create")
        if (fault := await self._record(request, permission)) is not None:
            return fault
        lease = self.requests[-1].body
        key = (namespace, lease["metadata"]["name"])
        if key in self.leases:
            return _status(409, "AlreadyExists", f"leases {key[1]} already exists")
        return JSONResponse(self._store_lease(key, lease), status_code=201)

    async def _lease(self, request: Request) -> Response:
        """GET, or a PUT guarded by its resourceVersion as the API server does it."""
        key = (request.path_params["namespace"], request.path_params["name"])
        verb = "get" if request.method == "GET" else "update"
        if (
            fault := await self._record(request, ("coordination.k8s.io", "leases", verb))
        ) is not None:
            return fault
        current = self.leases.get(key)
        if current is None:
            return _status(404, "NotFound", f"leases {key[1]} not found")
        if verb == "get":
            return JSONResponse(current)
        lease = self.requests[-1].body
        if lease["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            return _status(409, "Conflict", "the object has been modified")
        return JSONResponse(self._store_lease(key, lease))

    def _store_lease(self, key: tuple[str, str], lease: dict[str, Any]) -> dict[str, Any]:
        self.lease_version += 1
        stored = {**lease, "metadata": {**lease["metadata"], "namespace": key[0]}}
        stored["metadata"]["resourceVersion"] = str(self.lease_version)
        self.leases[key] = stored
        return stored

    async def _record(self, request: Request, permission: tuple[str, str, str]) -> Response | None:
        raw = await request.body()
        self.requests.append(
            Recorded(
                request.method,
                request.url.path,
                dict(request.query_params),
                request.headers.get("content-type"),
                json.loads(raw) if raw else None,
                permission,
            )
        )
        queued = self.faults.get(permission)
        if not queued:
            return None
        outcome = queued.popleft()
        if isinstance(outcome, float):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.released.wait(), outcome)
            return None
        reason = {403: "Forbidden", 404: "NotFound", 409: "Conflict"}.get(outcome, "InternalError")
        return _status(outcome, reason, f"injected {outcome}")


def matches(labels: dict[str, str], selector: str) -> bool:
    """Equality and existence terms, comma-separated (what bazaar sends)."""
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if key not in labels or (value and labels[key] != value):
            return False
    return True


def _selected(
    objects: dict[tuple[str, str], dict[str, Any]], namespace: str, selector: str | None
) -> list[dict[str, Any]]:
    return [
        item
        for (item_namespace, _), item in sorted(objects.items())
        if item_namespace == namespace and matches(item["metadata"]["labels"], selector or "")
    ]


def service(
    name: str, namespace: str, labels: dict[str, str], ports: dict[str, int]
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "selector": {"app": name},
            "ports": [
                {"name": port_name, "port": port, "targetPort": port_name, "protocol": "TCP"}
                for port_name, port in ports.items()
            ],
        },
    }


def endpoint_slice(
    name: str,
    namespace: str,
    service_name: str,
    endpoints: list[tuple[str, bool | None]],
    ports: dict[str, int],
    address_type: str,
) -> dict[str, Any]:
    """A slice as the endpointslice controller writes it (the shape read off the real 1.20
    controller in tests/controlplane, in its v1 form: ``nodeName`` for ``topology``, and the
    ``serving``/``terminating`` conditions of 1.22+): one endpoint per pod, its address, its
    conditions, the pod it targets, and the ports by the Service port's name with the
    container's port number."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "generateName": f"{service_name}-",
            "namespace": namespace,
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service_name,
            },
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": service_name,
                    "controller": True,
                    "blockOwnerDeletion": True,
                    "uid": f"uid-{service_name}",
                }
            ],
        },
        "addressType": address_type,
        "endpoints": [
            {
                "addresses": [address],
                "conditions": {}
                if ready is None
                else {"ready": ready, "serving": ready, "terminating": False},
                "nodeName": "bazaar-node",
                "targetRef": {
                    "kind": "Pod",
                    "name": f"{service_name}-{index}",
                    "namespace": namespace,
                    "uid": f"uid-{service_name}-{index}",
                },
            }
            for index, (address, ready) in enumerate(endpoints)
        ],
        "ports": [
            {"name": port_name, "port": port, "protocol": "TCP"}
            for port_name, port in ports.items()
        ],
    }


def deployment(
    name: str,
    model: str,
    namespace: str,
    replicas: int,
    ready_replicas: int,
    annotations: dict[str, str],
    port: int,
    version: str | None = None,
) -> dict[str, Any]:
    labels = {"app": name, "bazaar.dev/model": model}
    if version is not None:
        labels["bazaar.dev/version"] = version
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "model-server",
                            "image": "bazaar:test",
                            "ports": [
                                {"name": "metrics", "containerPort": 9999},
                                {"name": "http", "containerPort": port},
                            ],
                        }
                    ]
                },
            },
        },
        "status": {"replicas": replicas, "readyReplicas": ready_replicas},
    }


def _status(code: int, reason: str, message: str) -> Response:
    body = {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return JSONResponse(body, status_code=code)


def cluster_at(url: str, account: str, logger: str, **options: Any) -> Cluster:
    """The seam's ``Cluster`` for namespace ``default`` of the API at ``url``, configured as
    ``cluster.api.connect()`` configures it (urllib3's own retries off)."""
    configuration = Configuration(host=url)
    configuration.retries = False
    return Cluster(
        "default", account, logging.getLogger(logger), ApiClient(configuration), **options
    )


@contextlib.asynccontextmanager
async def serving(fake: FakeKubernetes) -> AsyncIterator[str]:
    """Serve ``fake`` on a free loopback port; yields its base URL."""
    async with serve(fake.app()) as url:
        try:
            yield url
        finally:
            fake.released.set()  # stalled requests answer now: shutdown need not wait them out
