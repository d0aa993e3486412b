"""A real ``bazaar gateway`` serving HTTPS, with certificates made for the test (trustme): a
verifying client is served, plain HTTP is not, client certificates are required when asked,
and the edge's limits still hold behind TLS."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from tests.protocol.test_edge import read_response, ready
from tests.support import bazaar_process, free_port

TIMEOUT_S = 0.5
"""The gateway's header and keep-alive timeouts here: short, so that slow clients are seen
being closed."""


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def certificates(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The CA, the server's certificate chain and its key, each in a PEM file."""
    root = tmp_path_factory.mktemp("tls")
    server = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": root / "ca.pem", "cert": root / "server.pem", "key": root / "server.key"}
    ca.cert_pem.write_to_path(files["ca"])
    for pem in server.cert_chain_pems:
        pem.write_to_path(files["cert"], append=True)
    server.private_key_pem.write_to_path(files["key"])
    return files


def client_context(ca: trustme.CA, client_cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    """A client trusting ``ca`` only, presenting ``client_cert`` if given."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if client_cert is not None:
        client_cert.configure_cert(context)
    return context


def tls_args(certificates: dict[str, Path], port: int, *extra: str) -> list[str]:
    endpoints = certificates["ca"].parent / "endpoints.json"
    endpoints.write_text(json.dumps({"models": {"m": [f"http://127.0.0.1:{free_port()}"]}}))
    return [
        "gateway", "--endpoints", str(endpoints), "--port", str(port),
        "--ssl-certfile", str(certificates["cert"]), "--ssl-keyfile", str(certificates["key"]),
        "--header-timeout", str(TIMEOUT_S), "--keep-alive-timeout", str(TIMEOUT_S), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def https_gateway(
    ca: trustme.CA, certificates: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    """A gateway serving HTTPS, no client certificates asked; yields its port."""
    port = free_port()
    log = tmp_path_factory.mktemp("https") / "gateway.log"
    ready_url = f"https://127.0.0.1:{port}/v2/health/ready"
    with bazaar_process(tls_args(certificates, port), log, ready_url, verify=client_context(ca)):
        yield port


def tls_connect(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


def closed_by_server(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the server closes the connection (cleanly or not) within the timeout."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except (ssl.SSLError, ConnectionResetError):
        pass
    return True


def test_a_verifying_client_is_served_over_https(ca: trustme.CA, https_gateway: int) -> None:
    answer = httpx.get(
        f"https://127.0.0.1:{https_gateway}/v2", verify=client_context(ca), timeout=5
    )
    assert answer.status_code == 200
    assert answer.json()["name"] == "bazaar"


def test_a_client_that_does_not_trust_the_ca_refuses_the_server(https_gateway: int) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://127.0.0.1:{https_gateway}/v2", timeout=5)


def test_plain_http_to_the_https_port_gets_no_answer(https_gateway: int) -> None:
    with socket.create_connection(("127.0.0.1", https_gateway), timeout=5) as sock:
        sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    assert not received.startswith(b"HTTP/")


def test_headers_at_a_trickle_over_tls_are_answered_408_and_closed(
    ca: trustme.CA, https_gateway: int
) -> None:
    with tls_connect(https_gateway, client_context(ca)) as sock:
        sock.sendall(b"GET /v2 HTTP/1.1\r\n")
        started = time.monotonic()
        while not ready(sock):
            assert time.monotonic() - started < 5, "the trickle was never timed out"
            sock.sendall(b"X")
            time.sleep(0.05)
        status, _, body = read_response(sock)
        assert status == 408
        assert json.loads(body) == {"error": f"request headers did not arrive within {TIMEOUT_S} s"}
        assert closed_by_server(sock, 5)


def test_an_idle_tls_connection_is_closed_after_the_keep_alive_timeout(
    ca: trustme.CA, https_gateway: int
) -> None:
    with tls_connect(https_gateway, client_context(ca)) as sock:
        started = time.monotonic()
        assert closed_by_server(sock, 5)
        assert time.monotonic() - started < 5 * TIMEOUT_S


@pytest.fixture(scope="module")
def mtls_gateway(
    ca: trustme.CA, certificates: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    """A gateway that requires a client certificate signed by the test CA; yields its port."""
    port = free_port()
    log = tmp_path_factory.mktemp("mtls") / "gateway.log"
    args = tls_args(
        certificates,
        port,
        "--ssl-ca-certs",
        str(certificates["ca"]),
        "--ssl-client-cert",
        "required",
    )
    verify = client_context(ca, ca.issue_cert("ready-check@example.com"))
    with bazaar_process(args, log, f"https://127.0.0.1:{port}/v2/health/ready", verify=verify):
        yield port


def get_status(port: int, context: ssl.SSLContext) -> int | None:
    """The status of ``GET /v2`` over TLS with ``context``; None: refused (no HTTP answer)."""
    try:
        with tls_connect(port, context) as sock:
            sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = sock.recv(65536)
    except (ssl.SSLError, ConnectionResetError):
        # TLS 1.3: the server checks the client's certificate after the client's side of the
        # handshake has finished, so a refusal arrives as an alert on the first read.
        return None
    return int(answer.split()[1]) if answer.startswith(b"HTTP/") else None


def test_a_client_certificate_signed_by_the_ca_is_required(
    ca: trustme.CA, mtls_gateway: int
) -> None:
    assert get_status(mtls_gateway, client_context(ca, ca.issue_cert("client@example.com"))) == 200
    assert get_status(mtls_gateway, client_context(ca)) is None
    stranger = trustme.CA().issue_cert("stranger@example.com")
    assert get_status(mtls_gateway, client_context(ca, stranger)) is None


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--ssl-client-cert", "required"], ["TLS: ca_certs", "give both"]),
        (["--ssl-keyfile", "/nonexistent.key"], ["TLS: certfile: cannot load"]),
    ],
)
def test_a_tls_mistake_stops_the_gateway_at_start_with_exit_code_2(
    certificates: dict[str, Path], extra: list[str], words: list[str]
) -> None:
    args = tls_args(certificates, free_port(), *extra)
    done = subprocess.run(
        [sys.executable, "-m", "bazaar", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    for word in words:
        assert word in done.stderr
