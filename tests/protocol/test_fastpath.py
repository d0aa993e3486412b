"""The bare-ASGI inference route: path matching, methods, body limits, errors."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette

from protocol.errors import InvalidRequest
from protocol.fastpath import Answer, Headers, infer_target, with_infer_route


@pytest.mark.parametrize(
    "path,target",
    [
        ("/v2/models/mlp/infer", ("mlp", None)),
        ("/v2/models/mlp/versions/3/infer", ("mlp", "3")),
        ("/v2/models/mlp", None),
        ("/v2/models//infer", None),
        ("/v2/models/mlp/versions//infer", None),
        ("/v2/models/mlp/other/3/infer", None),
        ("/v1/models/mlp/infer", None),
    ],
)
def test_inference_paths(path: str, target: tuple[str, str | None] | None) -> None:
    assert infer_target(path) == target


async def echo(
    model: str, version: str | None, body: bytes, headers: Headers, tenant: str | None
) -> Answer:
    if body == b"bad":
        raise InvalidRequest("input 'x': bad")
    return b'{"model_name": "%s"}' % model.encode(), None


@pytest.fixture
async def client() -> httpx.AsyncClient:
    app = with_infer_route(Starlette(), echo, max_body_bytes=16)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_answers_errors_methods_and_the_body_limit(client: httpx.AsyncClient) -> None:
    async with client:
        ok = await client.post("/v2/models/m/infer", content=b"{}")
        assert (ok.status_code, ok.json()) == (200, {"model_name": "m"})
        bad = await client.post("/v2/models/m/infer", content=b"bad")
        assert (bad.status_code, bad.json()) == (400, {"error": "input 'x': bad"})
        wrong_method = await client.get("/v2/models/m/infer")
        assert wrong_method.status_code == 405
        assert wrong_method.headers["allow"] == "POST"
        huge = await client.post("/v2/models/m/infer", content=b"x" * 17)
        assert huge.status_code == 413
        assert "16 bytes" in huge.json()["error"]
        other = await client.get("/v2/elsewhere")
        assert other.status_code == 404  # not ours: Starlette's
