"""The gateway's HTTP app in process (httpx over ASGI) in front of a real model-server.

Wired as ``gateway/server.py`` wires it: the real HTTP client, catalog and dispatchers, the
``model_server`` fixture's pod as the only endpoint. Answers are compared with the pod's own
answer to the same request; requests the gateway must refuse are checked never to reach the
pod by its own request counter.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.catalog import ModelCatalog
from gateway.client import HttpModelClient
from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from models.demo import digits_samples
from protocol.limits import EdgeLimits
from tests.support import eventually

HEADER_LENGTH = "Inference-Header-Content-Length"
DTYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "INT64": np.dtype("<i8")}


@dataclass
class Gateway:
    http: httpx.AsyncClient
    catalog: ModelCatalog
    model_server: str


MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(model_server: str) -> AsyncIterator[MakeGateway]:
    """Builds gateways whose every model has the pod as its endpoint; closes them after."""
    opened: list[tuple[httpx.AsyncClient, ModelCatalog, HttpModelClient]] = []

    async def build(
        models: Iterable[str] = ("digits", "mlp"), config: GatewayConfig | None = None
    ) -> Gateway:
        client = HttpModelClient()
        catalog = ModelCatalog(
            client, GatewayMetrics(CollectorRegistry()), config or GatewayConfig()
        )
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(catalog)), base_url="http://gateway"
        )
        opened.append((http, catalog, client))
        for model in models:
            catalog.set_endpoints(model, [model_server])
        await eventually(
            lambda: set(catalog.models) == set(models), 10.0, "the gateway to learn its models"
        )
        return Gateway(http, catalog, model_server)

    yield build
    for http, catalog, client in opened:
        await http.aclose()
        await catalog.close()
        await client.close()


@pytest.fixture
async def gateway(make_gateway: MakeGateway) -> Gateway:
    return await make_gateway()


@pytest.fixture
async def pod(model_server: str) -> AsyncIterator[httpx.AsyncClient]:
    """The pod itself, to ask it directly."""
    async with httpx.AsyncClient(base_url=model_server, timeout=30) as client:
        yield client


# -- bodies and answers ----------------------------------------------------------------------


def json_tensor(name: str, array: np.ndarray[Any, Any], datatype: str = "FP32") -> dict[str, Any]:
    return {
        "name": name,
        "shape": list(array.shape),
        "datatype": datatype,
        "data": array.ravel().tolist(),
    }


def json_body(array: np.ndarray[Any, Any], **extra: Any) -> dict[str, Any]:
    return {"inputs": [json_tensor("input", array)], **extra}


def binary_request(
    array: np.ndarray[Any, Any], size: int | None = None, **extra: Any
) -> tuple[bytes, dict[str, str]]:
    """A binary-extension body for input ``input`` (its ``binary_data_size`` overridable)."""
    chunk = array.astype("<f4").tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(array.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(chunk) if size is None else size},
                }
            ],
            **extra,
        }
    )
    headers = {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}
    return header + chunk, headers


def outputs_of(response: httpx.Response) -> dict[str, np.ndarray[Any, Any]]:
    """The outputs of an inference answer, JSON or binary, as arrays."""
    assert response.status_code == 200, response.text
    length = response.headers.get(HEADER_LENGTH)
    body = response.content
    split = int(length) if length is not None else len(body)
    header = orjson.loads(body[:split])
    offset = split
    outputs = {}
    for output in header["outputs"]:
        dtype = DTYPES[output["datatype"]]
        size = output.get("parameters", {}).get("binary_data_size")
        if size is None:
            array = np.array(output["data"], dtype=dtype)
        else:
            array = np.frombuffer(body[offset : offset + size], dtype=dtype)
            offset += size
        outputs[output["name"]] = array.reshape(output["shape"])
    assert offset == len(body)
    return outputs


def samples(text: str, name: str, **labels: str) -> list[float]:
    """Values of the samples called ``name`` whose labels include ``labels``."""
    return [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]


async def pod_inference_requests(pod: httpx.AsyncClient, model: str) -> float:
    """The pod's inference requests for ``model`` so far, every outcome together."""
    text = (await pod.get("/metrics")).text
    return sum(samples(text, "bazaar_model_inference_requests_total", model=model))


def mlp_rows(n: int, start: int = 0) -> np.ndarray[Any, Any]:
    """``n`` rows of 256, row i filled with (start + i) / 64."""
    values = np.arange(start, start + n, dtype=np.float32) / 64
    return np.repeat(values[:, None], 256, axis=1)


# -- metadata, health, index, stats ----------------------------------------------------------


async def test_server_metadata_and_health(gateway: Gateway) -> None:
    metadata = (await gateway.http.get("/v2")).json()
    assert metadata["name"] == "bazaar"
    # Exactly what is implemented: the repository's index alone is not the extension.
    assert set(metadata["extensions"]) == {
        "binary_tensor_data",
        "classification",
        "schedule_policy",
        "parameters",
        "statistics",
    }
    assert (await gateway.http.get("/v2/health/live")).json() == {"live": True}
    ready = await gateway.http.get("/v2/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"ready": True})


async def test_model_metadata_is_the_pods(gateway: Gateway, pod: httpx.AsyncClient) -> None:
    for path in ("/v2/models/mlp", "/v2/models/digits", "/v2/models/mlp/versions/1"):
        answer = await gateway.http.get(path)
        assert answer.status_code == 200, answer.text
        assert answer.json() == (await pod.get(path)).json()
    mlp = (await gateway.http.get("/v2/models/mlp")).json()
    assert mlp["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 256]}]
    assert mlp["parameters"] == {"max_batch_size": 32}
    for model in ("mlp", "digits"):
        answer = await gateway.http.get(f"/v2/models/{model}/ready")
        assert (answer.status_code, answer.json()) == (200, {"name": model, "ready": True})


async def test_config_is_tritons_of_what_the_gateway_enforces(gateway: Gateway) -> None:
    for path in ("/v2/models/mlp/config", "/v2/models/mlp/versions/1/config"):
        answer = await gateway.http.get(path)
        assert answer.status_code == 200, answer.text
        config = answer.json()
        assert (config["name"], config["platform"]) == ("mlp", "onnxruntime_onnx")
        assert config["max_batch_size"] == 32
        assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [256]}]
        assert config["output"] == [{"name": "output", "data_type": "TYPE_FP32", "dims": [10]}]
        policy = gateway.catalog.models["mlp"].dispatcher.policy
        batching = config["dynamic_batching"]
        assert batching["preferred_batch_size"] == list(policy.preferred_batch_sizes)
        assert batching["default_queue_policy"]["max_queue_size"] == policy.max_queue_size
    for path in ("/v2/models/nope/config", "/v2/models/mlp/versions/7/config"):
        assert (await gateway.http.get(path)).status_code == 404


async def test_repository_index_lists_the_models_and_their_state(gateway: Gateway) -> None:
    gateway.catalog.set_endpoints("ghost", [])
    index = await gateway.http.post("/v2/repository/index")
    assert index.status_code == 200
    assert index.json() == [
        {"name": "digits", "state": "READY", "version": "1"},
        {"name": "ghost", "state": "UNAVAILABLE"},
        {"name": "mlp", "state": "READY", "version": "1"},
    ]
    ready = await gateway.http.post("/v2/repository/index", json={"ready": True})
    assert [entry["name"] for entry in ready.json()] == ["digits", "mlp"]
    wrong = await gateway.http.post("/v2/repository/index", json={"ready": "no"})
    assert (wrong.status_code, wrong.json()) == (400, {"error": "'ready' must be a boolean"})


IDLE = {
    "queued": 0,
    "queued_rows": 0,
    "inflight_batches": 0,
    "inflight_rows": 0,
    "admitted": 0,
    "admitted_rows": 0,
    "completed_rows": 0,
    "endpoints": 1,
    "ready_endpoints": 1,
}


def idle(gateway: Gateway, **counted: int) -> dict[str, object]:
    """A model's ``/stats`` at its one version, "1", with ``counted`` on top of idle."""
    work = {**IDLE, "endpoint_urls": [gateway.model_server], **counted}
    return {
        **work,
        "default_version": "1",
        "traffic": None,
        "shadow": None,
        "rollout": None,
        "versions": {"1": work},
    }


async def test_stats_count_admitted_and_completed_work_per_model(gateway: Gateway) -> None:
    before = (await gateway.http.get("/stats")).json()
    instance = gateway.catalog.instance  # the gateway's name among its peers
    assert before == {
        "instance": instance,
        "models": {"digits": idle(gateway), "mlp": idle(gateway)},
    }
    for _ in range(3):
        answer = await gateway.http.post("/v2/models/mlp/infer", json=json_body(mlp_rows(2)))
        assert answer.status_code == 200
    await gateway.http.post("/v2/models/mlp/infer", json=json_body(mlp_rows(33)))  # a 400
    await asyncio.sleep(0)  # one loop turn: the last batch's task is reaped (see the next test)
    after = (await gateway.http.get("/stats")).json()
    counted = {"admitted": 3, "admitted_rows": 6, "completed_rows": 6}
    assert after == {
        "instance": instance,
        "models": {"digits": idle(gateway), "mlp": idle(gateway, **counted)},
    }


async def test_stats_show_no_batch_in_flight_once_its_answer_is_back(gateway: Gateway) -> None:
    """Fails today: ``inflight_batches`` is ``len(Dispatcher._inflight)``, and a batch's task
    leaves that set in a done callback, which runs after the callers it answered. Right after
    an answer /stats says one batch is in flight with zero rows, which the autoscaler reads.
    """
    answer = await gateway.http.post("/v2/models/mlp/infer", json=json_body(mlp_rows(2)))
    assert answer.status_code == 200
    mlp = (await gateway.http.get("/stats")).json()["models"]["mlp"]
    assert (mlp["inflight_batches"], mlp["inflight_rows"]) == (0, 0)


# -- inference -------------------------------------------------------------------------------


async def test_json_inference_answers_as_the_pod_does(
    gateway: Gateway, pod: httpx.AsyncClient
) -> None:
    digits, _ = digits_samples(5)
    cases = [
        ("mlp", json_body(mlp_rows(3), id="mlp-7")),
        ("digits", json_body(digits, id="digits-1")),
    ]
    for model, body in cases:
        via_gateway = await gateway.http.post(f"/v2/models/{model}/infer", json=body)
        direct = await pod.post(f"/v2/models/{model}/infer", json=body)
        assert via_gateway.status_code == 200, via_gateway.text
        assert via_gateway.headers["content-type"] == "application/json"
        assert via_gateway.json() == direct.json()
        assert via_gateway.json()["id"] == body["id"]
        assert via_gateway.json()["model_version"] == "1"


async def test_binary_inference_answers_as_the_pod_does(
    gateway: Gateway, pod: httpx.AsyncClient
) -> None:
    digits, _ = digits_samples(4)
    cases = [("mlp", mlp_rows(5, start=3)), ("digits", digits)]
    for model, rows in cases:
        body, headers = binary_request(
            rows, id=f"{model}-bin", parameters={"binary_data_output": True}
        )
        via_gateway = await gateway.http.post(
            f"/v2/models/{model}/infer", content=body, headers=headers
        )
        direct = await pod.post(f"/v2/models/{model}/infer", content=body, headers=headers)
        assert HEADER_LENGTH in via_gateway.headers
        ours, theirs = outputs_of(via_gateway), outputs_of(direct)
        assert ours.keys() == theirs.keys()
        for name in ours:
            np.testing.assert_array_equal(ours[name], theirs[name])
        header = orjson.loads(via_gateway.content[: int(via_gateway.headers[HEADER_LENGTH])])
        assert header["id"] == f"{model}-bin"
    assert outputs_of(via_gateway)["probabilities"].shape == (4, 10)


async def test_requested_outputs_are_honoured(gateway: Gateway, pod: httpx.AsyncClient) -> None:
    digits, labels = digits_samples(6)
    only_label = json_body(digits, outputs=[{"name": "label"}])
    answer = await gateway.http.post("/v2/models/digits/infer", json=only_label)
    assert [o["name"] for o in answer.json()["outputs"]] == ["label"]
    assert "id" not in answer.json()
    assert answer.json() == (await pod.post("/v2/models/digits/infer", json=only_label)).json()
    mixed = json_body(
        digits,
        outputs=[{"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "label"}],
    )
    answer = await gateway.http.post("/v2/models/digits/infer", json=mixed)
    outputs = outputs_of(answer)
    assert list(outputs) == ["probabilities", "label"]
    header = orjson.loads(answer.content[: int(answer.headers[HEADER_LENGTH])])
    assert "data" in header["outputs"][1] and "data" not in header["outputs"][0]
    np.testing.assert_array_equal(outputs["label"], np.argmax(outputs["probabilities"], axis=1))
    assert np.mean(outputs["label"] == labels) >= 0.8


# -- refused at the gateway ------------------------------------------------------------------


def _json(body: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    return orjson.dumps(body), {"Content-Type": "application/json"}


BAD_REQUESTS: dict[str, tuple[tuple[bytes, dict[str, str]], str]] = {
    "wrong shape": (
        _json({"inputs": [json_tensor("input", np.zeros((1, 255), np.float32))]}),
        r"input 'input': shape \[1,255\] does not match \[-1,256\] at dimension 1",
    ),
    "wrong rank": (
        _json({"inputs": [json_tensor("input", np.zeros(256, np.float32))]}),
        r"input 'input': shape \[256\] has rank 1, expected rank 2",
    ),
    "wrong datatype": (
        _json({"inputs": [json_tensor("input", np.zeros((1, 256)), "FP64")]}),
        r"input 'input': datatype FP64, expected FP32",
    ),
    "unknown input": (
        _json({"inputs": [json_tensor("pixels", np.zeros((1, 256), np.float32))]}),
        r"unknown input 'pixels': model 'mlp' has inputs",
    ),
    "too many rows": (
        _json(json_body(mlp_rows(33))),
        r"input 'input': batch size 33 exceeds the model's max_batch_size 32",
    ),
    "data short of the shape": (
        _json(
            {"inputs": [{"name": "input", "shape": [2, 256], "datatype": "FP32", "data": [1.0]}]}
        ),
        r"input 'input'",
    ),
    "unknown output": (
        _json(json_body(mlp_rows(1), outputs=[{"name": "logits"}])),
        r"unknown output 'logits': model 'mlp' has outputs",
    ),
    "bad JSON": ((b'{"inputs": [', {"Content-Type": "application/json"}), r"not valid JSON"),
    "binary size short": (
        binary_request(mlp_rows(1), size=1000),
        r"1024 bytes follow the JSON header but the binary_data_size of input 'input' add up "
        r"to 1000",
    ),
    "binary size overrun": (
        binary_request(mlp_rows(1), size=2048),
        r"input 'input': binary_data_size 2048 overruns the 1024 bytes",
    ),
    "binary without header length": (
        (binary_request(mlp_rows(1))[0], {"Content-Type": "application/octet-stream"}),
        r"binary tensors need Inference-Header-Content-Length",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_a_bad_request_is_answered_400_and_never_reaches_the_pod(
    gateway: Gateway, pod: httpx.AsyncClient, case: str
) -> None:
    (body, headers), message = BAD_REQUESTS[case]
    before = await pod_inference_requests(pod, "mlp")
    answer = await gateway.http.post("/v2/models/mlp/infer", content=body, headers=headers)
    assert answer.status_code == 400, answer.text
    assert answer.json().keys() == {"error"}
    assert re.search(message, answer.json()["error"]), answer.json()["error"]
    assert await pod_inference_requests(pod, "mlp") == before


async def test_the_pod_counter_does_count_requests_that_reach_it(
    gateway: Gateway, pod: httpx.AsyncClient
) -> None:
    """The counter the test above relies on moves when a request does reach the pod."""
    before = await pod_inference_requests(pod, "mlp")
    answer = await gateway.http.post("/v2/models/mlp/infer", json=json_body(mlp_rows(1)))
    assert answer.status_code == 200
    assert await pod_inference_requests(pod, "mlp") == before + 1


# -- schedule parameters ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parameters", "headers", "message"),
    [
        ({"priority": 2}, {}, r"priority 2 is out of range: model 'mlp' has levels 1\.\.1"),
        ({"priority": "high"}, {}, r"parameter 'priority' must be an integer >= 0, got 'high'"),
        ({"priority": 1.5}, {}, r"parameter 'priority' must be an integer"),
        ({"priority": -1}, {}, r"parameter 'priority' must be an integer >= 0"),
        ({"priority": True}, {}, r"parameter 'priority' must be an integer"),
        ({"timeout": -5}, {}, r"parameter 'timeout' must be an integer number of microseconds"),
        ({"timeout": "100"}, {}, r"parameter 'timeout' must be an integer"),
        ({"timeout": 2.5}, {}, r"parameter 'timeout' must be an integer"),
        ({}, {"X-Request-Timeout-Ms": "abc"}, r"X-Request-Timeout-Ms must be a number >= 0"),
        ({}, {"X-Request-Timeout-Ms": "-1"}, r"X-Request-Timeout-Ms must be a number >= 0"),
        ({}, {"X-Request-Timeout-Ms": "nan"}, r"X-Request-Timeout-Ms must be a number >= 0"),
    ],
)
async def test_bad_schedule_parameters_are_answered_400(
    gateway: Gateway,
    pod: httpx.AsyncClient,
    parameters: dict[str, Any],
    headers: dict[str, str],
    message: str,
) -> None:
    before = await pod_inference_requests(pod, "mlp")
    answer = await gateway.http.post(
        "/v2/models/mlp/infer",
        json=json_body(mlp_rows(1), parameters=parameters),
        headers=headers,
    )
    assert answer.status_code == 400, answer.text
    assert re.search(message, answer.json()["error"]), answer.json()["error"]
    assert await pod_inference_requests(pod, "mlp") == before


@pytest.mark.parametrize(
    ("parameters", "headers"),
    [
        ({"priority": 0}, {}),
        ({"priority": 1}, {}),
        ({"timeout": 0}, {}),
        ({"timeout": 5_000_000}, {}),
        ({"priority": 1, "timeout": 5_000_000}, {"X-Request-Timeout-Ms": "5000"}),
        ({}, {"X-Request-Timeout-Ms": "2500.5"}),
        ({}, {"X-Request-Timeout-Ms": "0"}),
    ],
)
async def test_valid_schedule_parameters_are_served(
    gateway: Gateway, parameters: dict[str, Any], headers: dict[str, str]
) -> None:
    answer = await gateway.http.post(
        "/v2/models/mlp/infer",
        json=json_body(mlp_rows(1), parameters=parameters),
        headers=headers,
    )
    assert answer.status_code == 200, answer.text
    assert outputs_of(answer)["output"].shape == (1, 10)


# -- models that are not there ---------------------------------------------------------------


async def test_unknown_model_or_version_is_404(gateway: Gateway) -> None:
    body = json_body(mlp_rows(1))
    for method, path, message in [
        ("POST", "/v2/models/nope/infer", "unknown model 'nope'"),
        ("GET", "/v2/models/nope", "unknown model 'nope'"),
        ("GET", "/v2/models/nope/ready", "unknown model 'nope'"),
        ("POST", "/v2/models/mlp/versions/7/infer", "unknown version '7' of model 'mlp'"),
        ("GET", "/v2/models/mlp/versions/7", "unknown version '7' of model 'mlp'"),
        ("GET", "/v2/models/nope/stats", "unknown model 'nope'"),
        ("GET", "/v2/models/mlp/versions/7/stats", "unknown version '7' of model 'mlp'"),
    ]:
        answer = await gateway.http.request(method, path, json=body if method == "POST" else None)
        assert (answer.status_code, answer.json()) == (404, {"error": message}), path


async def test_a_model_without_an_endpoint_yet_holds_requests_then_503s(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(config=GatewayConfig(max_queue_time_s=0.5))
    gateway.catalog.set_endpoints("ghost", [])
    held = asyncio.create_task(
        gateway.http.post("/v2/models/ghost/infer", json=json_body(mlp_rows(1)))
    )
    await eventually(lambda: gateway.catalog.waiting.get("ghost") == 1, 5.0, "the request held")
    stats = (await gateway.http.get("/stats")).json()["models"]["ghost"]
    assert (stats["queued"], stats["ready_endpoints"]) == (1, 0)  # demand the autoscaler sees
    ready = await gateway.http.get("/v2/models/ghost/ready")
    assert (ready.status_code, ready.json()) == (503, {"name": "ghost", "ready": False})
    # The gateway itself stays ready: it takes (and holds) the model's requests. Were it
    # not ready, it would drop out of the Service the autoscaler reads its queue through,
    # and the model would never be scaled up (the readiness deadlock).
    health = await gateway.http.get("/v2/health/ready")
    assert (health.status_code, health.json()) == (200, {"ready": True})
    served = await gateway.http.post("/v2/models/mlp/infer", json=json_body(mlp_rows(1)))
    assert served.status_code == 200  # the others still serve
    answer = await held
    assert answer.status_code == 503
    assert answer.json() == {"error": "model 'ghost' is without an endpoint for 0.5 s"}
    assert gateway.catalog.waiting["ghost"] == 0


async def test_a_held_request_is_answered_when_its_model_gets_an_endpoint(
    make_gateway: MakeGateway, model_server: str
) -> None:
    gateway = await make_gateway(models=("mlp",))
    gateway.catalog.set_endpoints("digits", [])  # scaled to zero before the gateway started
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
    held = asyncio.create_task(gateway.http.post("/v2/models/digits/infer", json=body))
    await eventually(lambda: gateway.catalog.waiting.get("digits") == 1, 5.0, "the request held")
    gateway.catalog.set_endpoints("digits", [model_server])  # a replica came up
    answer = await held
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["name"] == "label"


# -- many at once ----------------------------------------------------------------------------


async def test_concurrent_requests_each_get_their_own_rows_and_are_batched(
    gateway: Gateway, pod: httpx.AsyncClient
) -> None:
    rows = mlp_rows(64)
    direct = np.concatenate(
        [
            outputs_of(await pod.post("/v2/models/mlp/infer", json=json_body(rows[i : i + 32])))[
                "output"
            ]
            for i in (0, 32)
        ]
    )
    assert len({tuple(row) for row in direct.round(4)}) == 64  # every row's answer differs

    async def one(i: int) -> np.ndarray[Any, Any]:
        body = json_body(rows[i : i + 1], id=f"r{i}")
        answer = await gateway.http.post("/v2/models/mlp/infer", json=body)
        assert answer.json()["id"] == f"r{i}"
        return outputs_of(answer)["output"]

    answers = await asyncio.gather(*(one(i) for i in range(64)))
    for i, answer in enumerate(answers):
        np.testing.assert_allclose(answer, direct[i : i + 1], rtol=1e-5, atol=1e-5)

    text = (await gateway.http.get("/metrics")).text
    model = {"model": "mlp"}
    assert samples(text, "bazaar_gateway_batch_size_sum", **model) == [64]
    (batches,) = samples(text, "bazaar_gateway_batch_size_count", **model)
    assert batches < 64  # some batch carried more than one request
    assert samples(text, "bazaar_gateway_requests_total", **model, outcome="success") == [64]
    assert samples(text, "bazaar_gateway_queue_wait_seconds_count", **model) == [64]
    assert samples(text, "bazaar_gateway_pod_seconds_count", **model) == [batches]
    assert samples(text, "bazaar_gateway_request_seconds_count", **model) == [64]
    assert samples(text, "bazaar_gateway_queue_depth", **model) == [0]
    assert samples(text, "bazaar_gateway_ready_endpoints", **model) == [1]
    # Counters of rows (one per request here), for rate(): no rate gauges.
    assert samples(text, "bazaar_gateway_admitted_rows_total", **model) == [64]
    assert samples(text, "bazaar_gateway_completed_rows_total", **model) == [64]
    assert "rows_per_second" not in text


async def test_statistics_count_requests_rows_and_the_batches_sent(gateway: Gateway) -> None:
    rows = mlp_rows(16)
    answers = await asyncio.gather(
        *(gateway.http.post("/v2/models/mlp/infer", json=json_body(rows[i : i + 2]))
          for i in range(0, 16, 2))
    )  # fmt: skip
    assert [answer.status_code for answer in answers] == [200] * 8
    too_many = await gateway.http.post("/v2/models/mlp/infer", json=json_body(mlp_rows(33)))
    assert too_many.status_code == 400

    answer = await gateway.http.get("/v2/models/mlp/stats")
    assert answer.status_code == 200, answer.text
    (stat,) = answer.json()["model_stats"]
    assert (stat["name"], stat["version"]) == ("mlp", "1")
    assert stat["inference_count"] == 16
    stats = stat["inference_stats"]
    assert (stats["success"]["count"], stats["fail"]["count"]) == (8, 1)
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert stats[phase]["count"] == 8, phase
    # Every request waited for its batch's round trip to the pod, within its own time.
    assert 0 < stats["compute_infer"]["ns"] < stats["success"]["ns"]
    # The batches sent, by size, are the batches the metrics count.
    batches = stat["batch_stats"]
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in batches) == 16
    text = (await gateway.http.get("/metrics")).text
    sent = samples(text, "bazaar_gateway_batch_size_count", model="mlp")
    assert [stat["execution_count"]] == sent == [sum(b["compute_infer"]["count"] for b in batches)]

    assert (await gateway.http.get("/v2/models/mlp/versions/1/stats")).json() == {
        "model_stats": [stat]
    }
    every = (await gateway.http.get("/v2/models/stats")).json()["model_stats"]
    assert [s["name"] for s in every] == ["digits", "mlp"]
    assert every[0]["execution_count"] == 0 and every[1] == stat


async def test_metrics_count_outcomes(gateway: Gateway) -> None:
    await gateway.http.post("/v2/models/mlp/infer", json=json_body(mlp_rows(1)))
    await gateway.http.post("/v2/models/mlp/infer", json=json_body(mlp_rows(33)))
    answer = await gateway.http.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    text = answer.text
    counts = [("success", 1), ("client_error", 1), ("shed", 0), ("expired", 0), ("server_error", 0)]
    for outcome, count in counts:
        assert samples(text, "bazaar_gateway_requests_total", model="mlp", outcome=outcome) == [
            count
        ]
    assert samples(text, "bazaar_gateway_queue_depth", model="digits") == [0]
    assert samples(text, "bazaar_gateway_inflight_batches", model="mlp") == [0]
    # Labels are bounded: no series per pod URL (they churn with every pod; /stats has them).
    assert gateway.model_server not in text
    assert samples(text, "bazaar_gateway_pod_seconds_bucket", model="mlp", le="+Inf") == [1]
    assert samples(text, "bazaar_gateway_queue_wait_seconds_bucket", model="mlp", le="+Inf") == [1]


# -- deadlines -------------------------------------------------------------------------------


async def test_a_request_whose_deadline_passes_in_the_queue_gets_504(
    make_gateway: MakeGateway, pod: httpx.AsyncClient
) -> None:
    """One batch in flight at a time, full ones queued ahead: a 1 ms deadline must pass.

    Deterministic: the request queues behind full 32-row batches of mlp_wide (each several ms
    on the pod's only slot, max_batches_per_endpoint=1), which it cannot join; and mlp_wide
    holds a partial batch for 2 ms besides.
    """
    gateway = await make_gateway(["mlp_wide"], GatewayConfig(max_batches_per_endpoint=1))
    wide = np.ones((32, 1024), np.float32)
    computed_before = await pod_inference_requests(pod, "mlp_wide")
    full = [
        asyncio.create_task(
            gateway.http.post("/v2/models/mlp_wide/infer", content=body, headers=headers)
        )
        for body, headers in [binary_request(wide)] * 4
    ]
    await eventually(
        lambda: gateway.catalog.models["mlp_wide"].dispatcher.stats().admitted == 4,
        10.0,
        "four full batches admitted",
    )
    doomed = await gateway.http.post(
        "/v2/models/mlp_wide/infer",
        json={
            "inputs": [json_tensor("input", np.ones((1, 1024), np.float32))],
            "parameters": {"timeout": 1000},
        },
    )
    assert doomed.status_code == 504, doomed.text
    assert "deadline" in doomed.json()["error"]
    assert all(answer.status_code == 200 for answer in await asyncio.gather(*full))
    assert await pod_inference_requests(pod, "mlp_wide") == computed_before + 4  # not doomed
    text = (await gateway.http.get("/metrics")).text
    assert samples(text, "bazaar_gateway_requests_total", model="mlp_wide", outcome="expired") == [
        1
    ]
    assert samples(text, "bazaar_gateway_expired_requests_total", model="mlp_wide") == [1]


async def test_the_configured_inference_body_limit_reaches_the_route(
    make_gateway: MakeGateway,
) -> None:
    """Behind the edge or not (here: not), the gateway reads no more than its limit."""
    gateway = await make_gateway(["mlp"], GatewayConfig(edge=EdgeLimits(max_infer_body_bytes=100)))
    answer = await gateway.http.post("/v2/models/mlp/infer", content=b"x" * 101)
    assert answer.status_code == 413
    assert "100 bytes" in answer.json()["error"]
