"""The models the gateway serves, learned from their endpoints.

Endpoint sources (the static file, the local supervisor, later Kubernetes EndpointSlices)
call ``set_endpoints(model, urls)``; that is the whole seam. The first time a model has an
endpoint, the catalog reads its metadata and batching config from it (``GET
/v2/models/{m}`` and ``.../config``), then creates its ``EndpointPool`` and ``Dispatcher``
and starts the collector. It keeps them when the endpoints go away: a model at zero
endpoints still validates and queues requests, which wait (bounded by their deadline and
the queue) until an endpoint joins.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from gateway.client import HttpModelClient
from gateway.config import GatewayConfig, batch_policy
from gateway.dispatcher import BatchPolicy, Dispatcher, DispatcherStats
from gateway.metrics import GatewayMetrics, ModelMetrics
from gateway.router import EndpointPool
from protocol.errors import BazaarError, ModelNotFound, ModelNotReady
from protocol.schema import ModelMetadata
from protocol.support import cancel_and_wait

log = logging.getLogger(__name__)

EndpointListener = Callable[[str, list[str]], None]
"""An endpoint source's only call into the gateway: a model and its ready endpoint URLs."""


@dataclasses.dataclass(slots=True)
class ServedModel:
    metadata: ModelMetadata
    dispatcher: Dispatcher
    metrics: ModelMetrics
    collector: asyncio.Task[None]


class ModelCatalog:
    def __init__(
        self, client: HttpModelClient, metrics: GatewayMetrics, config: GatewayConfig
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.config = config
        self.models: dict[str, ServedModel] = {}
        self._endpoints: dict[str, list[str]] = {}
        self._learning: dict[str, asyncio.Task[None]] = {}
        self._learned: dict[str, asyncio.Event] = {}
        self.waiting: dict[str, int] = {}
        """Requests held per model while it has never had an endpoint (its queue demand)."""
        metrics.watch(lambda: {name: m.dispatcher for name, m in self.models.items()})

    def set_endpoints(self, model: str, urls: list[str]) -> None:
        self._endpoints[model] = list(urls)
        self._learned.setdefault(model, asyncio.Event())
        served = self.models.get(model)
        if served is not None:
            served.dispatcher.pool.set_endpoints(urls)
        elif urls and model not in self._learning:
            self._learning[model] = asyncio.create_task(self._learn(model))

    def get(self, name: str, version: str | None = None) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            if name in self._endpoints:
                raise ModelNotReady(name, "waiting for its first endpoint")
            raise ModelNotFound(name)
        if version is not None and version != served.metadata.version:
            raise ModelNotFound(name, version)
        return served

    async def serving(self, name: str, version: str | None, timeout_s: float) -> ServedModel:
        """``get``, but a known model not learned yet is waited for, up to ``timeout_s``.

        Such a model has never had an endpoint since the gateway started (scaled to zero
        before it, say): its requests cannot be validated yet, so they wait here, counted in
        ``waiting``, which ``/stats`` reports as queued so the autoscaler starts a replica.
        """
        learned = self._learned.get(name)
        if name in self.models or learned is None:
            return self.get(name, version)
        self.waiting[name] = self.waiting.get(name, 0) + 1
        try:
            await asyncio.wait_for(learned.wait(), timeout_s)
        except TimeoutError:
            raise ModelNotReady(name, f"without an endpoint for {timeout_s:g} s") from None
        finally:
            self.waiting[name] -= 1
        return self.get(name, version)

    def names(self) -> list[str]:
        return sorted(self._endpoints)

    def is_ready(self, name: str, version: str | None = None) -> bool:
        """The model takes batches now: learned, with an endpoint that is not ejected.
        ``ModelNotFound`` for a model or version the gateway does not serve."""
        try:
            served = self.get(name, version)
        except ModelNotReady:
            return False
        return served.dispatcher.pool.ready_endpoints > 0

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """The repository index: every known model, READY or UNAVAILABLE."""
        entries = []
        for name in self.names():
            served = self.models.get(name)
            is_ready = self.is_ready(name)
            if ready_only and not is_ready:
                continue
            entry = {"name": name, "state": "READY" if is_ready else "UNAVAILABLE"}
            if served is not None:
                entry["version"] = served.metadata.version
            entries.append(entry)
        return entries

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per model: its queue and work in flight, and its endpoints. A model not learned yet
        shows the requests held for it as queued: they are its whole demand."""
        models = {}
        for name in self.names():
            served = self.models.get(name)
            if served is None:
                held = self.waiting.get(name, 0)
                work, urls, ready = DispatcherStats(queued=held, queued_rows=held), [], 0
            else:
                pool = served.dispatcher.pool
                work, ready = served.dispatcher.stats(), pool.ready_endpoints
                urls = [endpoint.url for endpoint in pool.endpoints]
            models[name] = {
                **dataclasses.asdict(work),
                "endpoints": len(urls),
                "ready_endpoints": ready,
                "endpoint_urls": urls,
            }
        return models

    async def close(self) -> None:
        for served in self.models.values():
            served.dispatcher.close()
        await cancel_and_wait(
            *self._learning.values(), *(m.collector for m in self.models.values())
        )
        for served in self.models.values():
            await served.dispatcher.pool.close()

    async def _learn(self, model: str) -> None:
        """Read metadata and config from an endpoint, retrying while the model has any."""
        delay = 0.2
        while self._endpoints.get(model):
            for url in self._endpoints[model]:
                try:
                    metadata_json = await self.client.get_json(url, f"/v2/models/{model}")
                    config_json = await self.client.get_json(url, f"/v2/models/{model}/config")
                except BazaarError as exc:
                    log.info("%s: cannot read metadata from %s yet: %s", model, url, exc)
                    continue
                policy = batch_policy(config_json, self.config)
                metadata = ModelMetadata.from_json(
                    {**metadata_json, "parameters": {"max_batch_size": policy.max_batch_size}}
                )
                self._serve(model, metadata, policy)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _serve(self, model: str, metadata: ModelMetadata, policy: BatchPolicy) -> None:
        pool = EndpointPool(
            model,
            self.client,
            max_batches_per_endpoint=self.config.max_batches_per_endpoint,
            call_timeout_s=self.config.call_timeout_s,
        )
        pool.set_endpoints(self._endpoints.get(model, []))
        metrics = self.metrics.for_model(model)
        dispatcher = Dispatcher(model, policy, pool, metrics)
        collector = asyncio.create_task(dispatcher.run(), name=f"dispatcher-{model}")
        self.models[model] = ServedModel(metadata, dispatcher, metrics, collector)
        self._learning.pop(model, None)
        self._learned[model].set()
        log.info(
            "serving %s version %s: max_batch_size %d, delay %.1f ms, queue %d, %d endpoint(s)",
            model,
            metadata.version,
            policy.max_batch_size,
            policy.max_queue_delay_s * 1000,
            policy.max_queue_size,
            len(pool.endpoints),
        )
