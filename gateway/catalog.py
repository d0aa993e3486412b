"""The models the gateway serves, learned from their endpoints.

Endpoint sources (the static file, the local supervisor, later Kubernetes EndpointSlices)
call ``set_endpoints(model, urls)``; that is the whole seam. The first time a model has an
endpoint, the catalog learns it from one (``read_model``): its metadata (``GET
/v2/models/{m}``) and its batching config (``.../config``, a Triton extension; a server
without it, MLServer or KServe, is taken at its metadata's word, ``parameters.max_batch_size``
or 0), with what the endpoints file says of the model on top (``GatewayConfig.models``).
Then it creates the model's ``EndpointPool`` and ``Dispatcher`` and starts the collector.
It keeps them when the endpoints go away: a model at zero endpoints still validates and
queues requests, which wait (bounded by their deadline and the queue) until an endpoint
joins.

A model whose metadata declares no tensors (common with custom MLServer runtimes), or that
the endpoints file marks ``validate: false``, cannot be validated: its requests are passed
through as sent (``gateway.passthrough``), one per call, and it stays so while served.

Learning never gives up while the model has endpoints: whatever goes wrong (no answer, an
error status, a body that is not metadata, a bug) is logged once while it lasts, and the
endpoints are tried again with exponential backoff, from ``LEARN_BACKOFF_S`` up to
``max_learn_backoff_s``.

What a pod serves can change under the gateway: the repository API unloads a model, or
reloads it with another config (``max_batch_size`` lowered, say). So while a model is
served, its watcher re-reads every discovered endpoint (readiness of the model, metadata,
config) every ``refresh_s``, and at once when discovery adds an endpoint (``refresh``).
Periodic re-reading is the robust choice: it works against any v2 server, sees a change in
either direction (a limit raised as well as lowered) with or without traffic, and needs
nothing the data port does not already serve; a pod's repository index would need the
control port, which the gateway may not reach, and a 400 from a pod only arrives after a
batch has failed.
``reconcile`` decides, a pure function of the readings:

* An endpoint that answers that it does not serve the model leaves the model's pool (its
  requests go to the others, or wait in the queue while there are none) and rejoins when
  it serves it again, fresh: it is not ejected, which would fail batches until a probe.
* An endpoint whose model has other tensors or another version than the gateway validates
  against leaves the pool too (its batches would fail); when no endpoint serves the
  gateway's version any more (a rolling update has finished), the gateway takes the
  new one's metadata.
* ``max_batch_size`` is the smallest among the serving endpoints, so every batch fits
  every pod; the dispatcher forms batches with it from then on.
* An endpoint that could not be read keeps its place; ejection is the router's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gateway.client import HttpModelClient
from gateway.config import DEFAULT_MODEL_SETTINGS, GatewayConfig, ModelSettings, batch_policy
from gateway.dispatcher import BatchPolicy, Dispatcher, DispatcherStats
from gateway.metrics import GatewayMetrics, ModelMetrics
from gateway.router import EndpointPool
from protocol.errors import BazaarError, ModelNotFound, ModelNotReady, UpstreamError
from protocol.schema import ModelMetadata
from protocol.support import ProblemLog, cancel_and_wait

log = logging.getLogger(__name__)

EndpointListener = Callable[[str, list[str]], None]
"""An endpoint source's only call into the gateway: a model and its ready endpoint URLs."""


REFRESH_S = 5.0
"""How often a served model's endpoints are re-read (``ModelCatalog.refresh_s``)."""
LEARN_BACKOFF_S = 0.2
"""The first wait before an unlearned model's endpoints are tried again; it doubles."""
MAX_LEARN_BACKOFF_S = 5.0
"""The longest wait between tries to learn a model."""


@dataclasses.dataclass(slots=True)
class ServedModel:
    metadata: ModelMetadata
    dispatcher: Dispatcher
    metrics: ModelMetrics
    collector: asyncio.Task[None]
    passthrough: bool = False
    """Requests go to the endpoints as sent, unvalidated and unbatched."""


@dataclasses.dataclass(frozen=True, slots=True)
class Reading:
    """What one endpoint serves of a model."""

    metadata: ModelMetadata
    policy: BatchPolicy
    passthrough: bool = False
    """Requests cannot be validated (the metadata lacks inputs or outputs) or must not be
    (the endpoints file says ``validate: false``): they pass through as sent."""


async def read_model(
    client: HttpModelClient,
    url: str,
    model: str,
    settings: ModelSettings,
    config: GatewayConfig,
) -> Reading:
    """What ``url`` serves of ``model``, as the gateway will treat it (see the module's
    docstring); raises whatever went wrong (``UpstreamError``, or a ``ValueError`` & co.
    from a body that is not metadata)."""
    metadata_json = await client.get_json(url, f"/v2/models/{model}")
    if not isinstance(metadata_json, dict):
        raise UpstreamError(f"GET {url}/v2/models/{model} answered {metadata_json!r:.200}")
    config_json = await client.get_json(url, f"/v2/models/{model}/config", optional=True)
    if config_json is None:  # no config route: the metadata's word
        parameters = metadata_json.get("parameters") or {}
        config_json = {"max_batch_size": parameters.get("max_batch_size", 0)}
    elif not isinstance(config_json, dict):
        raise UpstreamError(f"GET {url}/v2/models/{model}/config answered {config_json!r:.200}")
    if settings.max_batch_size is not None:
        config_json = {**config_json, "max_batch_size": settings.max_batch_size}
    policy = batch_policy(config_json, config)
    metadata = ModelMetadata.from_json(
        {
            **metadata_json,
            "inputs": metadata_json.get("inputs") or [],
            "outputs": metadata_json.get("outputs") or [],
            "parameters": {"max_batch_size": policy.max_batch_size},
        }
    )
    labels = config_json.get("labels")
    if isinstance(labels, list) and all(isinstance(label, str) for label in labels):
        # A bazaar pod's: the classification extension answers with them here.
        metadata = dataclasses.replace(metadata, labels=tuple(labels))
    if settings.validate and metadata.inputs and metadata.outputs:
        return Reading(metadata, policy)
    return Reading(
        dataclasses.replace(metadata, max_batch_size=0),
        dataclasses.replace(policy, max_batch_size=0, preferred_batch_sizes=()),
        passthrough=True,
    )


NOT_SERVING = "not serving"
"""An endpoint answered that it does not serve the model (not ready, not found)."""
UNREAD = "unread"
"""An endpoint said it serves the model but its metadata could not be read."""

EndpointReading = Reading | str


@dataclasses.dataclass(frozen=True, slots=True)
class Reconciled:
    urls: list[str]
    """The endpoints that take the model's batches."""
    metadata: ModelMetadata
    max_batch_size: int


def reconcile(
    current: ModelMetadata, readings: Mapping[str, EndpointReading], pooled: Sequence[str]
) -> Reconciled:
    """The endpoints to use and the metadata to validate with, from each endpoint's reading.

    ``pooled``: the endpoints in use now (an ``UNREAD`` one keeps its membership).
    """
    read = {url: r for url, r in readings.items() if isinstance(r, Reading)}
    chosen = current
    if read and not any(_same_model(r.metadata, current) for r in read.values()):
        chosen = next(iter(read.values())).metadata  # every pod serves another version now
    compatible = [url for url, r in read.items() if _same_model(r.metadata, chosen)]
    urls = [
        url for url, r in readings.items() if url in compatible or (r == UNREAD and url in pooled)
    ]
    sizes = [read[url].policy.max_batch_size for url in compatible]
    max_batch_size = min(sizes) if sizes else chosen.max_batch_size
    metadata = dataclasses.replace(chosen, max_batch_size=max_batch_size)
    return Reconciled(urls, metadata, max_batch_size)


def _same_model(a: ModelMetadata, b: ModelMetadata) -> bool:
    return (a.version, a.inputs, a.outputs) == (b.version, b.inputs, b.outputs)


class ModelCatalog:
    def __init__(
        self,
        client: HttpModelClient,
        metrics: GatewayMetrics,
        config: GatewayConfig,
        refresh_s: float = REFRESH_S,
        max_learn_backoff_s: float = MAX_LEARN_BACKOFF_S,
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.config = config
        self.refresh_s = refresh_s
        """Seconds between re-reads of a served model's endpoints."""
        self.max_learn_backoff_s = max_learn_backoff_s
        """The longest wait between tries to learn a model."""
        self.models: dict[str, ServedModel] = {}
        self._endpoints: dict[str, list[str]] = {}
        self._pooled: dict[str, list[str]] = {}
        """Per served model, the discovered endpoints that serve it as the gateway expects."""
        self._learning: dict[str, asyncio.Task[None]] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._learned: dict[str, asyncio.Event] = {}
        self.waiting: dict[str, int] = {}
        """Requests held per model while it has never had an endpoint (its queue demand)."""
        metrics.watch(lambda: {name: m.dispatcher for name, m in self.models.items()})

    def set_endpoints(self, model: str, urls: list[str]) -> None:
        previous = self._endpoints.get(model, [])
        self._endpoints[model] = list(urls)
        self._learned.setdefault(model, asyncio.Event())
        served = self.models.get(model)
        if served is not None:
            # A new endpoint joins at once (discovery counts it ready) and is read soon;
            # one known not to serve the model stays out until a reading says it does.
            pooled = set(self._pooled[model]) | {u for u in urls if u not in previous}
            self._pooled[model] = [url for url in urls if url in pooled]
            served.dispatcher.pool.set_endpoints(self._pooled[model])
            if set(urls) - set(previous):
                self.refresh(model)
        elif urls and model not in self._learning:
            self._learning[model] = asyncio.create_task(self._learn(model))

    def refresh(self, model: str) -> None:
        """Re-read ``model``'s endpoints now (discovery added one)."""
        wake = self._wake.get(model)
        if wake is not None:
            wake.set()

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
            *self._learning.values(),
            *self._watchers.values(),
            *(m.collector for m in self.models.values()),
        )
        for served in self.models.values():
            await served.dispatcher.pool.close()

    async def _learn(self, model: str) -> None:
        """Learn the model from the first endpoint that answers, trying them all again with
        backoff while it has any; every failure is logged once while it lasts."""
        problems = ProblemLog(log)
        settings = self.config.models.get(model, DEFAULT_MODEL_SETTINGS)
        delay = min(LEARN_BACKOFF_S, self.max_learn_backoff_s)
        try:
            while urls := list(self._endpoints.get(model, [])):
                failing: dict[tuple[str, str], str] = {}
                for url in urls:
                    try:
                        reading = await read_model(self.client, url, model, settings, self.config)
                    except Exception as exc:  # learning outlives any failure, bugs included
                        problem = _problem(exc)
                        failing[url, problem] = (
                            f"{model}: cannot learn it from {url} yet (retrying): {problem}"
                        )
                        continue
                    self._serve(model, reading)
                    return
                problems.only(failing)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_learn_backoff_s)
        finally:
            if self._learning.get(model) is asyncio.current_task():
                del self._learning[model]

    def _serve(self, model: str, reading: Reading) -> None:
        metadata, policy, passthrough = reading.metadata, reading.policy, reading.passthrough
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
        self.models[model] = ServedModel(metadata, dispatcher, metrics, collector, passthrough)
        self._learned[model].set()
        self._pooled[model] = list(self._endpoints.get(model, []))
        self._wake[model] = asyncio.Event()
        self._watchers[model] = asyncio.create_task(self._watch(model), name=f"watch-{model}")
        log.info(
            "serving %s version %s%s: max_batch_size %d, delay %.1f ms, queue %d, %d endpoint(s)",
            model,
            metadata.version,
            " (requests passed through unvalidated)" if passthrough else "",
            policy.max_batch_size,
            policy.max_queue_delay_s * 1000,
            policy.max_queue_size,
            len(pool.endpoints),
        )

    async def _watch(self, model: str) -> None:
        """Re-read the model's endpoints every ``refresh_s``, or sooner when woken."""
        wake = self._wake[model]
        problems = ProblemLog(log)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.refresh_s)
            wake.clear()
            unread: dict[tuple[str, str], str] = {}
            try:
                await self._reread(model, unread)
            except Exception as exc:  # a bug here must not stop the watching
                unread["", repr(exc)] = f"{model}: re-reading its endpoints failed: {exc!r}"
            problems.only(unread)

    async def _reread(self, model: str, unread: dict[tuple[str, str], str]) -> None:
        """Re-read every endpoint and apply ``reconcile``; ``unread`` gets a message per
        endpoint that could not be read."""
        served = self.models[model]
        urls = list(self._endpoints.get(model, []))
        readings = await asyncio.gather(*(self._read(url, model, unread) for url in urls))
        result = reconcile(
            served.metadata, dict(zip(urls, readings, strict=True)), self._pooled[model]
        )
        if served.passthrough:  # it stays so while served: its queue may hold raw requests
            result = dataclasses.replace(
                result,
                metadata=dataclasses.replace(result.metadata, max_batch_size=0),
                max_batch_size=0,
            )
        if self._endpoints.get(model, []) != urls:
            return  # discovery moved on while we read; its change has woken us again
        dispatcher = served.dispatcher
        if result.metadata != served.metadata:
            log.info(
                "%s: the pods now serve version %s with max_batch_size %d (was %s, %d)",
                model,
                result.metadata.version,
                result.max_batch_size,
                served.metadata.version,
                served.metadata.max_batch_size,
            )
            served.metadata = result.metadata
            policy = dispatcher.policy
            dispatcher.policy = dataclasses.replace(
                policy,
                max_batch_size=result.max_batch_size,
                preferred_batch_sizes=tuple(
                    p for p in policy.preferred_batch_sizes if p <= result.max_batch_size
                ),
            )
        if result.urls != self._pooled[model]:
            left = [url for url in self._pooled[model] if url not in result.urls]
            joined = [url for url in result.urls if url not in self._pooled[model]]
            log.info("%s: endpoints left %s, joined %s", model, left, joined)
            self._pooled[model] = result.urls
            dispatcher.pool.set_endpoints(result.urls)

    async def _read(
        self, url: str, model: str, unread: dict[tuple[str, str], str]
    ) -> EndpointReading:
        if not await self.client.ready(url, model):
            return NOT_SERVING
        settings = self.config.models.get(model, DEFAULT_MODEL_SETTINGS)
        try:
            return await read_model(self.client, url, model, settings, self.config)
        except Exception as exc:  # whatever it is, the endpoint stays where it was
            problem = _problem(exc)
            unread[url, problem] = f"{model}: cannot read its metadata from {url}: {problem}"
            return UNREAD


def _problem(exc: Exception) -> str:
    """An exception as a log line: our own errors say it all, others need their type."""
    return exc.message if isinstance(exc, BazaarError) else f"{type(exc).__name__}: {exc}"
