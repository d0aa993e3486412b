"""A real ``bazaar gateway --api-keys`` in front of a real pod: every route the gateway serves,
enumerated from its route table, refused without a key for its scope; the keys file
reloaded, Kubernetes' symlink swap included; a bad keys file refused at start.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from gateway.app import routes
from gateway.catalog import ModelCatalog
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from protocol.auth import CONTROL, INFER, METRICS, STATS
from protocol.fastpath import INFER_PATHS
from tests.gateway.fakes import FakePods
from tests.protocol.test_auth import key_entry, new_token, write_keys
from tests.support import bazaar_process, free_port, wait_until

OPEN = {"/v2", "/v2/health/live", "/v2/health/ready"}
"""The routes open without a key by default: health, for probes. Every other is protected."""
SCOPE_OF = {
    "/stats": STATS,
    "/v2/models/stats": STATS,
    "/v2/models/digits/stats": STATS,
    "/v2/models/digits/versions/1/stats": STATS,
    "/metrics": METRICS,
    "/v2/repository/models/digits/load": CONTROL,
    "/v2/repository/models/digits/unload": CONTROL,
}
"""The scope each protected route needs, where it is not ``infer``."""
PATH_PARAMETERS = {"model": "digits", "version": "1", "region": "r0"}


def enumerated_routes() -> list[tuple[str, str]]:
    """(method, path) for every route of the gateway's app, path parameters filled in."""
    catalog = ModelCatalog(
        FakePods(),  # never called: only the table is read
        GatewayMetrics(CollectorRegistry()),
        GatewayConfig(),
    )
    table = [
        (sorted(route.methods or {"GET"} - {"HEAD"})[0], route.path) for route in routes(catalog)
    ]
    table += [("POST", path) for path in INFER_PATHS]
    return [
        (method, re.sub(r"\{(\w+)\}", lambda m: PATH_PARAMETERS[m.group(1)], path))
        for method, path in table
    ]


ROUTES = enumerated_routes()


@pytest.fixture(scope="module")
def tokens() -> dict[str, str]:
    """A token per scope, and one with every scope."""
    return {scope: new_token() for scope in (INFER, STATS, METRICS, CONTROL, "all")}


def gateway_args(
    root: Path, model_server: str, keys: Path, *extra: str
) -> tuple[str, list[str], Path]:
    """The arguments of a gateway in front of ``model_server`` with ``keys``."""
    endpoints = root / "endpoints.json"
    endpoints.write_text(json.dumps({"models": {"digits": [model_server]}}))
    port = free_port()
    args = ["gateway", "--endpoints", str(endpoints), "--port", str(port), "--api-keys", str(keys)]
    return f"http://127.0.0.1:{port}", [*args, *extra], root / "gateway.log"


@pytest.fixture(scope="module")
def gateway(
    model_server: str, tokens: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    root = tmp_path_factory.mktemp("auth")
    keys = root / "keys.json"
    entries = [
        key_entry(tokens[scope], f"tenant-{scope}", scope)
        for scope in sorted(set(SCOPE_OF.values()))
    ]
    entries.append(key_entry(tokens[INFER], "tenant-infer", INFER))
    entries.append(key_entry(tokens["all"], "tenant-all", INFER, STATS, METRICS, CONTROL))
    write_keys(keys, *entries)
    url, args, log = gateway_args(root, model_server, keys)
    with bazaar_process(args, log, f"{url}/v2/health/ready"):
        ready = "/v2/models/digits/ready"
        wait_until(lambda: call(url, "GET", ready, tokens[INFER]).status_code == 200, 30, "digits")
        yield url


def call(url: str, method: str, path: str, token: str | None = None) -> httpx.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.request(method, url + path, headers=headers, json={}, timeout=10)


def test_the_enumeration_covers_every_kind_of_route() -> None:
    paths = {path for _, path in ROUTES}
    assert paths >= OPEN | set(SCOPE_OF) | {"/v2/repository/index", "/v2/models/digits/infer"}
    assert len(ROUTES) == len(set(ROUTES)) >= 12


@pytest.mark.parametrize("method,path", ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_every_route_needs_a_key_for_its_scope_unless_open(
    gateway: str, tokens: dict[str, str], method: str, path: str
) -> None:
    if path in OPEN:
        assert call(gateway, method, path).status_code == 200
        return
    needed = SCOPE_OF.get(path, INFER)
    for token in (None, new_token()):
        refused = call(gateway, method, path, token)
        assert refused.status_code == 401, refused.text
        assert refused.headers["www-authenticate"].startswith('Bearer realm="bazaar"')
        assert "error" in refused.json()
    other = INFER if needed != INFER else STATS
    refused = call(gateway, method, path, tokens[other])
    assert refused.status_code == 403, refused.text
    assert needed in refused.json()["error"]
    for token in (tokens[needed], tokens["all"]):
        assert call(gateway, method, path, token).status_code not in (401, 403)


def test_a_key_is_accepted_as_x_api_key_too(gateway: str, tokens: dict[str, str]) -> None:
    answer = httpx.get(f"{gateway}/stats", headers={"X-API-Key": tokens[STATS]}, timeout=10)
    assert answer.status_code == 200
    assert "digits" in answer.json()["models"]


def test_open_scopes_serve_their_routes_without_a_key(
    model_server: str, tokens: dict[str, str], tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    write_keys(keys, key_entry(tokens[STATS], "tenant-stats", STATS))
    url, args, log = gateway_args(tmp_path, model_server, keys, "--open-scopes", "health,metrics")
    with bazaar_process(args, log, f"{url}/v2/health/ready"):
        assert call(url, "GET", "/metrics").status_code == 200
        assert call(url, "GET", "/stats").status_code == 401
        assert call(url, "GET", "/stats", tokens[STATS]).status_code == 200
        assert call(url, "GET", "/v2/models/digits").status_code == 401


def secret_volume(root: Path, version: str, *entries: dict[str, object]) -> None:
    """Write the keys as the kubelet updates a Secret volume: a new timestamped directory,
    then ``..data`` swapped to it by a rename of a symlink (``keys.json`` ->
    ``..data/keys.json`` never changes)."""
    directory = root / f"..{version}"
    directory.mkdir()
    write_keys(directory / "keys.json", *entries)
    os.symlink(directory.name, root / "..data_tmp")
    os.replace(root / "..data_tmp", root / "..data")
    if not (root / "keys.json").is_symlink():
        os.symlink("..data/keys.json", root / "keys.json")


def status(url: str, token: str) -> int:
    return call(url, "GET", "/v2/models/digits", token).status_code


def test_keys_are_reloaded_when_the_file_changes_or_the_secret_is_swapped(
    model_server: str, tmp_path: Path
) -> None:
    volume = tmp_path / "secret"
    volume.mkdir()
    first, second, third = new_token(), new_token(), new_token()
    secret_volume(volume, "2026_01_01", key_entry(first, "a", INFER))
    url, args, log = gateway_args(tmp_path, model_server, volume / "keys.json")
    with bazaar_process(args, log, f"{url}/v2/health/ready"):
        assert status(url, first) == 200
        assert status(url, second) == 401
        # Kubernetes: a new version of the Secret; the first key is revoked.
        secret_volume(volume, "2026_01_02", key_entry(second, "b", INFER))
        wait_until(lambda: status(url, second) == 200, 10, "the new key to be accepted")
        assert status(url, first) == 401
        # A file rewritten in place (a plain mount, an editor).
        write_keys(volume / "..2026_01_02" / "keys.json", key_entry(third, "c", INFER))
        wait_until(lambda: status(url, third) == 200, 10, "the rewritten key to be accepted")
        assert status(url, second) == 401
        # A broken update keeps the keys in use, and says why (when a request next comes).
        (volume / "..2026_01_02" / "keys.json").write_text('{"keys": [{"tenant": "d"}]}')
        wait_until(
            lambda: status(url, third) == 200 and "keeping the 1 keys" in log.read_text(),
            10,
            "the error, the key still in use",
        )
        assert "keys[0]: must have exactly" in log.read_text()


@pytest.mark.parametrize(
    "content,words",
    [
        ('{"keys": [{"tenant": "a", "sha256": "00", "scopes": ["infer"]}]}', ["keys[0].sha256"]),
        ("keys: []", ["not valid JSON"]),
        (None, ["cannot read"]),
    ],
)
def test_a_bad_keys_file_stops_the_gateway_at_start_with_exit_code_2(
    tmp_path: Path, content: str | None, words: list[str]
) -> None:
    keys = tmp_path / "keys.json"
    if content is not None:
        keys.write_text(content)
    _, args, _ = gateway_args(tmp_path, "http://127.0.0.1:1", keys)
    done = subprocess.run(
        [sys.executable, "-m", "bazaar", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    for word in [str(keys), *words]:
        assert word in done.stderr


def test_each_key_s_tenant_has_its_own_quota(model_server: str, tmp_path: Path) -> None:
    """The tenant a key names is the one the tenants file meters (auth → quotas, end to end)."""
    metered, free = new_token(), new_token()
    keys = tmp_path / "keys.json"
    write_keys(keys, key_entry(metered, "metered", INFER), key_entry(free, "free", INFER))
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("tenants:\n  metered: {requests_per_second: 0.01, burst: 1}\n")
    url, args, log = gateway_args(tmp_path, model_server, keys, "--tenants", str(tenants))
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}

    def infer(token: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.post(f"{url}/v2/models/digits/infer", headers=headers, json=body, timeout=10)

    with bazaar_process(args, log, f"{url}/v2/health/ready"):
        ready = "/v2/models/digits/ready"
        wait_until(lambda: call(url, "GET", ready, free).status_code == 200, 30, "digits")
        assert infer(metered).status_code == 200  # its burst of one
        refused = infer(metered)
        assert refused.status_code == 429
        assert refused.json() == {"error": "tenant 'metered' is over its request rate of 0.01/s"}
        assert int(refused.headers["retry-after"]) > 90
        assert [infer(free).status_code for _ in range(3)] == [200, 200, 200]
