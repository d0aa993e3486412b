"""A real ``bazaar gateway`` against clients that send too much, too slowly, or nothing.

Each test is a finding reproduced against the gateway before its edge had limits: a 100 MB
header stalled the event loop, large bodies were buffered on every route, long URLs were
answered in plain text, slow and idle clients were held forever.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.protocol.test_edge import closed, read_response, ready
from tests.support import bazaar_process, free_port, wait_until

MAX_CONNECTIONS = 40


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """A gateway with short read timeouts and a small connection cap; yields (port, pid)."""
    root = tmp_path_factory.mktemp("hostile")
    endpoints = root / "endpoints.yaml"
    endpoints.write_text(json.dumps({"models": {"m": [f"http://127.0.0.1:{free_port()}"]}}))
    port = free_port()
    args = [
        "gateway", "--endpoints", str(endpoints), "--port", str(port),
        "--header-timeout", "0.5", "--body-timeout", "0.5", "--body-min-rate", "1000",
        "--keep-alive-timeout", "60", "--max-connections", str(MAX_CONNECTIONS),
    ]  # fmt: skip
    ready_url = f"http://127.0.0.1:{port}/v2/health/ready"
    with bazaar_process(args, root / "gateway.log", ready_url) as process:
        yield port, process.pid


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def live(port: int) -> bool:
    """A normal client is answered, and quickly."""
    return httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1.0).status_code == 200


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def stream_until_answered(sock: socket.socket, chunk: bytes, most: int) -> int:
    """Send ``chunk`` until the server answers or closes; the bytes sent (fails past ``most``)."""
    sent = 0
    while not ready(sock):
        assert sent < most, f"no answer after {sent} bytes"
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(chunk)
    return sent


def test_a_100_mb_header_is_refused_431_at_once_and_others_are_served(
    gateway: tuple[int, int],
) -> None:
    port, _ = gateway
    with connect(port) as sock:
        sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: ")
        started = time.monotonic()
        sent = stream_until_answered(sock, b"a" * 65536, 100 * 1024 * 1024)
        assert live(port)
        status, _, body = read_response(sock)
    assert status == 431
    assert json.loads(body) == {"error": "request headers are larger than the limit of 65536 bytes"}
    assert sent < 16 * 1024 * 1024  # what the socket buffers hold, not 100 MB
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    "path,limit",
    [("/v2/repository/index", 1024 * 1024), ("/v2/models/m/infer", 256 * 1024 * 1024)],
)
def test_a_body_over_the_route_limit_is_refused_413_before_it_is_sent_and_never_held(
    gateway: tuple[int, int], path: str, limit: int
) -> None:
    port, pid = gateway
    before = memory_kib(pid)
    with connect(port) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {300 * 1024 * 1024}\r\n\r\n"
        sock.sendall(head.encode())
        stream_until_answered(sock, b"0" * 65536, 32 * 1024 * 1024)
        status, _, body = read_response(sock)
    assert status == 413
    assert json.loads(body) == {"error": f"request body is larger than the limit of {limit} bytes"}
    if limit < 32 * 1024 * 1024:  # chunked: no length to refuse up front
        with connect(port) as sock:
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            sock.sendall(head.encode())
            stream_until_answered(sock, b"10000\r\n" + b"0" * 65536 + b"\r\n", 32 * 1024 * 1024)
            assert read_response(sock)[0] == 413
    assert memory_kib(pid)["VmHWM"] < max(before.values()) + 64 * 1024


def test_a_long_url_is_answered_414_in_json(gateway: tuple[int, int]) -> None:
    port, _ = gateway
    with connect(port) as sock:  # raw: httpx itself refuses a URL this long
        sock.sendall(b"GET /v2/models/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_response(sock)
    assert (status, headers["content-type"]) == (414, "application/json")
    assert json.loads(body) == {"error": "the URL is longer than the limit of 8192 bytes"}


@pytest.mark.parametrize(
    "head,trickle",
    [
        (b"GET /v2 HTTP/1.1\r\n", b"X"),
        (b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n", b"{"),
    ],
    ids=["headers", "body"],
)
def test_a_client_sending_at_a_trickle_is_answered_408(
    gateway: tuple[int, int], head: bytes, trickle: bytes
) -> None:
    port, _ = gateway
    with connect(port) as sock:
        sock.sendall(head)
        started = time.monotonic()
        while not ready(sock):
            assert time.monotonic() - started < 5, "the trickle was never timed out"
            sock.sendall(trickle)
            time.sleep(0.05)
        status, _, body = read_response(sock)
        assert status == 408
        assert "did not arrive" in json.loads(body)["error"]
        assert closed(sock, 5)


def test_idle_connections_past_the_cap_make_room_for_new_clients(
    gateway: tuple[int, int],
) -> None:
    port, _ = gateway
    idle = [connect(port) for _ in range(MAX_CONNECTIONS + 10)]
    try:
        wait_until(lambda: all(closed(sock, 0.01) for sock in idle[:10]), 10, "the idlest to close")
        assert not any(closed(sock, 0.01) for sock in idle[-10:])
        assert live(port)
    finally:
        for sock in idle:
            sock.close()
