"""The HTTP edge: the limits and timeouts a client meets before the app sees its request.

``uvicorn_options(limits)`` gives a ``uvicorn.Config`` everything below, all of it enforced
by ``EdgeProtocol``, a subclass of uvicorn's httptools protocol (and ``FreshConnection``
before a connection's first bytes), because neither uvicorn nor httptools offers it:
httptools has no header size limit (it joins a header value by concatenation, so a 100 MB
header held the event loop for 20 s), uvicorn has no header or body read timeout, never
times out a connection that sends nothing, has no connection cap, and its
``limit_concurrency`` counts idle connections as load and answers in plain text (so it is
left off). h11 is not used: its ``h11_max_incomplete_event_size`` is its only limit, it
would need the same subclass for the rest, and it parses at about half httptools' speed.

Per connection, as bytes arrive: the bytes of the request head are counted per read (an
upper bound: a read that starts a request may end the previous one), header fields and URL
bytes in the parser's callbacks (431, 414); the body is counted as it is parsed, against 1
MiB on every route and ``max_infer_body_bytes`` on paths ending in ``/infer`` (a path that
ends so but is no route is answered 404 unread, so its larger allowance holds no memory),
and a declared Content-Length over the limit is refused before any body is read (413).
A refusal writes the JSON answer, half-closes, and reads and discards what the client still
sends for up to ``LINGER_S`` (at most ``LINGER_BYTES``) so that the answer is not lost to a
reset: closing a socket with unread input sends RST. A refusal for size (413, 414, 431) first
waits ``oversize_answer_delay_s``, reading nothing: a client that streams oversized requests
and reconnects as soon as it is refused cost 1 to 6 ms of the gateway's CPU per refusal, at
hundreds a second (measured under ``loadtests.hostile``: 100 MiB headers took 70 % of the
gateway's core, 250 MiB bodies 60 %; with the wait, 0.5 % and 1.2 %).

The app wakes for a request's body once it is whole or past uvicorn's high-water mark, not
for every read as in uvicorn, so that a trickled body costs a read per piece, not also a
task switch.

Timeouts: a connection is idle from its opening and from the end of each response, and is
closed after ``keep_alive_timeout_s`` by its server's ``sweep``, every ``SWEEP_S``, a few at
a time (uvicorn's keep-alive timer, one per connection armed at each response and cancelled
at the next request, is not used). A request whose head or body is still incomplete when a
read ends gets one timer; when it fires, the head must be complete (``header_timeout_s``
from its first read) and the body must have reached its pace (``body_timeout_s`` plus one
second per ``body_min_rate`` bytes), else 408. While uvicorn has paused reading because the
app has not taken the body yet, the client is not blamed. Each timer first fires at a random
point between its timeout and ``TIMEOUT_SPREAD`` times it: a thousand slow clients that
connected together would otherwise be refused and come back all in one instant (normal
traffic's p99 went to 3.1x unloaded at that instant, under ``loadtests.hostile``'s
slowloris).

Connections: a new connection is a ``FreshConnection`` (a place under the cap and in the
idle list, no timer of its own) until its first bytes, when it becomes an ``EdgeProtocol``:
an idle flood's connections never pay for uvicorn's protocol, nor for a timer each. Measured
with connections opened and closed by a client that sends nothing, server CPU per
connection: 68-70 µs with uvicorn's protocol, 28-38 µs with a fresh connection's; a
connection that sends one request pays for the switch within the noise (217-287 µs before,
250-293 after; a loaded machine, ``/v2/health/live`` of ``bazaar serve``). Idle connections
are kept in one ``OrderedDict`` per server, idlest first, so that at ``max_connections`` a new
connection closes the idlest in O(1); with none idle the new one is closed (the cap stays
below the file descriptor limit, where accepting fails for every client). Requests: past
``max_concurrent_requests`` in progress the app is not called, 503.

Cost on the hot path: a request whose head and body arrive in one read (every small inference
request) arms no timer and reads no clock; it pays a few attribute writes and compares in the
callbacks and a dict insert and pop per keep-alive cycle. Measured: server CPU per
keep-alive ``POST`` of a 60-byte body to a trivial app, 20,000 requests one at a time over a
raw socket, best of three, three runs each: 55-64 µs with uvicorn's protocol, 62-68 µs with
this one (about 4 µs more, within the noise of one run; under 2% of the gateway's 250 µs
per request at 4,000 req/s on one core).
"""

from __future__ import annotations

import asyncio
import http
import itertools
import logging
import random
import resource
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar, cast

import httptools
import orjson
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from protocol.limits import EdgeLimits

log = logging.getLogger(__name__)

LINGER_S = 2.0
"""After a refusal, how long what the client still sends is read and discarded."""
LINGER_BYTES = 1024 * 1024
"""... and how much of it, at most; then reading stops until the connection closes."""
RETRY_AFTER_S = 1
"""The Retry-After of a 503 past the concurrent request cap."""
MIN_IDLE_TO_CLOSE_S = 1.0
"""At the connection cap, the least time a keep-alive connection must have been idle to be
closed for a new one. A client between two requests may already have sent the next one,
unread yet under load; closing its connection would lose that request unanswered."""
ON_DISCONNECT = "bazaar.on_disconnect"
"""The scope key under which an app may leave a callable that the edge calls when the
connection is lost before the response is complete: how a handler learns that its client
left without listening on ``receive`` (a second task per request, which costs throughput)."""

OVERSIZE = frozenset((413, 414, 431))
"""Refusals of a request larger than a limit: their answers wait ``oversize_answer_delay_s``."""

SWEEP_S = 0.02
"""How often a server closes its connections idle past the keep-alive timeout (one timer per
server, not one per connection). Often, so that each sweep has few to close: a connection
accepted and closed costs the server's core about 55 µs, the kernel's part included, and
under an idle flood's 2,000 connections a second a sweep every 0.25 s closed 300 to 700 at
once and held the event loop 35 to 85 ms."""

SWEEP_BATCH = 32
"""The most connections one sweep closes (under 2 ms of the loop). When more are due, the next
sweep comes at the loop's next turn, after the I/O that is ready: a loop held for a while (a
large body decoded) does not then close everything that expired meanwhile in one go."""

TIMEOUT_SPREAD = 1.5
"""A header or body timer first fires between its timeout and this many times it."""

_IDLE, _HEAD, _BODY, _DONE = range(4)
"""Where a connection is in its current request: none yet, head, body, all read."""


def uvicorn_options(limits: EdgeLimits) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments enforcing ``limits`` (one call per server)."""
    return {
        "http": edge_protocol(limits),
        "limit_concurrency": None,
    }


def edge_protocol(limits: EdgeLimits) -> type[FreshConnection]:
    """The protocol class for one server's new connections: each becomes an ``EdgeProtocol``
    class of that server's own (which holds its idle connections) at its first bytes."""
    cap = connection_cap(limits.max_connections, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    if cap < limits.max_connections:
        log.warning(
            "max connections %d lowered to %d: three quarters of the file descriptor limit",
            limits.max_connections,
            cap,
        )

    class ServerEdgeProtocol(EdgeProtocol):
        pass

    ServerEdgeProtocol.limits = limits
    ServerEdgeProtocol.max_connections = cap
    ServerEdgeProtocol.idle = OrderedDict()

    class ServerFreshConnection(FreshConnection):
        __slots__ = ()

    ServerFreshConnection.edge = ServerEdgeProtocol
    return ServerFreshConnection


def connection_cap(max_connections: int, fd_limit: int) -> int:
    """The connection cap under a file descriptor limit: a quarter of the descriptors stay
    for the process's own (pod connections, logs, models)."""
    if fd_limit == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, fd_limit * 3 // 4))


def json_answer(status: int, message: str, headers: tuple[str, ...] = ()) -> bytes:
    """A whole ``{"error": message}`` response that closes the connection."""
    body = orjson.dumps({"error": message})
    head = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *headers,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def overloaded(scope: Scope, receive: Receive, send: Send) -> None:
    """The app past the concurrent request cap."""
    body = orjson.dumps({"error": "too many requests in progress; retry later"})
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(RETRY_AFTER_S).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _Refused(Exception):
    """Raised in a parser callback to stop parsing; the refusal is on the protocol."""


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the edge's limits (see the module docstring)."""

    limits: ClassVar[EdgeLimits] = EdgeLimits()
    max_connections: ClassVar[int] = EdgeLimits().max_connections
    idle: ClassVar[OrderedDict[EdgeProtocol | FreshConnection, float]] = OrderedDict()
    """The server's idle connections, idlest first, with when each became idle. Ordered, not
    a dict: connections leave it mostly from the front, and a dict's first item is found by
    stepping over every removed one (10 µs per new connection at the cap, 0.9 here)."""
    sweeping: ClassVar[asyncio.AbstractEventLoop | None] = None
    """The loop on which ``sweep`` will next look at ``idle``; None while nothing is idle."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.served_app = self.app
        self._phase = _IDLE
        self._head_bytes = 0
        self._header_count = 0
        self._declared_length: bytes | None = None
        self._body_limit = 0
        self._body_bytes = 0
        self._body_started: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str] | None = None
        self._refused = False
        self._discarded = 0

    # Connection events

    def connection_lost(self, exc: Exception | None) -> None:
        self.idle.pop(self, None)
        self._cancel_timer()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            on_disconnect = cast("Callable[[], None] | None", cycle.scope.get(ON_DISCONNECT))
            if on_disconnect is not None:
                on_disconnect()
        super().connection_lost(exc)

    def eof_received(self) -> None:
        if self._refused:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._discard(len(data))
            return
        self._unset_keepalive_if_required()
        self.idle.pop(self, None)
        before = self._phase
        if before == _HEAD:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            if self._refusal is None:
                self._refusal = (400, f"invalid HTTP request: {exc}")
        if self._refusal is not None:
            self._refuse(*self._refusal)
            return
        phase = self._phase
        if phase == _HEAD:
            if before != _HEAD:
                self._head_bytes = len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                limit = self.limits.max_header_bytes
                self._refuse(431, f"request headers are larger than the limit of {limit} bytes")
            elif self._timer is None:
                self._arm(spread(self.limits.header_timeout_s))
        elif phase == _BODY:
            if self._body_started is None:
                self._body_started = self.loop.time()
            if self._timer is None:
                self._arm(spread(self.limits.body_timeout_s))
        elif (self.cycle is None or self.cycle.response_complete) and not self.pipeline:
            # Bytes that began no request (blank lines): still idle.
            self._become_idle()

    def on_response_complete(self) -> None:
        # uvicorn's, but an idle connection joins the idle list instead of getting a keep-alive
        # timer of its own: ``sweep`` closes it, as it closes fresh ones.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._become_idle()

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = _HEAD
        self._header_count = 0
        self._declared_length = None
        self._body_bytes = 0
        self._body_started = None

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_url_bytes:
            self._stop(
                414, f"the URL is longer than the limit of {self.limits.max_url_bytes} bytes"
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._stop(431, f"more header fields than the limit of {self.limits.max_headers}")
        name = name.lower()
        if name == b"content-length":
            self._declared_length = value
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        infer = self.url.partition(b"?")[0].endswith(b"/infer")
        limit = self.limits.max_infer_body_bytes if infer else self.limits.max_body_bytes
        self._body_limit = limit
        if self._declared_length is not None and int(self._declared_length) > limit:
            self._stop(413, f"request body is larger than the limit of {limit} bytes")
        if len(self.tasks) >= self.limits.max_concurrent_requests:
            self.app = overloaded
        else:
            self.app = self.served_app
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._body_limit:
            self._stop(413, f"request body is larger than the limit of {self._body_limit} bytes")
        cycle = self.cycle
        if cycle.response_complete or (self.parser.should_upgrade() and self._should_upgrade()):
            return
        cycle.body += body
        # The app wakes for the whole body (on_message_complete) or a high-water mark of it,
        # not for every read as in uvicorn: a body trickled a byte at a time costs a read.
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
            cycle.message_event.set()

    def on_message_complete(self) -> None:
        self._phase = _DONE
        if self._timer is not None:
            self._cancel_timer()
        super().on_message_complete()

    # The edge's own

    def _stop(self, status: int, message: str) -> None:
        self._refusal = (status, message)
        raise _Refused(message)

    def _become_idle(self) -> None:
        self.idle[self] = self.loop.time()
        sweep_soon(type(self), self.loop)

    def _arm(self, delay_s: float) -> None:
        self._timer = self.loop.call_later(delay_s, self._deadline_passed)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _deadline_passed(self) -> None:
        self._timer = None
        if self._refused or self.transport.is_closing():
            return
        if self._phase == _HEAD:
            timeout = self.limits.header_timeout_s
            self._refuse(408, f"request headers did not arrive within {timeout} s")
        elif self._phase == _BODY:
            if self.flow.read_paused:  # the app has not taken what arrived: not the client's fault
                self._arm(self.limits.body_timeout_s)
                return
            assert self._body_started is not None
            limits = self.limits
            due = (
                self._body_started + limits.body_timeout_s + self._body_bytes / limits.body_min_rate
            )
            now = self.loop.time()
            if now < due:
                self._arm(due - now)
            else:
                self._refuse(408, "request body did not arrive in time")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` (unless a response has begun; an oversized request's answer
        after ``oversize_answer_delay_s``, unread meanwhile), half-close, linger, close."""
        log.debug("%s: %d %s", self.client, status, message)
        self._refused = True
        self._cancel_timer()
        self._unset_keepalive_if_required()
        self.idle.pop(self, None)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:
                self.transport.close()
                return
            # The app's receive now reports a disconnect, and what it sends is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        answer = json_answer(status, message)
        delay_s = self.limits.oversize_answer_delay_s
        if status in OVERSIZE and delay_s > 0:
            self.flow.pause_reading()
            self._timer = self.loop.call_later(delay_s, self._answer, answer)
        else:
            self._answer(answer)

    def _answer(self, answer: bytes) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        self.transport.write(answer)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(LINGER_S, self.transport.close)

    def _discard(self, size: int) -> None:
        self._discarded += size
        if self._discarded > LINGER_BYTES:
            self.transport.pause_reading()


class FreshConnection(asyncio.Protocol):
    """A connection that has sent nothing yet. It holds its place under the connection cap
    and in the server's idle list (``sweep`` closes it after the keep-alive timeout), and
    becomes the server's ``EdgeProtocol`` at its first bytes:
    uvicorn's protocol costs about half of a gateway's CPU per connection (its parser, flow
    control, loggers and addresses) and a connection that never sends (an idle flood) would
    pay it for nothing."""

    # Slots, no timer of its own (``sweep``) and no arguments of its own: what the collector
    # tracks per connection is what an idle flood of 10,000 connections makes it walk, 10
    # objects with a dict, a timer and uvicorn's arguments, 5 now (this, and uvloop's
    # transport, weak reference, buffer and bound data_received).
    __slots__ = ("transport",)

    edge: ClassVar[type[EdgeProtocol]] = EdgeProtocol
    uvicorn_arguments: ClassVar[dict[str, Any]] = {}
    """What uvicorn gives each new connection (its config, the server's state, the lifespan's
    state): the same for every connection of a server, so held by the server's class, from
    its first connection."""

    def __init__(self, **uvicorn_arguments: Any) -> None:
        cls = type(self)
        if cls.uvicorn_arguments.get("server_state") is not uvicorn_arguments["server_state"]:
            cls.uvicorn_arguments = uvicorn_arguments
        self.transport: asyncio.Transport

    @property
    def connections(self) -> set[Any]:
        return cast("set[Any]", self.uvicorn_arguments["server_state"].connections)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)
        connections, edge = self.connections, self.edge
        connections.add(self)
        loop = asyncio.get_running_loop()
        if len(connections) > edge.max_connections and not close_idlest(edge.idle, loop.time()):
            log.warning("connection cap (%d) reached with no idle connection", edge.max_connections)
            transport.close()
            return
        edge.idle[self] = loop.time()
        sweep_soon(edge, loop)

    def data_received(self, data: bytes) -> None:
        self._leave()
        protocol = self.edge(**self.uvicorn_arguments)
        protocol.connection_made(self.transport)
        self.transport.set_protocol(protocol)
        protocol.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: nothing is in progress here."""
        self.transport.close()

    def _leave(self) -> None:
        self.connections.discard(self)
        self.edge.idle.pop(self, None)


def sweep_soon(edge: type[EdgeProtocol], loop: asyncio.AbstractEventLoop) -> None:
    """Have the server's ``sweep`` look at its idle list, unless it is already due to."""
    if edge.sweeping is not loop:
        edge.sweeping = loop
        loop.call_later(SWEEP_S, sweep, edge, loop)


def sweep(edge: type[EdgeProtocol], loop: asyncio.AbstractEventLoop) -> None:
    """Close up to ``SWEEP_BATCH`` of the server's connections idle for its keep-alive
    timeout; come back at the loop's next turn if that many were due, else in ``SWEEP_S``
    while any connection is idle."""
    idle, before = edge.idle, loop.time() - edge.limits.keep_alive_timeout_s
    due = itertools.takewhile(lambda item: item[1] <= before, idle.items())
    expired = [connection for connection, _ in itertools.islice(due, SWEEP_BATCH)]
    for connection in expired:
        del idle[connection]
        connection.transport.close()
    if len(expired) == SWEEP_BATCH:
        loop.call_soon(sweep, edge, loop)
    elif idle:
        loop.call_later(SWEEP_S, sweep, edge, loop)
    else:
        edge.sweeping = None


def spread(timeout_s: float) -> float:
    """A moment between ``timeout_s`` and ``TIMEOUT_SPREAD`` times it, at random."""
    return timeout_s * random.uniform(1.0, TIMEOUT_SPREAD)


def close_idlest(idle: OrderedDict[EdgeProtocol | FreshConnection, float], now: float) -> bool:
    """Close the connection idle longest, if it has been idle long enough to be closed."""
    while idle:
        idlest, since = next(iter(idle.items()))
        if now - since < MIN_IDLE_TO_CLOSE_S:
            return False
        del idle[idlest]
        if not idlest.transport.is_closing():
            idlest.transport.close()
            return True
    return False
