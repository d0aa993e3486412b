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
Three things in that header are not, each refused by name (400): a tensor asking for
shared memory, and a request that is part of a sequence, as for any model, since the gateway
registers no regions and routes each request to any endpoint; and an output asking for the
classification extension, since the gateway, which lists it, cannot apply it to an answer
it does not decode. An upstream may ignore any of them silently (MLServer does: it answers
the raw tensor).
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.router import RawRequest
from protocol.codec import refuse_sequence, refuse_shared_memory
from protocol.errors import InvalidRequest
from protocol.fastpath import Headers, header_length

FORWARDED_HEADERS = (b"content-type", b"inference-header-content-length")
"""The request headers an upstream needs to read a body passed through."""


def raw_request(body: bytes, headers: Headers) -> tuple[RawRequest, dict[str, Any]]:
    """The request to forward, and its ``parameters`` (empty when they cannot be read);
    ``InvalidRequest`` when it asks for shared memory, a sequence or classification (see
    the module)."""
    forwarded = {
        name.decode("latin-1"): headers[name].decode("latin-1")
        for name in FORWARDED_HEADERS
        if name in headers
    }
    header = _header(body, headers)
    for kind in ("input", "output"):
        for tensor in _objects(header.get(f"{kind}s")):
            what = f"{kind} '{tensor.get('name')}'"
            parameters = tensor.get("parameters")
            if isinstance(parameters, dict):
                refuse_shared_memory(what, parameters)
                if kind == "output" and parameters.get("classification"):
                    raise InvalidRequest(
                        f"{what}: parameters.classification asks for the classification "
                        "extension, which the gateway cannot apply to a model whose requests "
                        "it passes through as sent (it declares no tensors)"
                    )
    parameters = header.get("parameters")
    parameters = parameters if isinstance(parameters, dict) else {}
    refuse_sequence(parameters)
    return RawRequest(body, forwarded), parameters


def _header(body: bytes, headers: Headers) -> dict[str, Any]:
    """The request's JSON header; empty when it does not parse (the upstream's to refuse)."""
    length = header_length(headers)
    try:
        header = orjson.loads(body if length is None else body[:length])
    except orjson.JSONDecodeError:
        return {}
    return header if isinstance(header, dict) else {}


def _objects(value: object) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []
