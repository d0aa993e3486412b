"""Kubernetes endpoint discovery: each model's ready pods, from its Services' EndpointSlices.

The second and last module that imports ``kubernetes`` (with ``autoscaler/kubernetes.py``,
whose ``connect``, ``Permission``, ``PermissionLog`` and ``pod_url`` it reuses). Which
Services are models: those in the namespace labelled ``bazaar.dev/model=<model>``. A
model's endpoints are the addresses of its Services' EndpointSlices (``discovery.k8s.io/v1``,
label ``kubernetes.io/service-name``) whose ``conditions.ready`` is true (unset counts as
ready, as the API documents), paired with the slice's port named ``http``:
``http://10.0.0.7:8001``, ``http://[fd00::7]:8001``. One endpoint per ready pod, so the
router's least-outstanding-work choice and per-endpoint limits see the pods themselves; a
model scaled to zero has no endpoints, and the catalog holds its requests in the queue until
a pod is ready and listed again.

**Re-listing, not a watch.** Every ``resync_s`` (1 s) one task lists the model Services and
the namespace's EndpointSlices (two calls, each in a thread: the client is blocking) and
reports each model whose endpoints changed. A watch would see a change a little sooner,
but it brings resource versions, 410 Gone, expired and silently stalled streams, and a
second code path for the initial state; a listing has one path, heals by itself, and its
staleness is bounded by ``resync_s``, small next to a pod's start. Its cost is two small
LISTs per second per gateway replica, filtered by label on the server.

Every model is reported once when first seen (also with ``[]``); a model whose Services are
gone is reported with ``[]`` once and forgotten. ``start()`` returns after the first
listing (or its failure), so a gateway starts knowing its models.

Failures never stop the task, and the last endpoints reported stay in place meanwhile:

- 403: logged once per permission, naming the verb and resource to grant to the gateway's
  ServiceAccount, until that call succeeds again.
- anything else (5xx, timeouts, refused connections, an answer that does not parse):
  logged once when it starts (and when it ends), retried with exponential backoff from
  ``resync_s`` up to ``max_backoff_s``.

``stop()`` cancels the task; a call in flight is abandoned in its thread, bounded by the
request timeout. ``REQUIRED_RBAC`` is exactly what the calls need; the gateway's Role in
``deploy/`` grants it and a test holds the two together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from kubernetes.client import ApiClient, CoreV1Api, DiscoveryV1Api
from kubernetes.client.exceptions import ApiException
from kubernetes.client.models import V1EndpointSlice
from prometheus_client import CollectorRegistry

from autoscaler.kubernetes import Forbidden, Permission, PermissionLog, connect, pod_url
from gateway.catalog import EndpointListener

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
LIST_SERVICES = Permission("", "services", "list")
LIST_ENDPOINT_SLICES = Permission("discovery.k8s.io", "endpointslices", "list")
REQUIRED_RBAC = frozenset({LIST_SERVICES, LIST_ENDPOINT_SLICES})
"""Every (apiGroup, resource, verb) this module calls; the gateway's Role grants these."""


class EndpointSlices:
    """An ``EndpointSource`` over the model Services of one namespace. It owns its API
    client (``connect()``'s when none is given) and closes it on ``stop()``."""

    def __init__(
        self,
        namespace: str,
        *,
        label: str = "bazaar.dev/model",
        port_name: str = "http",
        api_client: ApiClient | None = None,
        resync_s: float = 1.0,
        request_timeout_s: float = 5.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.namespace = namespace
        self.label = label
        """The Service label whose value names the model."""
        self.port_name = port_name
        """The EndpointSlice port (the Service port's name) that speaks v2."""
        self.client = api_client if api_client is not None else connect()
        self.resync_s = resync_s
        self.request_timeout_s = request_timeout_s
        self.max_backoff_s = max_backoff_s
        self._core = CoreV1Api(self.client)
        self._discovery = DiscoveryV1Api(self.client)
        self._reported: dict[str, list[str]] = {}
        self._permissions = PermissionLog(namespace, "gateway", log)
        self._failing: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, listener: EndpointListener, registry: CollectorRegistry) -> None:
        delay = await self._sync(listener)
        self._task = asyncio.create_task(self._run(listener, delay), name="endpoint-slices")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.client.close()  # type: ignore[no-untyped-call]

    async def _run(self, listener: EndpointListener, delay: float) -> None:
        while True:
            await asyncio.sleep(delay)
            delay = await self._sync(listener, delay)

    async def _sync(self, listener: EndpointListener, delay: float | None = None) -> float:
        """One listing, reported; returns how long to wait before the next one."""
        try:
            endpoints = await self._endpoints()
        except Forbidden:
            return self.resync_s
        except Exception as exc:  # the source outlives any failure of the API
            problem = f"{exc.status} {exc.reason}" if isinstance(exc, ApiException) else str(exc)
            if self._failing is None:
                log.warning(
                    "cannot list the model endpoints in namespace %s: %s; retrying with "
                    "backoff, the last endpoints stay in use",
                    self.namespace,
                    problem or type(exc).__name__,
                )
            self._failing = problem
            return min(2 * (delay or self.resync_s), self.max_backoff_s)
        if self._failing is not None:
            log.info("listing the model endpoints in namespace %s works again", self.namespace)
            self._failing = None
        for model in sorted(self._reported.keys() - endpoints.keys()):
            listener(model, [])
            del self._reported[model]
        for model, urls in sorted(endpoints.items()):
            if self._reported.get(model) != urls:
                log.info("%s: %d ready endpoint(s) %s", model, len(urls), " ".join(urls))
                listener(model, urls)
                self._reported[model] = urls
        return self.resync_s

    async def _endpoints(self) -> dict[str, list[str]]:
        """Model → sorted ready endpoint URLs, for every model Service in the namespace."""
        timeout = self.request_timeout_s
        services = await self._permissions.call(
            LIST_SERVICES,
            lambda: self._core.list_namespaced_service(
                self.namespace, label_selector=self.label, _request_timeout=timeout
            ),
        )
        models: dict[str, str] = {}
        for service in services.items:
            metadata = service.metadata
            model = metadata and (metadata.labels or {}).get(self.label)
            if metadata and metadata.name and model:
                models[metadata.name] = model
        if not models:
            return {}
        endpoints: dict[str, set[str]] = {model: set() for model in models.values()}
        slices = await self._permissions.call(
            LIST_ENDPOINT_SLICES,
            lambda: self._discovery.list_namespaced_endpoint_slice(
                self.namespace, label_selector=SERVICE_NAME_LABEL, _request_timeout=timeout
            ),
        )
        for endpoint_slice in slices.items:
            labels = (endpoint_slice.metadata and endpoint_slice.metadata.labels) or {}
            model = models.get(labels.get(SERVICE_NAME_LABEL, ""))
            if model is not None:
                endpoints[model] |= self._urls(endpoint_slice)
        return {model: sorted(urls) for model, urls in endpoints.items()}

    def _urls(self, endpoint_slice: V1EndpointSlice) -> set[str]:
        """The slice's ready addresses on its port named ``port_name`` (none if it lacks one,
        or if its addresses are FQDNs)."""
        if endpoint_slice.address_type not in ("IPv4", "IPv6"):
            return set()
        ports = [p.port for p in endpoint_slice.ports or [] if p.name == self.port_name]
        if not ports or ports[0] is None:
            return set()
        port = ports[0]
        urls = set()
        for endpoint in endpoint_slice.endpoints or []:
            conditions = endpoint.conditions
            if conditions is not None and conditions.ready is False:
                continue
            for ip in endpoint.addresses or []:
                urls.add(pod_url(ip, port))
        return urls
