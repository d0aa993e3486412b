"""The HTTP edge on a real uvicorn: every limit answers its JSON error, the hot path stays whole."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from protocol.edge import (
    MIN_IDLE_TO_CLOSE_S,
    SWEEP_BATCH,
    EdgeProtocol,
    connection_cap,
    uvicorn_options,
)
from protocol.errors import ConfigError
from protocol.fastpath import Answer, Headers, with_infer_route
from protocol.limits import EdgeLimits
from protocol.support import free_port
from tests.support import wait_until

RELEASE = threading.Event()
HELD: list[None] = []
"""One entry per ``/hold`` request waiting for ``RELEASE``."""


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the whole body and answers its size; ``/hold`` waits for ``RELEASE`` first."""
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    if scope["path"] == "/hold":
        HELD.append(None)
        await asyncio.to_thread(RELEASE.wait, 10)
    body = json.dumps({"size": size}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


EMPTY_BODY = [(b"content-length", b"0")]
TIMER_GRAIN_S = 0.002
"""How early against ``time.monotonic`` a server timer may fire: uvloop's clock counts whole
milliseconds (one suite run saw a 0.25 s wait end after 0.24995 s)."""


@contextlib.contextmanager
def edge_server(limits: EdgeLimits, served: ASGIApp = app) -> Iterator[int]:
    """A uvicorn server with ``limits`` in a thread of its own; yields its port."""
    with running_edge_server(limits, served) as server:
        yield server.config.port


@contextlib.contextmanager
def running_edge_server(limits: EdgeLimits, served: ASGIApp = app) -> Iterator[uvicorn.Server]:
    """``edge_server``, yielding the server itself."""
    config = uvicorn.Config(
        served, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="off",
        **uvicorn_options(limits),
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 10, "the edge server to start")
    try:
        yield server
    finally:
        RELEASE.set()
        server.should_exit = True
        thread.join(10)
        RELEASE.clear()
        HELD.clear()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def read_response(sock: socket.socket, timeout_s: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One response (status, headers, body) with a Content-Length; fails past the timeout.
    Bytes past it are dropped: for one answer per read, not pipelined ones."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed without an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    headers = {name.lower(): value for name, value in headers.items()}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the peer closes within the timeout (whatever it sends first is skipped)."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def get(port: int, path: str = "/") -> int:
    with connect(port) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return read_response(sock)[0]


def test_a_header_section_over_the_limit_is_answered_431_as_it_streams() -> None:
    limits = EdgeLimits(max_header_bytes=4096, oversize_answer_delay_s=0)
    with edge_server(limits) as port, connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        while not ready(sock):
            assert sent < 1024 * 1024, "no answer after 1 MiB of header"
            sock.sendall(b"a" * 1024)
            sent += 1024
            time.sleep(0.001)
        assert get(port) == 200  # another client is served meanwhile
        status, _, body = read_response(sock)
        assert status == 431
        assert (
            json.loads(body)["error"] == "request headers are larger than the limit of 4096 bytes"
        )


def test_a_client_that_sends_oversized_requests_in_a_loop_gets_one_answer_per_delay() -> None:
    """Each oversized request's answer waits the delay, its connection unread: a client that
    streams huge headers and reconnects as soon as it is refused (two did so 740 times a
    second without the delay) is held to one refusal per delay."""
    delay_s, window_s = 0.25, 1.5
    limits = EdgeLimits(max_header_bytes=4096, oversize_answer_delay_s=delay_s)
    waits: list[float] = []
    with edge_server(limits) as port:
        started = time.monotonic()
        while time.monotonic() - started < window_s:
            with connect(port) as sock:
                sent = time.monotonic()  # before: the server may refuse before sendall returns
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192)
                status, _, _ = read_response(sock)
                waits.append(time.monotonic() - sent)
            assert status == 431
        assert get(port) == 200  # a request within the limits is answered at once
    assert min(waits) >= delay_s - TIMER_GRAIN_S
    assert len(waits) <= window_s / delay_s + 1


def ready(sock: socket.socket) -> bool:
    """Whether the server has answered (or closed) yet."""
    return bool(select.select([sock], [], [], 0)[0])


def test_too_many_header_fields_are_answered_431() -> None:
    with edge_server(EdgeLimits(max_headers=10)) as port, connect(port) as sock:
        fields = "".join(f"X-{i}: v\r\n" for i in range(11))
        sock.sendall(f"GET / HTTP/1.1\r\nHost: x\r\n{fields}\r\n".encode())
        status, headers, body = read_response(sock)
    assert (status, headers["content-type"]) == (431, "application/json")
    assert json.loads(body)["error"] == "more header fields than the limit of 10"


def test_a_long_url_is_answered_414_in_json() -> None:
    with edge_server(EdgeLimits()) as port, connect(port) as sock:
        sock.sendall(b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = read_response(sock)
    assert status == 414
    assert json.loads(body) == {"error": "the URL is longer than the limit of 8192 bytes"}


def test_an_invalid_request_is_answered_400_in_json() -> None:
    with edge_server(EdgeLimits()) as port, connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
        status, _, body = read_response(sock)
    assert status == 400
    assert json.loads(body)["error"].startswith("invalid HTTP request")


@pytest.mark.parametrize(
    "path,limit", [("/v2/repository/index", 1000), ("/v2/models/m/infer", 5000)]
)
def test_a_declared_body_over_the_route_limit_is_refused_before_it_is_sent(
    path: str, limit: int
) -> None:
    limits = EdgeLimits(max_body_bytes=1000, max_infer_body_bytes=5000)
    with edge_server(limits) as port, connect(port) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {limit + 1}\r\n\r\n".encode()
        )
        status, headers, body = read_response(sock)
        assert (status, headers["connection"]) == (413, "close")
        assert (
            json.loads(body)["error"] == f"request body is larger than the limit of {limit} bytes"
        )
        assert closed(sock, 5)


def test_a_body_at_the_route_limit_is_served() -> None:
    with edge_server(EdgeLimits(max_body_bytes=1000)) as port, connect(port) as sock:
        sock.sendall(b"POST /any HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000)
        status, _, body = read_response(sock)
    assert (status, json.loads(body)) == (200, {"size": 1000})


def test_a_chunked_body_is_refused_413_as_soon_as_it_passes_the_limit() -> None:
    limits = EdgeLimits(max_body_bytes=100_000, oversize_answer_delay_s=0)
    with edge_server(limits) as port, connect(port) as sock:
        sock.sendall(b"POST /any HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        sent = 0
        while not ready(sock):
            assert sent < 1024 * 1024, "no answer after ten times the limit"
            sock.sendall(b"2000\r\n" + b"x" * 0x2000 + b"\r\n")
            sent += 0x2000
            time.sleep(0.001)
        status, _, _ = read_response(sock)
    assert status == 413
    assert sent < 1024 * 1024


def test_a_slow_header_section_is_answered_408() -> None:
    with edge_server(EdgeLimits(header_timeout_s=0.5)) as port, connect(port) as sock:
        started = time.monotonic()
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\n":
            if ready(sock):
                break
            sock.sendall(bytes([byte]))
            time.sleep(0.05)
        status, _, body = read_response(sock)
        assert status == 408
        assert "headers did not arrive within 0.5 s" in json.loads(body)["error"]
        assert 0.5 <= time.monotonic() - started < 3


def test_slow_clients_that_came_together_are_not_all_timed_out_at_once() -> None:
    """Each header timer fires between the timeout and 1.5 times it, at random: slow clients
    that connected together are refused, and come back, spread out, not in one instant."""
    timeout_s = 0.4
    with edge_server(EdgeLimits(header_timeout_s=timeout_s)) as port:
        socks = [connect(port) for _ in range(20)]
        sent = {}
        for sock in socks:
            sent[sock] = time.monotonic()
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        waits = []
        pending = set(socks)
        while pending:
            readable, _, _ = select.select(list(pending), [], [], 5)
            assert readable, "slow clients were never timed out"
            for sock in readable:
                waits.append(time.monotonic() - sent[sock])
                pending.discard(sock)
        for sock in socks:
            assert read_response(sock)[0] == 408
            sock.close()
    assert min(waits) >= timeout_s - TIMER_GRAIN_S
    assert max(waits) - min(waits) > timeout_s / 8


def test_a_slow_body_is_answered_408() -> None:
    limits = EdgeLimits(body_timeout_s=0.5, body_min_rate=1000)
    with edge_server(limits) as port, connect(port) as sock:
        sock.sendall(b"POST /any HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        started = time.monotonic()
        while not ready(sock):
            assert time.monotonic() - started < 3, "the slow body was never timed out"
            sock.sendall(b"x")
            time.sleep(0.05)
        status, _, body = read_response(sock)
    assert (status, json.loads(body)) == (408, {"error": "request body did not arrive in time"})


def test_a_body_that_keeps_its_pace_is_served_past_the_timeout() -> None:
    limits = EdgeLimits(body_timeout_s=0.3, body_min_rate=1000)
    with edge_server(limits) as port, connect(port) as sock:
        sock.sendall(b"POST /any HTTP/1.1\r\nHost: x\r\nContent-Length: 600\r\n\r\n")
        for _ in range(6):  # 100 bytes every 0.05 s: 2,000 bytes/s
            sock.sendall(b"x" * 100)
            time.sleep(0.05)
        status, _, body = read_response(sock)
    assert (status, json.loads(body)) == (200, {"size": 600})


def test_a_body_that_arrives_in_pieces_wakes_the_app_once() -> None:
    """The app wakes for the whole body, not for every read (uvicorn's way): a body trickled a
    byte at a time costs the server a read per byte, not also a task switch."""
    messages: list[bytes] = []

    async def counting(scope: Scope, receive: Receive, send: Send) -> None:
        more = True
        while more:
            message = await receive()
            messages.append(message.get("body", b""))
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": EMPTY_BODY})
        await send({"type": "http.response.body", "body": b""})

    with edge_server(EdgeLimits(), counting) as port, connect(port) as sock:
        sock.sendall(b"POST /any HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        for byte in b"abcde":
            sock.sendall(bytes([byte]))
            time.sleep(0.02)  # each byte its own read
        status, _, _ = read_response(sock)
    assert status == 200
    assert messages == [b"abcde"]


def test_a_connection_that_sends_nothing_is_closed_after_the_keep_alive_timeout() -> None:
    with edge_server(EdgeLimits(keep_alive_timeout_s=0.3)) as port, connect(port) as sock:
        assert closed(sock, 3)


def test_a_connection_idle_after_its_response_is_closed_after_the_keep_alive_timeout() -> None:
    with edge_server(EdgeLimits(keep_alive_timeout_s=0.3)) as port, connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
        assert closed(sock, 3)


def test_a_connection_idle_between_requests_holds_no_timer() -> None:
    # The sweep closes every connection idle past the keep-alive timeout; uvicorn's own timer
    # on top of it cost each response a timer armed and each next request one cancelled.
    count = 50
    with running_edge_server(EdgeLimits(keep_alive_timeout_s=60)) as server:
        clients = [connect(server.config.port) for _ in range(count)]
        try:
            for sock in clients:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_response(sock)[0] == 200
            timers = sum(type(o).__name__ == "TimerHandle" for o in gc.get_objects())
        finally:
            for sock in clients:
                sock.close()
    assert timers < count / 2, f"{timers} timers for {count} idle connections"


def test_a_connection_costs_no_http_protocol_until_it_sends() -> None:
    # An idle flood (connections that never send) paid uvicorn's protocol for each: half of
    # the server's CPU per connection, and the benchmark's worst p99 under hostile clients.
    with running_edge_server(EdgeLimits(keep_alive_timeout_s=60)) as server:
        port, connections = server.config.port, server.server_state.connections
        idle = [connect(port) for _ in range(20)]
        try:
            wait_until(lambda: len(connections) == 20, 5, "the server to accept all 20")
            assert not any(isinstance(c, EdgeProtocol) for c in list(connections))
            idle[0].sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
            status, _, body = read_response(idle[0])
            assert (status, json.loads(body)) == (200, {"size": 3})
            assert sum(isinstance(c, EdgeProtocol) for c in list(connections)) == 1
        finally:
            for sock in idle:
                sock.close()
        wait_until(lambda: not connections, 5, "every closed connection to leave the server")


def test_a_connection_that_sends_nothing_leaves_the_collector_little_to_walk() -> None:
    # Under the idle flood, a connection's timer (a TimerHandle, its libuv timer, a context, a
    # bound method and an argument list), its __dict__ and its copy of uvicorn's arguments
    # made 10 tracked objects of 5; closing old ones while new ones opened left the young
    # generation's count near zero, so tens of thousands piled up there and one young
    # collection took 12 ms of the loop.
    count = 400
    with running_edge_server(EdgeLimits(keep_alive_timeout_s=60)) as server:
        clients = [socket.socket() for _ in range(count)]
        try:
            gc.collect()
            before = len(gc.get_objects())
            for sock in clients:
                sock.connect(("127.0.0.1", server.config.port))
            wait_until(lambda: len(server.server_state.connections) == count, 5, "all accepted")
            gc.collect()
            per_connection = (len(gc.get_objects()) - before) / count
        finally:
            for sock in clients:
                sock.close()
    assert per_connection < 6, f"{per_connection:.1f} tracked objects per idle connection"


def test_connections_that_expire_together_are_closed_a_few_at_a_time() -> None:
    # A sweep every 0.25 s that closed all it found due closed 300 to 700 connections of an
    # idle flood at once, and held the gateway's event loop 35 to 85 ms doing so.
    count = 200
    with running_edge_server(EdgeLimits(keep_alive_timeout_s=1)) as server:
        connections = server.server_state.connections
        loop = server.servers[0].get_loop()
        open_per_turn: list[int] = []

        def watch() -> None:  # once per turn of the server's loop
            open_per_turn.append(len(connections))
            if connections:
                loop.call_soon(watch)

        clients = [connect(server.config.port) for _ in range(count)]
        try:
            wait_until(lambda: len(connections) == count, 5, "all accepted")
            loop.call_soon_threadsafe(watch)
            wait_until(lambda: not connections, 5, "every idle connection to be closed")
        finally:
            for sock in clients:
                sock.close()
    closed_per_turn = [a - b for a, b in itertools.pairwise(open_per_turn)]
    assert open_per_turn[0] == count
    assert max(closed_per_turn) <= SWEEP_BATCH, f"{max(closed_per_turn)} closed in one turn"


def test_at_the_connection_cap_the_idlest_connections_make_room() -> None:
    with edge_server(EdgeLimits(max_connections=10, keep_alive_timeout_s=60)) as port:
        idle = [connect(port) for _ in range(10)]
        try:
            fresh = connect(port)  # the others have just become idle: this one gives way
            wait_until(lambda: closed(fresh, 0.01), 5, "the new connection to be closed")
            fresh.close()
            time.sleep(MIN_IDLE_TO_CLOSE_S)  # now they have been idle long enough to go
            idle += [connect(port) for _ in range(5)]
            wait_until(
                lambda: all(closed(sock, 0.01) for sock in idle[:5]), 5, "the idlest to close"
            )
            assert not any(closed(sock, 0.01) for sock in idle[6:])
            assert get(port) == 200  # and a new client is served
        finally:
            for sock in idle:
                sock.close()


def test_past_the_concurrent_request_cap_the_answer_is_503_with_retry_after() -> None:
    with edge_server(EdgeLimits(max_concurrent_requests=2)) as port:
        held = [connect(port) for _ in range(2)]
        try:
            for sock in held:
                sock.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
            wait_until(lambda: len(HELD) == 2, 5, "two requests in progress")
            with connect(port) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                status, headers, body = read_response(sock)
            assert (status, headers["retry-after"]) == (503, "1")
            assert "too many requests" in json.loads(body)["error"]
            RELEASE.set()
            assert [read_response(sock)[0] for sock in held] == [200, 200]
        finally:
            for sock in held:
                sock.close()


def test_keep_alive_and_pipelined_requests_are_served_as_before() -> None:
    with edge_server(EdgeLimits()) as port, connect(port) as sock:
        for _ in range(3):
            sock.sendall(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            assert read_response(sock)[0] == 200
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
        answers = b""
        while answers.count(b'{"size": 0}') < 3:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {answers!r}"
            answers += chunk
        assert answers.count(b"HTTP/1.1 200 OK") == 3


def test_the_connection_cap_stays_under_the_file_descriptor_limit() -> None:
    assert connection_cap(10_000, 20_000) == 10_000
    assert connection_cap(10_000, 1024) == 768


def test_limits_refuse_zero_and_negative_values() -> None:
    with pytest.raises(ConfigError, match="header_timeout_s: must be a number > 0, got 0"):
        EdgeLimits(header_timeout_s=0)
    with pytest.raises(ConfigError, match="max_connections"):
        EdgeLimits(max_connections=-1)
    assert EdgeLimits(oversize_answer_delay_s=0).oversize_answer_delay_s == 0  # at once
    with pytest.raises(ConfigError, match="oversize_answer_delay_s: must be a number >= 0"):
        EdgeLimits(oversize_answer_delay_s=-1)


def test_a_client_that_disconnects_cancels_its_inference_handler() -> None:
    started = threading.Event()
    cancelled = threading.Event()

    async def handler(
        model: str, version: str | None, body: bytes, headers: Headers, tenant: str | None
    ) -> Answer:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b"{}", None

    with edge_server(EdgeLimits(), with_infer_route(Starlette(), handler)) as port:
        with connect(port) as sock:
            sock.sendall(
                b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
            )
            assert started.wait(5)
        assert cancelled.wait(5)  # the handler stopped when the connection was lost
        with connect(port) as sock:  # and the server carries on
            sock.sendall(b"GET /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock)[0] == 405
