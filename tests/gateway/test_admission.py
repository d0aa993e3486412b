"""Admission, cancellation and deadlines through the gateway's real ASGI app, on loop time.

The app is ``create_app`` over a catalog serving model ``m`` with a dispatcher over fake
pods (``tests.gateway.fakes``), driven the way uvicorn and the edge drive it: one ``scope``,
a ``receive`` that hands over the body chunk by chunk, a ``send`` that records the answer,
and, when the client leaves, the edge's call to the scope's ``ON_DISCONNECT`` (what
``protocol.edge.EdgeProtocol`` does when the connection is lost; tests/protocol/test_edge.py
checks that over a real socket).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.catalog import ModelCatalog, ServedModel
from gateway.config import GatewayConfig
from gateway.dispatcher import BatchPolicy, Dispatcher
from gateway.metrics import GatewayMetrics
from gateway.router import EndpointPool
from gateway.tenants import TenantPolicies, TenantPolicy
from protocol.auth import TENANT
from protocol.edge import ON_DISCONNECT
from protocol.schema import ModelMetadata
from tests.gateway.fakes import FakePods

pytestmark = pytest.mark.looptime

METADATA = ModelMetadata.from_json(
    {
        "name": "m",
        "versions": ["1"],
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1]}],
        "outputs": [{"name": "out", "datatype": "FP32", "shape": [-1, 1]}],
        "parameters": {"max_batch_size": 32},
    }
)


def body(rows: int, **parameters: Any) -> bytes:
    tensor = {"name": "x", "shape": [rows, 1], "datatype": "FP32", "data": [1.0] * rows}
    return orjson.dumps({"inputs": [tensor], "parameters": parameters})


@dataclass
class Client:
    """One HTTP request as the server hands it to the app."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    chunks: int = 2
    read: int = 0
    """Body chunks the app has taken."""
    tenant: str | None = None
    scope: dict[str, Any] = field(default_factory=dict)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    sent: list[MutableMapping[str, Any]] = field(default_factory=list)

    async def receive(self) -> dict[str, Any]:
        size = -(-len(self.body) // self.chunks)
        if self.read < self.chunks:
            chunk = self.body[self.read * size : (self.read + 1) * size]
            self.read += 1
            return {"type": "http.request", "body": chunk, "more_body": self.read < self.chunks}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.sent.append(message)

    def leave(self) -> None:
        self.gone.set()
        on_disconnect = self.scope.get(ON_DISCONNECT)
        if on_disconnect is not None:
            on_disconnect()

    @property
    def status(self) -> int | None:
        return self.sent[0]["status"] if self.sent else None

    @property
    def response_headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.sent[0]["headers"]}

    @property
    def answer(self) -> Any:
        return orjson.loads(self.sent[1]["body"])


@dataclass
class Gateway:
    pods: FakePods
    dispatcher: Dispatcher
    registry: CollectorRegistry
    request: Callable[[Client], asyncio.Future[None]]

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, {"model": "m", "version": "1", **labels})


MakeGateway = Callable[..., Gateway]


@pytest.fixture
async def make() -> AsyncIterator[MakeGateway]:
    catalogs: list[ModelCatalog] = []

    def build(pods: FakePods, tenants: TenantPolicies | None = None, **policy: Any) -> Gateway:
        registry = CollectorRegistry()
        metrics = GatewayMetrics(registry)
        config = GatewayConfig(tenants=tenants or TenantPolicies())
        catalog = ModelCatalog(pods, metrics, config)  # type: ignore[arg-type]
        pool = EndpointPool("m", pods, max_batches_per_endpoint=1, rng=random.Random(0))
        pool.set_endpoints(["http://pod-0"])
        model_metrics = metrics.for_model("m", "1")
        dispatcher = Dispatcher("m", BatchPolicy(**policy), pool, model_metrics)
        collector = asyncio.create_task(dispatcher.run())
        served = ServedModel(METADATA, dispatcher, model_metrics, collector)
        catalog.models["m"] = served
        catalog.versions["m"] = {"1": served}
        catalogs.append(catalog)
        app = create_app(catalog)

        def request(client: Client) -> asyncio.Future[None]:
            headers = [(k.lower().encode(), v.encode()) for k, v in client.headers.items()]
            client.scope.update(
                type="http", method="POST", path="/v2/models/m/infer", headers=headers
            )
            if client.tenant is not None:
                client.scope[TENANT] = client.tenant
            return asyncio.ensure_future(app(client.scope, client.receive, client.send))

        return Gateway(pods, dispatcher, registry, request)

    yield build
    for catalog in catalogs:
        await catalog.close()


async def test_a_full_queue_refuses_before_the_body_is_decoded(make: MakeGateway) -> None:
    gateway = make(FakePods(latency_s=1.0), max_batch_size=1, max_queue_size=2)
    running = [Client(body(1)) for _ in range(3)]  # one at the pod, two queued
    for client in running:
        gateway.request(client)
        await asyncio.sleep(0)
    await asyncio.sleep(0.001)
    assert gateway.dispatcher.stats().queued == 2
    refused = Client(b"{not json")  # decoding it would answer 400
    await gateway.request(refused)
    assert refused.status == 503
    assert "max_queue_size" in refused.answer["error"]
    assert int(refused.response_headers["retry-after"]) >= 1
    shed = "bazaar_gateway_shed_requests_total"
    assert gateway.sample(shed, stage="before_decode", reason="queue_full") == 1
    assert gateway.sample(shed, stage="after_decode", reason="queue_full") == 0
    assert gateway.sample("bazaar_gateway_requests_total", outcome="shed") == 1


async def test_a_client_that_leaves_takes_its_rows_out_of_the_queue(make: MakeGateway) -> None:
    pods = FakePods(latency_s=1.0)
    gateway = make(pods, max_batch_size=32)
    first = Client(body(1))
    answered = gateway.request(first)
    await asyncio.sleep(0.001)
    clients = [Client(body(32)) for _ in range(100)]
    handlers = [gateway.request(client) for client in clients]
    await asyncio.sleep(0.001)
    assert gateway.dispatcher.stats().queued_rows == 3200
    for client in clients:
        client.leave()
    await asyncio.gather(*handlers)
    assert gateway.dispatcher.stats().queued_rows == 0  # before the pod has answered
    assert all(client.sent == [] for client in clients)  # nobody to answer
    await answered
    await asyncio.sleep(2.0)
    assert [call.rows for call in pods.calls] == [1]  # none of the 3,200 rows computed
    assert first.status == 200
    assert gateway.sample("bazaar_gateway_requests_total", outcome="cancelled") == 100


async def test_when_its_only_client_leaves_a_batch_at_the_pod_is_stopped(
    make: MakeGateway,
) -> None:
    gateway = make(FakePods(latency_s=60.0), max_batch_size=32)
    client = Client(body(4))
    handler = gateway.request(client)
    await asyncio.sleep(0.5)
    assert gateway.dispatcher.stats().inflight_batches == 1
    client.leave()
    await handler
    await asyncio.sleep(0.001)
    assert gateway.dispatcher.stats().inflight_batches == 0
    assert gateway.dispatcher.pool.endpoints[0].inflight_batches == 0


async def test_a_deadline_is_answered_504_on_time_by_a_stalled_pod(make: MakeGateway) -> None:
    loop = asyncio.get_running_loop()
    pods = FakePods(latency_s=3600.0)
    gateway = make(pods, max_batch_size=32)
    client = Client(body(1), headers={"X-Request-Timeout-Ms": "100"})
    await gateway.request(client)
    assert client.status == 504
    assert loop.time() == pytest.approx(0.100)
    assert [call.timeout_s for call in pods.calls] == [pytest.approx(0.100)]
    assert gateway.dispatcher.pool.ready_endpoints == 1  # not ejected for it
    assert gateway.dispatcher.pool.endpoints[0].failures == 0


async def test_a_tenant_over_its_quota_is_answered_429_before_decoding(make: MakeGateway) -> None:
    tenants = TenantPolicies(
        TenantPolicy(),
        {"metered": TenantPolicy(requests_per_second=1, burst=2, max_concurrent_rows=40)},
    )
    gateway = make(FakePods(latency_s=1.0), tenants, max_batch_size=32)
    first = [Client(body(20), tenant="metered") for _ in range(2)]  # the burst, 40 rows
    handlers = [gateway.request(client) for client in first]
    await asyncio.sleep(0.001)
    over = Client(b"{not json", tenant="metered")
    await gateway.request(over)
    assert over.status == 429  # not 400: refused before the body is decoded
    assert "tenant 'metered'" in over.answer["error"]
    assert int(over.response_headers["retry-after"]) >= 1
    others = Client(body(1))  # anonymous: the default policy, no limits
    await gateway.request(others)
    assert others.status == 200
    await asyncio.gather(*handlers)
    assert [client.status for client in first] == [200, 200]
    await asyncio.sleep(1.0)  # a token back, and the 40 rows answered and released
    again = Client(body(32), tenant="metered")
    await gateway.request(again)
    assert again.status == 200
    refusals = gateway.registry.get_sample_value(
        "bazaar_gateway_quota_refusals_total", {"tenant": "metered", "quota": "rows"}
    )
    assert refusals == 1
    assert gateway.sample("bazaar_gateway_requests_total", outcome="rate_limited") == 1
