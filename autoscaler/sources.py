"""Where the autoscaler's signals come from, over HTTP with short timeouts.

- ``GatewayStats``: demand. ``GET /stats`` on every gateway replica, summed. A gateway URL
  whose host name resolves to several addresses (a headless Service) counts as one gateway
  per address, so every replica is read, not one picked by a load balancer. Rates are
  computed per gateway from its counters' deltas between two reads (the reader's clock),
  then summed; a gateway read for the first time, or whose counters went back (a restart),
  gives no rate until its next read. A version's demand is its entry under the model's
  ``versions`` (its own queue and work in flight, the rows shadowed to it included); while a
  gateway has not learned the model (no versions yet), the requests it holds for the model
  count for every version, since any of them may have to start to serve them.
- ``PodMetrics``: capacity in use. Each ready pod's ``/metrics``: the model's busy ratio
  (the busiest of its versions in that pod, or the one version's) and the pod's mean GPU
  utilisation, each averaged over the pods that reported it. A pod serving a group of
  models (a shared worker, a model group: ``read_group``) is as busy as its models together:
  their busy ratios summed in the pod, then averaged over the pods.
- ``PrometheusQuery``: GPU utilisation from DCGM through a Prometheus server's
  ``/api/v1/query`` (optional); when it answers it wins over the pods' NVML readings.
- ``Signals`` puts the three together into the policy's ``Sample``; for a target serving
  several models (``ScaleTarget.models``), their demands summed: one sample for the replicas
  they share.

A source that cannot answer (connection refused, timeout, bad body) gives missing
signals, None, never zero: a model whose gateways are all down has no known demand, which
is not the same as no demand. Failures are logged when a source goes from answering to
failing and back, not on every tick.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from autoscaler.loop import ScaleTarget
from autoscaler.policy import Sample
from protocol.replicas import replica_urls
from protocol.support import ProblemLog

log = logging.getLogger(__name__)

BUSY_RATIO = "bazaar_model_busy_ratio"
GPU_UTILIZATION = "bazaar_gpu_utilization_ratio"
DCGM_QUERY = 'avg(DCGM_FI_DEV_GPU_UTIL{pod=~"bazaar-model-{model}-.*"}) / 100'
"""The default PromQL: DCGM's utilisation (percent) of the model's pods' GPUs, as 0..1."""

_FAILURES = (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, AttributeError)
"""What a source that cannot answer raises: network, timeout, or an unexpected body."""


@dataclass(frozen=True, slots=True)
class Demand:
    """One model's work in the gateways, summed over those that answered; None: none did."""

    queued: float | None
    inflight: float | None
    arrival_rate: float | None
    completion_rate: float | None


@dataclass(frozen=True, slots=True)
class Load:
    """One model's pods' load, averaged over those that reported; None: none did."""

    busy_ratio: float | None
    gpu_utilization: float | None


@dataclass(frozen=True, slots=True)
class _Counters:
    time_s: float
    admitted_rows: float
    completed_rows: float


@dataclass(frozen=True, slots=True)
class _ModelStats:
    queued_rows: float
    inflight_rows: float
    counters: _Counters


_Key = tuple[str, str | None]
"""A model, and one of its versions (None: the model, all versions together)."""
_Answer = tuple[str, dict[_Key, _ModelStats] | None]
"""A gateway replica's URL and its stats by model and version (None: it did not answer)."""


class GatewayStats:
    def __init__(
        self,
        urls: Sequence[str],
        *,
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 1.0,
    ) -> None:
        self.urls = [url.rstrip("/") for url in urls]
        self.session = session
        self.clock = clock
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._previous: dict[tuple[str, _Key, _Key], _Counters] = {}
        """The counters last read, by gateway, what was asked for and where they were read
        (one version's held requests are read from the model's entry, and so are the
        others': each asks for its own rate)."""
        self._reachability = ProblemLog(log)
        self._shared: asyncio.Future[list[_Answer]] | None = None

    async def read(self, model: str, version: str | None = None) -> Demand:
        """The demand for ``model``, or for one ``version`` of it, over the gateways."""
        queued = inflight = arrival = completion = 0.0
        reported = rated = False
        for url, answer in await self._snapshot():
            if answer is None or (model, None) not in answer:
                continue
            reported = True
            key = _demand_key(answer, model, version)
            if key is None:
                continue  # it serves other versions only: it has no demand for this one
            stats = answer[key]
            queued += stats.queued_rows
            inflight += stats.inflight_rows
            previous = self._previous.get((url, (model, version), key))
            self._previous[url, (model, version), key] = stats.counters
            if previous is None or not _advanced(previous, stats.counters):
                continue
            elapsed = stats.counters.time_s - previous.time_s
            arrival += (stats.counters.admitted_rows - previous.admitted_rows) / elapsed
            completion += (stats.counters.completed_rows - previous.completed_rows) / elapsed
            rated = True
        if not reported:
            return Demand(None, None, None, None)
        if not rated:
            return Demand(queued, inflight, None, None)
        return Demand(queued, inflight, arrival, completion)

    async def _snapshot(self) -> list[_Answer]:
        """Every gateway replica's stats. One ``/stats`` document serves every model, so the
        reads of one tick (one per model, concurrent) join the round of requests in flight."""
        if self._shared is None or self._shared.done():
            self._shared = asyncio.ensure_future(self._read_all())
        # Shielded: one model's read being cancelled must not cancel the others' fetch.
        return await asyncio.shield(self._shared)

    async def _read_all(self) -> list[_Answer]:
        resolved = await asyncio.gather(*map(replica_urls, self.urls))
        replicas = [url for urls in resolved for url in urls]
        answers = await asyncio.gather(*(self._stats(url) for url in replicas))
        return list(zip(replicas, answers, strict=True))

    async def _stats(self, url: str) -> dict[_Key, _ModelStats] | None:
        """One gateway's stats by model and version; None when it did not answer or answered
        nonsense."""
        try:
            async with self.session.get(f"{url}/stats", timeout=self.timeout) as response:
                response.raise_for_status()
                body = await response.json()
            now = self.clock()
            models: dict[_Key, _ModelStats] = {}
            for name, stats in body["models"].items():
                models[str(name), None] = _model_stats(stats, now)
                for version, of_version in (stats.get("versions") or {}).items():
                    models[str(name), str(version)] = _model_stats(of_version, now)
        except _FAILURES as exc:
            self._reachability.failing(url, _unreachable("gateway", url, exc))
            return None
        self._reachability.ok(url, f"gateway {url} answers again")
        return models


def _demand_key(answer: dict[_Key, _ModelStats], model: str, version: str | None) -> _Key | None:
    """Where a gateway's stats hold the demand for ``version`` of ``model``: its own entry;
    the model's while the gateway has learned no version (the requests it holds may need
    any); None when it serves other versions of the model but not this one."""
    if version is None or (model, version) in answer:
        return model, version
    if any(name == model and served is not None for name, served in answer):
        return None
    return model, None


def _model_stats(stats: dict[str, Any], now: float) -> _ModelStats:
    return _ModelStats(
        float(stats["queued_rows"]),
        float(stats["inflight_rows"]),
        _Counters(now, float(stats["admitted_rows"]), float(stats["completed_rows"])),
    )


def _advanced(previous: _Counters, counters: _Counters) -> bool:
    """Whether two reads of one gateway give a rate: time went on and no counter went back."""
    return (
        counters.time_s > previous.time_s
        and counters.admitted_rows >= previous.admitted_rows
        and counters.completed_rows >= previous.completed_rows
    )


class PodMetrics:
    def __init__(self, *, session: aiohttp.ClientSession, timeout_s: float = 1.0) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def read(self, model: str, pod_urls: Iterable[str], version: str | None = None) -> Load:
        """The load of ``model`` (or of one ``version`` of it) on the pods at ``pod_urls``."""
        return await self._read((model,), pod_urls, version)

    async def read_group(self, models: Sequence[str], pod_urls: Iterable[str]) -> Load:
        """The load of the pods at ``pod_urls``, which serve ``models`` together: in each
        pod, the models' busy ratios summed."""
        return await self._read(models, pod_urls, None)

    async def busy_by_model(self, pod_urls: Iterable[str]) -> dict[str, float]:
        """Each model's busy ratio on the pods at ``pod_urls`` (its busiest version in a
        pod, averaged over the pods that report it): one scrape of each pod for them all."""
        texts = await asyncio.gather(*(self._scrape(url) for url in pod_urls))
        ratios: dict[str, list[float]] = {}
        for text in texts:
            if text is None:
                continue
            for model, ratio in _busy_by_model(text).items():
                ratios.setdefault(model, []).append(ratio)
        return {model: sum(values) / len(values) for model, values in ratios.items()}

    async def _read(
        self, models: Sequence[str], pod_urls: Iterable[str], version: str | None
    ) -> Load:
        texts = await asyncio.gather(*(self._scrape(url) for url in pod_urls))
        busy: list[float] = []
        gpu: list[float] = []
        for text in texts:
            if text is None:
                continue
            pod_busy, pod_gpu = _pod_load(text, models, version)
            if pod_busy is not None:
                busy.append(pod_busy)
            if pod_gpu is not None:
                gpu.append(pod_gpu)
        return Load(_mean(busy), _mean(gpu))

    async def _scrape(self, url: str) -> str | None:
        try:
            async with self.session.get(f"{url}/metrics", timeout=self.timeout) as response:
                response.raise_for_status()
                return await response.text()
        except _FAILURES as exc:
            # Pods come and go (a terminating pod stops answering): not worth a warning.
            log.debug("pod %s: no metrics: %r", url, exc)
            return None


def _pod_load(
    text: str, models: Sequence[str], version: str | None
) -> tuple[float | None, float | None]:
    """The pod's busy ratio for ``models`` (each one's busiest version, or ``version``'s,
    summed over the models) and its mean GPU use."""
    busy, gpu = _pod_samples(text, version)
    found = [busy[model] for model in models if model in busy]
    return (sum(found) if found else None), _mean(gpu)


def _busy_by_model(text: str) -> dict[str, float]:
    """The pod's busy ratio per model, each its busiest version's."""
    return _pod_samples(text, None)[0]


def _pod_samples(text: str, version: str | None) -> tuple[dict[str, float], list[float]]:
    """Each model's busy ratio in the pod's metrics (its busiest version's, or
    ``version``'s) and each GPU's use; nothing from unreadable text."""
    busy: dict[str, float] = {}
    gpu: list[float] = []
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                model = sample.labels.get("model")
                if sample.name == BUSY_RATIO and model:
                    of_version = version is None or sample.labels.get("version") == version
                    if of_version and math.isfinite(sample.value):
                        busy[model] = max(busy.get(model, sample.value), sample.value)
                elif sample.name == GPU_UTILIZATION:
                    gpu.append(sample.value)
    except ValueError as exc:
        log.debug("unreadable metrics text: %s", exc)
        return {}, []
    return busy, gpu


class PrometheusQuery:
    """An instant PromQL query per model (``{model}`` in it is replaced by the model's name).

    The query must yield a 0..1 ratio; the default, ``DCGM_QUERY``, scales DCGM's percent.
    A vector result is averaged over its series; an empty result is a missing signal.
    """

    def __init__(
        self,
        url: str,
        query: str = DCGM_QUERY,
        *,
        session: aiohttp.ClientSession,
        timeout_s: float = 2.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.query = query
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._reachability = ProblemLog(log)

    async def read(self, model: str) -> float | None:
        query = self.query.replace("{model}", model)
        try:
            async with self.session.get(
                f"{self.url}/api/v1/query", params={"query": query}, timeout=self.timeout
            ) as response:
                response.raise_for_status()
                body = await response.json()
            values = _query_values(body)
        except _FAILURES as exc:
            self._reachability.failing(self.url, _unreachable("prometheus", self.url, exc))
            return None
        self._reachability.ok(self.url, f"prometheus {self.url} answers again")
        return _mean(values)


def _unreachable(what: str, url: str, exc: BaseException) -> str:
    return f"{what} {url} does not answer; its signals are missing: {exc!r}"


def _query_values(body: Any) -> list[float]:
    """The numbers in a ``/api/v1/query`` answer (vector or scalar)."""
    if body["status"] != "success":
        raise ValueError(f"query failed: {body.get('error')}")
    data = body["data"]
    if data["resultType"] == "scalar":
        return [float(data["result"][1])]
    if data["resultType"] != "vector":
        raise ValueError(f"expected a vector or scalar result, got {data['resultType']}")
    return [float(series["value"][1]) for series in data["result"]]


def _mean(values: Sequence[float]) -> float | None:
    finite = [value for value in values if math.isfinite(value)]
    return sum(finite) / len(finite) if finite else None


class Signals:
    """The ``SignalReader`` of the loop: gateway demand, pod load and optionally DCGM."""

    def __init__(
        self,
        gateway: GatewayStats,
        pods: PodMetrics,
        gpu: PrometheusQuery | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gateway = gateway
        self.pods = pods
        self.gpu = gpu
        self.clock = clock

    async def read(self, target: ScaleTarget) -> Sample:
        now = self.clock()
        if target.models:
            demands, load, dcgm = await asyncio.gather(
                asyncio.gather(*(self.gateway.read(model) for model in target.models)),
                self.pods.read_group(target.models, target.pod_urls),
                self._dcgm(target.model),
            )
            demand = _summed(demands)
        else:
            demand, load, dcgm = await asyncio.gather(
                self.gateway.read(target.model, target.version),
                self.pods.read(target.model, target.pod_urls, target.version),
                self._dcgm(target.model),
            )
        return Sample(
            time_s=now,
            replicas=target.replicas,
            ready_replicas=target.ready_replicas,
            starting_replicas=target.starting_replicas,
            queued=demand.queued,
            inflight=demand.inflight,
            arrival_rate=demand.arrival_rate,
            completion_rate=demand.completion_rate,
            busy_ratio=load.busy_ratio,
            gpu_utilization=dcgm if dcgm is not None else load.gpu_utilization,
        )

    async def _dcgm(self, model: str) -> float | None:
        return None if self.gpu is None else await self.gpu.read(model)


def _summed(demands: Sequence[Demand]) -> Demand:
    """Several models' demand together: each signal summed over the models that have it,
    None when none has."""

    def total(values: Iterable[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return sum(known) if known else None

    return Demand(
        total(d.queued for d in demands),
        total(d.inflight for d in demands),
        total(d.arrival_rate for d in demands),
        total(d.completion_rate for d in demands),
    )
