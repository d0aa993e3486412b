"""``GET /metrics/workers`` on ``bazaar serve``'s gateway: every local worker's metrics at once.

The workers listen on loopback ports picked at random, new ones with every restart and
scale-up, so no Prometheus configuration can name them. The gateway knows them (its
supervisor started them), so it federates: on each GET it scrapes every running worker's
``/metrics`` concurrently, adds a ``worker`` label to each sample and answers one exposition
with each family once. One scrape target, fixed, whatever the workers do.

It is a path of its own rather than a ``worker`` label on the gateway's ``/metrics``: that
scrape stays the gateway's own, answered from memory, never slowed or failed by a worker that
hangs, and the workers' ``process_*`` series never mix with the gateway's under one name.

``worker`` is ``MODEL/N``, N the worker's place among its model's workers (1: the oldest).
Scaling down retires the newest and a restart keeps the place, so the values are bounded by
the most workers a model has had at once, not by restarts or scale-ups over a long run.
A worker that does not answer within ``SCRAPE_TIMEOUT_S``, or sends more than
``MAX_EXPOSITION_BYTES``, is left out, and ``bazaar_worker_up{worker}`` is 0 for it (1 for
the others), as Prometheus's own ``up`` would be for a target it scrapes itself. Parsing and
writing run in a thread: the event loop keeps serving inference meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

log = logging.getLogger(__name__)

PATH = "/metrics/workers"
SCRAPE_TIMEOUT_S = 2.0
"""How long one worker's ``/metrics`` may take; Prometheus's default scrape timeout is 10 s."""
MAX_EXPOSITION_BYTES = 8 * 1024 * 1024
"""The most one worker's ``/metrics`` may send (a worker's is tens of KiB)."""


def worker_metrics_route(workers: Callable[[], Mapping[str, str]]) -> Route:
    """The ``/metrics/workers`` route over ``workers()``: ``MODEL/N`` -> base URL, read at
    every request, so it follows scaling."""

    async def federate(request: Request) -> Response:
        urls = dict(workers())
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            bodies = await asyncio.gather(*(_scrape(session, url) for url in urls.values()))
        scraped = dict(zip(urls, bodies, strict=True))
        body = await asyncio.to_thread(federated_exposition, scraped)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return Route(PATH, federate)


async def _scrape(session: aiohttp.ClientSession, url: str) -> str | None:
    """The worker's ``/metrics`` text; None when it did not answer 200 within the limits."""
    try:
        async with session.get(f"{url}/metrics") as response:
            if response.status != 200:
                return None
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_EXPOSITION_BYTES:
                    return None
            return body.decode()
    except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError) as exc:
        log.debug("scraping %s/metrics failed: %r", url, exc)
        return None


def federated_exposition(scraped: Mapping[str, str | None]) -> bytes:
    """One text exposition of every worker's families, each sample labelled with its worker;
    ``scraped``: worker -> its ``/metrics`` text, None if the scrape failed."""
    families: dict[str, Metric] = {}
    up = Metric("bazaar_worker_up", "1 if the worker's /metrics answered this scrape.", "gauge")
    for worker, text in scraped.items():
        parsed = _parse(worker, text)
        up.samples.append(Sample("bazaar_worker_up", {"worker": worker}, float(parsed is not None)))
        for family in parsed or ():
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            merged.samples.extend(
                sample._replace(labels={**sample.labels, "worker": worker})
                for sample in family.samples
            )
    return generate_latest(_Families([up, *families.values()]))


def _parse(worker: str, text: str | None) -> list[Metric] | None:
    if text is None:
        return None
    try:
        return list(text_string_to_metric_families(text))
    except ValueError as exc:
        log.warning("worker %s sent metrics that do not parse: %s", worker, exc)
        return None


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families
