"""Traffic policies: the decision (``protocol.traffic``) alone, and at a gateway in front of
real pods serving ``scale`` at versions 1 and 2 (``tests.gateway.scale``: an answer says which
version computed it), the policy coming from the endpoints file, re-read while the gateway
runs, from the model's config, and from a Service annotation in Kubernetes."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
import yaml
from prometheus_client import CollectorRegistry

from gateway.app import EXTENSIONS, SERVER_NAME, create_app
from gateway.catalog import ModelCatalog
from gateway.client import HttpModelClient
from gateway.config import GatewayConfig
from gateway.discovery import TRAFFIC_ANNOTATION, EndpointSlices, StaticEndpoints
from gateway.grpc import GatewayGrpcBackend
from gateway.inference import GatewayInference
from gateway.metrics import GatewayMetrics
from protocol.errors import ConfigError
from protocol.grpc.service import InferenceService, grpc_server
from protocol.limits import EdgeLimits
from protocol.traffic import TrafficPolicy, choose_version, parse_traffic, split_of
from tests.cluster.fake_kubernetes import FakeKubernetes, cluster_at, serving
from tests.gateway.scale import WIDTH, answered, body, model_server, pod_url, write_scale
from tests.gateway.test_discovery import Listener
from tests.support import eventually

REQUESTS = 10_000
SIGMAS = 5


def within_bounds(count: int, n: int, share: float) -> bool:
    """``count`` of ``n`` draws is within ``SIGMAS`` binomial standard deviations of ``share``."""
    return abs(count - n * share) <= SIGMAS * math.sqrt(n * share * (1 - share))


def policy(weights: dict[str, float], sticky_header: str | None = None) -> TrafficPolicy:
    data: dict[str, object] = {"weights": weights}
    if sticky_header is not None:
        data["sticky_header"] = sticky_header
    return parse_traffic(data, "test")


# -- the decision ---------------------------------------------------------------------------


def test_a_split_shares_draws_by_weight_and_leaves_out_versions_not_served() -> None:
    split = split_of(policy({"2": 10, "1": 90, "3": 50}), {"1", "2"})
    assert split is not None
    rng = random.Random(7)
    counts = Counter(choose_version(split, None, rng) for _ in range(REQUESTS))
    assert within_bounds(counts["2"], REQUESTS, 0.1), counts
    assert set(counts) == {"1", "2"}
    assert split_of(policy({"3": 1}), {"1", "2"}) is None


def test_a_sticky_key_stays_on_its_version_and_moves_only_towards_a_growing_one() -> None:
    rng = random.Random(7)
    canary = split_of(policy({"1": 90, "2": 10}, "X-User"), {"1", "2"})
    half = split_of(policy({"1": 50, "2": 50}, "X-User"), {"1", "2"})
    assert canary is not None and half is not None and canary.header == b"x-user"
    keys = [f"user-{i}".encode() for i in range(2000)]
    at_canary = {key: choose_version(canary, key, rng) for key in keys}
    assert all(choose_version(canary, key, rng) == at_canary[key] for key in keys)
    assert within_bounds(Counter(at_canary.values())["2"], len(keys), 0.1)
    at_half = {key: choose_version(half, key, rng) for key in keys}
    assert all(at_half[key] == "2" for key in keys if at_canary[key] == "2")


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ({"weights": {"1": -1}}, "traffic.weights.1"),
        ({"weights": {"1": 0}}, "traffic.weights"),
        ({"weights": {"1": "ten"}}, "traffic.weights.1"),
        ({"weights": {}}, "traffic.weights"),
        ({"weights": {"1": 1}, "sticky_header": 7}, "traffic.sticky_header"),
        ({"weights": {"1": 1}, "shadow": {}}, "traffic.shadow.version"),
        ({"weights": {"1": 1}, "shadow": {"version": 2, "share": 2}}, "traffic.shadow.share"),
        (
            {"weights": {"1": 1}, "shadow": {"version": 2, "share": 1, "compare": "f1"}},
            "traffic.shadow.compare",
        ),
        ({"weights": {"1": 1}, "replay": {}}, "traffic"),
    ],
)
def test_a_bad_policy_is_refused_naming_its_key(value: object, key: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_traffic(value, "config.yaml")
    assert refused.value.key == key


# -- at a gateway ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def gateway() -> AsyncIterator[tuple[httpx.AsyncClient, ModelCatalog]]:
    client = HttpModelClient()
    catalog = ModelCatalog(
        client, GatewayMetrics(CollectorRegistry()), GatewayConfig(), refresh_s=0.1
    )
    transport = httpx.ASGITransport(app=create_app(catalog))
    http = httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=30)
    try:
        yield http, catalog
    finally:
        await http.aclose()
        await catalog.close()
        await client.close()


async def versions_of(http: httpx.AsyncClient, n: int, user: str | None = None) -> Counter[str]:
    """Which versions answered ``n`` unversioned requests (with ``X-User: user``)."""
    headers = {} if user is None else {"X-User": user}
    answers = await asyncio.gather(
        *(http.post("/v2/models/scale/infer", json=body(1.0), headers=headers) for _ in range(n))
    )
    for answer in answers:  # the version named is the one that computed it
        assert answered(answer) == [float(answer.json()["model_version"])]
    return Counter(answer.json()["model_version"] for answer in answers)


def write_endpoints(path: Path, urls: list[str], weights: dict[str, int]) -> None:
    traffic = {"weights": weights, "sticky_header": "X-User"}
    entry = {"endpoints": urls, "traffic": traffic}
    path.write_text(yaml.safe_dump({"models": {"scale": entry}}))


async def test_the_endpoints_file_splits_90_10_sticks_by_header_and_changes_while_running(
    scale_pods: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "endpoints.yaml"
    write_endpoints(path, scale_pods, {"1": 90, "2": 10})
    source = StaticEndpoints(path, reread_s=0.05)
    async with gateway() as (http, catalog):
        await source.start(catalog.set_endpoints, CollectorRegistry())
        try:
            await eventually(lambda: "2" in catalog.versions.get("scale", {}), 10, "version 2")
            counts: Counter[str] = Counter()
            for _ in range(REQUESTS // 500):
                counts += await versions_of(http, 500)
            assert within_bounds(counts["2"], REQUESTS, 0.1), counts
            assert counts["1"] + counts["2"] == REQUESTS

            for user in ("ada", "bob", "cy", "dee", "eve", "fay", "gus", "hal"):
                assert len(await versions_of(http, 10, user)) == 1, user

            write_endpoints(path, scale_pods, {"2": 1})
            await eventually(
                lambda: catalog.traffic["scale"] == policy({"2": 1}, "x-user"), 5, "the change"
            )
            assert await versions_of(http, 50) == {"2": 50}
            stats = (await http.get("/stats")).json()["models"]["scale"]
            assert stats["traffic"] == {"weights": {"2": 1.0}, "sticky_header": "x-user"}

            path.write_text("models: {scale: [not-a-url]}")  # broken: the last policy stays
            await asyncio.sleep(0.2)
            assert await versions_of(http, 20) == {"2": 20}
        finally:
            await source.stop()


async def test_over_grpc_a_sticky_key_in_the_metadata_always_lands_on_one_version(
    scale_pods: list[str],
) -> None:
    """``tritonclient.grpc`` sends its ``headers`` as the call's metadata: the sticky header's
    name there is the key, as the header is over HTTP, and a request without it is drawn."""
    inputs = triton_grpc.InferInput("x", [1, WIDTH], "FP32")
    inputs.set_data_from_numpy(np.ones((1, WIDTH), dtype=np.float32))

    async def versions(
        client: triton_aio.InferenceServerClient, n: int, user: str | None
    ) -> set[str]:
        headers = None if user is None else {"x-user": user}  # gRPC's names are lower-case
        answers = await asyncio.gather(
            *(client.infer("scale", [inputs], headers=headers) for _ in range(n))
        )
        for answer in answers:  # the version named is the one that computed it
            assert answer.as_numpy("y")[0, 0] == float(answer.get_response().model_version)
        return {answer.get_response().model_version for answer in answers}

    async with gateway() as (_, catalog):
        catalog.set_endpoints("scale", scale_pods, policy({"1": 50, "2": 50}, "X-User"))
        await eventually(lambda: "2" in catalog.versions.get("scale", {}), 10, "version 2")
        backend = GatewayGrpcBackend(GatewayInference(catalog), SERVER_NAME, EXTENSIONS)
        server, port = grpc_server(InferenceService(backend), "127.0.0.1", 0, EdgeLimits())
        await server.start()
        client = triton_aio.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            landed = {}
            for user in ("ada", "bob", "cy", "dee", "eve", "fay", "gus", "hal"):
                [landed[user]] = await versions(client, 20, user)
            assert set(landed.values()) == {"1", "2"}, landed  # the keys spread over both
            assert await versions(client, 40, None) == {"1", "2"}
        finally:
            await client.close()
            await server.stop(None)


@pytest.fixture(scope="module")
def pod_with_policy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A pod serving ``scale`` 1 and 2 whose config sends every unversioned request to 1."""
    traffic = "traffic:\n  weights: {'1': 1}\n"
    root = write_scale(tmp_path_factory.mktemp("policy-repository"), [1, 2], traffic)
    url = pod_url()
    with model_server(root, url, tmp_path_factory.mktemp("logs") / "policy-pod.log"):
        yield url


async def test_the_model_config_policy_applies_until_the_source_gives_one(
    pod_with_policy: str,
) -> None:
    async with gateway() as (http, catalog):
        catalog.set_endpoints("scale", [pod_with_policy])
        await eventually(lambda: "scale" in catalog.models, 10, "the gateway to learn scale")
        assert catalog.traffic["scale"] == policy({"1": 1})
        assert await versions_of(http, 20) == {"1": 20}
        # What the endpoints file or the Service annotation says replaces it ...
        catalog.set_endpoints("scale", [pod_with_policy], policy({"2": 1}))
        assert await versions_of(http, 20) == {"2": 20}
        # ... until it says nothing any more.
        catalog.set_endpoints("scale", [pod_with_policy])
        assert await versions_of(http, 20) == {"1": 20}


async def test_a_service_annotation_comes_with_the_endpoints_and_a_bad_one_keeps_the_last() -> None:
    fake = FakeKubernetes()
    fake.add_service("scale", {"bazaar.dev/model": "scale"})
    fake.set_slice("scale-a", "scale", [("10.0.0.1", True)])
    annotations = fake.services["default", "scale"]["metadata"].setdefault("annotations", {})
    annotations[TRAFFIC_ANNOTATION] = '{"weights": {"1": 90, "2": 10}}'
    async with serving(fake) as url:
        cluster = cluster_at(url, "gateway", "gateway.discovery", request_timeout_s=1.0)
        source = EndpointSlices(cluster, resync_s=0.05)
        listener = Listener()
        await source.start(listener, CollectorRegistry())
        try:
            assert listener.traffic["scale"] == policy({"1": 90, "2": 10})
            annotations[TRAFFIC_ANNOTATION] = "weights: {'2': 1}\nsticky_header: X-User"
            await eventually(
                lambda: listener.traffic["scale"] == policy({"2": 1}, "x-user"), 5, "the change"
            )
            annotations[TRAFFIC_ANNOTATION] = '{"weights": {"2": -1}}'
            requests = len(fake.requests)
            await eventually(lambda: len(fake.requests) >= requests + 6, 5, "three listings")
            assert listener.traffic["scale"] == policy({"2": 1}, "x-user")
            del annotations[TRAFFIC_ANNOTATION]
            await eventually(lambda: listener.traffic["scale"] is None, 5, "the policy gone")
            assert listener.latest["scale"] == ["http://10.0.0.1:8001"]
        finally:
            await source.stop()
