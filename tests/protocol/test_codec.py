"""The v2 codec: round trips, validation messages, random bodies, and tritonclient's wire form."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocol.codec import (
    MAX_ID_CHARS,
    InferenceRequest,
    InferenceResponse,
    RequestedOutput,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from protocol.errors import BazaarError, InvalidRequest, UpstreamError
from protocol.schema import DATATYPES, ModelMetadata, TensorSpec
from protocol.tensors import Array

ALL_DATATYPES = list(DATATYPES)


def one_tensor_model(datatype: str, shape: tuple[int, ...] = (-1, 3)) -> ModelMetadata:
    return ModelMetadata(
        name="echo",
        version="1",
        platform="onnxruntime_onnx",
        inputs=(TensorSpec("x", datatype, shape),),
        outputs=(TensorSpec("y", datatype, shape),),
        max_batch_size=8,
    )


def sample(datatype: str, shape: tuple[int, ...], text: bool = False) -> Array:
    """Values that stress each type: the extremes of integer ranges, large and tiny floats."""
    count = int(np.prod(shape))
    dtype = DATATYPES[datatype]
    if datatype == "BYTES":
        texts = ["", "héllo", "a b", "\x00z", "ünï", "long" * 20]
        elements = [texts[i % len(texts)].encode() for i in range(count)]
        if not text and count:
            elements[0] = b"\xff\xfe\x00"  # not UTF-8: only binary can carry it
        return objects(elements).reshape(shape)
    values: list[bool] | list[int] | list[float]
    if datatype == "BOOL":
        values = [True, False, False]
    elif dtype.kind in "iu":
        ints = np.iinfo(dtype)
        values = [ints.min, ints.max, 0, 1, ints.max // 3, ints.min // 3 or 7]
    else:
        floats = np.finfo(dtype)
        values = [float(floats.max), float(floats.min), 0.1, -2.5, float(floats.tiny), 1e-3]
    cycled = [values[i % len(values)] for i in range(count)]
    return np.array(cycled, dtype=dtype).reshape(shape)


def objects(elements: list[bytes]) -> Array:
    """A BYTES tensor: numpy would make ``bytes`` a fixed-width 'S' array."""
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array


def assert_same(got: Array, want: Array) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.tolist() == want.tolist()
    else:
        np.testing.assert_array_equal(got, want)


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_request_round_trip(datatype: str, binary: bool) -> None:
    array = sample(datatype, (2, 3), text=not binary)
    request = InferenceRequest(
        id="r-1",
        parameters={"priority": 2, "timeout": 5000},
        inputs={"x": array},
        outputs=(RequestedOutput("y", None),),
        binary_output=False,
    )
    body, header_length = encode_request(request, binary=binary)
    assert (header_length is not None) == binary
    decoded = decode_request(body, header_length, one_tensor_model(datatype))
    assert_same(decoded.inputs["x"], array)
    assert decoded.id == "r-1"
    assert decoded.parameters["priority"] == 2
    assert decoded.parameters["timeout"] == 5000
    # Forwarded binary, the gateway asks the pod for binary answers.
    assert decoded.outputs == (RequestedOutput("y", True if binary else None),)
    assert decoded.binary_output is binary


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_response_round_trip(datatype: str, binary: bool) -> None:
    array = sample(datatype, (4, 3), text=not binary)
    response = InferenceResponse("echo", "3", "r-2", {"sequence_id": 7}, {"y": array})
    body, header_length = encode_response(response, None, binary_output=binary)
    assert (header_length is not None) == binary
    decoded = decode_response(body, header_length)
    assert_same(decoded.outputs["y"], array)
    assert (decoded.model_name, decoded.model_version, decoded.id) == ("echo", "3", "r-2")
    assert decoded.parameters == {"sequence_id": 7}


@pytest.mark.parametrize("binary", [True, False])
def test_empty_tensors_round_trip(binary: bool) -> None:
    model = one_tensor_model("INT32", (-1, -1))
    array = np.zeros((1, 0), dtype=np.int32)
    request = InferenceRequest(None, {}, {"x": array}, None, False)
    decoded = decode_request(*encode_request(request, binary), model)
    assert_same(decoded.inputs["x"], array)
    response = InferenceResponse("echo", None, None, {}, {"y": array})
    assert_same(decode_response(*encode_response(response, None, binary)).outputs["y"], array)


def test_binary_inputs_are_views_of_the_body() -> None:
    array = sample("FP32", (2, 3))
    body, header_length = encode_request(InferenceRequest(None, {}, {"x": array}, None, False))
    decoded = decode_request(body, header_length, one_tensor_model("FP32")).inputs["x"]
    assert np.shares_memory(decoded, np.frombuffer(body, dtype=np.uint8))
    assert not decoded.flags.writeable


def test_nested_and_flat_json_decode_identically() -> None:
    model = one_tensor_model("INT32", (-1, 2, 3))
    nested = [[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [10, 11, 12]]]
    flat = list(range(1, 13))
    decoded = [
        decode_request(
            orjson.dumps(
                {"inputs": [{"name": "x", "datatype": "INT32", "shape": [2, 2, 3], "data": d}]}
            ),
            None,
            model,
        ).inputs["x"]
        for d in (nested, flat)
    ]
    assert_same(decoded[0], decoded[1])
    assert_same(decoded[0], np.arange(1, 13, dtype=np.int32).reshape(2, 2, 3))


def test_rows_is_the_batch_dimension_only_when_the_model_batches() -> None:
    request = InferenceRequest(None, {}, {"x": np.zeros((5, 3), np.float32)}, None, False)
    assert request.rows(max_batch_size=8) == 5
    assert request.rows(max_batch_size=0) == 1


# --- response choices ------------------------------------------------------------------------

TWO_OUTPUTS: dict[str, Array] = {
    "y": np.arange(6, dtype=np.float32).reshape(2, 3),
    "z": np.array([7, 8], np.int64),
}


def header_of(body: bytes, header_length: int | None) -> dict[str, Any]:
    parsed = orjson.loads(body[:header_length] if header_length is not None else body)
    assert isinstance(parsed, dict)
    return parsed


def test_id_is_echoed_and_omitted_when_absent() -> None:
    with_id = InferenceResponse("m", "1", "abc", {}, TWO_OUTPUTS)
    assert header_of(*encode_response(with_id, None, False))["id"] == "abc"
    bare = InferenceResponse("m", None, None, {}, TWO_OUTPUTS)
    header = header_of(*encode_response(bare, None, False))
    assert "id" not in header
    assert "model_version" not in header
    assert "parameters" not in header


def test_request_id_reaches_the_decoded_request() -> None:
    body = orjson.dumps(
        {
            "id": "42",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}],
        }
    )
    assert decode_request(body, None, one_tensor_model("FP32")).id == "42"


def test_a_request_id_longer_than_the_limit_is_refused_not_echoed() -> None:
    tensor = {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}
    at_limit = orjson.dumps({"id": "a" * MAX_ID_CHARS, "inputs": [tensor]})
    assert decode_request(at_limit, None, one_tensor_model("FP32")).id == "a" * MAX_ID_CHARS
    over = orjson.dumps({"id": "a" * (MAX_ID_CHARS + 1), "inputs": [tensor]})
    with pytest.raises(InvalidRequest, match=f"'id' has {MAX_ID_CHARS + 1} characters, more than"):
        decode_request(over, None, one_tensor_model("FP32"))


def test_only_requested_outputs_in_requested_order() -> None:
    response = InferenceResponse("m", "1", None, {}, TWO_OUTPUTS)
    body, header_length = encode_response(response, (RequestedOutput("z", None),), False)
    assert header_length is None
    assert header_of(body, None)["outputs"] == [
        {"name": "z", "datatype": "INT64", "shape": [2], "data": [7, 8]}
    ]
    both = (RequestedOutput("z", None), RequestedOutput("y", None))
    decoded = decode_response(*encode_response(response, both, True))
    assert list(decoded.outputs) == ["z", "y"]


@pytest.mark.parametrize("binary_output", [True, False])
def test_per_output_binary_flag_overrides_binary_data_output(binary_output: bool) -> None:
    response = InferenceResponse("m", "1", None, {}, TWO_OUTPUTS)
    requested = (RequestedOutput("y", not binary_output), RequestedOutput("z", None))
    body, header_length = encode_response(response, requested, binary_output)
    assert header_length is not None
    y, z = header_of(body, header_length)["outputs"]
    binary_one, json_one = (z, y) if binary_output else (y, z)
    assert binary_one["parameters"] == {"binary_data_size": 24 if binary_one is y else 16}
    assert "data" not in binary_one
    assert "parameters" not in json_one
    assert "data" in json_one
    decoded = decode_response(body, header_length)
    for name, array in TWO_OUTPUTS.items():
        assert_same(decoded.outputs[name], array)


def test_decoded_output_requests_keep_their_flags() -> None:
    model = ModelMetadata(
        "m",
        "1",
        "",
        (TensorSpec("x", "FP32", (-1, 3)),),
        (TensorSpec("y", "FP32", (-1, 3)), TensorSpec("z", "INT64", (-1,))),
        4,
    )
    base: dict[str, Any] = {
        "parameters": {"binary_data_output": True},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}],
    }
    body = orjson.dumps(
        base | {"outputs": [{"name": "z", "parameters": {"binary_data": False}}, {"name": "y"}]}
    )
    request = decode_request(body, None, model)
    assert request.outputs == (RequestedOutput("z", False), RequestedOutput("y", None))
    assert request.binary_output is True
    # An empty list is the same as none given, as tritonclient sends it.
    assert decode_request(orjson.dumps(base | {"outputs": []}), None, model).outputs is None


def test_json_bytes_must_be_utf8() -> None:
    response = InferenceResponse("m", "1", None, {}, {"y": sample("BYTES", (2,))})
    with pytest.raises(InvalidRequest, match=r"output 'y'.*UTF-8"):
        encode_response(response, None, False)


def test_missing_model_output_is_a_server_error() -> None:
    response = InferenceResponse("m", "1", None, {}, TWO_OUTPUTS)
    with pytest.raises(BazaarError, match="no output 'w'") as caught:
        encode_response(response, (RequestedOutput("w", None),), False)
    assert caught.value.status == 500


@pytest.mark.parametrize(
    ("body", "header_length", "match"),
    [
        (b"{", None, "not valid JSON"),
        (b'{"model_name": 3, "outputs": []}', None, "model_name"),
        (b'{"model_name": "m", "outputs": [{"name": "y"}]}', None, "output 'y'"),
        (b'{"model_name": "m", "outputs": []}xx', 34, "2 bytes follow"),
    ],
)
def test_malformed_responses_are_upstream_errors(
    body: bytes, header_length: int | None, match: str
) -> None:
    with pytest.raises(UpstreamError, match=match):
        decode_response(body, header_length)


# --- validation --------------------------------------------------------------------------------

MODEL = ModelMetadata(
    name="v",
    version="1",
    platform="onnxruntime_onnx",
    inputs=(
        TensorSpec("x", "FP32", (-1, 3)),
        TensorSpec("n", "UINT8", (-1, 2)),
        TensorSpec("t", "BYTES", (-1,)),
        TensorSpec("f", "BOOL", (-1,)),
    ),
    outputs=(TensorSpec("y", "FP32", (-1, 3)), TensorSpec("z", "INT64", (-1,))),
    max_batch_size=4,
)


def valid() -> dict[str, Any]:
    return {
        "id": "1",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [[1, 2, 3], [4, 5.5, 6]]},
            {"name": "n", "datatype": "UINT8", "shape": [2, 2], "data": [1, 2, 3, 255]},
            {"name": "t", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]},
            {"name": "f", "datatype": "BOOL", "shape": [2], "data": [True, False]},
        ],
        "outputs": [{"name": "y"}],
    }


Edit = Callable[[dict[str, Any]], object]
DROP = object()


def on_input(input_name: str, /, **fields: object) -> Edit:
    def edit(request: dict[str, Any]) -> None:
        tensor = next(t for t in request["inputs"] if t["name"] == input_name)
        for key, value in fields.items():
            if value is DROP:
                del tensor[key]
            else:
                tensor[key] = value

    return edit


def on_request(**fields: object) -> Edit:
    return lambda request: request.update(fields)


JSON_CASES: list[tuple[str, Edit, str]] = [
    ("inputs missing", lambda r: r.pop("inputs"), "'inputs' must be a non-empty array"),
    ("inputs empty", on_request(inputs=[]), "'inputs' must be a non-empty array"),
    ("inputs not a list", on_request(inputs={"x": 1}), "got object"),
    (
        "input not an object",
        lambda r: r["inputs"].append(3),
        r"inputs\[4\] must be an object, got integer",
    ),
    (
        "name not a string",
        on_input("x", name=7),
        r"inputs\[0\]: 'name' must be a string, got integer",
    ),
    ("datatype missing", on_input("x", datatype=DROP), "input 'x': 'datatype' must be a string"),
    ("shape negative", on_input("x", shape=[2, -3]), "input 'x': 'shape' must be an array"),
    ("shape of bools", on_input("x", shape=[True, 3]), "input 'x': 'shape' must be an array"),
    ("shape not a list", on_input("x", shape="2,3"), "input 'x': 'shape' must be an array"),
    ("no data", on_input("x", data=DROP), "input 'x': needs exactly one of 'data'.*neither"),
    (
        "data and binary",
        on_input("x", parameters={"binary_data_size": 24}),
        "input 'x': needs exactly one of 'data'.*both",
    ),
    ("duplicate", lambda r: r["inputs"].append(r["inputs"][0]), "input 'x' appears more than once"),
    (
        "unknown input",
        lambda r: r["inputs"].append({"name": "q", "datatype": "FP32", "shape": [1], "data": [1]}),
        "unknown input 'q': model 'v' has inputs 'x', 'n', 't', 'f'",
    ),
    ("missing input", lambda r: r["inputs"].pop(), "missing input 'f': model 'v' has inputs"),
    ("wrong datatype", on_input("x", datatype="FP64"), "input 'x': datatype FP64, expected FP32"),
    ("BF16", on_input("x", datatype="BF16"), "input 'x': BF16 is not supported"),
    ("unknown datatype", on_input("x", datatype="FP8"), "input 'x': unknown datatype 'FP8'"),
    ("rank", on_input("x", shape=[6]), r"input 'x': shape \[6\] has rank 1, expected rank 2"),
    (
        "fixed dim",
        on_input("x", shape=[2, 4], data=[0] * 8),
        r"input 'x': shape \[2,4\] does not match \[-1,3\] at dimension 1: expected 3, got 4",
    ),
    ("batch over", on_input("x", shape=[5, 3]), "input 'x': batch size 5 exceeds .* 4"),
    ("batch zero", on_input("x", shape=[0, 3], data=[]), "input 'x': batch size 0"),
    ("batch differs", on_input("t", shape=[3]), "input 't': batch size 3 differs from input 'x'"),
    (
        "count",
        on_input("x", data=[1, 2, 3, 4, 5]),
        r"input 'x': shape \[2,3\] needs 6 elements, got 5",
    ),
    ("uint8 over", on_input("n", data=[1, 2, 3, 300]), "input 'n': value 300 is out of range"),
    ("uint8 negative", on_input("n", data=[-1, 2, 3, 4]), "input 'n': value -1 is out of range"),
    ("int from float", on_input("n", data=[1, 2, 3, 1.5]), "input 'n': UINT8 data must be integ"),
    ("int from bool", on_input("n", data=[1, 2, 3, True]), "input 'n': .* got boolean"),
    ("fp from string", on_input("x", data=[1, 2, 3, 4, 5, "6"]), "input 'x': FP32 .* got string"),
    ("fp from null", on_input("x", data=[1, 2, 3, 4, 5, None]), "input 'x': .* got null"),
    ("fp from bool", on_input("x", data=[1, 2, 3, 4, 5, False]), "input 'x': .* got boolean"),
    (
        "fp overflow",
        on_input("x", data=[1, 2, 3, 4, 5, 1e300]),
        "input 'x': value 1e[+]300 is out of range for FP32",
    ),
    ("dicts", on_input("x", data=[[{}, {}, {}], [{}, {}, {}]]), "input 'x': .* got object"),
    ("mixed nesting", on_input("x", data=[[1, 2, 3], 4, 5, 6]), "input 'x': 'data' mixes"),
    ("data not a list", on_input("x", data=5), "input 'x': 'data' must be an array"),
    ("bool from int", on_input("f", data=[1, 0]), "input 'f': BOOL data must be true or false"),
    ("bytes from int", on_input("t", data=["a", 2]), "input 't': BYTES data must be strings"),
    (
        "input parameters",
        on_input("x", parameters=[]),
        "input 'x' 'parameters' must be an object",
    ),
    (
        "binary size negative",
        on_input("x", data=DROP, parameters={"binary_data_size": -4}),
        "input 'x': parameters.binary_data_size must be a non-negative integer",
    ),
    (
        "unknown output",
        on_request(outputs=[{"name": "w"}]),
        "unknown output 'w': model 'v' has outputs 'y', 'z'",
    ),
    ("outputs not a list", on_request(outputs="y"), "'outputs' must be an array"),
    ("output not an object", on_request(outputs=["y"]), r"outputs\[0\] must be an object"),
    (
        "output flag",
        on_request(outputs=[{"name": "y", "parameters": {"binary_data": 1}}]),
        "output 'y': parameters.binary_data must be true or false",
    ),
    (
        "output twice",
        on_request(outputs=[{"name": "y"}, {"name": "y"}]),
        "output 'y' is requested more than once",
    ),
    ("id not a string", on_request(id=42), "request 'id' must be a string"),
    ("parameters not an object", on_request(parameters=[1]), "request 'parameters' must be"),
    ("parameter nested", on_request(parameters={"p": [1]}), "request parameter 'p' must be"),
    (
        "binary_data_output",
        on_request(parameters={"binary_data_output": "yes"}),
        "parameters.binary_data_output must be true or false",
    ),
]


def test_the_valid_request_is_valid() -> None:
    request = decode_request(orjson.dumps(valid()), None, MODEL)
    assert list(request.inputs) == ["x", "n", "t", "f"]
    assert request.inputs["t"].tolist() == [b"a", b"b"]
    assert request.inputs["n"].dtype == np.uint8
    assert request.rows(MODEL.max_batch_size) == 2


@pytest.mark.parametrize(
    ("edit", "match"), [c[1:] for c in JSON_CASES], ids=[c[0] for c in JSON_CASES]
)
def test_invalid_json_requests(edit: Edit, match: str) -> None:
    request = valid()
    edit(request)
    with pytest.raises(InvalidRequest, match=match) as caught:
        decode_request(orjson.dumps(request), None, MODEL)
    assert caught.value.status == 400


def binary_body(binary: dict[str, bytes], header_length: bool = True) -> tuple[bytes, int | None]:
    """The valid request with the named inputs sent as the given raw chunks."""
    request = valid()
    for tensor in request["inputs"]:
        if tensor["name"] in binary:
            del tensor["data"]
            tensor["parameters"] = {"binary_data_size": len(binary[tensor["name"]])}
    head = orjson.dumps(request)
    return head + b"".join(binary.values()), len(head) if header_length else None


X = np.arange(6, dtype=np.float32).tobytes()


def strings(*elements: bytes) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


WITH_X, X_AT = binary_body({"x": X})
JUST_JSON = orjson.dumps(valid())

BINARY_CASES: list[tuple[str, tuple[bytes, int | None], str]] = [
    ("header length zero", (JUST_JSON, 0), "Inference-Header-Content-Length 0 must be"),
    ("header length past body", (b"{}", 3), "Inference-Header-Content-Length 3 must be"),
    ("not JSON", (b"\x00\x01garbage", None), "not valid JSON"),
    ("not an object", (b"[1, 2]", None), "must be an object, got array"),
    ("too few bytes", (WITH_X[:-4], X_AT), "input 'x': binary_data_size 24 overruns the 20 bytes"),
    ("too many bytes", (WITH_X + b"????", X_AT), "28 bytes follow .* input 'x' add up to 24"),
    ("unclaimed bytes", (JUST_JSON + b"ab", len(JUST_JSON)), "no tensor add up to 0"),
    (
        "header length missing",
        (WITH_X, None),
        r"not valid JSON \(binary tensors need Inference-Header-Content-Length\)",
    ),
    (
        "header length missing, binary declared",
        (WITH_X[:X_AT], None),
        "input 'x': binary_data_size 24 overruns .*Inference-Header-Content-Length is missing",
    ),
    (
        "not a multiple",
        binary_body({"x": X[:-1]}),
        "input 'x': binary_data_size 23 is not a multiple of the FP32 element size 4",
    ),
    (
        "binary count",
        binary_body({"x": X[:-4]}),
        r"input 'x': shape \[2,3\] needs 6 elements, got 5",
    ),
    ("bool byte", binary_body({"f": b"\x01\x02"}), "input 'f': BOOL bytes must be 0 or 1, got 2"),
    (
        "bytes overrun",
        binary_body({"t": strings(b"a") + b"\x64\x00\x00\x00abc"}),
        "input 't': BYTES element 1 of 100 bytes overruns",
    ),
    (
        "bytes truncated length",
        binary_body({"t": strings(b"abc") + b"\x01\x00"}),
        "input 't': BYTES element 1 has a truncated length",
    ),
    (
        "bytes too many",
        binary_body({"t": strings(b"a", b"b", b"c")}),
        r"input 't': shape \[2\] needs 2 elements, but 5 bytes follow",
    ),
    (
        "bytes too few",
        binary_body({"t": strings(b"abcdefgh")}),
        r"input 't': shape \[2\] needs 2 elements, got 1",
    ),
    (
        "bytes too short for the count",
        binary_body({"t": strings(b"a")}),
        r"input 't': shape \[2\] needs 2 elements, at least 8 bytes, but binary_data_size is 5",
    ),
]


@pytest.mark.parametrize(
    ("body", "match"), [c[1:] for c in BINARY_CASES], ids=[c[0] for c in BINARY_CASES]
)
def test_invalid_binary_requests(body: tuple[bytes, int | None], match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        decode_request(body[0], body[1], MODEL)


def test_mixed_binary_and_json_inputs() -> None:
    n = np.array([[1, 2], [3, 4]], np.uint8).tobytes()
    request = decode_request(*binary_body({"x": X, "n": n, "t": strings(b"\xff", b"")}), MODEL)
    assert_same(request.inputs["x"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert_same(request.inputs["n"], np.array([[1, 2], [3, 4]], np.uint8))
    assert request.inputs["t"].tolist() == [b"\xff", b""]
    assert request.inputs["f"].tolist() == [True, False]


# --- random bodies -----------------------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
# Values that get past the first checks, so mutations reach the deeper ones.
PLAUSIBLE = st.sampled_from(
    [*ALL_DATATYPES, "BF16", "x", "n", "t", "f", "y", "q", [], [0], [2], [2, 3], [5, 3], [2, 2]]
    + [{"binary_data_size": k} for k in (0, 1, 4, 24, 10**6)]
    + [{"binary_data": True}, [1, 2, 3, 4, 5, 6], [[1, 2, 3], [4, 5, 6]], [True, False], ["a"]]
)


def places(node: object) -> list[tuple[Any, Any]]:
    """Every (container, key) in a JSON tree, for mutating one spot."""
    found: list[tuple[Any, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            found += [(node, key), *places(value)]
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += [(node, index), *places(value)]
    return found


@st.composite
def mutated_bodies(draw: st.DrawFn) -> tuple[bytes, int | None]:
    binary = draw(st.sets(st.sampled_from(["x", "n", "t", "f"])))
    raw = {
        "x": X,
        "n": b"\x01\x02\x03\x04",
        "t": strings(b"a", b"bc"),
        "f": b"\x01\x00",
    }
    body, header_length = binary_body({k: v for k, v in raw.items() if k in binary})
    head = orjson.loads(body[:header_length] if header_length else body)
    rest = body[header_length:] if header_length else b""
    for _ in range(draw(st.integers(1, 3))):
        spots = places(head)
        container, key = draw(st.sampled_from(spots))
        if draw(st.booleans()) and isinstance(container, dict):
            del container[key]
        else:
            # A copy: the sampled values are shared between examples.
            container[key] = orjson.loads(orjson.dumps(draw(PLAUSIBLE | JSON_VALUES)))
    new_head = orjson.dumps(head)
    rest = rest[: draw(st.integers(0, len(rest)))] + draw(st.binary(max_size=6))
    length: int | None = len(new_head) + draw(st.sampled_from([0, 0, 0, -1, 1, -len(new_head)]))
    if draw(st.booleans()) and not rest:
        length = None
    return new_head + rest, length


def decodes_or_refuses(body: bytes, header_length: int | None) -> None:
    with contextlib.suppress(InvalidRequest):
        decode_request(body, header_length, MODEL)
    with contextlib.suppress(UpstreamError):
        decode_response(body, header_length)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_bodies())
def test_mutated_requests_decode_or_raise_invalid_request(body: tuple[bytes, int | None]) -> None:
    decodes_or_refuses(*body)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120), st.none() | st.integers(-3, 130))
def test_random_bytes_decode_or_raise_invalid_request(
    body: bytes, header_length: int | None
) -> None:
    decodes_or_refuses(body, header_length)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_valid_requests_decode(data: st.DataObject) -> None:
    rows = data.draw(st.integers(1, MODEL.max_batch_size))
    binary = data.draw(st.booleans())
    # JSON carries BYTES only as text.
    elements = st.binary(max_size=8) if binary else st.text(max_size=8).map(str.encode)
    inputs: dict[str, Array] = {
        "x": data.draw(hnp.arrays(np.float32, (rows, 3), elements=st.floats(-1e6, 1e6, width=32))),
        "n": data.draw(hnp.arrays(np.uint8, (rows, 2))),
        "t": objects(data.draw(st.lists(elements, min_size=rows, max_size=rows))),
        "f": data.draw(hnp.arrays(np.bool_, (rows,))),
    }
    request = InferenceRequest("id", {}, inputs, None, False)
    decoded = decode_request(*encode_request(request, binary), MODEL)
    assert decoded.rows(MODEL.max_batch_size) == rows
    for name, array in inputs.items():
        assert_same(decoded.inputs[name], array)


# --- the Triton client's wire form --------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_decodes_tritonclient_requests(datatype: str, binary: bool) -> None:
    array = sample(datatype, (2, 3), text=not binary)
    tensor = triton.InferInput("x", [2, 3], datatype).set_data_from_numpy(array, binary_data=binary)
    outputs = [triton.InferRequestedOutput("y", binary_data=False)]
    body, header_length = triton.InferenceServerClient.generate_request_body(
        [tensor], outputs=outputs, request_id="tc", priority=3, timeout=1000
    )
    request = decode_request(body, header_length, one_tensor_model(datatype))
    assert_same(request.inputs["x"], array)
    assert request.id == "tc"
    assert request.parameters == {"priority": 3, "timeout": 1000}
    assert request.outputs == (RequestedOutput("y", False),)


def test_decodes_tritonclient_requests_without_outputs() -> None:
    tensor = triton.InferInput("x", [1, 3], "FP32").set_data_from_numpy(sample("FP32", (1, 3)))
    body, header_length = triton.InferenceServerClient.generate_request_body([tensor])
    request = decode_request(body, header_length, one_tensor_model("FP32"))
    assert request.outputs is None
    assert request.binary_output is True  # tritonclient asks for all outputs in binary


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_tritonclient_reads_our_responses(datatype: str, binary: bool) -> None:
    array = sample(datatype, (2, 3), text=not binary)
    response = InferenceResponse("echo", "1", "tc", {}, {"y": array})
    body, header_length = encode_response(response, None, binary)
    result = triton.InferResult.from_response_body(body, verbose=False, header_length=header_length)
    got = result.as_numpy("y")
    assert result.get_response()["id"] == "tc"
    if datatype == "BYTES" and not binary:
        # tritonclient leaves JSON strings as str.
        assert got.tolist() == [[e.decode() for e in row] for row in array.tolist()]
    else:
        assert_same(got, array)


@pytest.mark.parametrize(
    ("sequence", "refused"),
    [
        ({}, None),
        ({"sequence_id": 7, "sequence_start": True}, "sequence_id"),
        ({"sequence_id": "user-3"}, "sequence_id"),
        ({"sequence_end": True}, None),  # without a sequence_id tritonclient sends none
    ],
)
def test_a_request_in_a_sequence_is_refused_naming_the_extension(
    sequence: dict[str, Any], refused: str | None
) -> None:
    """Before, the sequence was ignored: each request ran alone, batched with any other, and
    a stateful model's client got answers with no error."""
    tensor = triton.InferInput("x", [1, 3], "FP32").set_data_from_numpy(sample("FP32", (1, 3)))
    body, header_length = triton.InferenceServerClient.generate_request_body([tensor], **sequence)
    if refused is None:  # a sequence_id of 0, tritonclient's default, says no sequence
        decode_request(body, header_length, one_tensor_model("FP32"))
        return
    with pytest.raises(InvalidRequest, match=f"'{refused}' asks for the sequence batching"):
        decode_request(body, header_length, one_tensor_model("FP32"))


def test_shared_memory_inputs_and_outputs_are_refused_by_name() -> None:
    """Before, both decoded: the input's data was missing (400 'neither'), the output's
    region was ignored and the client read a region nobody wrote."""
    tensor = triton.InferInput("x", [1, 3], "FP32").set_data_from_numpy(sample("FP32", (1, 3)))
    output = triton.InferRequestedOutput("y")
    output.set_shared_memory("region", 12)
    body, header_length = triton.InferenceServerClient.generate_request_body(
        [tensor], outputs=[output]
    )
    with pytest.raises(InvalidRequest, match=r"output 'y'.*'shared_memory_region'.*shared memory"):
        decode_request(body, header_length, one_tensor_model("FP32"))
    shared = triton.InferInput("x", [1, 3], "FP32")
    shared.set_shared_memory("region", 12)
    body, header_length = triton.InferenceServerClient.generate_request_body([shared])
    with pytest.raises(InvalidRequest, match=r"input 'x': .*'shared_memory_region'.*shared memory"):
        decode_request(body, header_length, one_tensor_model("FP32"))
