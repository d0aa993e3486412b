"""TLS on our HTTP servers: uvicorn's options, with every file checked when the command starts.

uvicorn terminates TLS on the event loop's transport, below the HTTP protocol: the edge
(``protocol.edge``) reads the decrypted stream exactly as it reads plain HTTP, so every limit
and timeout applies unchanged, counted from the end of the handshake. The handshake itself
is bounded by the event loop's own timeout (60 s in asyncio and uvloop; uvicorn offers no
option to shorten it), and a connection in its handshake does not yet count toward
``max_connections``.

Client certificates (``client_cert``): ``none`` asks for none; ``optional`` verifies one
when a client sends it; ``required`` fails the handshake of a client without a certificate
that chains to ``ca_certs``. The certificate and key are read once, at start: a renewed
certificate takes a restart.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import ConfigError

CLIENT_CERT = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
"""``--ssl-client-cert``'s values and what each makes of a client certificate."""


@dataclass(frozen=True, slots=True)
class ServerTls:
    certfile: Path
    """The server's certificate chain (PEM), and its private key unless ``keyfile``."""
    keyfile: Path | None = None
    """The private key (PEM, unencrypted); default: in ``certfile``."""
    ca_certs: Path | None = None
    """The CA certificates (PEM) client certificates must chain to; given with
    ``client_cert`` ``optional`` or ``required``, and only then."""
    client_cert: str = "none"
    """``none`` (default), ``optional`` or ``required`` (``CLIENT_CERT``)."""

    def __post_init__(self) -> None:
        if self.client_cert not in CLIENT_CERT:
            raise ConfigError(
                "TLS",
                "client_cert",
                f"must be one of {list(CLIENT_CERT)}, got {self.client_cert!r}",
            )
        if (self.client_cert == "none") != (self.ca_certs is None):
            raise ConfigError(
                "TLS",
                "ca_certs",
                "client certificates are checked against the CA certificates: give both, "
                "or neither",
            )
        self.context()  # what uvicorn will load, loaded now: a bad file fails the start

    def context(self) -> ssl.SSLContext:
        """The server's SSL context, as uvicorn builds it from ``uvicorn_options``."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.certfile, self.keyfile)
        except (OSError, ssl.SSLError) as exc:
            key = self.keyfile or "in the same file"
            raise ConfigError(
                "TLS", "certfile", f"cannot load {self.certfile} (key {key}): {exc}"
            ) from None
        if self.ca_certs is not None:
            try:
                context.load_verify_locations(self.ca_certs)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    "TLS", "ca_certs", f"cannot load {self.ca_certs}: {exc}"
                ) from None
        context.verify_mode = CLIENT_CERT[self.client_cert]
        return context

    def uvicorn_options(self) -> dict[str, Any]:
        """``uvicorn.Config`` keyword arguments serving HTTPS with these files."""
        return {
            "ssl_certfile": str(self.certfile),
            "ssl_keyfile": None if self.keyfile is None else str(self.keyfile),
            "ssl_ca_certs": None if self.ca_certs is None else str(self.ca_certs),
            "ssl_cert_reqs": CLIENT_CERT[self.client_cert],
        }
