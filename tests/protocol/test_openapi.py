"""The OpenAPI document: valid OpenAPI 3.1, every route of the table, and schemas that agree
with the codec (what the schema admits decodes; what the encoder writes validates)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import numpy as np
import orjson
import pytest
import schemathesis
from starlette.applications import Starlette
from starlette.routing import Route

from protocol.codec import InferenceResponse, decode_request, encode_response
from protocol.errors import BazaarError, InvalidRequest
from protocol.fastpath import INFER_PATHS, infer_target, with_infer_route
from protocol.jsonschemas import ERROR, inference_request, inference_response
from protocol.openapi import EDGE_REFUSALS, INFER_ERRORS, OPERATIONS, document, openapi_route
from protocol.responses import model_routes, server_routes
from protocol.schema import DATATYPES, ModelMetadata, TensorSpec

Document = dict[str, Any]


def model(name: str, datatype: str, shape: tuple[int, ...], max_batch_size: int) -> ModelMetadata:
    """A model with one input and two outputs of ``datatype``."""
    return ModelMetadata(
        name=name,
        version="3",
        platform="onnxruntime_onnx",
        inputs=(TensorSpec("x", datatype, shape),),
        outputs=(TensorSpec("y", datatype, shape), TensorSpec("z", datatype, shape)),
        max_batch_size=max_batch_size,
    )


# Every datatype, batching and not, a fixed and a variable dimension, a name needing quoting.
MODELS = [model(f"m-{dt.lower()}", dt, (-1, 2), 4) for dt in DATATYPES] + [
    model("no batch", "FP32", (3, -1), 0),
    model("scalar", "INT8", (), 0),
]


def unavailable(name: str, version: str | None) -> Any:
    raise BazaarError("not called: the document is read, not the routes")


ROUTES = [
    *server_routes("test", [], lambda: True),
    *model_routes(unavailable, unavailable, unavailable),
    openapi_route(lambda: MODELS),
]


@pytest.fixture(scope="module")
def openapi() -> Document:
    return document(ROUTES, MODELS)


def test_the_document_is_valid_openapi_3_1_with_valid_json_schemas(openapi: Document) -> None:
    schemathesis.openapi.from_dict(openapi).validate()
    for name in (m.name for m in MODELS):
        operation = openapi["paths"][f"/v2/models/{name.replace(' ', '%20')}/infer"]["post"]
        request = operation["requestBody"]["content"]["application/json"]["schema"]
        response = operation["responses"]["200"]["content"]["application/json"]["schema"]
        jsonschema.Draft202012Validator.check_schema(request)
        jsonschema.Draft202012Validator.check_schema(response)


def test_every_route_is_listed_with_its_methods_and_the_inference_paths_too(
    openapi: Document,
) -> None:
    table = {route.path: route.methods - {"HEAD"} for route in ROUTES if isinstance(route, Route)}
    table |= {path: {"POST"} for path in INFER_PATHS}
    listed = {
        path: {method.upper() for method in item if method != "parameters"}
        for path, item in openapi["paths"].items()
        if "{" in path or not path.startswith("/v2/models/")  # not a model's own copy
    }
    assert listed == table
    for path in table.keys() & OPERATIONS.keys():
        assert "not described" not in str(openapi["paths"][path])


def test_inference_takes_the_binary_extension_and_the_schedule_parameters(
    openapi: Document,
) -> None:
    for path in ["/v2/models/{model}/infer", "/v2/models/m-fp32/versions/3/infer"]:
        operation = openapi["paths"][path]["post"]
        headers = {parameter["name"] for parameter in operation["parameters"]}
        assert headers == {"Inference-Header-Content-Length", "X-Request-Timeout-Ms"}
        request = operation["requestBody"]["content"]
        assert set(request) == {"application/json", "application/octet-stream"}
        parameters = request["application/json"]["schema"]["properties"]["parameters"]
        assert {"priority", "timeout", "binary_data_output"} <= set(parameters["properties"])
        answer = operation["responses"]["200"]
        assert set(answer["content"]) == {"application/json", "application/octet-stream"}
        assert "Inference-Header-Content-Length" in answer["headers"]


def test_each_model_has_its_routes_at_concrete_paths_that_the_routes_match(
    openapi: Document,
) -> None:
    concrete = [path for path in openapi["paths"] if "{" not in path and "/v2/models/" in path]
    per_model = [path for path in openapi["paths"] if path.startswith("/v2/models/{model}")]
    assert len(concrete) == len(per_model) * len(MODELS)
    for path in concrete:
        matched = [
            route for route in ROUTES if isinstance(route, Route) and route.path_regex.match(path)
        ]
        assert len(matched) == 1 or (not matched and infer_target(path) is not None), path
    assert "/v2/models/no%20batch/versions/3/infer" in openapi["paths"]


def test_every_error_the_inference_route_raises_is_documented_with_the_error_body(
    openapi: Document,
) -> None:
    responses = openapi["paths"]["/v2/models/{model}/infer"]["post"]["responses"]
    expected = {cls.status for cls in INFER_ERRORS} | set(EDGE_REFUSALS) | {200, 500}
    assert set(map(int, responses)) == expected
    components = openapi["components"]["responses"]
    for status in expected - {200}:
        error = components[f"Error{status}"]
        assert error["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"
        }
        assert error["description"]
    assert "Retry-After" in components["Error503"]["headers"]
    # Readiness answers 503 with its own body, and the edge 503 with an error.
    ready = openapi["paths"]["/v2/health/ready"]["get"]["responses"]["503"]
    assert ready["content"]["application/json"]["schema"]["anyOf"][1] == ERROR


@pytest.mark.parametrize("metadata", MODELS, ids=lambda m: m.name)
def test_the_example_request_is_valid_and_decodes(
    openapi: Document, metadata: ModelMetadata
) -> None:
    path = f"/v2/models/{metadata.name.replace(' ', '%20')}/infer"
    content = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    jsonschema.validate(content["example"], content["schema"])
    decode_request(orjson.dumps(content["example"]), None, metadata)


@pytest.mark.parametrize("datatype", [dt for dt in DATATYPES if dt not in ("BYTES", "BOOL")])
def test_element_ranges_are_the_codecs(datatype: str) -> None:
    """Inside the schema's bounds the codec decodes; past them both refuse."""
    metadata = model("m", datatype, (-1,), 4)
    schema = inference_request(metadata)
    element = schema["properties"]["inputs"]["items"]["oneOf"][0]["properties"]["data"]["items"]
    if element["type"] == "integer":
        inside = [element["minimum"], element["maximum"]]
        outside = [element["minimum"] - 1, element["maximum"] + 1]
    else:  # FP64 has no bound but JSON's: every finite number
        largest = float(np.finfo(DATATYPES[datatype]).max)
        inside = [-largest, largest]
        outside = [element.get("exclusiveMinimum"), element.get("exclusiveMaximum")]
    outside = [value for value in outside if value is not None]
    for value in inside + outside:
        body = {"inputs": [{"name": "x", "datatype": datatype, "shape": [1], "data": [value]}]}
        # json, not orjson: orjson writes no integer past 64 bits (and reads it as a float).
        encoded = json.dumps(body).encode()
        if value in inside:
            jsonschema.validate(body, schema)
            decode_request(encoded, None, metadata)
        else:
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(body, schema)
            with pytest.raises(InvalidRequest, match=r"out of range|must be integers"):
                decode_request(encoded, None, metadata)


@pytest.mark.parametrize("metadata", MODELS, ids=lambda m: m.name)
def test_the_encoders_responses_validate(metadata: ModelMetadata) -> None:
    rows = 2 if metadata.max_batch_size else 1
    outputs = {}
    for spec in metadata.outputs:
        shape = [rows if size == -1 else size for size in spec.shape]
        outputs[spec.name] = _values(spec.datatype, shape)
    response = InferenceResponse(metadata.name, metadata.version, "7", {}, outputs)
    body, header_length = encode_response(response, None, binary_output=False)
    assert header_length is None
    jsonschema.validate(orjson.loads(body), inference_response(metadata))
    jsonschema.validate(orjson.loads(body), inference_response(None))


async def test_the_route_serves_the_document_of_the_app_it_is_in() -> None:
    app = with_infer_route(Starlette(routes=ROUTES), _unreachable)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.json() == orjson.loads(orjson.dumps(document(ROUTES, MODELS)))


async def _unreachable(*args: Any) -> Any:
    raise AssertionError("no inference in this test")


def _values(datatype: str, shape: list[int]) -> np.ndarray[Any, Any]:
    """Values of ``datatype`` with its extremes (and NaN and infinity, which JSON writes null)."""
    count = int(np.prod(shape))
    dtype = DATATYPES[datatype]
    if datatype == "BYTES":
        values: list[Any] = [f"text {i}".encode() for i in range(count)]
    elif datatype == "BOOL":
        values = [i % 2 == 0 for i in range(count)]
    elif dtype.kind in "iu":
        ints = np.iinfo(dtype)
        values = [[int(ints.min), int(ints.max)][i % 2] for i in range(count)]
    else:
        floats = np.finfo(dtype)
        values = [
            [float(floats.max), float("nan"), -float("inf"), 0.5][i % 4] for i in range(count)
        ]
    array = np.empty(count, dtype=dtype)
    array[:] = values
    return array.reshape(shape)
