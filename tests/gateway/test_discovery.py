"""Kubernetes endpoint discovery: the real ``kubernetes`` client against an in-process fake API,
and a real gateway process that finds a real model server through it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.discovery import REQUIRED_RBAC, EndpointSlices
from protocol.traffic import TrafficPolicy
from tests.cluster.fake_kubernetes import FakeKubernetes, cluster_at, serving
from tests.support import bazaar_process, eventually, free_port

LIST_SERVICES = ("", "services", "list")
LIST_SLICES = ("discovery.k8s.io", "endpointslices", "list")
MLP = "bazaar-model-mlp"
RESYNC_S = 0.05


class Listener:
    """What the source reported: every call, each model's latest endpoints and traffic."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.latest: dict[str, list[str]] = {}
        self.traffic: dict[str, TrafficPolicy | None] = {}

    def __call__(self, model: str, urls: list[str], traffic: TrafficPolicy | None = None) -> None:
        self.calls.append((model, urls))
        self.latest[model] = urls
        self.traffic[model] = traffic


@pytest.fixture
def fake() -> FakeKubernetes:
    fake = FakeKubernetes()
    fake.add_service(MLP, {"bazaar.dev/model": "mlp"}, ports={"metrics": 9999, "http": 8001})
    fake.add_service("bazaar-model-digits", {"bazaar.dev/model": "digits"})
    fake.add_service("unrelated", {"app": "unrelated"})
    fake.set_slice(
        "mlp-a",
        MLP,
        [("10.0.0.1", True), ("10.0.0.2", False), ("10.0.0.3", None)],
        ports={"metrics": 9999, "http": 8001},
    )
    fake.set_slice("mlp-b", MLP, [("fd00::1", True)], address_type="IPv6")
    fake.set_slice("mlp-other-port", MLP, [("10.0.0.9", True)], ports={"grpc": 9000})
    fake.set_slice("unrelated-a", "unrelated", [("10.0.1.1", True)])
    return fake


@pytest.fixture
async def api_url(fake: FakeKubernetes) -> AsyncIterator[str]:
    async with serving(fake) as url:
        yield url


@pytest.fixture
async def source(api_url: str) -> AsyncIterator[EndpointSlices]:
    cluster = cluster_at(api_url, "gateway", "gateway.discovery", request_timeout_s=1.0)
    source = EndpointSlices(cluster, resync_s=RESYNC_S)
    yield source
    await source.stop()


async def test_models_come_from_labelled_services_with_their_ready_endpoints(
    fake: FakeKubernetes, source: EndpointSlices
) -> None:
    listener = Listener()
    await source.start(listener, CollectorRegistry())
    assert listener.latest == {
        "digits": [],
        "mlp": ["http://10.0.0.1:8001", "http://10.0.0.3:8001", "http://[fd00::1]:8001"],
    }
    assert fake.permissions() == {(p.api_group, p.resource, p.verb) for p in REQUIRED_RBAC}
    selectors = {
        request.path.rsplit("/", 1)[1]: request.query["labelSelector"] for request in fake.requests
    }
    assert selectors == {
        "services": "bazaar.dev/model",
        "endpointslices": "kubernetes.io/service-name",
    }


async def test_slice_changes_reach_the_listener(
    fake: FakeKubernetes, source: EndpointSlices
) -> None:
    listener = Listener()
    fake.endpoint_slices.clear()
    await source.start(listener, CollectorRegistry())
    assert listener.latest["mlp"] == []

    fake.set_slice("mlp-a", MLP, [("10.0.0.1", True)])
    await eventually(lambda: listener.latest["mlp"] == ["http://10.0.0.1:8001"], 5.0, "a pod added")
    fake.set_slice("mlp-a", MLP, [("10.0.0.1", True), ("10.0.0.2", True)])
    await eventually(
        lambda: listener.latest["mlp"] == ["http://10.0.0.1:8001", "http://10.0.0.2:8001"],
        5.0,
        "a second pod",
    )
    fake.set_slice("mlp-a", MLP, [("10.0.0.1", False), ("10.0.0.2", True)])
    await eventually(
        lambda: listener.latest["mlp"] == ["http://10.0.0.2:8001"], 5.0, "a pod not ready"
    )
    fake.set_slice("mlp-a", MLP, [])
    await eventually(lambda: listener.latest["mlp"] == [], 5.0, "all pods gone")

    # Reported on change only: no call repeats the one before it for the same model.
    mlp = [urls for model, urls in listener.calls if model == "mlp"]
    assert all(a != b for a, b in itertools.pairwise(mlp))


async def test_a_model_whose_service_is_removed_is_reported_empty_once(
    fake: FakeKubernetes, source: EndpointSlices
) -> None:
    listener = Listener()
    await source.start(listener, CollectorRegistry())
    assert listener.latest["mlp"]
    del fake.services["default", MLP]
    await eventually(lambda: listener.latest["mlp"] == [], 5.0, "mlp emptied")
    requests = len(fake.requests)
    await eventually(lambda: len(fake.requests) >= requests + 6, 5.0, "three more listings")
    assert listener.calls.count(("mlp", [])) == 1


async def test_forbidden_is_logged_once_and_the_source_keeps_going(
    fake: FakeKubernetes, source: EndpointSlices, caplog: pytest.LogCaptureFixture
) -> None:
    fake.fail(LIST_SLICES, 403, 403, 403)
    listener = Listener()
    with caplog.at_level(logging.ERROR, logger="gateway.discovery"):
        await source.start(listener, CollectorRegistry())
        assert listener.latest == {}
        await eventually(lambda: "mlp" in listener.latest, 5.0, "endpoints once RBAC allows")
    [record] = [r for r in caplog.records if "RBAC" in r.getMessage()]
    message = record.getMessage()
    assert "list endpointslices" in message and "discovery.k8s.io" in message
    assert listener.latest["mlp"] == [
        "http://10.0.0.1:8001",
        "http://10.0.0.3:8001",
        "http://[fd00::1]:8001",
    ]


async def test_server_errors_back_off_and_keep_the_last_endpoints(
    fake: FakeKubernetes, source: EndpointSlices, caplog: pytest.LogCaptureFixture
) -> None:
    listener = Listener()
    await source.start(listener, CollectorRegistry())
    before = dict(listener.latest)
    fake.fail(LIST_SERVICES, 500, 503, 500)
    fake.set_slice("mlp-a", MLP, [])
    with caplog.at_level(logging.INFO, logger="gateway.discovery"):
        await eventually(
            lambda: listener.latest["mlp"] == ["http://[fd00::1]:8001"], 5.0, "recovery"
        )
    assert not fake.faults[LIST_SERVICES]
    assert listener.calls.count(("mlp", before["mlp"])) == 1  # kept, not cleared, meanwhile
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "500" in warnings[0].getMessage()
    assert any("works again" in r.getMessage() for r in caplog.records)


async def test_stop_returns_promptly_with_a_call_in_flight(
    fake: FakeKubernetes, source: EndpointSlices
) -> None:
    await source.start(Listener(), CollectorRegistry())
    fake.fail(LIST_SERVICES, 30.0)  # the next listing stalls
    requests = len(fake.requests)
    await eventually(lambda: len(fake.requests) > requests, 5.0, "the stalled listing")
    started = time.monotonic()
    await source.stop()
    assert time.monotonic() - started < 0.5
    fake.released.set()


ONE_ROW = {
    "inputs": [{"name": "input", "shape": [1, 256], "datatype": "FP32", "data": [0.5] * 256}]
}
"""One row for ``mlp``."""


def _gateway_args(tmp_path: Path, api: str, port: int) -> list[str]:
    """``bazaar gateway`` discovering namespace ``ns`` through the fake API at ``api``."""
    return [
        "gateway",
        "--kubernetes-namespace=ns",
        f"--kubeconfig={_kubeconfig(tmp_path / 'kubeconfig', api)}",
        f"--port={port}",
    ]


def _kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": server}}],
                "users": [{"name": "gateway", "user": {"token": "test"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "gateway"}}],
                "current-context": "fake",
            }
        )
    )
    return path


@contextlib.asynccontextmanager
async def _in_thread(manager: contextlib.AbstractContextManager[object]) -> AsyncIterator[None]:
    """A blocking context manager entered and left in a thread, so this loop (serving the
    fake API) keeps answering meanwhile."""
    stack = contextlib.ExitStack()
    await asyncio.to_thread(stack.enter_context, manager)
    try:
        yield
    finally:
        await asyncio.to_thread(stack.close)


def _endpoints(stats: httpx.Response) -> int:
    return int(stats.json()["models"].get("mlp", {}).get("endpoints", -1))


async def test_a_gateway_process_serves_a_discovered_pod_and_holds_requests_at_zero(
    model_server: str, tmp_path: Path
) -> None:
    pod_port = int(urlsplit(model_server).port or 0)
    fake = FakeKubernetes()
    fake.add_service(MLP, {"bazaar.dev/model": "mlp"}, namespace="ns", ports={"http": pod_port})

    def pod(ready: bool | None) -> None:
        endpoints: list[tuple[str, bool | None]] = [] if ready is False else [("127.0.0.1", ready)]
        fake.set_slice("mlp-x", MLP, endpoints, namespace="ns", ports={"http": pod_port})

    pod(True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with serving(fake) as api, httpx.AsyncClient(base_url=url, timeout=30) as http:
        args = _gateway_args(tmp_path, api, port)
        ready = f"{url}/v2/models/mlp/ready"
        async with _in_thread(bazaar_process(args, tmp_path / "gateway.log", ready)):
            response = await http.post("/v2/models/mlp/infer", json=ONE_ROW)
            assert response.status_code == 200, response.text
            assert len(response.json()["outputs"][0]["data"]) == 10

            pod(False)  # scaled to zero: the slice lists no endpoint
            deadline = time.monotonic() + 10
            while _endpoints(await http.get("/stats")) != 0:
                assert time.monotonic() < deadline, "the gateway still lists the pod"
                await asyncio.sleep(0.05)
            held = asyncio.create_task(http.post("/v2/models/mlp/infer", json=ONE_ROW))
            await asyncio.sleep(0.5)
            assert not held.done(), "a request for a model at zero must wait, not fail"
            assert (await http.get("/stats")).json()["models"]["mlp"]["queued"] == 1

            pod(None)  # back, with the ready condition unset: counts as ready
            response = await asyncio.wait_for(held, 15)
            assert response.status_code == 200, response.text
        log = (tmp_path / "gateway.log").read_text()
    assert "mlp: 1 ready endpoint(s) http://127.0.0.1:" in log
    assert {r.permission for r in fake.requests} == {LIST_SERVICES, LIST_SLICES}


async def test_a_slice_with_a_grpc_port_gives_its_pods_the_grpc_hop(
    fake: FakeKubernetes, source: EndpointSlices, caplog: pytest.LogCaptureFixture
) -> None:
    both = {"http": 8001, "grpc": 9001}
    fake.set_slice("mlp-a", MLP, [("10.0.0.1", True), ("10.0.0.2", False)], ports=both)
    fake.set_slice("mlp-b", MLP, [("fd00::1", True)], address_type="IPv6", ports=both)
    fake.set_slice("mlp-c", MLP, [("10.0.0.5", True)], ports={"http": 8001})
    listener = Listener()
    with caplog.at_level(logging.INFO, logger="gateway.discovery"):
        await source.start(listener, CollectorRegistry())
    assert listener.latest["mlp"] == [
        "http://10.0.0.1:8001",
        "http://10.0.0.5:8001",
        "http://[fd00::1]:8001",
    ]
    assert "mlp: 3 ready endpoint(s) http://10.0.0.1:8001 (gRPC 10.0.0.1:9001) " in caplog.text
    assert source.grpc_target("http://10.0.0.1:8001") == "10.0.0.1:9001"
    assert source.grpc_target("http://[fd00::1]:8001") == "[fd00::1]:9001"
    assert source.grpc_target("http://10.0.0.5:8001") is None  # no grpc port: HTTP
    assert source.grpc_target("http://10.0.0.2:8001") is None  # not ready

    # A pod in two slices, one with the gRPC port, keeps it; a slice that loses the port
    # takes its pods back to HTTP on the next listing.
    fake.set_slice("mlp-d", MLP, [("10.0.0.1", True)], ports={"http": 8001})
    with caplog.at_level(logging.INFO, logger="gateway.discovery"):
        fake.set_slice("mlp-a", MLP, [("10.0.0.1", True)], ports={"http": 8001})
        await eventually(
            lambda: source.grpc_target("http://10.0.0.1:8001") is None, 5.0, "gRPC port removed"
        )
    assert source.grpc_target("http://[fd00::1]:8001") == "[fd00::1]:9001"
    # The hop changed, the URLs did not: said in the log, not reported to the catalog.
    assert "mlp: 3 ready endpoint(s) http://10.0.0.1:8001 http://10.0.0.5:8001 " in caplog.text
    assert [urls for model, urls in listener.calls if model == "mlp"] == [listener.latest["mlp"]]


async def test_a_gateway_process_sends_batches_over_grpc_where_the_slice_has_the_port(
    demo_repository: Path, tmp_path: Path
) -> None:
    http_port, grpc_port, port = free_port(), free_port(), free_port()
    pod_log = tmp_path / "pod.log"
    pod_args = [
        "model-server",
        f"--model-repository={demo_repository}",
        "--model=mlp",
        f"--port={http_port}",
        f"--grpc-port={grpc_port}",
        "--access-log",
    ]
    fake = FakeKubernetes()
    fake.add_service(MLP, {"bazaar.dev/model": "mlp"}, namespace="ns")

    def pod(ports: dict[str, int]) -> None:
        fake.set_slice("mlp-x", MLP, [("127.0.0.1", True)], namespace="ns", ports=ports)

    def pod_infers_over_http() -> int:
        return pod_log.read_text().count('"POST /v2/models/mlp/versions/1/infer ')

    pod({"http": http_port, "grpc": grpc_port})
    url = f"http://127.0.0.1:{port}"
    pod_ready = f"http://127.0.0.1:{http_port}/v2/health/ready"
    with bazaar_process(pod_args, pod_log, pod_ready):
        async with serving(fake) as api, httpx.AsyncClient(base_url=url, timeout=30) as http:
            args = [*_gateway_args(tmp_path, api, port), "--hop=grpc"]
            ready = f"{url}/v2/models/mlp/ready"
            async with _in_thread(bazaar_process(args, tmp_path / "gateway.log", ready)):
                response = await http.post("/v2/models/mlp/infer", json=ONE_ROW)
                assert response.status_code == 200, response.text
                assert len(response.json()["outputs"][0]["data"]) == 10
                assert pod_infers_over_http() == 0, "the batch went over HTTP, not gRPC"

                pod({"http": http_port})  # the slice no longer lists gRPC: back to HTTP
                deadline = time.monotonic() + 10
                while pod_infers_over_http() == 0:
                    assert time.monotonic() < deadline, "the gateway still calls over gRPC"
                    response = await http.post("/v2/models/mlp/infer", json=ONE_ROW)
                    assert response.status_code == 200, response.text
                    await asyncio.sleep(0.05)
