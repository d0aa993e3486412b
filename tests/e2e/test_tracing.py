"""Tracing end to end: ``bazaar serve --otlp-endpoint`` sends its gateway's and its workers'
spans to a real OTLP/HTTP receiver (the test's own, decoding OpenTelemetry's protobuf), and
a caller's W3C ``traceparent`` (HTTP header or gRPC metadata) is the parent of the whole
tree: gateway request, its steps, the batch, the pod call and the pod's own spans."""

from __future__ import annotations

import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from models.demo import digits_samples
from tests.support import bazaar_process, free_port, models_ready, wait_until

SERVER = 2  # opentelemetry.proto's Span.SpanKind
CLIENT = 3


@dataclass(frozen=True, slots=True)
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    links: tuple[str, ...]
    """Span ids this span is linked to."""


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver on loopback: every span it was sent, decoded."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ExportHandler)
        self.spans: list[Span] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [span for span in self.spans if span.trace_id == trace_id]


class _ExportHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        assert self.path == "/v1/traces", self.path
        assert self.headers["Content-Type"] == "application/x-protobuf"
        export = ExportTraceServiceRequest.FromString(
            self.rfile.read(int(self.headers["Content-Length"]))
        )
        for resource_spans in export.resource_spans:
            service = next(
                a.value.string_value
                for a in resource_spans.resource.attributes
                if a.key == "service.name"
            )
            for scope_spans in resource_spans.scope_spans:
                with self.server.lock:
                    self.server.spans += [
                        Span(
                            service,
                            s.name,
                            s.kind,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            tuple(link.span_id.hex() for link in s.links),
                        )
                        for s in scope_spans.spans
                    ]
        body = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@dataclass(frozen=True, slots=True)
class Traced:
    http: str
    grpc: str


@pytest.fixture(scope="module")
def serve(
    receiver: Receiver, demo_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Traced]:
    root = tmp_path_factory.mktemp("tracing-repository")
    shutil.copytree(demo_repository / "digits", root / "digits")
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    args = [
        "serve", "--model-repository", str(root), "--port", str(port),
        "--grpc-port", str(grpc_port), "--otlp-endpoint", receiver.url,
    ]  # fmt: skip
    # Spans leave in batches every 5 s by default; a test need not wait that long.
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "50"
    try:
        with bazaar_process(args, log, models_ready(url, ["digits"])):
            yield Traced(url, f"127.0.0.1:{grpc_port}")
    finally:
        del os.environ["OTEL_BSP_SCHEDULE_DELAY"]


def caller() -> tuple[str, str, str]:
    """A caller's trace id, span id, and its ``traceparent``."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def the(spans: list[Span], service: str, name: str) -> Span:
    [span] = [s for s in spans if s.service == service and s.name == name]
    return span


def complete(receiver: Receiver, trace_id: str) -> list[Span]:
    """The trace once the pod's compute span has arrived (the last one to be exported)."""
    wait_until(
        lambda: any(s.name == "compute" for s in receiver.trace(trace_id)),
        timeout_s=20,
        what=f"the pod's spans of trace {trace_id}",
    )
    wait_until(
        lambda: any(
            s.name == "encode" and s.service == "bazaar-gateway" for s in receiver.trace(trace_id)
        ),
        timeout_s=20,
        what=f"the gateway's spans of trace {trace_id}",
    )
    return receiver.trace(trace_id)


def assert_one_tree(spans: list[Span], caller_span: str) -> None:
    gateway = "bazaar-gateway"
    request = the(spans, gateway, "infer digits")
    assert (request.kind, request.parent_id) == (SERVER, caller_span)
    for step in ("decode", "queue", "encode"):
        assert the(spans, gateway, step).parent_id == request.span_id, step
    batch = the(spans, gateway, "batch digits")
    assert batch.parent_id == request.span_id
    assert request.span_id in batch.links
    call = the(spans, gateway, "pod call")
    assert (call.kind, call.parent_id) == (CLIENT, batch.span_id)
    pod = the(spans, "bazaar-model-server", "infer digits")
    assert (pod.kind, pod.parent_id) == (SERVER, call.span_id)
    for step in ("decode", "compute", "encode"):
        assert the(spans, "bazaar-model-server", step).parent_id == pod.span_id, step


def test_an_http_callers_traceparent_is_the_parent_of_the_gateway_and_pod_spans(
    serve: Traced, receiver: Receiver
) -> None:
    trace_id, span_id, traceparent = caller()
    client = triton_http.InferenceServerClient(serve.http.removeprefix("http://"))
    image = triton_http.InferInput("input", [1, 64], "FP32")
    image.set_data_from_numpy(digits_samples(1)[0])
    client.infer("digits", [image], headers={"traceparent": traceparent})
    assert_one_tree(complete(receiver, trace_id), span_id)


def test_a_grpc_callers_traceparent_is_the_parent_too(serve: Traced, receiver: Receiver) -> None:
    trace_id, span_id, traceparent = caller()
    client = triton_grpc.InferenceServerClient(serve.grpc)
    image = triton_grpc.InferInput("input", [1, 64], "FP32")
    image.set_data_from_numpy(digits_samples(1)[0])
    client.infer("digits", [image], headers={"traceparent": traceparent})
    assert_one_tree(complete(receiver, trace_id), span_id)


def test_a_request_without_a_traceparent_starts_a_trace_of_its_own(
    serve: Traced, receiver: Receiver
) -> None:
    before = {s.trace_id for s in receiver.spans}
    client = triton_http.InferenceServerClient(serve.http.removeprefix("http://"))
    image = triton_http.InferInput("input", [1, 64], "FP32")
    image.set_data_from_numpy(digits_samples(1)[0])
    client.infer("digits", [image])

    def new_root() -> Span | None:
        roots = [
            s
            for s in receiver.spans
            if s.name == "infer digits"
            and s.service == "bazaar-gateway"
            and s.trace_id not in before
        ]
        return roots[0] if roots else None

    wait_until(lambda: new_root() is not None, timeout_s=20, what="a new trace")
    root = new_root()
    assert root is not None and root.parent_id == ""
    assert_one_tree(complete(receiver, root.trace_id), "")


def test_a_caller_that_did_not_sample_its_trace_gets_no_spans(
    serve: Traced, receiver: Receiver
) -> None:
    client = triton_http.InferenceServerClient(serve.http.removeprefix("http://"))
    image = triton_http.InferInput("input", [1, 64], "FP32")
    image.set_data_from_numpy(digits_samples(1)[0])
    unsampled, span_id, _ = caller()
    client.infer("digits", [image], headers={"traceparent": f"00-{unsampled}-{span_id}-00"})
    # A sampled request after it: once its spans are in, the first one's would be too.
    sampled, span_id, traceparent = caller()
    client.infer("digits", [image], headers={"traceparent": traceparent})
    assert_one_tree(complete(receiver, sampled), span_id)
    assert receiver.trace(unsampled) == []
