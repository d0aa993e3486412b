"""Request tracing: W3C trace context in, OpenTelemetry spans out over OTLP, nothing when off.

A process traces when it is given an OTLP endpoint (``--otlp-endpoint URL``, or the
standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``):
``configure`` then installs a tracer whose spans go to ``URL/v1/traces`` (OTLP over HTTP,
protobuf) in batches from a background thread. Sampling follows OpenTelemetry's own
variables (``OTEL_TRACES_SAMPLER``, ``OTEL_TRACES_SAMPLER_ARG``; default: parent-based,
every root sampled). Otherwise ``TRACER`` stays None and every call site skips tracing with
one test of it, so an untraced request costs nothing else.

What a traced request records, at the gateway (``gateway.inference``, ``gateway.dispatcher``,
``gateway.client``): ``infer MODEL`` (server; its parent is the caller's ``traceparent``
header or gRPC metadata entry, its start the body's arrival) with ``decode``, ``queue`` (from
admission until its batch left) and ``encode`` children; a ``batch MODEL`` span per batch,
child of its first member and *linked* to every member (a batch serves many traces), with a
``pod call`` client span under it that sends its own ``traceparent`` to the pod. At the pod
(``models.inference``): ``infer MODEL`` (server, under the pod call) with ``decode``,
``compute`` (the runtime's own time, after any wait for an instance) and ``encode``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import ParamSpec, TypeVar

from opentelemetry import context, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, SpanContext, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from protocol import __version__ as VERSION

TRACER: trace.Tracer | None = None
"""The process's tracer; None when it does not trace."""
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

_PROPAGATOR = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None
P = ParamSpec("P")
R = TypeVar("R")


def configure(service: str, endpoint: str | None) -> bool:
    """Trace this process as ``service`` when ``endpoint`` or the environment names an OTLP
    collector (``endpoint`` is its base URL); True if it now traces."""
    global TRACER, _provider
    if endpoint is None and not any(os.environ.get(name) for name in ENDPOINT_VARIABLES):
        return False
    exporter = OTLPSpanExporter(
        endpoint=None if endpoint is None else endpoint.rstrip("/") + "/v1/traces"
    )
    resource = Resource.create({"service.name": service, "service.version": VERSION})
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(BatchSpanProcessor(exporter))
    TRACER = _provider.get_tracer("bazaar", VERSION)
    return True


def shutdown() -> None:
    """Send what is buffered and stop tracing (a process that exits calls it)."""
    global TRACER, _provider
    if _provider is not None:
        _provider.shutdown()
    TRACER = _provider = None


@contextlib.contextmanager
def incoming(traceparent: bytes | str | None, tracestate: bytes | str | None) -> Iterator[None]:
    """The caller's trace context, current for the block (nothing when it sent none)."""
    if traceparent is None:
        yield
        return
    carrier = {TRACEPARENT: _text(traceparent)}
    if tracestate is not None:
        carrier[TRACESTATE] = _text(tracestate)
    token = context.attach(_PROPAGATOR.extract(carrier))
    try:
        yield
    finally:
        context.detach(token)


def server_span(
    tracer: trace.Tracer, name: str, attributes: Mapping[str, str | int]
) -> contextlib.AbstractContextManager[trace.Span]:
    """A request's span, current for the block, under the caller's context."""
    return tracer.start_as_current_span(name, kind=SpanKind.SERVER, attributes=attributes)


def traced(tracer: trace.Tracer, name: str, step: Callable[P, R]) -> Callable[P, R]:
    """``step``, run in a span of its own under the current one (never made current: a step
    starts no spans, and attaching a context costs as much as the span)."""

    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        span = tracer.start_span(name)
        try:
            return step(*args, **kwargs)
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(trace.StatusCode.ERROR)
            raise
        finally:
            span.end()

    return run


def recording() -> bool:
    """Whether the current span records: false when it was not sampled, and then the spans
    under it would not be either, so they are not made at all."""
    return trace.get_current_span().is_recording()


Waiting = tuple[SpanContext, int]
"""A queued request's span context and when it was queued (ns since the epoch)."""


def waiting() -> Waiting | None:
    """What a queued request carries to its batch: the current span and the time; None when
    that span does not record."""
    span = trace.get_current_span()
    if not span.is_recording():
        return None
    return span.get_span_context(), time.time_ns()


def waited(tracer: trace.Tracer, name: str, since: Waiting) -> None:
    """A span under the queued request's, from when it was queued until now."""
    parent, queued_ns = since
    span = tracer.start_span(
        name,
        context=trace.set_span_in_context(trace.NonRecordingSpan(parent)),
        start_time=queued_ns,
    )
    span.end()


def finished_span(tracer: trace.Tracer, name: str, took_s: float) -> None:
    """A span under the current one that ended now, ``took_s`` long (a step timed elsewhere,
    such as the runtime's own compute time in its thread)."""
    now_ns = time.time_ns()
    span = tracer.start_span(name, start_time=now_ns - int(took_s * 1e9))
    span.end(end_time=now_ns)


def batch_span(
    tracer: trace.Tracer,
    name: str,
    members: list[SpanContext],
    attributes: Mapping[str, str | int],
) -> contextlib.AbstractContextManager[trace.Span]:
    """A batch's span, current for the block: the first member's child, linked to all."""
    parent = trace.set_span_in_context(trace.NonRecordingSpan(members[0]))
    return tracer.start_as_current_span(
        name,
        context=parent,
        links=[Link(member) for member in members],
        attributes=attributes,
    )


def client_span(tracer: trace.Tracer, name: str) -> contextlib.AbstractContextManager[trace.Span]:
    return tracer.start_as_current_span(name, kind=SpanKind.CLIENT)


def inject(headers: MutableMapping[str, str]) -> None:
    """The current span's ``traceparent`` (and ``tracestate``) into outgoing ``headers``."""
    _PROPAGATOR.inject(headers)


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value
