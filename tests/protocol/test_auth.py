"""protocol.auth: keys files read strictly, reloaded without ever losing the keys in use, and
the middleware on a real socket handing the tenant to the app."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from protocol.auth import (
    CONTROL,
    HEALTH,
    INFER,
    METRICS,
    STATS,
    TENANT,
    ApiKey,
    ApiKeyAuth,
    KeyFile,
    parse_keys_file,
    parse_token_file,
    presented_token,
    route_scope,
    token_digest,
)
from protocol.errors import ConfigError
from tests.support import serve


def new_token() -> str:
    return secrets.token_hex(32)


def key_entry(token: str, tenant: str, *scopes: str) -> dict[str, Any]:
    """A keys file entry, as an operator writes it (``printf %s $TOKEN | sha256sum``)."""
    digest = hashlib.sha256(token.encode()).hexdigest()
    return {"tenant": tenant, "sha256": digest, "scopes": list(scopes)}


def write_keys(path: Path, *entries: dict[str, Any]) -> None:
    path.write_text(json.dumps({"keys": list(entries)}))


def test_a_keys_file_holds_digests_with_their_tenant_and_scopes() -> None:
    token = new_token()
    data = json.dumps({"keys": [key_entry(token, "team-a", INFER, STATS)]}).encode()
    assert parse_keys_file(data, "keys.json") == {
        token_digest(token.encode()): ApiKey("team-a", frozenset({INFER, STATS}))
    }


DIGEST = "ab" * 32


@pytest.mark.parametrize(
    "document,words",
    [
        (b"{", ["keys.json", "not valid JSON"]),
        (b"[]", ['one member, "keys"']),
        (b'{"keys": {}}', ['one member, "keys"']),
        (
            {"tenant": "a", "sha256": DIGEST},
            ["keys[0]", "must have exactly", "['sha256', 'tenant']"],
        ),
        ({"tenant": "a", "sha256": DIGEST, "scopes": ["infer"], "token": "x"}, ["'token'"]),
        ({"tenant": "a b", "sha256": DIGEST, "scopes": ["infer"]}, ["keys[0].tenant", "'a b'"]),
        ({"tenant": "a", "sha256": "ab" * 31, "scopes": ["infer"]}, ["keys[0].sha256", "64"]),
        ({"tenant": "a", "sha256": DIGEST, "scopes": []}, ["keys[0].scopes", "non-empty"]),
        ({"tenant": "a", "sha256": DIGEST, "scopes": ["admin"]}, ["keys[0].scopes", "'admin'"]),
        ({"tenant": "a", "sha256": DIGEST, "scopes": "infer"}, ["keys[0].scopes"]),
    ],
)
def test_a_malformed_keys_file_is_refused_naming_the_entry_and_field(
    document: bytes | dict[str, Any], words: list[str]
) -> None:
    data = document if isinstance(document, bytes) else json.dumps({"keys": [document]}).encode()
    with pytest.raises(ConfigError) as raised:
        parse_keys_file(data, "keys.json")
    for word in words:
        assert word in str(raised.value)


def test_a_key_listed_twice_is_refused_and_no_digest_is_echoed() -> None:
    token = new_token()
    data = json.dumps({"keys": [key_entry(token, "a", INFER), key_entry(token, "b", STATS)]})
    with pytest.raises(
        ConfigError, match=r"keys\[1\]\.sha256: the same key as keys\[0\]"
    ) as raised:
        parse_keys_file(data.encode(), "keys.json")
    assert hashlib.sha256(token.encode()).hexdigest() not in str(raised.value)


@pytest.mark.parametrize("text", [b"", b"short", b"a b" * 20, b"\xe9" * 40])
def test_a_token_file_needs_one_long_visible_token(text: bytes) -> None:
    with pytest.raises(ConfigError, match="at least 32 visible ASCII characters"):
        parse_token_file(CONTROL, "control")(text, "token")


def test_a_token_file_grants_its_one_scope_whatever_whitespace_surrounds_it() -> None:
    token = new_token()
    keys = parse_token_file(CONTROL, "control")(f"  {token}\n".encode(), "token")
    assert keys == {token_digest(token.encode()): ApiKey("control", frozenset({CONTROL}))}


@pytest.mark.parametrize(
    "path,scope",
    [
        ("/v2", HEALTH),
        ("/v2/health/live", HEALTH),
        ("/v2/health/ready", HEALTH),
        ("/metrics", METRICS),
        ("/metrics/workers", METRICS),
        ("/stats", STATS),
        ("/v2/models/m", INFER),
        ("/v2/models/m/versions/1/infer", INFER),
        ("/v2/models/stats", STATS),
        ("/v2/models/m/stats", STATS),
        ("/v2/models/m/versions/1/stats", STATS),
        ("/v2/models/stats/ready", INFER),
        ("/v2/repository/index", INFER),
        ("/v2/repository/models/m/load", CONTROL),
        # Not a route: the strictest default, so that no route is open by mistake.
        ("/v2/", INFER),
        ("/stats/", INFER),
        ("/anything", INFER),
    ],
)
def test_each_path_needs_its_scope(path: str, scope: str) -> None:
    assert route_scope(path) == scope


@pytest.mark.parametrize(
    "headers,token",
    [
        ([(b"authorization", b"Bearer abc")], b"abc"),
        ([(b"authorization", b"bearer  abc ")], b"abc"),
        ([(b"x-api-key", b"abc")], b"abc"),
        ([(b"authorization", b"Basic YTpi"), (b"x-api-key", b"abc")], b"abc"),
        ([(b"authorization", b"Basic YTpi")], None),
        ([(b"authorization", b"Bearer ")], None),
        ([], None),
    ],
)
def test_the_token_comes_from_a_bearer_authorization_or_x_api_key(
    headers: list[tuple[bytes, bytes]], token: bytes | None
) -> None:
    assert presented_token(headers) == token


def test_a_bad_file_on_reload_keeps_the_keys_in_use_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.json"
    old, new = new_token(), new_token()
    write_keys(path, key_entry(old, "a", INFER))
    keys = KeyFile(path, parse_keys_file, interval_s=0)
    path.write_text('{"keys": [')
    with caplog.at_level(logging.ERROR, "protocol.auth"):
        for _ in range(3):
            assert keys.lookup(old.encode()) == ApiKey("a", frozenset({INFER}))
    [record] = caplog.records
    assert "not valid JSON" in record.getMessage()
    assert "keeping the 1 keys in use" in record.getMessage()
    path.unlink()
    assert keys.lookup(old.encode()) is not None  # a missing file too
    write_keys(path, key_entry(new, "b", INFER))
    assert keys.lookup(old.encode()) is None
    assert keys.lookup(new.encode()) == ApiKey("b", frozenset({INFER}))


def test_a_missing_or_malformed_file_at_start_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read: No such file or directory"):
        KeyFile(tmp_path / "absent.json", parse_keys_file)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"bad\.json: must be a JSON object"):
        KeyFile(tmp_path / "bad.json", parse_keys_file)


def test_fixed_keys_stay_whatever_the_file_holds(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    write_keys(path)
    own = new_token()
    fixed = {token_digest(own.encode()): ApiKey("own", frozenset({STATS}))}
    keys = KeyFile(path, parse_keys_file, fixed=fixed, interval_s=0)
    write_keys(path, key_entry(new_token(), "a", INFER))
    assert keys.lookup(own.encode()) == ApiKey("own", frozenset({STATS}))


async def tenant_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers the tenant the middleware put in the scope (null: none)."""
    body = json.dumps({"tenant": scope.get(TENANT)}).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def test_the_app_gets_the_tenant_of_the_key_and_refusals_are_json(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    token = new_token()
    write_keys(path, key_entry(token, "team-a", INFER))
    app = ApiKeyAuth(tenant_app, KeyFile(path, parse_keys_file))
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        answer = await client.get("/v2/models/m", headers={"Authorization": f"Bearer {token}"})
        assert answer.json() == {"tenant": "team-a"}
        assert (await client.get("/v2/health/live")).json() == {"tenant": None}
        refused = await client.get("/v2/models/m")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == 'Bearer realm="bazaar"'
        assert refused.json() == {"error": "this route needs an API key"}
        refused = await client.get("/stats", headers={"X-API-Key": token})
        assert refused.status_code == 403
        assert refused.json() == {"error": "the API key does not grant the 'stats' scope"}
        assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]


async def test_a_websocket_without_a_key_is_refused(tmp_path: Path) -> None:
    """No route serves websockets, but uvicorn hands an upgrade to the app: refused too."""
    write_keys(tmp_path / "keys.json")
    app = ApiKeyAuth(tenant_app, KeyFile(tmp_path / "keys.json", parse_keys_file))
    async with serve(app) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"GET /v2/models/m HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        status_line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        await writer.wait_closed()
    assert status_line.startswith(b"HTTP/1.1 403")
