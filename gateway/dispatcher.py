"""The per-model dispatcher: requests wait here, not in the pods, and leave as batches.

Admission is checked twice, so that load is shed where it is cheap. ``admit`` is asked
before a request's body is decoded, knowing only its headers: it refuses (503 with
``Retry-After``) when the queue is full or when the queue's expected wait (its rows over the
rate the pods drained them at while backlogged) exceeds the request's deadline. ``submit``
admits the decoded request, refusing it only for what the body alone says (a bad priority, a
tighter ``timeout`` parameter), and returns a future for its outputs. Decoding and
submitting happen in one step of the event loop, so nothing can fill the queue in between:
what ``admit`` let through ``submit`` takes. Without the first check, under many clients
every request is decoded before the full queue refuses it, and that work crowds out the
requests that are admitted.

One collector task, ``run``, forms batches:

* Requests queue by priority level (1 is highest), FIFO within a level. A batch takes
  requests in that order, counting rows, never more than ``max_batch_size``; it stops at the
  first request that does not fit, or whose non-batch dimensions differ from the first
  one's (their tensors could not be concatenated), so nothing overtakes within a level.
* A batch leaves when the pool has a free slot and either it is full, or it reaches a
  preferred size (the largest preferred size that fits leaves), or its oldest request has
  waited ``max_queue_delay_s``. With delay 0 it is work-conserving: an idle endpoint takes
  whatever is queued at once, so batches grow exactly as fast as the pods are busy. A batch
  that could still grow goes only to an idle endpoint; the further slots an endpoint has
  (``max_batches_per_endpoint``) pipeline full batches, so the pod never waits for the next
  one to arrive and is never handed a small one while it is busy anyway.
* A request whose deadline passes while queued is answered 504 and never computed. A
  request whose caller went away (its future cancelled) leaves the queue's counts at once
  and is dropped, never computed; a batch in flight whose every caller went away is
  cancelled, so its pod call ends (one that lost only some callers still runs: they cost
  their rows, nothing more).
* Each batch runs as its own task: inputs are concatenated along the batch dimension, the
  pool sends them (with one retry elsewhere) bounded by the earliest deadline of its
  members, and the outputs are sliced back so every caller gets exactly its own rows. A
  failure fails only that batch's requests.

A request passed through as sent (``RawRequest``, ``gateway.passthrough``) queues, expires,
is cancelled and routed like any other; it counts one row and never batches: its model's
policy has ``max_batch_size`` 0, so each leaves alone and its future resolves to the
upstream's answer as is.

Every admitted future is resolved exactly once: with its rows, or an error. If the collector
itself dies, every waiter gets the error, and ``close`` fails whatever is still queued.
The loop's clock is the only clock (``loop.time()``), so tests run it on virtual time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast, overload

import numpy as np

from gateway.metrics import ModelMetrics
from gateway.router import Endpoint, EndpointPool, RawRequest, Tensors
from gateway.tenants import ANONYMOUS_TENANT, Tenant
from protocol import tracing
from protocol.errors import (
    BazaarError,
    DeadlineExceeded,
    InvalidRequest,
    ModelNotReady,
    Overloaded,
    UpstreamError,
)
from protocol.fastpath import Answer

log = logging.getLogger(__name__)

# asyncio fires a timer up to its clock resolution early; a due time this close counts as
# reached, or the collector would re-arm the same timer and spin.
TIMER_SLACK_S = 1e-6


DEFAULT_MAX_QUEUE_SIZE = 4096
"""As many as the edge's requests in progress (each queued request is one of them), so that
only the edge's cap binds: clients waiting in a closed loop queue rather than cycle
through 503s."""


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How one model's requests are batched and bounded (from its pod's config)."""

    max_batch_size: int
    """Rows per batch; 0 = the model does not batch (one request per call)."""
    max_queue_delay_s: float = 0.0
    """How long the oldest request may wait for a fuller batch; 0 = work-conserving."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Batch sizes that leave at once when reached (ascending)."""
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    """Requests queued at most; beyond it requests are refused with 503."""
    default_timeout_s: float | None = None
    """Queue deadline of a request that sets none; None = no deadline."""
    priority_levels: int = 1
    """Levels 1..priority_levels, 1 highest."""
    default_priority_level: int = 1
    """Level of requests that set priority 0 or none."""
    max_queue_time_s: float = 30.0
    """Cap on any request's time in the queue, so nothing waits forever (for an endpoint,
    say, while a model has none)."""
    max_batch_bytes: int = 64 * 1024 * 1024
    """The most tensor bytes in one batch: a pod reads a batch as one body, under its own
    inference body limit (the gateway's, by default), however many rows it may take."""


@dataclass(slots=True, eq=False, weakref_slot=True)
class Pending:
    """One admitted request."""

    inputs: Tensors | RawRequest
    """Its tensors, or its body passed through as sent (a model with max_batch_size 0)."""
    rows: int
    arrived: float
    deadline: float
    """When it leaves the queue unanswered (504): its timeout, capped by the queue time."""
    call_deadline: float | None
    """When its answer is no use to its caller any more: the request's own timeout (not the
    model's default, a queue timeout as in Triton), which also bounds the pod call."""
    future: asyncio.Future[Any]
    """Resolves to its output rows (``Tensors``), or for a ``RawRequest`` the ``Answer``."""
    nbytes: int
    """Its tensors' bytes, counted against ``max_batch_bytes``."""
    signature: tuple[tuple[int, ...], ...]
    """Non-batch dimensions of every input; requests batch together only when equal."""
    flow: _Flow
    """Its tenant's share of the queue."""
    tag: float
    """Its place in the fair order of its level: the virtual time its service starts at."""
    queued: bool = True
    batch: _Batch | None = None
    """The batch it left in, while that is in flight."""
    waiting: tracing.Waiting | None = None
    """Its trace, when the gateway traces: its span's context and when it was queued."""


@dataclass(slots=True, eq=False)
class _Flow:
    """One tenant's requests in this queue (start-time fair queuing, per priority level).

    A request's tag is where its tenant's queued work ends in virtual time, or the level's
    virtual time (the tag of the request last taken) if that is later; its tenant's work
    then grows by its rows over the tenant's weight. A level is kept in tag order, so every
    tenant with requests queued is served in proportion to its weight, a tenant that floods
    only delays itself, and with one tenant the order is arrival order.
    """

    weight: float
    finish: list[float]
    """Per level, the virtual time at which this tenant's queued work ends."""
    queued: int = 0
    rows: int = 0


@dataclass(slots=True, eq=False)
class _Batch:
    members: list[Pending]
    task: asyncio.Task[None] | None = None


class _RequestFuture(asyncio.Future[Any]):
    """A request's future that tells its dispatcher the moment its caller cancels it.

    A done-callback on every future would do the same, but costs every request an extra turn
    of the event loop: measured at 12 % of the gateway's throughput at 64 clients.
    """

    on_cancel: Callable[[], None]

    def cancel(self, msg: Any | None = None) -> bool:
        if not super().cancel(msg):
            return False
        self.on_cancel()
        return True


@dataclass(slots=True)
class DispatcherStats:
    queued: int = 0
    queued_rows: int = 0
    inflight_batches: int = 0
    inflight_rows: int = 0
    admitted: int = 0
    """Requests admitted since start (a counter: its rate is the arrival rate)."""
    admitted_rows: int = 0
    """Rows admitted since start."""
    completed_rows: int = 0
    """Rows answered by pods since start (the rate is the throughput)."""


@dataclass(slots=True)
class _Drain:
    """Rows completed per second while requests were queued, smoothed: the pods' capacity as
    this gateway sees it, the basis of ``Retry-After`` and of the expected queue wait.

    Only backlogged stretches count: when the queue runs empty the completions measure the
    arrival rate, not what the pods could do, and a request would be refused for a wait
    that a burst of load makes look long. Until a backlog has been measured the rate is 0,
    unknown, and no request is refused for its deadline.
    """

    rate: float = 0.0
    last: float = 0.0
    pending_rows: int = 0
    backlogged: bool = False
    """Whether the queue held requests at the last completion."""

    def record(self, rows: int, now: float, backlogged: bool) -> None:
        if not (backlogged and self.backlogged):
            # A window opens at the first completion of a backlog: these rows were computed
            # before it, and the time since the completion before may have been idle (a
            # model idle for a minute, then a burst, was measured at a row a minute).
            self.last = now
            self.pending_rows = 0
            self.backlogged = backlogged
            return
        self.pending_rows += rows
        elapsed = now - self.last
        if elapsed >= 0.25:
            sample = self.pending_rows / elapsed
            self.rate = sample if self.rate == 0 else 0.7 * self.rate + 0.3 * sample
            self.pending_rows = 0
            self.last = now


@dataclass(slots=True)
class _Queue:
    """Priority levels of FIFO deques, plus a deadline heap for prompt expiry."""

    levels: list[deque[Pending]]
    deadlines: list[tuple[float, int, Pending]] = field(default_factory=list)
    size: int = 0
    rows: int = 0


class Dispatcher:
    def __init__(
        self, model: str, policy: BatchPolicy, pool: EndpointPool, metrics: ModelMetrics
    ) -> None:
        self.model = model
        self.policy = policy
        self.pool = pool
        self.metrics = metrics
        self._queue = _Queue([deque() for _ in range(policy.priority_levels)])
        self._virtual = [0.0] * policy.priority_levels
        """Per level, the tag of the request last taken: where a tenant's new work starts."""
        self._flows: dict[str, _Flow] = {}
        self._active_weight = 0.0
        """The weights of the tenants with requests queued, summed."""
        self._sequence = itertools.count()
        self._inflight: set[asyncio.Task[None]] = set()
        self._inflight_rows = 0
        self._admitted = 0
        self._admitted_rows = 0
        self._completed_rows = 0
        self._drain = _Drain()
        self._waiter: asyncio.Future[None] | None = None
        self._closed: BazaarError | None = None
        pool.on_capacity(self._wakeup)

    # -- admission -------------------------------------------------------------------------

    def admit(self, timeout_s: float | None = None, tenant: Tenant = ANONYMOUS_TENANT) -> None:
        """Refuse now, before its body is decoded, a request that will not fit: raises
        ``Overloaded`` (see the module's docstring). ``timeout_s``: its header's deadline."""
        flow = self._flow(tenant)
        refusal = self._refusal(self._own_timeout_s(timeout_s), flow, "before_decode")
        if refusal is not None:
            raise refusal

    @overload
    def submit(
        self,
        inputs: Tensors,
        rows: int,
        priority: int = 0,
        timeout_s: float | None = None,
        tenant: Tenant = ANONYMOUS_TENANT,
    ) -> asyncio.Future[Tensors]: ...

    @overload
    def submit(
        self,
        inputs: RawRequest,
        rows: int,
        priority: int = 0,
        timeout_s: float | None = None,
        tenant: Tenant = ANONYMOUS_TENANT,
    ) -> asyncio.Future[Answer]: ...

    def submit(
        self,
        inputs: Tensors | RawRequest,
        rows: int,
        priority: int = 0,
        timeout_s: float | None = None,
        tenant: Tenant = ANONYMOUS_TENANT,
    ) -> asyncio.Future[Any]:
        """Admit a request; its future resolves to its own output rows (or, passed through,
        to the upstream's answer)."""
        policy = self.policy
        if not 0 <= priority <= policy.priority_levels:
            raise InvalidRequest(
                f"priority {priority} is out of range: model '{self.model}' has levels "
                f"1..{policy.priority_levels} (0 = default)"
            )
        own_timeout_s = self._own_timeout_s(timeout_s)
        flow = self._flow(tenant)
        refusal = self._refusal(own_timeout_s, flow, "after_decode")
        if refusal is not None:
            raise refusal
        loop = asyncio.get_running_loop()
        now = loop.time()
        future = _RequestFuture(loop=loop)
        index = (priority or policy.default_priority_level) - 1
        tag = max(self._virtual[index], flow.finish[index])
        flow.finish[index] = tag + rows / flow.weight
        nbytes, signature = 0, ()
        if policy.max_batch_size and not isinstance(inputs, RawRequest):
            nbytes = sum(array.nbytes for array in inputs.values())
            signature = tuple(array.shape[1:] for array in inputs.values())
        pending = Pending(
            inputs=inputs,
            rows=rows,
            arrived=now,
            deadline=now + min(own_timeout_s or policy.max_queue_time_s, policy.max_queue_time_s),
            call_deadline=now + timeout_s if timeout_s else None,
            future=future,
            nbytes=nbytes,
            signature=signature,
            flow=flow,
            tag=tag,
        )
        if tracing.TRACER is not None:
            pending.waiting = tracing.waiting()
        # A weak reference: a strong one would make pending -> future -> pending a cycle,
        # left to the cyclic collector after every request.
        future.on_cancel = functools.partial(self._left, weakref.ref(pending))
        level = self._queue.levels[index]
        if not level or level[-1].tag <= tag:
            level.append(pending)
        else:
            _insert_in_tag_order(level, pending)
        self._queue.size += 1
        self._queue.rows += rows
        if not flow.queued:
            self._active_weight += flow.weight
        flow.queued += 1
        flow.rows += rows
        self._admitted += 1
        self._admitted_rows += rows
        deadlines = self._queue.deadlines
        heapq.heappush(deadlines, (pending.deadline, next(self._sequence), pending))
        if len(deadlines) > 2 * self._queue.size + 64:
            # Entries of requests that already left stay until their deadline would pass;
            # under load that is every request of the last max_queue_time_s, inputs and
            # all. Compacting here keeps the heap within twice the queue, amortised O(1).
            deadlines[:] = [entry for entry in deadlines if entry[2].queued]
            heapq.heapify(deadlines)
        self._wakeup()
        return pending.future

    def _own_timeout_s(self, timeout_s: float | None) -> float | None:
        """The request's deadline from now: a request may lower the model's default timeout,
        never raise it (Triton). None: it has none (the queue time still caps its wait)."""
        limits = [t for t in (timeout_s, self.policy.default_timeout_s) if t]
        return min(limits) if limits else None

    def _flow(self, tenant: Tenant) -> _Flow:
        flow = self._flows.get(tenant.name)
        if flow is None:
            levels = self.policy.priority_levels
            flow = self._flows[tenant.name] = _Flow(tenant.policy.weight, [0.0] * levels)
        return flow

    def _refusal(self, timeout_s: float | None, flow: _Flow, stage: str) -> BazaarError | None:
        """Why a request with this deadline from this tenant cannot be admitted now, if it
        cannot.

        At ``max_queue_size`` a tenant still holding less than its weighted share of that
        size is admitted: a flood from one tenant cannot shut another out. The queue then
        holds at most twice ``max_queue_size``.
        """
        if self._closed is not None:
            return self._closed
        queued = self._queue.size
        share = flow.weight / (self._active_weight + (0 if flow.queued else flow.weight))
        if (
            queued >= self.policy.max_queue_size
            and flow.queued >= share * self.policy.max_queue_size
        ):
            self.metrics.shed[stage, "queue_full"].inc()
            return Overloaded(
                f"model '{self.model}' has {queued} requests queued, its limit (max_queue_size)",
                self._retry_after_s(),
            )
        wait_s = self._expected_wait_s(flow, share)
        limit_s = min(timeout_s or self.policy.max_queue_time_s, self.policy.max_queue_time_s)
        if wait_s > limit_s:
            self.metrics.shed[stage, "deadline"].inc()
            return Overloaded(
                f"model '{self.model}' has {wait_s * 1000:.0f} ms of work queued, more than "
                f"the request's deadline of {limit_s * 1000:.0f} ms",
                wait_s,
            )
        return None

    def _expected_wait_s(self, flow: _Flow, share: float) -> float:
        """How long a request from this tenant arriving now would queue: its tenant's queued
        rows, served at its share of the measured drain rate (0: unknown, never measured
        under a backlog)."""
        if self._drain.rate <= 0:
            return 0.0
        return min(self._queue.rows, flow.rows / share) / self._drain.rate

    def stats(self) -> DispatcherStats:
        return DispatcherStats(
            queued=self._queue.size,
            queued_rows=self._queue.rows,
            inflight_batches=len(self._inflight),
            inflight_rows=self._inflight_rows,
            admitted=self._admitted,
            admitted_rows=self._admitted_rows,
            completed_rows=self._completed_rows,
        )

    # -- the collector ---------------------------------------------------------------------

    async def run(self) -> None:
        """Form and send batches until cancelled; a dying collector fails every waiter."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                now = loop.time()
                self._expire(now)
                wake_at = self._dispatch(now)
                deadlines = self._queue.deadlines
                while deadlines and not deadlines[0][2].queued:
                    heapq.heappop(deadlines)  # it left: no reason to wake at its deadline
                if deadlines:
                    first_deadline = deadlines[0][0]
                    wake_at = first_deadline if wake_at is None else min(wake_at, first_deadline)
                self._waiter = loop.create_future()
                timer = loop.call_at(wake_at, self._wakeup) if wake_at is not None else None
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                    if timer is not None:
                        timer.cancel()
        except asyncio.CancelledError:
            self._fail_queued(ModelNotReady(self.model, "shutting down"))
            raise
        except BaseException as exc:
            log.exception("%s: dispatcher failed", self.model)
            self._fail_queued(ModelNotReady(self.model, f"failing: {exc}"))
            raise

    def close(self) -> None:
        self._closed = ModelNotReady(self.model, "shutting down")
        self._fail_queued(self._closed)

    def _wakeup(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _dispatch(self, now: float) -> float | None:
        """Send every batch that may leave now; returns when the next one may, if known."""
        policy = self.policy
        while self._queue.size and self.pool.has_capacity():
            batch, rows, full = self._candidate()
            if not batch:
                self._purge()  # only abandoned requests were left
                return None
            # A batch that could still grow leaves only for an idle endpoint; the extra
            # slots per endpoint pipeline batches that are as big as they will get, so a
            # busy pod is not handed small batches while company is on its way.
            grown = full or not policy.max_batch_size
            if not grown:
                preferred = [p for p in policy.preferred_batch_sizes if p <= rows]
                head, head_rows = _prefix(batch, preferred[-1]) if preferred else ([], 0)
                if head:
                    batch, rows, grown = head, head_rows, True
                else:
                    leave_at = min(p.arrived for p in batch) + policy.max_queue_delay_s
                    # Waiting for company must not outlast a member's deadline.
                    if now + TIMER_SLACK_S < leave_at < min(p.deadline for p in batch):
                        return leave_at
            # Full rounds queued for one endpoint: how readily a model spreads to pods that
            # would have to load it first (``gateway.router``, cache affinity).
            round_rows = (policy.max_batch_size or 1) * self.pool.max_batches_per_endpoint
            endpoint = self.pool.acquire(
                rows, idle_only=not grown, backlog_rounds=self._queue.rows / round_rows
            )
            if endpoint is None:
                return None
            self._take(len(batch))
            running = _Batch(batch)
            for pending in batch:
                pending.batch = running
                self.metrics.queue_wait.observe(now - pending.arrived)
            self.metrics.batch_size.observe(rows)
            running.task = asyncio.create_task(self._execute(endpoint, running, rows))
            self._inflight.add(running.task)
            self._inflight_rows += rows
        return None

    def _candidate(self) -> tuple[list[Pending], int, bool]:
        """The next batch in queue order, its rows, and whether it can grow no further."""
        limit = self.policy.max_batch_size
        batch: list[Pending] = []
        rows = size = 0
        for level in self._queue.levels:
            for pending in level:
                if pending.future.done():
                    continue  # the caller is gone; dropped when taken
                if not limit:
                    return [pending], pending.rows, True
                if batch and (
                    rows + pending.rows > limit
                    or pending.signature != batch[0].signature
                    or size + pending.nbytes > self.policy.max_batch_bytes
                ):
                    return batch, rows, True
                batch.append(pending)
                rows += pending.rows
                size += pending.nbytes
                if rows == limit:
                    return batch, rows, True
        return batch, rows, False

    def _take(self, count: int) -> None:
        """Dequeue the first ``count`` live requests, and abandoned ones among them.

        A batch is always the live head of the queue in priority order, so this is a pop
        from the front of each level.
        """
        for index, level in enumerate(self._queue.levels):
            while count and level:
                pending = level.popleft()
                self._virtual[index] = pending.tag
                self._unqueue(pending)
                if not pending.future.done():
                    count -= 1

    def _unqueue(self, pending: Pending) -> None:
        if pending.queued:
            pending.queued = False
            self._queue.size -= 1
            self._queue.rows -= pending.rows
            flow = pending.flow
            flow.queued -= 1
            flow.rows -= pending.rows
            if not flow.queued:
                # Summed afresh when the queue empties: no float drift over a long run.
                self._active_weight = self._active_weight - flow.weight if self._queue.size else 0.0

    def _left(self, ref: weakref.ref[Pending]) -> None:
        """A request's caller cancelled its future: its place and rows are free at once, and
        a batch in flight that no caller waits for any more is stopped."""
        pending = ref()
        if pending is None:
            return  # answered and forgotten already
        if pending.queued:
            self._unqueue(pending)
            queue = self._queue
            if sum(len(level) for level in queue.levels) > 2 * queue.size + 64:
                self._purge()  # abandoned requests (and their inputs) must not pile up
            return
        batch = pending.batch
        if (
            batch is not None
            and batch.task is not None
            and all(member.future.done() for member in batch.members)
        ):
            batch.task.cancel()

    def _expire(self, now: float) -> None:
        deadlines = self._queue.deadlines
        expired = False
        while deadlines and deadlines[0][0] <= now + TIMER_SLACK_S:
            _, _, pending = heapq.heappop(deadlines)
            if pending.queued and not pending.future.done():
                self.metrics.expired.inc()
                waited_ms = (now - pending.arrived) * 1000
                pending.future.set_exception(
                    DeadlineExceeded(
                        f"request to model '{self.model}' waited {waited_ms:.0f} ms in the "
                        "queue, past its deadline"
                    )
                )
                expired = True
        if expired:
            self._purge()

    def _purge(self) -> None:
        """Drop answered or abandoned requests from anywhere in the queue."""
        for index, level in enumerate(self._queue.levels):
            if any(not p.queued or p.future.done() for p in level):
                for pending in level:
                    if pending.future.done():
                        self._unqueue(pending)
                self._queue.levels[index] = deque(p for p in level if p.queued)

    # -- a batch in flight -----------------------------------------------------------------

    async def _execute(self, endpoint: Endpoint, running: _Batch, rows: int) -> None:
        loop = asyncio.get_running_loop()
        batch = running.members
        try:
            # Triton's statistics phases: concatenating, the pod's round trip, slicing, timed
            # with perf_counter (uvloop's loop.time() counts whole milliseconds); the queue
            # wait is in the loop's clock, as the queue's deadlines are.
            left, leaving = loop.time(), time.perf_counter()
            inputs = _concatenate(batch) if len(batch) > 1 else batch[0].inputs
            started = time.perf_counter()
            deadlines = [p.call_deadline for p in batch if p.call_deadline is not None]
            with self._traced(batch, rows):
                outputs = await self.pool.call(
                    endpoint, inputs, rows, min(deadlines) if deadlines else None
                )
            answered = time.perf_counter()
            self.metrics.pod_seconds.observe(answered - started)
            waiting = [p for p in batch if not p.future.done()]
            _split(self.model, batch, rows, outputs)
            self.metrics.statistics.executed(
                rows,
                len(waiting),
                sum(left - p.arrived for p in waiting),
                started - leaving,
                answered - started,
                time.perf_counter() - answered,
            )
            self._drain.record(rows, loop.time(), backlogged=self._queue.size > 0)
            self._completed_rows += rows
        except asyncio.CancelledError:
            # Every caller went away (``_left``), or the loop is shutting down.
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(ModelNotReady(self.model, "shutting down"))
            raise
        except BaseException as exc:
            error = exc if isinstance(exc, BazaarError) else _unexpected(self.model, exc)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
        finally:
            for pending in batch:
                pending.batch = None
            # Now, not in a done-callback: the callers resume before callbacks run, and
            # /stats must not show a batch in flight that has already answered them.
            self._inflight.discard(asyncio.current_task())
            self._inflight_rows -= rows
            self._wakeup()

    def _traced(self, batch: list[Pending], rows: int) -> contextlib.AbstractContextManager[Any]:
        """The batch's span, current while it is in flight, after each traced member's
        queue span; nothing when the gateway does not trace."""
        tracer = tracing.TRACER
        if tracer is None:
            return contextlib.nullcontext()
        members = [p.waiting for p in batch if p.waiting is not None]
        if not members:
            return contextlib.nullcontext()
        for member in members:
            tracing.waited(tracer, "queue", member)
        attributes: dict[str, str | int] = {
            "bazaar.model": self.model,
            "bazaar.rows": rows,
            "bazaar.requests": len(batch),
        }
        return tracing.batch_span(
            tracer, f"batch {self.model}", [m[0] for m in members], attributes
        )

    def _retry_after_s(self) -> float:
        if self._drain.rate <= 0:
            return 1.0
        return self._queue.rows / self._drain.rate

    def _fail_queued(self, error: BazaarError) -> None:
        for level in self._queue.levels:
            for pending in level:
                if not pending.future.done():
                    pending.future.set_exception(error)
                self._unqueue(pending)
            level.clear()
        self._queue.deadlines.clear()


def _insert_in_tag_order(level: deque[Pending], pending: Pending) -> None:
    """Insert behind every request with a tag no later than its own (searching from the
    back: a tenant's new request usually lands near it)."""
    index = len(level)
    while index and level[index - 1].tag > pending.tag:
        index -= 1
    level.insert(index, pending)


def _prefix(batch: list[Pending], size: int) -> tuple[list[Pending], int]:
    """The longest head of ``batch`` with at most ``size`` rows."""
    rows = 0
    for index, pending in enumerate(batch):
        if rows + pending.rows > size:
            return batch[:index], rows
        rows += pending.rows
    return batch, rows


def _concatenate(batch: list[Pending]) -> Tensors:
    # Only tensors batch: a RawRequest's model has max_batch_size 0, so it leaves alone.
    members = [cast(Tensors, p.inputs) for p in batch]
    return {name: np.concatenate([m[name] for m in members]) for name in members[0]}


def _split(model: str, batch: list[Pending], rows: int, answer: Tensors | Answer) -> None:
    if len(batch) == 1:
        if not batch[0].future.done():
            batch[0].future.set_result(answer)
        return
    outputs = cast(Tensors, answer)  # a batch of several is tensors (``_concatenate``)
    for name, out in outputs.items():
        if out.ndim == 0 or out.shape[0] != rows:
            raise UpstreamError(
                f"a pod of model '{model}' answered a batch of {rows} rows with output "
                f"'{name}' of shape {list(out.shape)}"
            )
    offset = 0
    for pending in batch:
        end = offset + pending.rows
        if not pending.future.done():
            pending.future.set_result({name: out[offset:end] for name, out in outputs.items()})
        offset += pending.rows


def _unexpected(model: str, exc: BaseException) -> BazaarError:
    log.error("%s: batch failed unexpectedly", model, exc_info=exc)
    return BazaarError(f"internal error while running a batch of model '{model}': {exc}")
