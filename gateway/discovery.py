"""Where the gateway's endpoints come from: a file, or Kubernetes EndpointSlices.

An endpoint source reports each model's ready endpoint URLs through the catalog's listener
(``catalog.set_endpoints``); that call is the whole seam. ``bazaar serve``'s local workers
are the third source, in the command package.

``StaticEndpoints`` reads a file once: ``models: {name: [url, ...]}``, any v2 servers, and
what the file says of each model beyond its endpoints (``gateway.config``), which the
composition root hands the catalog as ``GatewayConfig.models``.

``EndpointSlices`` follows the model Services of one namespace (``cluster.endpoints``: one
endpoint per ready pod, so the router's least-outstanding-work choice and per-endpoint
limits see the pods themselves; a model scaled to zero has no endpoints, and the catalog
holds its requests in the queue until a pod is ready and listed again).

**Re-listing, not a watch.** Every ``resync_s`` (1 s) one task lists the model Services and
the namespace's EndpointSlices and reports each model whose endpoints changed. A watch would
see a change a little sooner, but it brings resource versions, 410 Gone, expired and
silently stalled streams, and a second code path for the initial state; a listing has one
path, heals by itself, and its staleness is bounded by ``resync_s``, small next to a pod's
start. Its cost is two small LISTs per second per gateway replica, filtered by label on the
server.

Every model is reported once when first seen (also with ``[]``); a model whose Services are
gone is reported with ``[]`` once and forgotten. ``start()`` returns after the first listing
(or its failure), so a gateway starts knowing its models. Failures never stop the task, and
the last endpoints reported stay in place meanwhile: a 403 is logged once by the seam; any
other failure that outlasts the seam's retries is logged once when it starts (and when it
ends), and the listing is retried with exponential backoff from ``resync_s`` up to
``max_backoff_s``. ``stop()`` cancels the task and closes the cluster's client.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry

from cluster.api import Cluster, Forbidden, KubernetesError
from cluster.endpoints import DISCOVERY_RBAC, model_endpoints
from gateway.catalog import EndpointListener
from gateway.config import ModelSettings, load_static_endpoints
from protocol.support import ProblemLog, cancel_and_wait

log = logging.getLogger(__name__)

REQUIRED_RBAC = DISCOVERY_RBAC


class EndpointSource(Protocol):
    """Where endpoints come from; it reports them through ``catalog.set_endpoints``."""

    async def start(self, listener: EndpointListener, registry: CollectorRegistry) -> None:
        """Begin reporting endpoints; ``registry`` is the gateway's, for the source's metrics."""

    async def stop(self) -> None: ...


class StaticEndpoints:
    """Endpoints listed in a file, per model; they can be any v2 server (Triton, MLServer)."""

    def __init__(self, path: Path) -> None:
        models = load_static_endpoints(path)
        self.endpoints = {name: model.endpoints for name, model in models.items()}
        self.settings: dict[str, ModelSettings] = {
            name: model.settings for name, model in models.items()
        }
        """Per model, what the file says of it beyond its endpoints."""

    async def start(self, listener: EndpointListener, registry: CollectorRegistry) -> None:
        for model, urls in self.endpoints.items():
            listener(model, urls)

    async def stop(self) -> None:
        return None


class EndpointSlices:
    """An ``EndpointSource`` over the model Services of ``cluster``'s namespace."""

    def __init__(
        self,
        cluster: Cluster,
        *,
        label: str = "bazaar.dev/model",
        port_name: str = "http",
        resync_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.cluster = cluster
        self.label = label
        """The Service label whose value names the model."""
        self.port_name = port_name
        """The EndpointSlice port (the Service port's name) that speaks v2."""
        self.resync_s = resync_s
        self.max_backoff_s = max_backoff_s
        self._reported: dict[str, list[str]] = {}
        self._failing = ProblemLog(log)
        self._task: asyncio.Task[None] | None = None

    async def start(self, listener: EndpointListener, registry: CollectorRegistry) -> None:
        delay = await self._sync(listener)
        self._task = asyncio.create_task(self._run(listener, delay), name="endpoint-slices")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self.cluster.close()

    async def _run(self, listener: EndpointListener, delay: float) -> None:
        while True:
            await asyncio.sleep(delay)
            delay = await self._sync(listener, delay)

    async def _sync(self, listener: EndpointListener, delay: float | None = None) -> float:
        """One listing, reported; returns how long to wait before the next one."""
        namespace = self.cluster.namespace
        try:
            endpoints = await model_endpoints(self.cluster, self.label, self.port_name)
        except Forbidden:
            return self.resync_s
        except Exception as exc:  # the source outlives any failure of the API
            problem = str(exc) if isinstance(exc, KubernetesError) else repr(exc)
            self._failing.failing(
                "list",
                f"cannot list the model endpoints in namespace {namespace}: {problem}; "
                "retrying with backoff, the last endpoints stay in use",
            )
            return min(2 * (delay or self.resync_s), self.max_backoff_s)
        self._failing.ok(
            "list", f"listing the model endpoints in namespace {namespace} works again"
        )
        for model in sorted(self._reported.keys() - endpoints.keys()):
            listener(model, [])
            del self._reported[model]
        for model, urls in sorted(endpoints.items()):
            if self._reported.get(model) != urls:
                log.info("%s: %d ready endpoint(s) %s", model, len(urls), " ".join(urls))
                listener(model, urls)
                self._reported[model] = urls
        return self.resync_s
