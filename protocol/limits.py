"""What a client may send one of our HTTP servers, and how slowly (standard library only, so
the command line reads the defaults without importing a web stack).

``protocol.edge`` enforces these before the app sees a request; every refusal is answered
``{"error": ...}`` with the status that names it (413, 414, 431, 408, 503).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from protocol.errors import ConfigError


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    max_header_bytes: int = 64 * 1024
    """The request line and headers together, in bytes (64 KiB); more is answered 431."""
    max_headers: int = 100
    """Header fields in one request (100); more is answered 431."""
    max_url_bytes: int = 8 * 1024
    """The request target, path and query, in bytes (8 KiB); longer is answered 414."""
    max_body_bytes: int = 1024 * 1024
    """A request body on any route but inference, in bytes (1 MiB); larger is answered 413
    as soon as it is declared (Content-Length) or, chunked, as soon as it is exceeded."""
    max_infer_body_bytes: int = 64 * 1024 * 1024
    """An inference request body, in bytes (64 MiB, Triton's ``--http-max-input-size``): the
    body is read into memory whole, and a JSON one is parsed on the event loop in one piece
    (about 12-30 ms a MiB, while every other request waits); large tensors go binary."""
    header_timeout_s: float = 10.0
    """From a request's first byte, the longest its request line and headers may take to
    arrive (10 s); then 408."""
    body_timeout_s: float = 30.0
    """From the end of the headers, the longest a body may take to arrive (30 s), extended by
    one second per ``body_min_rate`` bytes received: a large body on a slow link finishes,
    a trickle is answered 408."""
    body_min_rate: int = 16 * 1024
    """Bytes per second a body must average past ``body_timeout_s`` (16 KiB/s)."""
    keep_alive_timeout_s: float = 5.0
    """How long an idle connection (new, or between requests) is kept open (5 s)."""
    max_connections: int = 10_000
    """Open connections per process (10,000; at most three quarters of the process's file
    descriptor limit). At the cap a new connection closes the longest-idle keep-alive one;
    with none idle, the new one is closed."""
    oversize_answer_delay_s: float = 1.0
    """How long the answer to a request refused for its size (413, 414, 431) waits, its
    connection unread meanwhile (1 s; 0 answers at once). A client that sends oversized
    requests one after another, each as soon as it hears the last refused, is held to one a
    second per connection: without the wait, two connections streaming 100 MiB headers were
    refused 740 times a second and took 70 % of the gateway's core."""
    max_concurrent_requests: int = 4096
    """Requests in progress per process (4,096); beyond, 503 with Retry-After. Well above
    the clients a gateway is expected to serve in a closed loop (2,048): at the cap each
    refused client comes straight back, and goodput goes to answering 503s."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            zero_allowed = field.name == "oversize_answer_delay_s"
            if not (
                isinstance(value, int | float)
                and math.isfinite(value)
                and (value > 0 or (zero_allowed and value == 0))
            ):
                bound = ">= 0" if zero_allowed else "> 0"
                raise ConfigError(
                    "edge limits", field.name, f"must be a number {bound}, got {value!r}"
                )
