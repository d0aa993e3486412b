"""KEDA's external scaler: a real grpc.aio server on a free port, called as KEDA's operator
calls it, through the client protoc builds from KEDA's ``externalscaler.proto``."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from autoscaler.keda import externalscaler_pb2 as pb
from autoscaler.keda.externalscaler_pb2_grpc import ExternalScalerStub
from autoscaler.keda.service import METRIC_NAME, Answers, KedaScaler, keda_server
from autoscaler.loop import Autoscaler, DecideFn
from autoscaler.metrics import AutoscalerMetrics
from autoscaler.policy import Decision, PolicyState, Sample, ScaleConfig
from protocol.support import free_port
from tests.autoscaler.test_loop import FakeScaler, FakeSignals, target
from tests.cluster.fake_kubernetes import FakeKubernetes, serving
from tests.support import serve

NAMESPACE = "bazaar"
DEADLINE_S = 5.0


@dataclass
class Keda:
    """What KEDA's operator holds: the stub, and the answers behind the server."""

    answers: Answers
    stub: ExternalScalerStub


@pytest.fixture
async def keda() -> AsyncIterator[Keda]:
    answers = Answers(NAMESPACE)
    server, port = keda_server(answers, "127.0.0.1", 0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Keda(answers, ExternalScalerStub(channel))
    finally:
        await server.stop(grace=None)


def ref(model: str | None = "mlp", namespace: str = NAMESPACE) -> pb.ScaledObjectRef:
    """A ScaledObjectRef as KEDA sends it: the trigger's metadata, its address included."""
    metadata = {"scalerAddress": "bazaar-autoscaler-keda.bazaar:8003"}
    if model is not None:
        metadata["model"] = model
    return pb.ScaledObjectRef(name="mlp", namespace=namespace, scalerMetadata=metadata)


def decided(keda: Keda, **replicas: int) -> None:
    keda.answers.retain(replicas)
    for model, count in replicas.items():
        keda.answers.publish(model, count)


async def test_the_metric_spec_asks_for_one_per_replica(keda: Keda) -> None:
    decided(keda, mlp=3)
    response = await keda.stub.GetMetricSpec(ref(), timeout=DEADLINE_S)
    [spec] = response.metricSpecs
    assert (spec.metricName, spec.targetSize, spec.targetSizeFloat) == (METRIC_NAME, 1, 1.0)


async def test_metrics_are_the_desired_replicas(keda: Keda) -> None:
    decided(keda, mlp=5, other=2)
    request = pb.GetMetricsRequest(scaledObjectRef=ref(), metricName=METRIC_NAME)
    [value] = (await keda.stub.GetMetrics(request, timeout=DEADLINE_S)).metricValues
    assert (value.metricName, value.metricValue, value.metricValueFloat) == (METRIC_NAME, 5, 5.0)
    keda.answers.publish("mlp", 0)
    [value] = (await keda.stub.GetMetrics(request, timeout=DEADLINE_S)).metricValues
    assert (value.metricValue, value.metricValueFloat) == (0, 0.0)


async def test_active_while_bazaar_wants_a_replica(keda: Keda) -> None:
    decided(keda, mlp=1)
    assert (await keda.stub.IsActive(ref(), timeout=DEADLINE_S)).result is True
    keda.answers.publish("mlp", 0)
    assert (await keda.stub.IsActive(ref(), timeout=DEADLINE_S)).result is False


@pytest.mark.parametrize(
    ("request_ref", "code", "words"),
    [
        (ref("unknown"), grpc.StatusCode.NOT_FOUND, "no Deployment labelled with model 'unknown'"),
        (ref(namespace="other"), grpc.StatusCode.NOT_FOUND, "in namespace 'other'"),
        (ref(None), grpc.StatusCode.INVALID_ARGUMENT, "the trigger's metadata needs 'model'"),
        (ref("listed"), grpc.StatusCode.UNAVAILABLE, "no decision yet"),
    ],
)
async def test_what_keda_shows_for_a_model_bazaar_cannot_answer_for(
    keda: Keda, request_ref: pb.ScaledObjectRef, code: grpc.StatusCode, words: str
) -> None:
    decided(keda, mlp=2)
    keda.answers.retain(["mlp", "listed"])
    calls = [
        keda.stub.IsActive(request_ref, timeout=DEADLINE_S),
        keda.stub.GetMetricSpec(request_ref, timeout=DEADLINE_S),
        keda.stub.GetMetrics(
            pb.GetMetricsRequest(scaledObjectRef=request_ref, metricName=METRIC_NAME),
            timeout=DEADLINE_S,
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call
        assert error.value.code() == code
        assert words in str(error.value.details())


async def test_an_unknown_metric_name_is_not_found(keda: Keda) -> None:
    decided(keda, mlp=2)
    request = pb.GetMetricsRequest(scaledObjectRef=ref(), metricName="queue-depth")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await keda.stub.GetMetrics(request, timeout=DEADLINE_S)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_model_whose_deployment_goes_is_forgotten(keda: Keda) -> None:
    decided(keda, mlp=2)
    keda.answers.retain([])
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await keda.stub.IsActive(ref(), timeout=DEADLINE_S)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_stream_pushes_the_activity_now_and_each_change(keda: Keda) -> None:
    decided(keda, mlp=0)
    stream = keda.stub.StreamIsActive(ref(), timeout=30)
    assert (await asyncio.wait_for(stream.read(), DEADLINE_S)).result is False
    keda.answers.publish("mlp", 2)
    assert (await asyncio.wait_for(stream.read(), DEADLINE_S)).result is True
    # 2 → 3 leaves the activity as it was: nothing is sent until it changes again.
    keda.answers.publish("mlp", 3)
    keda.answers.publish("other-model-news", 1)
    keda.answers.publish("mlp", 0)
    assert (await asyncio.wait_for(stream.read(), DEADLINE_S)).result is False
    # The Deployment is deleted: the stream ends as KEDA's retry expects, with the error.
    keda.answers.retain([])
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await asyncio.wait_for(stream.read(), DEADLINE_S)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def fixed_policy(replicas: int) -> DecideFn:
    def decide(sample: Sample, state: PolicyState, config: ScaleConfig, now: float) -> Decision:
        return Decision(replicas, state, f"want {replicas}", "scale_up")

    return decide


@pytest.mark.parametrize("wanted", [3, 5])
async def test_with_keda_the_loop_answers_every_decision_and_patches_nothing(
    keda: Keda, wanted: int
) -> None:
    """A decision that holds (3 at 3) is answered like one that changes (5 at 3): KEDA's HPA
    must hear the count in both cases."""
    lister = FakeScaler([target("mlp", 3)])
    autoscaler = Autoscaler(
        KedaScaler(lister, keda.answers),
        FakeSignals(),
        AutoscalerMetrics(CollectorRegistry()),
        decide=fixed_policy(wanted),
        publish=keda.answers.publish,
    )
    await autoscaler.run_once()
    request = pb.GetMetricsRequest(scaledObjectRef=ref(), metricName=METRIC_NAME)
    [value] = (await keda.stub.GetMetrics(request, timeout=DEADLINE_S)).metricValues
    assert value.metricValue == wanted
    assert lister.scaled == []


def kubeconfig(path: Path, url: str) -> Path:
    cluster = {"name": "fake", "cluster": {"server": url}}
    context = {"name": "fake", "context": {"cluster": "fake", "user": "fake"}}
    user = {"name": "fake", "user": {"token": "fake-token"}}
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "contexts": [context],
        "users": [user],
        "current-context": "fake",
    }
    path.write_text(yaml.safe_dump(document))
    return path


async def test_bazaar_autoscaler_keda_answers_kedas_client_and_leaves_scale_alone(
    tmp_path: Path,
) -> None:
    """The command as deployed: the model's Deployment at 2 replicas, a gateway with 200 rows
    queued. The policy wants its ceiling, 8: KEDA hears 8, and /scale is never patched."""
    fake = FakeKubernetes()
    annotations = {"bazaar.dev/max-replicas": "8"}
    fake.add_deployment(
        "bazaar-model-mlp", "mlp", replicas=2, ready_replicas=2, annotations=annotations
    )

    async def stats(request: Request) -> JSONResponse:
        mlp = {"queued_rows": 200, "inflight_rows": 16, "admitted_rows": 0, "completed_rows": 0}
        return JSONResponse({"models": {"mlp": mlp}})

    gateway = Starlette(routes=[Route("/stats", stats)])
    keda_port = free_port()
    async with serving(fake) as api, serve(gateway) as gateway_url:
        args = ["autoscaler", "--namespace", "default", "--gateway", gateway_url, "--keda"]
        args += ["--keda-port", str(keda_port), "--metrics-port", str(free_port())]
        args += ["--kubeconfig", str(kubeconfig(tmp_path / "kubeconfig", api))]
        args += ["--leader-election-id", "autoscaler-0"]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bazaar", *args, stderr=asyncio.subprocess.PIPE
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{keda_port}") as channel:
                stub = ExternalScalerStub(channel)
                request = pb.GetMetricsRequest(
                    scaledObjectRef=ref(namespace="default"), metricName=METRIC_NAME
                )
                metrics = await _first_answer(stub, request)
                assert [v.metricValue for v in metrics.metricValues] == [8]
                active = await stub.IsActive(ref(namespace="default"), timeout=DEADLINE_S)
                assert active.result is True
        finally:
            process.terminate()
            _, errors = await asyncio.wait_for(process.communicate(), 20)
        assert process.returncode == 0, errors.decode()
    verbs = {request.permission for request in fake.requests}
    assert ("apps", "deployments/scale", "get") in verbs
    assert ("apps", "deployments/scale", "patch") not in verbs
    # No election with --keda: nothing is patched, every replica answers.
    assert not any(resource == "leases" for _, resource, _ in verbs)


async def _first_answer(
    stub: ExternalScalerStub, request: pb.GetMetricsRequest, timeout_s: float = 30.0
) -> pb.GetMetricsResponse:
    """GetMetrics once the process serves (waiting for its port) and has decided
    (UNAVAILABLE until then)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        left_s = deadline - loop.time()
        try:
            return await stub.GetMetrics(request, timeout=left_s, wait_for_ready=True)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or loop.time() > deadline:
                raise
        await asyncio.sleep(0.05)
