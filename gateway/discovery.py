"""Where the gateway's endpoints come from: a file, or Kubernetes EndpointSlices.

An endpoint source reports each model's ready endpoint URLs through the catalog's listener
(``catalog.set_endpoints``); that call is the whole seam. ``bazaar serve``'s local workers
are the third source, in the command package.

``StaticEndpoints`` reads a file: ``models: {name: [url, ...]}``, any v2 servers (an endpoint
``{url, grpc}`` gets batches over gRPC: ``grpc_target``), and what the
file says of each model beyond its endpoints (``gateway.config``), which the composition
root hands the catalog as ``GatewayConfig.models``. It reads the file again every
``reread_s`` (1 s) and reports each model whose endpoints or traffic policy changed, so both
change without a restart (``validate`` and ``max_batch_size`` are read at start only). A
file that no longer parses is logged once and changes nothing until it does.

``EndpointSlices`` follows the model Services of one namespace (``cluster.endpoints``: one
endpoint per ready pod, so the router's least-outstanding-work choice and per-endpoint
limits see the pods themselves; a model scaled to zero has no endpoints, and the catalog
holds its requests in the queue until a pod is ready and listed again). A slice with a port
named ``grpc`` (the model Service's port to the pods' ``--grpc-port``) gets its pods' batches
over gRPC, as an endpoints file's ``{url, grpc}`` does (``grpc_target``); a slice without one
keeps the HTTP hop. Readiness, learning and passthrough stay on the ``http`` port either way.

**Re-listing, not a watch.** Every ``resync_s`` (1 s) one task lists the model Services and
the namespace's EndpointSlices and reports each model whose endpoints changed. A watch would
see a change a little sooner, but it brings resource versions, 410 Gone, expired and
silently stalled streams, and a second code path for the initial state; a listing has one
path, heals by itself, and its staleness is bounded by ``resync_s``, small next to a pod's
start. Its cost is two small LISTs per second per gateway replica, filtered by label on the
server.

A model Service's ``bazaar.dev/traffic`` annotation, a traffic policy as JSON (or YAML), is
reported with its endpoints and replaces the model config's; it changes on the next listing.
One that does not parse is logged once and the last good one stays (a typo must not end a
canary); no further RBAC: it is read off the Services already listed.

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

import yaml
from prometheus_client import CollectorRegistry

from cluster.api import Cluster, Forbidden, KubernetesError
from cluster.endpoints import DISCOVERY_RBAC, model_services
from gateway.catalog import EndpointListener
from gateway.config import ModelSettings, StaticModel, load_static_endpoints
from protocol.errors import ConfigError
from protocol.support import ProblemLog, cancel_and_wait
from protocol.traffic import TrafficPolicy, parse_traffic

log = logging.getLogger(__name__)

REQUIRED_RBAC = DISCOVERY_RBAC
TRAFFIC_ANNOTATION = "bazaar.dev/traffic"
"""The model Service annotation holding its traffic policy (``protocol.traffic``)."""


class EndpointSource(Protocol):
    """Where endpoints come from; it reports them through ``catalog.set_endpoints``."""

    async def start(self, listener: EndpointListener, registry: CollectorRegistry) -> None:
        """Begin reporting endpoints; ``registry`` is the gateway's, for the source's metrics."""

    async def stop(self) -> None: ...


class StaticEndpoints:
    """Endpoints listed in a file, per model; they can be any v2 server (Triton, MLServer)."""

    def __init__(self, path: Path, reread_s: float = 1.0) -> None:
        self.path = path.absolute()
        self.reread_s = reread_s
        self._text = self.path.read_text() if self.path.is_file() else ""
        self.models = load_static_endpoints(self.path)
        self._grpc_targets = _grpc_targets(self.models)
        self.settings: dict[str, ModelSettings] = {
            name: model.settings for name, model in self.models.items()
        }
        """Per model, what the file says of it beyond its endpoints (read at start)."""
        self._task: asyncio.Task[None] | None = None

    async def start(self, listener: EndpointListener, registry: CollectorRegistry) -> None:
        _report_changes(listener, {}, self.models)
        self._task = asyncio.create_task(self._reread(listener), name="endpoints-file")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    def grpc_target(self, url: str) -> str | None:
        """The gRPC ``host:port`` the file gives the endpoint at ``url``, if any (as of its
        last good reading)."""
        return self._grpc_targets.get(url)

    async def _reread(self, listener: EndpointListener) -> None:
        problems = ProblemLog(log)
        while True:
            await asyncio.sleep(self.reread_s)
            try:
                text = self.path.read_text()
                if text == self._text:
                    continue
                models = load_static_endpoints(self.path)
            except (OSError, ConfigError) as exc:
                problems.failing(
                    "file", f"{exc}; the endpoints and traffic it said before stay in use"
                )
                continue
            problems.ok("file", f"{self.path} is valid again")
            log.info("%s changed: reporting its endpoints and traffic", self.path)
            self._grpc_targets = _grpc_targets(models)  # before a new endpoint is used
            _report_changes(listener, self.models, models)
            self._text, self.models = text, models


def _grpc_targets(models: dict[str, StaticModel]) -> dict[str, str]:
    return {url: target for model in models.values() for url, target in model.grpc_targets.items()}


def _report_changes(
    listener: EndpointListener, before: dict[str, StaticModel], after: dict[str, StaticModel]
) -> None:
    for model in before.keys() - after.keys():
        listener(model, [])
    for model, entry in after.items():
        previous = before.get(model)
        if previous is None or (previous.endpoints, previous.traffic) != (
            entry.endpoints,
            entry.traffic,
        ):
            listener(model, entry.endpoints, entry.traffic)


class EndpointSlices:
    """An ``EndpointSource`` over the model Services of ``cluster``'s namespace."""

    def __init__(
        self,
        cluster: Cluster,
        *,
        label: str = "bazaar.dev/model",
        port_name: str = "http",
        grpc_port_name: str = "grpc",
        resync_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.cluster = cluster
        self.label = label
        """The Service label whose value names the model."""
        self.port_name = port_name
        """The EndpointSlice port (the Service port's name) that speaks v2."""
        self.grpc_port_name = grpc_port_name
        """The EndpointSlice port that speaks v2 over gRPC, where a slice has it."""
        self.resync_s = resync_s
        self.max_backoff_s = max_backoff_s
        self._reported: dict[str, tuple[list[str], TrafficPolicy | None]] = {}
        self._grpc_targets: dict[str, str] = {}
        self._failing = ProblemLog(log)
        self._task: asyncio.Task[None] | None = None

    async def start(self, listener: EndpointListener, registry: CollectorRegistry) -> None:
        delay = await self._sync(listener)
        self._task = asyncio.create_task(self._run(listener, delay), name="endpoint-slices")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self.cluster.close()

    def grpc_target(self, url: str) -> str | None:
        """The gRPC ``host:port`` of the endpoint at ``url``, if its slice has the gRPC port
        (as of the last good listing)."""
        return self._grpc_targets.get(url)

    async def _run(self, listener: EndpointListener, delay: float) -> None:
        while True:
            await asyncio.sleep(delay)
            delay = await self._sync(listener, delay)

    async def _sync(self, listener: EndpointListener, delay: float | None = None) -> float:
        """One listing, reported; returns how long to wait before the next one."""
        namespace = self.cluster.namespace
        try:
            services = await model_services(
                self.cluster, self.label, self.port_name, TRAFFIC_ANNOTATION, self.grpc_port_name
            )
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
        before, targets = (
            self._grpc_targets,
            {
                url: target
                for service in services.values()
                for url, target in service.grpc_targets.items()
            },
        )
        self._grpc_targets = targets  # before a new endpoint is used
        for model in sorted(self._reported.keys() - services.keys()):
            listener(model, [])
            del self._reported[model]
        for model, service in sorted(services.items()):
            urls = service.urls
            traffic = self._traffic(model, service.annotation)
            reported = self._reported.get(model)
            if (
                reported is None
                or reported[0] != urls
                or any(before.get(url) != targets.get(url) for url in urls)
            ):
                described = [
                    f"{url} (gRPC {targets[url]})" if url in targets else url for url in urls
                ]
                log.info("%s: %d ready endpoint(s) %s", model, len(urls), " ".join(described))
            if reported != (urls, traffic):
                listener(model, urls, traffic)
                self._reported[model] = (urls, traffic)
        return self.resync_s

    def _traffic(self, model: str, annotation: str | None) -> TrafficPolicy | None:
        """The annotation's policy; the last one reported while it does not parse."""
        key = ("traffic", model)
        if annotation is None:
            self._failing.ok(key)
            return None
        try:
            policy = parse_traffic(yaml.safe_load(annotation), model, TRAFFIC_ANNOTATION)
        except (yaml.YAMLError, ConfigError) as exc:
            reported = self._reported.get(model)
            kept = reported[1] if reported is not None else None
            self._failing.failing(
                key,
                f"{model}: annotation {TRAFFIC_ANNOTATION} is not a traffic policy, keeping "
                f"{kept.to_json() if kept else 'none'}: {exc}",
            )
            return kept
        self._failing.ok(key)
        return policy
