"""HTTP content coding of inference bodies: gzip and deflate, as ``tritonclient.http`` sends
them (``request_compression_algorithm``) and asks for them (``response_compression_algorithm``).

A compressed request body is decoded at the edge of the inference route, before anything
reads it, so the codec, the gateway's passthrough and the pod call all see plain bytes.
Decompression is incremental with a cap on its output: the route's body limit holds for the
decoded body as it does for the sent one, so a zip bomb (1 MiB of gzip decodes to 1 GiB) is
answered 413 having made at most the limit plus one byte. ``deflate`` is the zlib format,
as HTTP defines it and tritonclient sends it.

An answer is compressed when the client's ``Accept-Encoding`` accepts gzip (preferred) or
deflate; ``Inference-Header-Content-Length`` still counts the uncompressed JSON header, as
Triton sends it and tritonclient reads it (it inflates first, then splits). Level 1: the
bodies are tensors, where higher levels gain little and cost several times the CPU, on the
event loop. A request without these headers pays one header lookup each way.
"""

from __future__ import annotations

import zlib

from protocol.errors import InvalidRequest, PayloadTooLarge, UnsupportedEncoding

_WINDOW_BITS = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}
"""zlib's ``wbits`` for each coding: 16 + 15 reads a gzip member, 15 a zlib stream."""
PREFERRED = (b"gzip", b"deflate")
"""The codings offered for answers, in order of preference."""
LEVEL = 1


def decompress(body: bytes, encoding: bytes, max_bytes: int) -> bytes:
    """``body`` decoded from ``encoding``; 413 if it decodes to more than ``max_bytes``, 415
    for a coding not supported, 400 for a corrupt or truncated stream."""
    coding = encoding.strip().lower()
    if coding == b"identity":
        return body
    window_bits = _WINDOW_BITS.get(coding)
    if window_bits is None:
        raise UnsupportedEncoding(encoding.decode("latin-1"), "gzip, deflate or identity")
    name = coding.decode()
    decoder = zlib.decompressobj(window_bits)
    try:
        # One byte over the limit tells "over" from "exactly at it" without a second call.
        decoded = decoder.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise InvalidRequest(f"the {name} request body is corrupt: {exc}") from None
    if len(decoded) > max_bytes:
        raise PayloadTooLarge(max_bytes, f"the {name} request body, decompressed,")
    if not decoder.eof:
        raise InvalidRequest(f"the {name} request body ends before its compressed stream does")
    if decoder.unused_data:
        raise InvalidRequest(f"the {name} request body has bytes after its compressed stream")
    return decoded


def response_coding(accept_encoding: bytes) -> bytes | None:
    """The coding to answer in for an ``Accept-Encoding`` value: gzip, else deflate, when the
    client accepts it (named or ``*``, with a ``q`` above 0); None: no compression."""
    accepted: set[bytes] = set()
    refused: set[bytes] = set()
    for item in accept_encoding.lower().split(b","):
        coding, _, weight = item.partition(b";")
        weight = weight.strip()
        try:
            wanted = not weight.startswith(b"q=") or float(weight[2:]) > 0
        except ValueError:
            wanted = False
        (accepted if wanted else refused).add(coding.strip())
    for coding in PREFERRED:
        if coding in accepted or (b"*" in accepted and coding not in refused):
            return coding
    return None


def compress(body: bytes, coding: bytes) -> bytes:
    """``body`` in ``coding`` (one of ``PREFERRED``)."""
    encoder = zlib.compressobj(LEVEL, zlib.DEFLATED, _WINDOW_BITS[coding])
    return encoder.compress(body) + encoder.flush()
