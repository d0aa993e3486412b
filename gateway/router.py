"""Which pod takes a batch: least outstanding work, a cap per endpoint, retries, ejection.

``choose_endpoint`` is the decision, a pure function: among healthy endpoints with room for
another batch, the one with the fewest rows in flight (ties broken at random). For large
pools it samples two candidates and keeps the less loaded (power of two choices), which
costs O(1) and stays within a small factor of the best choice; its failure mode is the
same as least-loaded's with stale counts, herding, which cannot happen here because the
counts are the gateway's own, updated before the batch is sent.

**Cache affinity.** A pod that pages models under a memory budget may serve a model it does
not hold loaded (``Endpoint.cold``): a batch sent there waits for a page-in first. So the
endpoints that hold the model come first, least outstanding work among them, and a cold one
takes a batch only when no healthy endpoint holds the model (one must load it), or when the
model is backlogged: every endpoint holding it is full and the queue holds another full
round for each of them (``backlog_rounds``, which the dispatcher counts). That spreads a hot
model to more pods and keeps a cool one where it is, so a few hot models do not end up
loaded everywhere and evict the rest. What a pod holds is learned from its readiness
answers, which the catalog re-reads every few seconds (``"loaded"``), and an endpoint that
answers a batch holds the model from then on; between re-reads an eviction goes unseen, and
costs a page-in, not an error.

``EndpointPool`` is one model's set of endpoints. ``acquire`` reserves a slot on the chosen
endpoint; ``call`` sends the batch and releases it. A call lasts at most until the batch's
deadline (its earliest member's), and never longer than ``call_timeout_s``; the pod is told
the same bound. A deadline that passes during the call is the caller's, answered 504, and
no fault of the endpoint. A connection failure or a 5xx is retried once on another
endpoint while the deadline allows; when every other endpoint's slots are taken (a pod was
killed and its batches all retry at once), the retry waits for the first slot to free,
ahead of new batches, for as long as the deadline (or ``call_timeout_s``) allows. An
endpoint that fails ``eject_after`` times in a row is ejected: it takes no batches until a
background probe of its readiness succeeds, with the probe interval doubling up to
``max_eject_s``.

A batch is tensors, or one ``RawRequest`` of a model the gateway passes requests through to
(``gateway.passthrough``): the pool routes, retries and ejects alike for both.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, overload

import numpy as np

from protocol.errors import BazaarError, DeadlineExceeded, UpstreamError
from protocol.fastpath import Answer
from protocol.support import cancel_and_wait

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray[Any, Any]]

POWER_OF_TWO_ABOVE = 8
"""Pools larger than this sample two candidates instead of scanning every endpoint."""
DEADLINE_SLACK_S = 0.001
"""A call that fails this close to its deadline failed for the deadline: the pod's own
timer (the client's, the pod's) may fire a little before the pool's."""


@dataclass(frozen=True, slots=True)
class RawRequest:
    """An inference request passed through as its client sent it: its body, and the headers
    that say how to read it (by their lower-case names)."""

    body: bytes
    headers: dict[str, str]


class ModelClient(Protocol):
    """How the gateway talks to a pod (HTTP in production, a fake in tests). ``model`` is
    the model's path under ``/v2/models/``: its name, or ``name/versions/v`` for a version
    (``gateway.catalog.model_path``)."""

    async def infer(self, url: str, model: str, inputs: Tensors, timeout_s: float) -> Tensors:
        """The pod's outputs; ``timeout_s`` bounds the call and is sent to the pod too."""
        ...

    async def forward(self, url: str, model: str, request: RawRequest, timeout_s: float) -> Answer:
        """The pod's answer to a request passed through as sent, bounded by ``timeout_s``."""
        ...

    async def ready(self, url: str, model: str) -> bool: ...


@dataclass(slots=True, eq=False)
class Endpoint:
    url: str
    inflight_batches: int = 0
    inflight_rows: int = 0
    failures: int = 0
    """Consecutive failed calls."""
    ejected: bool = False
    removed: bool = False
    cold: bool = False
    """The pod does not hold the model loaded now: it pages models, and would load it first."""


def choose_endpoint(
    endpoints: Sequence[Endpoint],
    max_batches: int,
    rng: random.Random,
    backlog_rounds: float = math.inf,
) -> Endpoint | None:
    """The healthy endpoint with room and the least rows in flight, holding the model if
    one with room does; or None.

    A cold endpoint is chosen only when no healthy endpoint holds the model, or when
    ``backlog_rounds`` (the queue's rows over what one endpoint's slots take) is at least
    the number that do: each of them has a full round waiting. Its default, a retry's,
    takes any endpoint with room.
    """
    candidates = [
        e for e in endpoints if not e.ejected and not e.removed and e.inflight_batches < max_batches
    ]
    if not candidates:
        return None
    if len(candidates) > POWER_OF_TWO_ABOVE:
        warm = [e for e in candidates if not e.cold]
        if len(warm) > 1:
            first, second = rng.sample(warm, 2)
            return first if first.inflight_rows <= second.inflight_rows else second
        if warm:
            return warm[0]
        if not _may_spread(endpoints, backlog_rounds):
            return None
        first, second = rng.sample(candidates, 2)
        return first if first.inflight_rows <= second.inflight_rows else second
    # Warm before cold, then the least rows: one pass, as cheap as least rows alone.
    least = min((e.cold, e.inflight_rows) for e in candidates)
    if least[0] and not _may_spread(endpoints, backlog_rounds):
        return None
    return rng.choice([e for e in candidates if (e.cold, e.inflight_rows) == least])


def _may_spread(endpoints: Sequence[Endpoint], backlog_rounds: float) -> bool:
    """A cold endpoint may take a batch: no healthy endpoint holds the model, or each that
    does has a full round waiting."""
    holding = sum(1 for e in endpoints if not e.cold and not e.ejected and not e.removed)
    return backlog_rounds >= holding


class EndpointPool:
    """The endpoints of one model version; ``model`` is its path (``ModelClient``)."""

    def __init__(
        self,
        model: str,
        client: ModelClient,
        *,
        max_batches_per_endpoint: int = 2,
        eject_after: int = 3,
        min_eject_s: float = 0.5,
        max_eject_s: float = 30.0,
        call_timeout_s: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self.model = model
        self.max_batches_per_endpoint = max_batches_per_endpoint
        self.eject_after = eject_after
        self.min_eject_s = min_eject_s
        self.max_eject_s = max_eject_s
        self.call_timeout_s = call_timeout_s
        self.endpoints: list[Endpoint] = []
        self._client = client
        self._rng = rng or random.Random()
        self._listeners: list[Callable[[], None]] = []
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._retries: list[_Retry] = []
        """Retries waiting for a slot, oldest first; served before any new batch."""

    def on_capacity(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever a slot frees or an endpoint (re)joins."""
        self._listeners.append(listener)

    def set_endpoints(self, urls: Sequence[str]) -> None:
        """Replace the endpoint set (discovery); batches in flight on removed ones finish."""
        current = {e.url: e for e in self.endpoints}
        for endpoint in self.endpoints:
            if endpoint.url not in urls:
                endpoint.removed = True
                probe = self._probes.pop(endpoint.url, None)
                if probe is not None:
                    probe.cancel()
        self.endpoints = [current.get(url) or Endpoint(url) for url in dict.fromkeys(urls)]
        self._notify()

    def set_loaded(self, loaded: Mapping[str, bool]) -> None:
        """Whether each endpoint named holds the model loaded now (its readiness answer);
        one that just took the model in frees the batches that waited for it."""
        warmed = False
        for endpoint in self.endpoints:
            held = loaded.get(endpoint.url)
            if held is not None:
                warmed |= endpoint.cold and held
                endpoint.cold = not held
        if warmed:
            self._notify()

    @property
    def ready_endpoints(self) -> int:
        return sum(1 for e in self.endpoints if not e.ejected)

    def has_capacity(self) -> bool:
        return any(
            not e.ejected and e.inflight_batches < self.max_batches_per_endpoint
            for e in self.endpoints
        )

    def acquire(
        self,
        rows: int,
        exclude: Endpoint | None = None,
        *,
        idle_only: bool = False,
        backlog_rounds: float = math.inf,
    ) -> Endpoint | None:
        """Reserve a slot for a batch of ``rows``; None when every endpoint is full or down,
        or every one with room is cold and the backlog does not call for it
        (``choose_endpoint``).

        ``idle_only`` takes only an endpoint with nothing in flight: the extra slots are
        for batches worth queueing behind another at the pod.
        """
        candidates = [e for e in self.endpoints if e is not exclude]
        limit = 1 if idle_only else self.max_batches_per_endpoint
        endpoint = choose_endpoint(candidates, limit, self._rng, backlog_rounds)
        if endpoint is not None:
            endpoint.inflight_batches += 1
            endpoint.inflight_rows += rows
        return endpoint

    @overload
    async def call(
        self, endpoint: Endpoint, inputs: Tensors, rows: int, deadline: float | None
    ) -> Tensors: ...

    @overload
    async def call(
        self, endpoint: Endpoint, inputs: RawRequest, rows: int, deadline: float | None
    ) -> Answer: ...

    async def call(
        self, endpoint: Endpoint, inputs: Tensors | RawRequest, rows: int, deadline: float | None
    ) -> Tensors | Answer:
        """Send a batch on an acquired endpoint; retried once elsewhere on a retryable failure.

        Releases every slot it used. Raises what the pod answered (a 4xx passes through),
        ``UpstreamError`` when no endpoint could answer, ``DeadlineExceeded`` when the
        deadline passed during a call or before the retry could start.
        """
        loop = asyncio.get_running_loop()
        try:
            return await self._call_once(endpoint, inputs, rows, deadline)
        except BazaarError as exc:
            if not exc.retryable:
                raise
            first_error = exc
        if deadline is not None and loop.time() >= deadline:
            raise DeadlineExceeded(f"deadline passed after a failed call to {endpoint.url}")
        retry = self.acquire(rows, exclude=endpoint)
        if retry is None:
            wait_until = loop.time() + self.call_timeout_s
            retry = await self._wait_for_slot(
                rows, endpoint, wait_until if deadline is None else min(deadline, wait_until)
            )
        if retry is None:
            if deadline is not None and loop.time() >= deadline:
                raise DeadlineExceeded(
                    f"deadline passed waiting for a slot after a failed call to {endpoint.url}"
                )
            raise first_error
        log.info("%s: retrying a batch on %s after: %s", self.model, retry.url, first_error)
        return await self._call_once(retry, inputs, rows, deadline)

    async def close(self) -> None:
        await cancel_and_wait(*self._probes.values())
        self._probes.clear()

    async def _wait_for_slot(self, rows: int, exclude: Endpoint, until: float) -> Endpoint | None:
        """A slot on another endpoint, acquired as soon as one frees before ``until``; None
        when none frees in time or no other endpoint is left that could take the batch."""
        if not self._elsewhere(exclude):
            return None
        waiter = _Retry(rows, exclude, asyncio.get_running_loop().create_future())
        self._retries.append(waiter)
        taken: Endpoint | None = None
        try:
            async with asyncio.timeout_at(until):
                taken = await waiter.endpoint
        except TimeoutError:
            pass
        finally:
            self._retries.remove(waiter)
            slot = waiter.endpoint
            if taken is None and slot.done() and not slot.cancelled() and slot.result():
                # A slot acquired for it just as time ran out (or the batch was cancelled).
                self._release(slot.result(), rows)  # type: ignore[arg-type]
        return taken

    def _elsewhere(self, exclude: Endpoint) -> bool:
        """Another endpoint exists that could take a batch once it has room."""
        return any(not e.ejected and not e.removed and e is not exclude for e in self.endpoints)

    async def _call_once(
        self, endpoint: Endpoint, inputs: Tensors | RawRequest, rows: int, deadline: float | None
    ) -> Tensors | Answer:
        loop = asyncio.get_running_loop()
        timeout_s = self.call_timeout_s
        if deadline is not None:
            timeout_s = min(timeout_s, deadline - loop.time())
        try:
            if timeout_s <= 0:
                raise DeadlineExceeded(f"deadline passed before a call to {endpoint.url}")
            try:
                outputs: Tensors | Answer
                async with asyncio.timeout(timeout_s):
                    if isinstance(inputs, RawRequest):
                        outputs = await self._client.forward(
                            endpoint.url, self.model, inputs, timeout_s
                        )
                    else:
                        outputs = await self._client.infer(
                            endpoint.url, self.model, inputs, timeout_s
                        )
            except (TimeoutError, BazaarError) as exc:
                if deadline is not None and loop.time() >= deadline - DEADLINE_SLACK_S:
                    raise DeadlineExceeded(
                        f"deadline passed during a call to {endpoint.url}"
                    ) from None
                if isinstance(exc, TimeoutError):
                    raise UpstreamError(
                        f"pod {endpoint.url} did not answer within {timeout_s:g} s"
                    ) from None
                raise
        except DeadlineExceeded:
            raise  # the caller's deadline, not the endpoint's fault
        except BazaarError as exc:
            if exc.retryable or exc.status >= 500:
                self._failed(endpoint, exc)
            raise
        else:
            endpoint.failures = 0
            endpoint.cold = False  # it has the model loaded now
            return outputs
        finally:
            self._release(endpoint, rows)

    def _release(self, endpoint: Endpoint, rows: int) -> None:
        endpoint.inflight_batches -= 1
        endpoint.inflight_rows -= rows
        self._notify()

    def _failed(self, endpoint: Endpoint, exc: BazaarError) -> None:
        endpoint.failures += 1
        if endpoint.failures >= self.eject_after and not endpoint.ejected and not endpoint.removed:
            endpoint.ejected = True
            log.warning(
                "%s: ejected %s after %d failures in a row: %s",
                self.model,
                endpoint.url,
                endpoint.failures,
                exc,
            )
            self._probes[endpoint.url] = asyncio.create_task(self._probe(endpoint))

    async def _probe(self, endpoint: Endpoint) -> None:
        delay = self.min_eject_s
        while not endpoint.removed:
            await asyncio.sleep(delay)
            try:
                healthy = await self._client.ready(endpoint.url, self.model)
            except BazaarError:
                healthy = False
            if healthy:
                endpoint.ejected = False
                endpoint.failures = 0
                self._probes.pop(endpoint.url, None)
                log.info("%s: %s is back", self.model, endpoint.url)
                self._notify()
                return
            delay = min(delay * 2, self.max_eject_s)

    def _notify(self) -> None:
        for waiter in list(self._retries):
            if waiter.endpoint.done():
                continue
            if not self._elsewhere(waiter.exclude):
                waiter.endpoint.set_result(None)  # nowhere else to go: fail now, not later
                continue
            endpoint = self.acquire(waiter.rows, exclude=waiter.exclude)
            if endpoint is not None:
                waiter.endpoint.set_result(endpoint)
        for listener in self._listeners:
            listener()


@dataclass(slots=True, eq=False)
class _Retry:
    """A retry waiting for a slot: ``endpoint`` resolves to the slot, or None to give up."""

    rows: int
    exclude: Endpoint
    endpoint: asyncio.Future[Endpoint | None]
