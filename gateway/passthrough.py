"""Requests passed through as sent, for models the gateway cannot validate.

A model whose upstream's metadata declares no tensors (a custom MLServer runtime, say), or
that the endpoints file marks ``validate: false``, has nothing to check a request against
and nothing to batch it by. Its requests are not decoded: the body goes to one endpoint as
the client sent it, with the headers that say how to read it (``FORWARDED_HEADERS``), and
the endpoint's 200 answer comes back as it sent it (``gateway.client.forward``). Everything
else is as for any model: the tenant's quotas, admission, the queue with its priorities,
deadlines and fairness, cancellation when the client leaves, the router's least
outstanding work, retry and ejection. Each request counts one row and leaves the queue
alone (the model's policy has ``max_batch_size`` 0).

Priority and timeout are read from the request's ``parameters`` when its JSON header
parses (a compressed body arrives here decoded, ``protocol.compression``);
what the upstream makes of the rest is its business, and its 4xx is the client's answer.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.router import RawRequest
from protocol.fastpath import Headers, header_length

FORWARDED_HEADERS = (b"content-type", b"inference-header-content-length")
"""The request headers an upstream needs to read a body passed through."""


def raw_request(body: bytes, headers: Headers) -> tuple[RawRequest, dict[str, Any]]:
    """The request to forward, and its ``parameters`` (empty when they cannot be read)."""
    forwarded = {
        name.decode("latin-1"): headers[name].decode("latin-1")
        for name in FORWARDED_HEADERS
        if name in headers
    }
    return RawRequest(body, forwarded), _parameters(body, headers)


def _parameters(body: bytes, headers: Headers) -> dict[str, Any]:
    length = header_length(headers)
    try:
        header = orjson.loads(body if length is None else body[:length])
    except orjson.JSONDecodeError:
        return {}
    parameters = header.get("parameters") if isinstance(header, dict) else None
    return parameters if isinstance(parameters, dict) else {}
