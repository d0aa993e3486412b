"""The models the gateway serves, every version of them, learned from their endpoints, and
where each request goes among them.

Endpoint sources (the static file, the local supervisor, Kubernetes EndpointSlices) call
``set_endpoints(model, urls, traffic)``; that is the whole seam. The first time a model has
an endpoint, the catalog learns it from one (``gateway.readings.read_model``: the versions it
serves, and each one's metadata and batching config). Each version is served apart: its own
``EndpointPool`` (the endpoints that serve it, called at its versioned path, so a pod serving
several runs the one asked for), ``Dispatcher`` (its queue and batches: two versions never
share a batch) and metrics. A version whose endpoints go away is kept: it still validates
and queues requests, which wait (bounded by their deadline and the queue) until an endpoint
joins.

Requests that name a version go to it (404 for one no pod has served). The others follow
the model's traffic policy (``protocol.traffic``): the endpoint source's, else the one in
the model's config (its highest version's); without one they go to the default version
(``models``): the highest version that has endpoints, or the highest known while none has.
A policy may also shadow requests to a candidate (``gateway.shadow``) and roll a candidate
out in steps (``gateway.rollout``, judged every ``rollout_check_s``; with a
``RolloutRecord``, by the gateway it names, the others following the progress it saves;
with ``RolloutPeers`` too, on the sum of its own samples and the other gateways'). Each
gateway publishes its samples in its ``/stats``, under an ``instance`` name of its own, by
which the deciding one knows itself among the gateways it reads.

A model whose metadata declares no tensors (common with custom MLServer runtimes), or that
the endpoints file marks ``validate: false``, cannot be validated: its requests are passed
through as sent (``gateway.passthrough``), one per call, and it stays so while served.

Learning never gives up while the model has endpoints: whatever goes wrong (no answer, an
error status, a body that is not metadata, a bug) is logged once while it lasts, and the
endpoints are tried again with exponential backoff, from ``LEARN_BACKOFF_S`` up to
``max_learn_backoff_s``.

What a pod serves can change under the gateway: the repository API unloads a model, or
reloads it with another config (``max_batch_size`` lowered, say) or other versions. So while
a model is served, its watcher re-reads every discovered endpoint every ``refresh_s``, and
at once when discovery adds an endpoint (``refresh``) or the model was just learned from one
of several; ``gateway.readings.reconcile_versions`` decides what the readings mean. The same
re-read tells which endpoints hold the model loaded (a pod paging models under a memory
budget says so in its ready answer), which the pools prefer (``gateway.router``).

A new endpoint joins the default version's pool at once (discovery counts it ready, and a
model scaled to zero must not wait a re-read for its first pod), the other versions' when a
reading says it serves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

from gateway.client import HttpModelClient
from gateway.config import DEFAULT_MODEL_SETTINGS, GatewayConfig
from gateway.dispatcher import Dispatcher, DispatcherStats
from gateway.metrics import GatewayMetrics, ModelMetrics
from gateway.readings import (
    NOT_SERVING,
    UNREAD,
    EndpointReadings,
    Reading,
    Reconciled,
    config_traffic,
    default_version,
    model_path,
    read_model,
    reading_of,
    reconcile_versions,
)
from gateway.rollout import Rollout, RolloutRecord, SavedRollout, rollout_weights
from gateway.rollout_peers import RolloutPeers
from gateway.router import EndpointPool
from gateway.shadow import Shadow
from protocol.errors import BazaarError, ModelNotFound, ModelNotReady
from protocol.fastpath import Headers
from protocol.schema import ModelMetadata
from protocol.support import ProblemLog, cancel_and_wait
from protocol.traffic import (
    RolloutPolicy,
    ShadowPolicy,
    Split,
    TrafficPolicy,
    choose_version,
    split_of,
    version_order,
)

log = logging.getLogger(__name__)


class EndpointListener(Protocol):
    """An endpoint source's only call into the gateway (``ModelCatalog.set_endpoints``)."""

    def __call__(self, model: str, urls: list[str], traffic: TrafficPolicy | None = None) -> None:
        """``model``'s ready endpoint URLs, and the source's own traffic policy for it (the
        endpoints file's, the Service annotation's; None: the model config's applies)."""


REFRESH_S = 5.0
"""How often a served model's endpoints are re-read (``ModelCatalog.refresh_s``)."""
ROLLOUT_CHECK_S = 1.0
"""How often rollouts in progress are judged (``ModelCatalog.rollout_check_s``)."""
LEARN_BACKOFF_S = 0.2
"""The first wait before an unlearned model's endpoints are tried again; it doubles."""
MAX_LEARN_BACKOFF_S = 5.0
"""The longest wait between tries to learn a model."""


@dataclasses.dataclass(slots=True)
class ServedModel:
    """One version of a model, as the gateway serves it."""

    metadata: ModelMetadata
    dispatcher: Dispatcher
    metrics: ModelMetrics
    collector: asyncio.Task[None]
    passthrough: bool = False
    """Requests go to the endpoints as sent, unvalidated and unbatched."""


class ModelCatalog:
    def __init__(
        self,
        client: HttpModelClient,
        metrics: GatewayMetrics,
        config: GatewayConfig,
        refresh_s: float = REFRESH_S,
        max_learn_backoff_s: float = MAX_LEARN_BACKOFF_S,
        rollout_check_s: float = ROLLOUT_CHECK_S,
        rollout_record: RolloutRecord | None = None,
        rollout_peers: RolloutPeers | None = None,
    ) -> None:
        self.client = client
        self.instance = uuid.uuid4().hex
        """This gateway's name in its ``/stats``, unique to the process."""
        self.metrics = metrics
        self.config = config
        self.refresh_s = refresh_s
        """Seconds between re-reads of a served model's endpoints."""
        self.max_learn_backoff_s = max_learn_backoff_s
        """The longest wait between tries to learn a model."""
        self.models: dict[str, ServedModel] = {}
        """Per served model, its default version: where unversioned requests go."""
        self.versions: dict[str, dict[str, ServedModel]] = {}
        """Per served model, every version served, the default included."""
        self._endpoints: dict[str, list[str]] = {}
        self._pooled: dict[str, dict[str, list[str]]] = {}
        """Per served model and version, the discovered endpoints that serve it as the
        gateway expects."""
        self._learning: dict[str, asyncio.Task[None]] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._learned: dict[str, asyncio.Event] = {}
        self.waiting: dict[str, int] = {}
        """Requests held per model while it has never had an endpoint (its queue demand)."""
        self._config_traffic: dict[str, TrafficPolicy | None] = {}
        """Per served model, its config's traffic policy (its highest version's)."""
        self._source_traffic: dict[str, TrafficPolicy | None] = {}
        """Per model, the endpoint source's traffic policy, which replaces the config's."""
        self._configured: dict[str, TrafficPolicy | None] = {}
        """Per served model, the policy its source or config gives."""
        self.traffic: dict[str, TrafficPolicy] = {}
        """Per served model with one, the traffic policy in force (a rollout's weights in
        place of the configured ones)."""
        self._splits: dict[str, Split] = {}
        """Per served model whose policy routes, that policy over its versions."""
        self.shadows: dict[str, Shadow] = {}
        """Per served model whose policy shadows to a version it serves, that shadow."""
        self._retired: list[Shadow] = []
        """Shadows replaced while their comparisons were in flight."""
        self.rollouts: dict[str, Rollout] = {}
        """Per served model whose policy has one, its rollout (``gateway.rollout``)."""
        self.rollout_check_s = rollout_check_s
        self.rollout_record = rollout_record
        """Where rollouts' progress is kept and who decides; None: here, by this gateway."""
        self.rollout_peers = rollout_peers
        """With ``rollout_record``: the other gateways, whose samples the deciding one adds
        to its own; None: it judges on its own."""
        self._loaded: dict[str, Rollout] = {}
        """Per model, the rollout last brought up to the record's saved progress."""
        self._saved: dict[str, SavedRollout] = {}
        """Per model, the progress this gateway last saved."""
        self._judging: asyncio.Task[None] | None = None
        self._rng = random.Random()
        metrics.watch(
            lambda: {
                (name, version): served.dispatcher
                for name, versions in self.versions.items()
                for version, served in versions.items()
            }
        )

    def set_endpoints(
        self, model: str, urls: list[str], traffic: TrafficPolicy | None = None
    ) -> None:
        previous = self._endpoints.get(model, [])
        self._endpoints[model] = list(urls)
        self._source_traffic[model] = traffic
        self._learned.setdefault(model, asyncio.Event())
        versions = self.versions.get(model)
        if versions is not None:
            # A new endpoint joins the default version at once (discovery counts it ready)
            # and is read soon; one known not to serve a version stays out of its pool
            # until a reading says it does.
            joined = {url for url in urls if url not in previous}
            default = self.models[model].metadata.version
            for version, served in versions.items():
                pooled = set(self._pooled[model][version])
                if version == default:
                    pooled |= joined
                self._pooled[model][version] = [url for url in urls if url in pooled]
                served.dispatcher.pool.set_endpoints(self._pooled[model][version])
            self._choose_default(model)
            self._route(model)
            if joined:
                self.refresh(model)
        elif urls and model not in self._learning:
            self._learning[model] = asyncio.create_task(self._learn(model))

    def refresh(self, model: str) -> None:
        """Re-read ``model``'s endpoints now (discovery added one)."""
        wake = self._wake.get(model)
        if wake is not None:
            wake.set()

    def get(
        self, name: str, version: str | None = None, headers: Headers | None = None
    ) -> ServedModel:
        """The version of ``name`` a request for ``version`` goes to; one that names none
        goes where the model's traffic policy sends it (by its sticky header among
        ``headers``), or to the default version."""
        served = self.models.get(name)
        if served is None:
            if name in self._endpoints:
                raise ModelNotReady(name, "waiting for its first endpoint")
            raise ModelNotFound(name)
        if version is None:
            split = self._splits.get(name)
            if split is None:
                return served
            key = headers.get(split.header) if headers and split.header else None
            version = choose_version(split, key, self._rng)
        if version == served.metadata.version:
            return served
        versioned = self.versions[name].get(version)
        if versioned is None:
            raise ModelNotFound(name, version)
        return versioned

    async def serving(
        self, name: str, version: str | None, timeout_s: float, headers: Headers | None = None
    ) -> ServedModel:
        """``get``, but a known model not learned yet is waited for, up to ``timeout_s``.

        Such a model has never had an endpoint since the gateway started (scaled to zero
        before it, say): its requests cannot be validated yet, so they wait here, counted in
        ``waiting``, which ``/stats`` reports as queued so the autoscaler starts a replica.
        """
        learned = self._learned.get(name)
        if name in self.models or learned is None:
            return self.get(name, version, headers)
        self.waiting[name] = self.waiting.get(name, 0) + 1
        try:
            await asyncio.wait_for(learned.wait(), timeout_s)
        except TimeoutError:
            raise ModelNotReady(name, f"without an endpoint for {timeout_s:g} s") from None
        finally:
            self.waiting[name] -= 1
        return self.get(name, version, headers)

    def metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """The v2 model metadata: of the version asked for, or of the default version with
        every version served listed."""
        served = self.get(name, version)
        if version is not None:
            return served.metadata.to_json()
        return served.metadata.to_json(sorted(self.versions[name], key=version_order))

    def names(self) -> list[str]:
        return sorted(self._endpoints)

    def is_ready(self, name: str, version: str | None = None) -> bool:
        """The model (version) takes batches now: learned, with an endpoint that is not
        ejected. ``ModelNotFound`` for a model or version the gateway does not serve."""
        try:
            served = self.get(name, version)
        except ModelNotReady:
            return False
        return served.dispatcher.pool.ready_endpoints > 0

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """The repository index: every known model, one entry per version served, READY or
        UNAVAILABLE."""
        entries = []
        for name in self.names():
            versions = self.versions.get(name)
            if versions is None:
                if not ready_only:
                    entries.append({"name": name, "state": "UNAVAILABLE"})
                continue
            for version in sorted(versions, key=version_order):
                is_ready = versions[version].dispatcher.pool.ready_endpoints > 0
                if ready_only and not is_ready:
                    continue
                state = "READY" if is_ready else "UNAVAILABLE"
                entries.append({"name": name, "state": state, "version": version})
        return entries

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per model: its queue and work in flight, and its endpoints, summed over its
        versions, and the same of each version under ``versions``. A model not learned yet
        shows the requests held for it as queued: they are its whole demand."""
        models = {}
        for name in self.names():
            versions = self.versions.get(name)
            if versions is None:
                held = self.waiting.get(name, 0)
                work = DispatcherStats(queued=held, queued_rows=held)
                models[name] = {**_stats(work, [], 0), "versions": {}}
                continue
            ordered = sorted(versions.items(), key=lambda item: version_order(item[0]))
            works = {version: served.dispatcher.stats() for version, served in ordered}
            of_versions = {
                version: _stats(
                    works[version],
                    [endpoint.url for endpoint in served.dispatcher.pool.endpoints],
                    served.dispatcher.pool.ready_endpoints,
                )
                for version, served in ordered
            }
            totals = DispatcherStats(
                *(
                    sum(getattr(work, field.name) for work in works.values())
                    for field in dataclasses.fields(DispatcherStats)
                )
            )
            urls = list(dict.fromkeys(u for s in of_versions.values() for u in s["endpoint_urls"]))
            ready = len(
                {
                    endpoint.url
                    for served in versions.values()
                    for endpoint in served.dispatcher.pool.endpoints
                    if not endpoint.ejected
                }
            )
            traffic = self.traffic.get(name)
            shadow = self.shadows.get(name)
            rollout = self.rollouts.get(name)
            models[name] = {
                **_stats(totals, urls, ready),
                "default_version": self.models[name].metadata.version,
                "traffic": traffic.to_json() if traffic is not None else None,
                "shadow": None
                if shadow is None
                else {
                    "version": shadow.policy.version,
                    "inflight": shadow.inflight,
                    **shadow.stats.to_json(),
                },
                "rollout": None if rollout is None else self._rollout_stats(rollout, shadow),
                "versions": of_versions,
            }
        return models

    def _rollout_stats(self, rollout: Rollout, shadow: Shadow | None) -> dict[str, Any]:
        """The rollout's state, and the counts of its step here (``Rollout.published``)."""
        rows, agreed = _shadowed_to(rollout, shadow)
        return {**rollout.to_json(), "sample": rollout.published(rows, agreed)}

    async def close(self) -> None:
        await cancel_and_wait(self._judging)
        if self.rollout_peers is not None:
            await self.rollout_peers.close()
        for shadow in [*self.shadows.values(), *self._retired]:
            await shadow.close()
        served = [s for versions in self.versions.values() for s in versions.values()]
        for version in served:
            version.dispatcher.close()
        await cancel_and_wait(
            *self._learning.values(),
            *self._watchers.values(),
            *(version.collector for version in served),
        )
        for version in served:
            await version.dispatcher.pool.close()

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
                        readings = await read_model(self.client, url, model, settings, self.config)
                    except Exception as exc:  # learning outlives any failure, bugs included
                        problem = _problem(exc)
                        failing[url, problem] = (
                            f"{model}: cannot learn it from {url} yet (retrying): {problem}"
                        )
                        continue
                    self._serve(model, url, readings)
                    return
                problems.only(failing)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_learn_backoff_s)
        finally:
            if self._learning.get(model) is asyncio.current_task():
                del self._learning[model]

    def _serve(self, model: str, url: str, readings: Mapping[str, Reading]) -> None:
        """Serve every version ``url`` serves: every endpoint takes the default version's
        batches, as discovery counts them ready; the other versions start with ``url``, and
        the other endpoints are read at once."""
        urls = self._endpoints.get(model, [])
        highest = max(readings, key=version_order)
        self.versions[model] = {}
        self._pooled[model] = {}
        for version, reading in readings.items():
            self._serve_version(model, reading, urls if version == highest else [url])
        self.models[model] = self.versions[model][highest]
        self._config_traffic[model] = readings[highest].traffic
        self._route(model)
        self._learned[model].set()
        self._wake[model] = asyncio.Event()
        if len(urls) > 1:
            self._wake[model].set()  # the others may serve other versions: read them now
        self._watchers[model] = asyncio.create_task(self._watch(model), name=f"watch-{model}")

    def _serve_version(self, model: str, reading: Reading, urls: list[str]) -> ServedModel:
        metadata, policy, passthrough = reading.metadata, reading.policy, reading.passthrough
        version = metadata.version
        pool = EndpointPool(
            model_path(model, version),
            self.client,
            max_batches_per_endpoint=self.config.max_batches_per_endpoint,
            call_timeout_s=self.config.call_timeout_s,
        )
        pool.set_endpoints(urls)
        metrics = self.metrics.for_model(model, version)
        dispatcher = Dispatcher(model, policy, pool, metrics)
        name = f"dispatcher-{model_path(model, version)}"
        collector = asyncio.create_task(dispatcher.run(), name=name)
        served = ServedModel(metadata, dispatcher, metrics, collector, passthrough)
        self.versions[model][version] = served
        self._pooled[model][version] = list(urls)
        log.info(
            "serving %s version %s%s: max_batch_size %d, delay %.1f ms, queue %d, %d endpoint(s)",
            model,
            version or "(unnamed)",
            " (requests passed through unvalidated)" if passthrough else "",
            policy.max_batch_size,
            policy.max_queue_delay_s * 1000,
            policy.max_queue_size,
            len(pool.endpoints),
        )
        return served

    def _choose_default(self, model: str) -> None:
        """Point unversioned requests at ``default_version``, saying so when it changes."""
        version = default_version(self._pooled[model])
        current = self.models[model]
        if version != current.metadata.version:
            log.info(
                "%s: unversioned requests go to version %s now (was %s)",
                model,
                version,
                current.metadata.version,
            )
            self.models[model] = self.versions[model][version]

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
        """Re-read every endpoint and apply ``reconcile_versions``; ``unread`` gets a message
        per endpoint that could not be read."""
        versions = self.versions[model]
        urls = list(self._endpoints.get(model, []))
        loaded: dict[str, bool] = {}
        readings = await asyncio.gather(*(self._read(url, model, unread, loaded) for url in urls))
        by_url = dict(zip(urls, readings, strict=True))
        results = reconcile_versions(
            {version: served.metadata for version, served in versions.items()},
            by_url,
            self._pooled[model],
        )
        if self._endpoints.get(model, []) != urls:
            return  # discovery moved on while we read; its change has woken us again
        for version, result in results.items():
            served = versions.get(version)
            if served is None:
                if not result.urls:
                    continue
                served = self._serve_version(model, reading_of(by_url, version), [])
            self._apply(model, served, result)
        for served in versions.values():
            served.dispatcher.pool.set_loaded(loaded)
        self._choose_default(model)
        read = [r for r in by_url.values() if not isinstance(r, str) and r]
        if read:  # else nothing is known of the config now: it stays as it was
            self._config_traffic[model] = config_traffic(read)
        self._route(model)

    def _route(self, model: str) -> None:
        """Lay out the traffic policy in force (the source's, else the config's) over the
        versions served, saying so when it changes."""
        policy = self._source_traffic.get(model) or self._config_traffic.get(model)
        if policy != self._configured.get(model):
            shown = policy.to_json() if policy is not None else "none: the default version"
            log.info("%s: traffic policy %s", model, shown)
            self._configured[model] = policy
        if policy is not None and policy.rollout is not None:
            # The rollout's step decides the candidate's weight.
            rollout = self._rollout(model, policy.rollout)
            weights = rollout_weights(
                policy.weights, rollout.policy.version, rollout.percent, self.versions[model]
            )
            policy = dataclasses.replace(policy, weights=weights)
        else:
            self.rollouts.pop(model, None)
        split = split_of(policy, self.versions[model]) if policy is not None else None
        if policy is None:
            self.traffic.pop(model, None)
        else:
            self.traffic[model] = policy
        if split is None:
            self._splits.pop(model, None)
        else:
            self._splits[model] = split
        self._shadow(model, policy.shadow if policy is not None else None)

    def _rollout(self, model: str, policy: RolloutPolicy) -> Rollout:
        """The model's rollout under ``policy``: the one in progress, or a new one at its
        first step (a changed policy starts over)."""
        rollout = self.rollouts.get(model)
        if rollout is None or rollout.policy != policy:
            loop = asyncio.get_running_loop()
            rollout = self.rollouts[model] = Rollout(model, policy, loop.time())
            log.info(
                "%s: rollout of version %s at step 1: %g %%", model, policy.version, rollout.percent
            )
            if self._judging is None:
                self._judging = loop.create_task(self._judge(), name="rollouts")
        self.metrics.rollout_percent.labels(model, policy.version).set(rollout.percent)
        return rollout

    async def _judge(self) -> None:
        """Judge every rollout in progress every ``rollout_check_s``; a step taken or a
        rollback lays the model's traffic out again."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.rollout_check_s)
            published = await self._peers_published()
            for model, rollout in list(self.rollouts.items()):
                rows, agreed = _shadowed_to(rollout, self.shadows.get(model))
                record, now = self.rollout_record, loop.time()
                if record is not None and not await self._recorded(
                    record, model, rollout, now, rows, agreed
                ):
                    continue  # another gateway decides, or the policy changed meanwhile
                if published is None:
                    continue  # a gateway's samples are missing: no judgement on part of them
                peers = rollout.peer_counts(published.get(model, []))
                verdict = rollout.tick(now, rows, agreed, peers)
                if verdict.action == "rollback" and verdict.reason is not None:
                    labels = (model, rollout.policy.version, verdict.reason)
                    self.metrics.rollbacks.labels(*labels).inc()
                if verdict.action != "hold":
                    self._route(model)
                if record is not None:
                    await self._save(record, model, rollout)

    async def _peers_published(self) -> dict[str, list[Any]] | None:
        """Per model, the samples the other gateways publish, when this one decides with
        peers (else none); None when one of them did not answer."""
        record, peers = self.rollout_record, self.rollout_peers
        running = any(rollout.state == "running" for rollout in self.rollouts.values())
        if record is None or peers is None or not running or not record.deciding:
            return {}
        return await peers.read(self.instance)

    async def _recorded(
        self,
        record: RolloutRecord,
        model: str,
        rollout: Rollout,
        now: float,
        rows: int,
        agreed: int,
    ) -> bool:
        """Bring ``rollout`` in line with the record: a gateway that does not decide follows
        the saved progress; the deciding one resumes from it once, then saves its own after
        each judgement. True when this gateway judges the rollout now."""
        deciding = record.deciding
        if not deciding or self._loaded.get(model) is not rollout:
            saved = await record.load(model)
            if self.rollouts.get(model) is not rollout:
                return False  # the policy changed meanwhile: its new rollout is judged next
            self._loaded[model] = rollout
            if saved is not None and rollout.follow(saved, now, rows, agreed):
                self._route(model)
        return deciding

    async def _save(self, record: RolloutRecord, model: str, rollout: Rollout) -> None:
        """Save the rollout's progress when it changed since the last save that worked (a
        failed one is tried again at the next judgement)."""
        progress = rollout.saved()
        if self._saved.get(model) != progress and await record.save(model, progress):
            self._saved[model] = progress

    def _shadow(self, model: str, policy: ShadowPolicy | None) -> None:
        """Keep the model's shadow as ``policy`` says: its measurements go on while its
        candidate stays the same version served."""
        candidate = self.versions[model].get(policy.version) if policy is not None else None
        current = self.shadows.get(model)
        if (
            policy is not None
            and candidate is not None
            and current is not None
            and current.candidate is candidate.dispatcher
        ):
            current.policy = policy
            return
        self._retired = [shadow for shadow in self._retired if shadow.inflight]
        if current is not None:
            del self.shadows[model]
            self._retired.append(current)
        if policy is not None and candidate is not None:
            metrics = self.metrics.for_shadow(model, policy.version)
            self.shadows[model] = Shadow(
                model, policy, candidate.dispatcher, candidate.metadata.inputs, metrics, self._rng
            )

    def _apply(self, model: str, served: ServedModel, result: Reconciled) -> None:
        """Bring one served version to ``result``: its metadata, batch size and endpoints."""
        if served.passthrough:  # it stays so while served: its queue may hold raw requests
            result = dataclasses.replace(
                result,
                metadata=dataclasses.replace(result.metadata, max_batch_size=0),
                max_batch_size=0,
            )
        version = served.metadata.version
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
        pooled = self._pooled[model][version]
        if result.urls != pooled:
            left = [url for url in pooled if url not in result.urls]
            joined = [url for url in result.urls if url not in pooled]
            log.info(
                "%s version %s: endpoints left %s, joined %s",
                model,
                version or "(unnamed)",
                left,
                joined,
            )
            self._pooled[model][version] = result.urls
            dispatcher.pool.set_endpoints(result.urls)

    async def _read(
        self, url: str, model: str, unread: dict[tuple[str, str], str], loaded: dict[str, bool]
    ) -> EndpointReadings:
        """``url``'s readings of ``model``; ``loaded`` gets whether it holds the model loaded
        (cache affinity, ``gateway.router``)."""
        readiness = await self.client.readiness(url, model)
        if not readiness.ready:
            return NOT_SERVING
        loaded[url] = readiness.loaded
        settings = self.config.models.get(model, DEFAULT_MODEL_SETTINGS)
        try:
            return await read_model(self.client, url, model, settings, self.config)
        except Exception as exc:  # whatever it is, the endpoint stays where it was
            problem = _problem(exc)
            unread[url, problem] = f"{model}: cannot read its metadata from {url}: {problem}"
            return UNREAD


def _shadowed_to(rollout: Rollout, shadow: Shadow | None) -> tuple[int, int]:
    """The rows shadowed to the rollout's candidate so far, and those agreeing."""
    if shadow is None or shadow.policy.version != rollout.policy.version:
        return 0, 0
    return shadow.stats.rows, shadow.stats.agreed_rows


def _stats(work: DispatcherStats, urls: list[str], ready: int) -> dict[str, Any]:
    return {
        **dataclasses.asdict(work),
        "endpoints": len(urls),
        "ready_endpoints": ready,
        "endpoint_urls": urls,
    }


def _problem(exc: Exception) -> str:
    """An exception as a log line: our own errors say it all, others need their type."""
    return exc.message if isinstance(exc, BazaarError) else f"{type(exc).__name__}: {exc}"
