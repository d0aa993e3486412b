"""Who may call which route: API keys (bearer tokens), checked before the app sees a request.

``ApiKeyAuth`` is ASGI middleware, standard library only at run time, shared by the gateway
(a keys file of tenants, ``--api-keys``) and the pods (one control token,
``--control-token-file``). Each path has a scope (``route_scope``), decided from
``scope["path"]``, the field the routers match on:

- ``health``: ``/v2`` and ``/v2/health/*``, open by default (probes);
- ``metrics``: ``/metrics`` and below (``bazaar serve``'s ``/metrics/workers``); ``stats``:
  ``/stats`` and Triton's statistics extension, ``/v2/models[/...]/stats``;
- ``control``: the pods' ``/v2/repository/models/*`` (load, unload);
- ``infer``: everything else: inference, model metadata and readiness, the repository
  index, and any path no route serves, so that a new route is protected until it is given
  a scope, and a caller without a key learns nothing from 404s.

A request for an open scope passes untouched. Any other must carry a token, as
``Authorization: Bearer <token>`` or ``X-API-Key: <token>``: none, or one that is no key, is
answered 401 with ``WWW-Authenticate: Bearer realm="bazaar"``; a key without the route's
scope, 403. The answer is ``{"error": ...}`` like every refusal, sent before the body is read
(uvicorn discards what follows). A key's tenant goes into the ASGI scope under ``TENANT``.

Keys are kept as SHA-256 digests of the tokens, never the tokens. A fast unsalted hash is
enough because tokens are random and long (``openssl rand -hex 32``: 256 bits): a digest
cannot be turned back into its token, so a leaked keys file grants nothing. The lookup is a
dict lookup by the digest of what the caller sent, not a comparison of tokens: what its
timing could leak is how the caller's digest relates to a stored one, and steering a digest
toward a stored one is a preimage search, so it tells nothing about any token.

Reload: ``KeyFile`` looks at its file at most once a second, when a request comes (the hot
path reads a clock; one ``stat`` a second). A new inode, size or mtime (a rewrite, a rename
into place, Kubernetes swapping a Secret volume's ``..data`` symlink) is read and parsed;
a file that cannot be read or parsed is logged once and the keys in use are kept. At start a
bad file is a ``ConfigError``: the command says why and exits 2.

Cost on the hot path, measured by ``tests/protocol/bench_auth.py`` (the middleware around an
app that does nothing, best of five runs, on a shared and busy 2-core machine): 3.5-4.5 µs
per request with a key (the header scan, SHA-256 and the clock read are most of it) and
1.1-1.5 µs on an open route, against the gateway's 250 µs per request at 4,000 req/s on
one core.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.errors import ConfigError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

TENANT = "bazaar.tenant"
"""The ASGI scope key of the caller's tenant name: set for a request authenticated by a key;
absent on open routes and where authentication is off."""

HEALTH, INFER, STATS, METRICS, CONTROL = "health", "infer", "stats", "metrics", "control"
SCOPES = frozenset({HEALTH, INFER, STATS, METRICS, CONTROL})
OPEN_BY_DEFAULT = frozenset({HEALTH})
"""The scopes open without a key unless the server is told otherwise."""

REALM = "bazaar"
RELOAD_INTERVAL_S = 1.0
"""How often, at most, a ``KeyFile`` looks for a change to its file."""
MIN_TOKEN_LENGTH = 32
"""The shortest token a token file may hold (``openssl rand -hex 32`` gives 64)."""

_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_TOKEN = re.compile(rb"[\x21-\x7e]+")
"""Visible ASCII: what fits in a header value unchanged."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    tenant: str
    """Who holds the key: quotas and logs are per tenant; several keys may share one."""
    scopes: frozenset[str]
    """What the key may call (``SCOPES``)."""


Keys = dict[bytes, ApiKey]
"""Keys by the SHA-256 digest of their token."""
Parser = Callable[[bytes, str], Keys]
"""Reads a file's contents into keys; raises ``ConfigError`` naming the file (second
argument) and what is wrong."""


def route_scope(path: str) -> str:
    """The scope a request for ``path`` needs (see the module docstring)."""
    if path.startswith("/v2/models/"):
        return STATS if path.endswith("/stats") else INFER
    if path == "/v2" or path.startswith("/v2/health/"):
        return HEALTH
    if path == "/metrics" or path.startswith("/metrics/"):
        return METRICS
    if path == "/stats":
        return STATS
    if path.startswith("/v2/repository/models/"):
        return CONTROL
    return INFER


def bearer(token: str) -> dict[str, str]:
    """The header a client presents ``token`` in."""
    return {"Authorization": f"Bearer {token}"}


def token_digest(token: bytes) -> bytes:
    """The SHA-256 digest keys are stored and looked up by."""
    return hashlib.sha256(token).digest()


class ApiKeyAuth:
    """ASGI middleware: a key with the route's scope, unless the scope is open."""

    def __init__(
        self, app: ASGIApp, keys: KeyFile, open_scopes: frozenset[str] = OPEN_BY_DEFAULT
    ) -> None:
        self.app = app
        self.keys = keys
        self.open_scopes = open_scopes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        needed = route_scope(scope["path"])
        if needed in self.open_scopes:
            await self.app(scope, receive, send)
            return
        token = presented_token(scope["headers"])
        if token is None:
            await _refuse(scope, send, 401, "this route needs an API key", "")
            return
        key = self.keys.lookup(token)
        if key is None:
            await _refuse(scope, send, 401, "the API key is not valid", ', error="invalid_token"')
            return
        if needed not in key.scopes:
            message = f"the API key does not grant the '{needed}' scope"
            await _refuse(
                scope, send, 403, message, f', error="insufficient_scope", scope="{needed}"'
            )
            return
        # Set in place, not on a copy as the ASGI spec asks of middleware: uvicorn makes a
        # scope per request and nothing before this reads it again, and a copy would add
        # about 0.6 µs to every request.
        scope[TENANT] = key.tenant
        await self.app(scope, receive, send)


def presented_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The token of ``Authorization: Bearer`` or ``X-API-Key``, whichever comes first
    (uvicorn gives header names in lower case)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip() or None
        elif name == b"x-api-key":
            return value.strip() or None
    return None


async def _refuse(scope: Scope, send: Send, status: int, message: str, challenge: str) -> None:
    if scope["type"] == "websocket":  # no route serves websockets; uvicorn answers 403
        await send({"type": "websocket.close", "code": 1008})
        return
    log.debug("%s %s: %d %s", scope.get("client"), scope["path"], status, message)
    body = json.dumps({"error": message}, separators=(",", ":")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", f'Bearer realm="{REALM}"{challenge}'.encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class KeyFile:
    """The keys in a file, re-read when it changes (see the module docstring).

    ``fixed`` keys are added to whatever the file holds (``bazaar serve`` gives its own
    autoscaler one). Raises ``ConfigError`` when the file cannot be read or parsed now.
    """

    def __init__(
        self,
        path: Path,
        parse: Parser,
        *,
        fixed: Mapping[bytes, ApiKey] | None = None,
        interval_s: float = RELOAD_INTERVAL_S,
    ) -> None:
        # Absolute, not resolved: resolving would pin the target of a Secret's symlinks.
        self.path = path.absolute()
        self._parse = parse
        self._fixed = dict(fixed or {})
        self._interval_s = interval_s
        self._signature = self._stat()
        self.keys = self._load()
        self._due = time.monotonic() + interval_s

    def lookup(self, token: bytes) -> ApiKey | None:
        """The key ``token`` is, if any (the file is looked at first when a check is due)."""
        now = time.monotonic()
        if now >= self._due:
            self._due = now + self._interval_s
            self._reload()
        return self.keys.get(token_digest(token))

    def _reload(self) -> None:
        signature = self._stat()
        if signature == self._signature:
            return
        self._signature = signature  # a bad file is reported once, not once a second
        try:
            keys = self._load()
        except ConfigError as exc:
            log.error("%s; keeping the %d keys in use", exc, len(self.keys))
            return
        self.keys = keys
        log.info("reloaded %s: %d keys", self.path, len(keys))

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns

    def _load(self) -> Keys:
        where = str(self.path)
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(where, None, f"cannot read: {exc.strerror}") from None
        return {**self._parse(data, where), **self._fixed}


def parse_keys_file(data: bytes, where: str) -> Keys:
    """A keys file: JSON, ``{"keys": [{"tenant": NAME, "sha256": HEX, "scopes": [...]}]}``.

    ``sha256`` is the hex digest of the token (``printf %s "$TOKEN" | sha256sum``). Errors
    name the entry and the field, never echo a digest.
    """
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise ConfigError(where, None, f"is not valid JSON: {exc}") from None
    if (
        not isinstance(document, dict)
        or set(document) != {"keys"}
        or not isinstance(document["keys"], list)
    ):
        raise ConfigError(where, None, 'must be a JSON object with one member, "keys": a list')
    keys: Keys = {}
    first_entry: dict[bytes, int] = {}
    for number, entry in enumerate(document["keys"]):
        at = f"keys[{number}]"
        fields = {"tenant", "sha256", "scopes"}
        if not isinstance(entry, dict) or set(entry) != fields:
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise ConfigError(where, at, f"must have exactly {sorted(fields)}, got {got}")
        tenant, digest, scopes = entry["tenant"], entry["sha256"], entry["scopes"]
        if not isinstance(tenant, str) or not _TENANT_NAME.fullmatch(tenant):
            raise ConfigError(
                where,
                f"{at}.tenant",
                f"must be 1 to 64 letters, digits, '.', '_' or '-', got {tenant!r}",
            )
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
            raise ConfigError(
                where, f"{at}.sha256", "must be the SHA-256 of the token: 64 hexadecimal digits"
            )
        if (
            not isinstance(scopes, list)
            or not scopes
            or not all(isinstance(s, str) and s in SCOPES for s in scopes)
        ):
            raise ConfigError(
                where,
                f"{at}.scopes",
                f"must be a non-empty list of {sorted(SCOPES)}, got {scopes!r}",
            )
        raw = bytes.fromhex(digest)
        if raw in first_entry:
            raise ConfigError(where, f"{at}.sha256", f"the same key as keys[{first_entry[raw]}]")
        first_entry[raw] = number
        keys[raw] = ApiKey(tenant, frozenset(scopes))
    return keys


def parse_token_file(scope: str, tenant: str) -> Parser:
    """A file holding one token (surrounding whitespace ignored), granting ``scope``."""

    def parse(data: bytes, where: str) -> Keys:
        return {token_digest(parse_token(data, where)): ApiKey(tenant, frozenset({scope}))}

    return parse


def parse_token(data: bytes, where: str) -> bytes:
    """The token a token file holds: at least ``MIN_TOKEN_LENGTH`` visible ASCII characters."""
    token = data.strip()
    if len(token) < MIN_TOKEN_LENGTH or not _TOKEN.fullmatch(token):
        raise ConfigError(
            where,
            None,
            f"must hold one token of at least {MIN_TOKEN_LENGTH} visible ASCII characters "
            "(openssl rand -hex 32)",
        )
    return token
