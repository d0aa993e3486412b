"""The gRPC hop to pods: against a real pod (``bazaar model-server --grpc-port``) for what it
computes and refuses, and against a small in-process gRPC server of the test's own for what
a pod receives (timeout, version, traceparent) and sees of a cancelled batch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider

from gateway.client import HttpModelClient
from gateway.grpc_client import GrpcModelClient
from protocol import tracing
from protocol.errors import InvalidRequest, UpstreamError
from protocol.grpc import codec
from protocol.grpc import grpc_service_pb2 as pb
from protocol.grpc.grpc_service_pb2_grpc import (
    GRPCInferenceServiceServicer,
    add_GRPCInferenceServiceServicer_to_server,
)
from tests.support import bazaar_process, eventually, free_port, models_ready, wait_until

UNREACHABLE = "http://127.0.0.1:9"
"""An endpoint whose HTTP port answers nothing: a call to it that succeeds went over gRPC."""


@pytest.fixture(scope="module")
def pod(
    demo_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """``bazaar model-server --model mlp --grpc-port``: its HTTP URL and gRPC target."""
    http_port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{http_port}"
    args = ["model-server", "--model-repository", str(demo_repository), "--model", "mlp"]
    args += ["--port", str(http_port), "--grpc-port", str(grpc_port)]
    log = tmp_path_factory.mktemp("logs") / "pod.log"
    with bazaar_process(args, log, f"{url}/v2/models/mlp/ready"):
        yield url, f"127.0.0.1:{grpc_port}"


async def test_a_batch_over_grpc_is_what_the_pod_computes_over_http(pod: tuple[str, str]) -> None:
    url, target = pod
    rows = np.random.default_rng(1).random((3, 256), dtype=np.float32)
    over_grpc = GrpcModelClient(lambda endpoint: target if endpoint == UNREACHABLE else None)
    over_http = HttpModelClient()
    try:
        by_grpc = await over_grpc.infer(UNREACHABLE, "mlp", {"input": rows}, timeout_s=10)
        by_version = await over_grpc.infer(UNREACHABLE, "mlp/versions/1", {"input": rows}, 10)
        by_http = await over_http.infer(url, "mlp", {"input": rows}, timeout_s=10)
        # A pod the targets do not know is called over HTTP, the same client.
        unknown = await over_grpc.infer(url, "mlp", {"input": rows}, timeout_s=10)
    finally:
        await over_grpc.close()
        await over_http.close()
    assert by_grpc.keys() == by_http.keys()
    for name in by_http:
        np.testing.assert_array_equal(by_grpc[name], by_http[name])
        np.testing.assert_array_equal(by_version[name], by_http[name])
        np.testing.assert_array_equal(unknown[name], by_http[name])


async def test_the_pods_refusal_is_the_clients_and_an_absent_pod_is_the_pods(
    pod: tuple[str, str],
) -> None:
    _, target = pod
    closed = f"127.0.0.1:{free_port()}"
    client = GrpcModelClient({UNREACHABLE: target, "http://absent": closed}.get)
    try:
        with pytest.raises(InvalidRequest, match=r"the pod refused the request: .*input"):
            await client.infer(UNREACHABLE, "mlp", {"input": np.ones((1, 3), np.float32)}, 10)
        with pytest.raises(UpstreamError, match="UNAVAILABLE"):  # the router retries elsewhere
            await client.infer("http://absent", "mlp", {"input": np.ones((1, 256), np.float32)}, 5)
    finally:
        await client.close()


class RecordingPod(GRPCInferenceServiceServicer):
    """Answers ``ModelInfer`` with its input as output, after ``hold`` is set; records what
    it was sent and whether a call was cancelled."""

    def __init__(self) -> None:
        self.requests: list[pb.ModelInferRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.deadlines: list[float | None] = []
        self.cancelled = 0
        self.hold = asyncio.Event()
        self.hold.set()

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInferResponse:
        self.requests.append(request)
        self.metadata.append(
            {key: str(value) for key, value in context.invocation_metadata() or ()}
        )
        self.deadlines.append(context.time_remaining())
        try:
            await self.hold.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        answer = pb.ModelInferResponse(model_name=request.model_name)
        tensor = request.inputs[0]
        answer.outputs.add(name="out", datatype=tensor.datatype, shape=tensor.shape)
        answer.raw_output_contents.append(request.raw_input_contents[0])
        return answer


@pytest.fixture
async def recording() -> AsyncIterator[tuple[RecordingPod, str]]:
    server = grpc.aio.server()
    pod = RecordingPod()
    add_GRPCInferenceServiceServicer_to_server(pod, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield pod, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_the_pod_is_told_the_deadline_as_timeout_and_the_call_deadline(
    recording: tuple[RecordingPod, str],
) -> None:
    pod, target = recording
    client = GrpcModelClient(lambda _: target)
    try:
        outputs = await client.infer(UNREACHABLE, "m/versions/3", {"x": np.ones((2, 1))}, 0.25)
    finally:
        await client.close()
    assert outputs["out"].tolist() == [[1.0], [1.0]]
    (request,) = pod.requests
    assert (request.model_name, request.model_version) == ("m", "3")
    assert codec.parameters_of(request.parameters) == {"timeout": 250_000}
    (remaining,) = pod.deadlines
    assert remaining is not None and 0 < remaining <= 0.25


async def test_a_pod_that_does_not_answer_in_time_is_the_pods_failure(
    recording: tuple[RecordingPod, str],
) -> None:
    pod, target = recording
    pod.hold.clear()
    client = GrpcModelClient(lambda _: target)
    try:
        with pytest.raises(UpstreamError, match="DEADLINE_EXCEEDED"):
            await client.infer(UNREACHABLE, "m", {"x": np.ones((1, 1))}, 0.2)
    finally:
        await client.close()


async def test_a_cancelled_batch_cancels_the_pods_call(recording: tuple[RecordingPod, str]) -> None:
    pod, target = recording
    pod.hold.clear()
    client = GrpcModelClient(lambda _: target)
    try:
        call = asyncio.create_task(client.infer(UNREACHABLE, "m", {"x": np.ones((1, 1))}, 30))
        await eventually(lambda: len(pod.requests) == 1, 10, "the pod received the batch")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await eventually(lambda: pod.cancelled == 1, 10, "the pod saw its call cancelled")
    finally:
        await client.close()


async def test_the_pod_call_sends_its_own_span_as_traceparent_only_when_tracing(
    recording: tuple[RecordingPod, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pod, target = recording
    client = GrpcModelClient(lambda _: target)
    inputs = {"x": np.ones((1, 1))}
    try:
        await client.infer(UNREACHABLE, "m", inputs, timeout_s=1)  # not tracing: nothing sent
        tracer = TracerProvider().get_tracer("test")
        monkeypatch.setattr(tracing, "TRACER", tracer)
        with tracer.start_as_current_span("batch") as batch:
            await client.infer(UNREACHABLE, "m", inputs, timeout_s=1)
    finally:
        await client.close()
    assert "traceparent" not in pod.metadata[0]
    version, trace_id, span_id, flags = pod.metadata[1]["traceparent"].split("-")
    context = batch.get_span_context()
    assert (version, trace_id) == ("00", f"{context.trace_id:032x}")
    assert int(flags, 16) & 1  # sampled
    assert span_id != f"{context.span_id:016x}"  # the pod call's own span, under the batch


def test_a_gateway_sends_batches_over_grpc_to_an_endpoint_the_file_gives_grpc(
    pod: tuple[str, str], tmp_path: Path
) -> None:
    url, target = pod
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(f"models:\n  mlp: [{{url: {url}, grpc: '{target}'}}]\n")
    port = free_port()
    gateway = f"http://127.0.0.1:{port}"
    body = {
        "inputs": [{"name": "input", "shape": [1, 256], "datatype": "FP32", "data": [0.5] * 256}]
    }
    args = ["gateway", "--endpoints", str(endpoints), "--port", str(port)]
    with bazaar_process(args, tmp_path / "gateway.log", models_ready(gateway, ["mlp"])):
        answer = httpx.post(f"{gateway}/v2/models/mlp/infer", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        # The same endpoint with a gRPC address nobody serves: its batches fail, although
        # its HTTP port (readiness, metadata) still answers: they went over gRPC.
        endpoints.write_text(f"models:\n  mlp: [{{url: {url}, grpc: '127.0.0.1:{free_port()}'}}]\n")

        def refused() -> bool:
            status = httpx.post(f"{gateway}/v2/models/mlp/infer", json=body, timeout=30).status_code
            return status in (502, 503)

        wait_until(refused, 30, "batches to an absent gRPC address to fail")
        endpoints.write_text(f"models:\n  mlp: [{url}]\n")  # plain URL: back over HTTP
        wait_until(
            lambda: (
                httpx.post(f"{gateway}/v2/models/mlp/infer", json=body, timeout=30).status_code
                == 200
            ),
            60,
            "batches over HTTP again",
        )


async def test_a_channel_is_closed_once_no_endpoint_maps_to_it(
    recording: tuple[RecordingPod, str],
) -> None:
    pod, target = recording
    server = grpc.aio.server()
    add_GRPCInferenceServiceServicer_to_server(pod, server)  # type: ignore[no-untyped-call]
    second = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    targets = {"http://a": target, "http://b": second}
    client = GrpcModelClient(targets.get)
    inputs = {"x": np.ones((1, 1))}
    try:
        await client.infer("http://a", "m", inputs, 5)
        await client.infer("http://b", "m", inputs, 5)
        assert set(client._channels) == {target, second}
        del targets["http://a"]  # a retired worker: its URL gone, its channel with it
        targets["http://c"] = target.replace("127.0.0.1", "localhost")  # a new pod
        await client.infer("http://c", "m", inputs, 5)
        assert set(client._channels) == {second, targets["http://c"]}
        await client.infer("http://b", "m", inputs, 5)  # the kept channel still works
    finally:
        await client.close()
        await server.stop(None)
    assert len(pod.requests) == 4
