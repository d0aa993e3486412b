"""gzip and deflate bodies on the inference route: decoded within the limit, answers compressed
when the client accepts it."""

from __future__ import annotations

import gzip
import zlib

import httpx
import pytest
from starlette.applications import Starlette

from protocol.compression import compress, decompress, response_coding
from protocol.errors import InvalidRequest, PayloadTooLarge, UnsupportedEncoding
from protocol.fastpath import Answer, Headers, with_infer_route

LIMIT = 1024


@pytest.mark.parametrize(
    "encoding,encoded",
    [
        (b"gzip", gzip.compress(b"x" * LIMIT)),
        (b"deflate", zlib.compress(b"x" * LIMIT)),  # tritonclient's deflate: zlib format
        (b" GZip ", gzip.compress(b"x" * LIMIT)),
        (b"identity", b"x" * LIMIT),
    ],
)
def test_decodes_up_to_the_limit(encoding: bytes, encoded: bytes) -> None:
    assert decompress(encoded, encoding, LIMIT) == b"x" * LIMIT


def test_a_zip_bomb_is_refused_having_decoded_at_most_the_limit() -> None:
    bomb = gzip.compress(bytes(64 * 1024 * 1024))  # 64 KiB that decode to 64 MiB
    with pytest.raises(PayloadTooLarge, match="gzip request body, decompressed, is larger"):
        decompress(bomb, b"gzip", LIMIT)
    with pytest.raises(PayloadTooLarge):
        decompress(gzip.compress(b"x" * (LIMIT + 1)), b"gzip", LIMIT)


@pytest.mark.parametrize(
    "encoding,encoded,error,match",
    [
        (b"br", b"...", UnsupportedEncoding, "'br' is not supported"),
        (b"gzip", b"not gzip at all", InvalidRequest, "corrupt"),
        (b"gzip", gzip.compress(b"x" * 100)[:-12], InvalidRequest, "ends before"),
        (b"deflate", zlib.compress(b"x") + b"tail", InvalidRequest, "bytes after"),
    ],
)
def test_refuses_what_cannot_be_decoded(
    encoding: bytes, encoded: bytes, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        decompress(encoded, encoding, LIMIT)


@pytest.mark.parametrize(
    "accept,coding",
    [
        (b"gzip", b"gzip"),
        (b"deflate", b"deflate"),
        (b"gzip, deflate", b"gzip"),
        (b"deflate, GZIP;q=0.5", b"gzip"),
        (b"gzip;q=0, deflate", b"deflate"),
        (b"*", b"gzip"),
        (b"*, gzip;q=0", b"deflate"),
        (b"identity", None),
        (b"br, zstd", None),
        (b"gzip;q=nonsense", None),
        (b"", None),
    ],
)
def test_response_coding(accept: bytes, coding: bytes | None) -> None:
    assert response_coding(accept) == coding


@pytest.mark.parametrize("coding", [b"gzip", b"deflate"])
def test_compress_round_trips(coding: bytes) -> None:
    assert decompress(compress(b"tensor" * 100, coding), coding, LIMIT) == b"tensor" * 100


async def echo(
    model: str, version: str | None, body: bytes, headers: Headers, tenant: str | None
) -> Answer:
    """Answers the body it was given, header length 2, and checks the coding is gone."""
    assert b"content-encoding" not in headers
    return body, 2


@pytest.fixture
async def client() -> httpx.AsyncClient:
    app = with_infer_route(Starlette(), echo, max_body_bytes=LIMIT)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_the_route_decodes_requests_and_compresses_answers(client: httpx.AsyncClient) -> None:
    """Before, a gzip body reached the codec as it was sent: 400 "not valid JSON"."""
    body = b'{"a": 1}' + b"x" * 500
    async with client:
        sent = await client.post(
            "/v2/models/m/infer",
            content=gzip.compress(body),
            headers={"Content-Encoding": "gzip", "Accept-Encoding": "deflate"},
        )
        assert sent.status_code == 200
        assert sent.headers["content-encoding"] == "deflate"
        assert sent.headers["inference-header-content-length"] == "2"  # of the plain body
        assert sent.content == body  # httpx inflated it
        plain = await client.post(
            "/v2/models/m/infer", content=body, headers={"Accept-Encoding": "identity"}
        )
        assert "content-encoding" not in plain.headers
        assert plain.content == body
        bomb = await client.post(
            "/v2/models/m/infer",
            content=gzip.compress(bytes(LIMIT * 100)),
            headers={"Content-Encoding": "gzip"},
        )
        assert bomb.status_code == 413
        assert "decompressed" in bomb.json()["error"]
        unknown = await client.post(
            "/v2/models/m/infer", content=body, headers={"Content-Encoding": "br"}
        )
        assert unknown.status_code == 415
