"""An HTTP/1.1 load generator that accounts for every request: closed loop and open loop.

wrk measures a closed loop well but cannot say what became of each request: when its run
ends, the requests in flight are dropped, so its sent and answered never match, and a
server that loses a request looks like a client that stopped. Here every request is sent
once, on a keep-alive connection, never pipelined and never retried, and ends in exactly one
of two ways: an answer, counted by status, or its connection closing without one, counted as
an error by kind. When the load stops nothing new is sent and the requests in flight are
waited for, up to a drain deadline; any still unanswered then are counted too. So
``sent == answered + errors + unanswered`` always, and a server that answers every request
exactly once shows ``lost == 0``.

- Closed loop (``closed_loop``): N connections, each sending its next request as soon as
  its last is answered; a connection the server closes is replaced.
- Open loop (``open_loop``): requests fall due at a fixed rate whatever the answers. A due
  request goes out on an idle connection, or on a new one while fewer than
  ``max_connections`` are open or opening; past that bound it is not sent and counts as
  missed. Latency is measured from when a request was due, so a server that falls behind
  cannot hide it behind a late generator (coordinated omission).
- Trace (``trace_loop``): the open loop with the due times given, one per request (a
  workload trace's arrivals), so the load can rise and fall as a real one does.

Cost: one prebuilt ``bytes`` per request; a response is parsed only as far as its status
line, Content-Length and Connection; answers are handled in the protocol callback, so the
closed loop sends the next request without a task switch. Measured: about 35 µs of CPU
per one-row request (10,782 requests at 64 connections in 0.39 s), several times less than
the gateway spends answering it; multi-row bodies keep the generator further ahead.

The open loop does not reuse a connection once it has been idle for ``IDLE_REUSE_S``, well
under any server's keep-alive timeout, so that a request never crosses the server's close
of a connection whose keep-alive timeout ran out (a race the server cannot prevent).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import re
import resource
import time
from collections import Counter
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

DRAIN_S = 60.0
"""How long the requests in flight are waited for once the load stops."""
IDLE_REUSE_S = 1.0
"""An open-loop connection idle longer than this is closed rather than reused."""
STOP_POLL_S = 0.05
"""The open loop's longest sleep between due requests: how soon it notices ``stop``."""
CONNECT_AT_ONCE = 256
"""Connections a closed loop opens concurrently when it starts (the server's accept
backlog is finite, and a refused connect would count as an error)."""

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)
_CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.I)


@dataclass(frozen=True, slots=True)
class Request:
    """One POST, encoded once and sent as is."""

    path: str
    body: bytes
    headers: Sequence[tuple[str, str]] = ()

    def wire(self) -> bytes:
        head = [
            f"POST {self.path} HTTP/1.1",
            "Host: loadgen",
            f"Content-Length: {len(self.body)}",
            *(f"{name}: {value}" for name, value in self.headers),
        ]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + self.body


@dataclass(slots=True)
class Tally:
    """What became of the requests of one run."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    """Answers by HTTP status."""
    errors: Counter[str] = field(default_factory=Counter)
    """Requests sent whose connection ended without their answer, by how."""
    unanswered: int = 0
    """Requests still waiting for their answer when the drain deadline passed."""
    connect_errors: Counter[str] = field(default_factory=Counter)
    """Connections that could not be opened (no request had been sent on them)."""
    missed: int = 0
    """Open loop: requests that fell due while ``max_connections`` were busy; not sent."""
    unsolicited: int = 0
    """Answers, or bytes, that came when no request was waiting: a second answer."""
    ok_latencies_s: list[float] = field(default_factory=list)
    """Of every 200, from when it was due to its last byte."""
    ok_due_s: list[float] = field(default_factory=list)
    """Of every 200, in the order of ``ok_latencies_s``: when it was due, seconds after the
    run started (latency over time)."""
    ok_while_loaded: int = 0
    """200s answered before the load stopped: goodput is these over ``loaded_s``."""
    loaded_s: float = 0.0
    """From the first request to the moment the load stopped."""

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    @property
    def lost(self) -> int:
        """Sent and never answered: errors and unanswered together."""
        return self.sent - self.answered

    @property
    def goodput(self) -> float:
        """200s per second while the load ran."""
        return self.ok_while_loaded / self.loaded_s if self.loaded_s else 0.0

    def ok_percentile_ms(self, percent: float) -> float | None:
        """The nearest-rank percentile of the 200s' latency; None without any."""
        if not self.ok_latencies_s:
            return None
        ordered = sorted(self.ok_latencies_s)
        rank = max(1, math.ceil(percent / 100 * len(ordered)))
        return ordered[rank - 1] * 1e3


def raise_fd_limit(needed: int) -> int:
    """Raise this process's open file limit towards its hard limit (children inherit it);
    returns the soft limit now. Thousands of connections need thousands of descriptors, in
    the generator and in a server started after this, whose connection cap follows it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(soft, needed) if hard == resource.RLIM_INFINITY else min(hard, max(soft, needed))
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class _Run:
    """The state one run's connections share."""

    def __init__(self, host: str, port: int, request: Request, tally: Tally) -> None:
        self.host = host
        self.port = port
        self.wire = request.wire()
        self.tally = tally
        self.loop = asyncio.get_running_loop()
        self.loading = True
        self.finished = False
        self.in_flight = 0
        self.connections: set[_Connection] = set()
        self.opening = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.idle: list[_Connection] = []
        """Open loop: connections waiting for a request, most recently idle last."""
        self.closed_loop = False
        self.settled = asyncio.Event()
        self.started = time.perf_counter()

    async def connect(self) -> _Connection | None:
        self.opening += 1
        try:
            _, connection = await self.loop.create_connection(
                lambda: _Connection(self), self.host, self.port
            )
        except OSError as exc:
            self.opening -= 1
            self.tally.connect_errors[type(exc).__name__] += 1
            self._check_settled()
            return None
        # The caller sends on it at once, or checks whether the run has settled.
        self.opening -= 1
        return connection

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def send(self, connection: _Connection, due: float) -> None:
        self.tally.sent += 1
        self.in_flight += 1
        connection.due = due
        connection.transport.write(self.wire)

    def answered(self, connection: _Connection, status: int, closing: bool) -> None:
        now = time.perf_counter()
        due = connection.due
        assert due is not None
        connection.due = None
        self.in_flight -= 1
        self.tally.statuses[status] += 1
        if status == 200:
            self.tally.ok_latencies_s.append(now - due)
            self.tally.ok_due_s.append(due - self.started)
            if self.loading:
                self.tally.ok_while_loaded += 1
        if closing:
            connection.transport.close()
        elif self.closed_loop:
            if self.loading:
                self.send(connection, now)
        else:
            connection.idle_since = now
            self.idle.append(connection)
        self._check_settled()

    def failed(self, connection: _Connection, kind: str) -> None:
        """The connection ended, or broke the protocol, with its request unanswered."""
        if connection.due is not None and not self.finished:
            connection.due = None
            self.in_flight -= 1
            self.tally.errors[kind] += 1
        connection.transport.close()

    def lost_connection(self, connection: _Connection) -> None:
        self.connections.discard(connection)
        if self.closed_loop and self.loading and not self.finished:
            self.spawn(self._replace())
        self._check_settled()

    async def _replace(self) -> None:
        connection = await self.connect()
        if connection is not None and self.loading:
            self.send(connection, time.perf_counter())
        else:
            self._check_settled()

    def take_idle(self) -> _Connection | None:
        """The most recently idle connection that is still fresh; stale ones are closed."""
        while self.idle:
            connection = self.idle.pop()
            if connection.transport.is_closing():
                continue
            if time.perf_counter() - connection.idle_since > IDLE_REUSE_S:
                # Everything under it in the stack has been idle longer still.
                for stale in (connection, *self.idle):
                    stale.transport.close()
                self.idle.clear()
                return None
            return connection
        return None

    def stop_loading(self) -> None:
        self.loading = False
        self.tally.ok_while_loaded = self.tally.statuses[200]
        self._check_settled()

    def _check_settled(self) -> None:
        if not self.loading and self.in_flight == 0 and not self.opening:
            self.settled.set()

    async def finish(self, drain_s: float) -> None:
        """Wait for the requests in flight, then close everything."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.settled.wait(), drain_s)
        self.finished = True
        self.tally.unanswered = self.in_flight
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for connection in list(self.connections):
            connection.transport.close()
        # Let the transports deliver connection_lost before the loop may close.
        await asyncio.sleep(0)


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.Transport
        self.due: float | None = None
        """When the request in flight fell due; None while idle."""
        self.idle_since = 0.0
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.run.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.due is None:
            self.run.tally.unsolicited += 1
            self.transport.close()
            return
        buffer = self.buffer
        buffer += data
        end_of_head = buffer.find(b"\r\n\r\n")
        if end_of_head < 0:
            return
        head = bytes(buffer[:end_of_head])
        length = _CONTENT_LENGTH.search(head)
        if not head.startswith(b"HTTP/1.") or length is None:
            self.run.failed(self, "malformed response")
            return
        end = end_of_head + 4 + int(length.group(1))
        if len(buffer) < end:
            return
        closing = _CONNECTION_CLOSE.search(head) is not None
        if len(buffer) > end:
            self.run.tally.unsolicited += 1
            closing = True
        buffer.clear()
        self.run.answered(self, int(head[9:12]), closing)

    def connection_lost(self, exc: Exception | None) -> None:
        kind = "closed without an answer" if exc is None else type(exc).__name__
        self.run.failed(self, kind)
        self.run.lost_connection(self)


async def closed_loop(
    host: str,
    port: int,
    request: Request,
    connections: int,
    stop: asyncio.Event,
    *,
    tally: Tally | None = None,
    drain_s: float = DRAIN_S,
) -> Tally:
    """``connections`` clients, each sending ``request`` again as soon as it is answered,
    until ``stop`` is set; then the requests in flight are waited for."""
    tally = tally if tally is not None else Tally()
    run = _Run(host, port, request, tally)
    run.closed_loop = True
    opened: list[_Connection] = []
    for start in range(0, connections, CONNECT_AT_ONCE):
        batch = min(CONNECT_AT_ONCE, connections - start)
        results = await asyncio.gather(*(run.connect() for _ in range(batch)))
        opened += [connection for connection in results if connection is not None]
    started = time.perf_counter()
    for connection in opened:
        run.send(connection, started)
    await stop.wait()
    tally.loaded_s = time.perf_counter() - started
    run.stop_loading()
    await run.finish(drain_s)
    return tally


async def open_loop(
    host: str,
    port: int,
    request: Request,
    rate: float,
    max_connections: int,
    stop: asyncio.Event,
    *,
    tally: Tally | None = None,
    drain_s: float = DRAIN_S,
) -> Tally:
    """``request`` sent ``rate`` times a second, whatever the answers, until ``stop`` is
    set; then the requests in flight are waited for."""
    if not rate > 0:
        raise ValueError(f"an open loop needs a rate above 0, got {rate}")
    due = (scheduled / rate for scheduled in itertools.count())
    return await _paced(host, port, request, due, max_connections, stop, tally, drain_s)


async def trace_loop(
    host: str,
    port: int,
    request: Request,
    due_s: Iterable[float],
    max_connections: int,
    *,
    tally: Tally | None = None,
    drain_s: float = DRAIN_S,
) -> Tally:
    """``request`` sent at each of ``due_s`` (seconds from the start, ascending), whatever
    the answers; then the requests in flight are waited for."""
    stop = asyncio.Event()  # never set: the trace ends the run
    return await _paced(host, port, request, iter(due_s), max_connections, stop, tally, drain_s)


async def _paced(
    host: str,
    port: int,
    request: Request,
    due_s: Iterator[float],
    max_connections: int,
    stop: asyncio.Event,
    tally: Tally | None,
    drain_s: float,
) -> Tally:
    """The open loop: each request of ``due_s`` goes out when due, until the times run out
    or ``stop`` is set."""
    tally = tally if tally is not None else Tally()
    run = _Run(host, port, request, tally)
    started = run.started

    async def send_on_new(due: float) -> None:
        connection = await run.connect()
        if connection is not None:
            run.send(connection, due)

    next_s = next(due_s, None)
    while next_s is not None and not stop.is_set():
        now = time.perf_counter()
        while next_s is not None and started + next_s <= now:
            due = started + next_s
            next_s = next(due_s, None)
            connection = run.take_idle()
            if connection is not None:
                run.send(connection, due)
            elif len(run.connections) + run.opening < max_connections:
                run.spawn(send_on_new(due))
            else:
                tally.missed += 1
        if next_s is not None:
            await asyncio.sleep(min(STOP_POLL_S, max(0.0, started + next_s - time.perf_counter())))
    tally.loaded_s = time.perf_counter() - started
    run.stop_loading()
    await run.finish(drain_s)
    return tally


def stop_after(seconds: float) -> asyncio.Event:
    """An event set ``seconds`` from now, on the running loop."""
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    return stop
