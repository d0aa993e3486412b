"""An in-process Kubernetes API for the real ``kubernetes`` client: the few paths bazaar calls.

A Starlette app on a real uvicorn server on a loopback port. It serves, for one or more
namespaces:

- ``GET  /apis/apps/v1/namespaces/{ns}/deployments?labelSelector=...``
- ``GET  /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale``
- ``PATCH /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`` (JSON merge patch)
- ``GET  /api/v1/namespaces/{ns}/pods?labelSelector=...``
- ``GET  /api/v1/namespaces/{ns}/services?labelSelector=...``
- ``GET  /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=...``

Every request is recorded (method, path, query, content type, body) with the RBAC
permission it needs, and faults can be queued per permission: a status (403, 409, 500...)
answered as a Kubernetes ``Status``, or a stall that holds the answer past the client's
timeout. Anything else answers 404, so a call the fake does not know fails loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

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
    pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    services: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    endpoint_slices: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    faults: dict[tuple[str, str, str], deque[int | float]] = field(default_factory=dict)
    """Per permission, what the next requests get: an int status, or a float stall in s."""
    released: asyncio.Event = field(default_factory=asyncio.Event)

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
    ) -> None:
        self.deployments[namespace, name] = deployment(
            name, model, namespace, replicas, ready_replicas, annotations or {}, port
        )

    def add_pod(
        self,
        name: str,
        model: str,
        ip: str,
        *,
        namespace: str = "default",
        ready: bool = True,
        terminating: bool = False,
    ) -> None:
        self.pods[namespace, name] = pod(name, model, namespace, ip, ready, terminating)

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
        return Starlette(
            routes=[
                Route(prefix, self._list_deployments),
                Route(prefix + "/{name}/scale", self._scale, methods=["GET", "PATCH"]),
                Route("/api/v1/namespaces/{namespace}/pods", self._list_pods),
                Route("/api/v1/namespaces/{namespace}/services", self._list_services),
                Route(
                    "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
                    self._list_endpoint_slices,
                ),
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

    async def _list_pods(self, request: Request) -> Response:
        namespace = request.path_params["namespace"]
        if (fault := await self._record(request, ("", "pods", "list"))) is not None:
            return fault
        selector = request.query_params.get("labelSelector", "")
        items = [
            item
            for (item_namespace, _), item in sorted(self.pods.items())
            if item_namespace == namespace and matches(item["metadata"]["labels"], selector)
        ]
        return JSONResponse({"apiVersion": "v1", "kind": "PodList", "items": items})

    async def _list_services(self, request: Request) -> Response:
        namespace = request.path_params["namespace"]
        if (fault := await self._record(request, ("", "services", "list"))) is not None:
            return fault
        items = _selected(self.services, namespace, request.query_params.get("labelSelector"))
        return JSONResponse({"apiVersion": "v1", "kind": "ServiceList", "items": items})

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
        reason = {403: "Forbidden", 409: "Conflict"}.get(outcome, "InternalError")
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
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": address_type,
        "endpoints": [
            {"addresses": [address], "conditions": {} if ready is None else {"ready": ready}}
            for address, ready in endpoints
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
) -> dict[str, Any]:
    labels = {"app": name, "bazaar.dev/model": model}
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


def pod(
    name: str, model: str, namespace: str, ip: str, ready: bool, terminating: bool
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {"app": f"bazaar-model-{model}", "bazaar.dev/model": model},
    }
    if terminating:
        metadata["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"containers": [{"name": "model-server", "image": "bazaar:test"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
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


@contextlib.asynccontextmanager
async def serving(fake: FakeKubernetes) -> AsyncIterator[str]:
    """Serve ``fake`` on a free loopback port; yields its base URL."""
    async with serve(fake.app()) as url:
        try:
            yield url
        finally:
            fake.released.set()  # stalled requests answer now: shutdown need not wait them out
