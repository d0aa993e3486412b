"""The Open Inference Protocol (KServe v2 / Triton) as bazaar speaks it, on both hops.

Everything else of ours may import this package; it imports nothing of ours. It holds the
wire format and what every v2 server of ours answers the same way: the codec between bodies
and typed tensors (``codec``, ``tensors``) and what decoding may cost (``budget``), what a
model accepts (``schema``), the error tree and its HTTP table (``errors``, ``responses``),
the bare-ASGI inference route (``fastpath``), the HTTP edge's limits before any of it
(``edge``, ``limits``, ``tls``), who may call which route (``auth``), the OpenAPI
description of it all (``openapi``, ``jsonschemas``), the gRPC API (``grpc``), and what every
process shares (``server``, ``support``, ``arguments``).
"""

__version__ = "0.1.0"
"""bazaar's version: the one source (pyproject reads it), reported by ``GET /v2``."""
