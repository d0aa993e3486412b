"""protocol.grpc.codec: Triton's protobuf messages to the HTTP codec's typed requests and back,
every datatype raw and typed, and the faults named as the HTTP codec names them."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.codec import InferenceResponse
from protocol.errors import InvalidRequest, UpstreamError
from protocol.grpc import codec
from protocol.grpc import grpc_service_pb2 as pb
from protocol.schema import ModelMetadata, TensorSpec
from protocol.tensors import binary_data

ARRAYS = {
    "FP32": np.array([[1.5, -2.0]], dtype=np.float32),
    "FP64": np.array([[1e300, 0.0]], dtype=np.float64),
    "INT8": np.array([[-128, 127]], dtype=np.int8),
    "INT64": np.array([[2**62, -1]], dtype=np.int64),
    "UINT16": np.array([[0, 65535]], dtype=np.uint16),
    "UINT64": np.array([[2**63, 1]], dtype=np.uint64),
    "BOOL": np.array([[True, False]]),
    "BYTES": np.array([[b"a\x00b", b""]], dtype=object),
}


def _metadata(datatype: str) -> ModelMetadata:
    spec = (TensorSpec("x", datatype, (-1, 2)),)
    return ModelMetadata("m", "1", "test", spec, (TensorSpec("y", datatype, (-1, 2)),), 8)


def _typed(datatype: str, array: np.ndarray) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m")
    tensor = message.inputs.add(name="x", datatype=datatype, shape=array.shape)
    field = codec._CONTENTS_FIELD[datatype]
    getattr(tensor.contents, field).extend(array.ravel().tolist())
    return message


@pytest.mark.parametrize("datatype", ARRAYS)
def test_raw_and_typed_inputs_decode_to_the_same_array(datatype: str) -> None:
    array = ARRAYS[datatype]
    raw = codec.encode_request("m", {"x": array}, {"priority": 2, "timeout": 5})
    from_raw = codec.decode_request(raw, _metadata(datatype))
    from_typed = codec.decode_request(_typed(datatype, array), _metadata(datatype))
    for request in (from_raw, from_typed):
        assert request.inputs["x"].dtype == array.dtype
        np.testing.assert_array_equal(request.inputs["x"], array)
    assert from_raw.parameters == {"priority": 2, "timeout": 5}


def test_fp16_travels_raw_only() -> None:
    array = np.array([[0.5, 2.0]], dtype=np.float16)
    request = codec.decode_request(codec.encode_request("m", {"x": array}, {}), _metadata("FP16"))
    np.testing.assert_array_equal(request.inputs["x"], array)
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="x", datatype="FP16", shape=[1, 2])
    with pytest.raises(InvalidRequest, match="FP16 has no typed contents; send it raw"):
        codec.decode_request(typed, _metadata("FP16"))


def test_response_round_trip_with_the_requested_outputs_only() -> None:
    outputs = {"y": ARRAYS["BYTES"], "z": ARRAYS["INT64"]}
    message = codec.encode_response(InferenceResponse("m", "1", "id-7", {}, outputs), ("z",))
    assert (message.model_name, message.model_version, message.id) == ("m", "1", "id-7")
    assert [tensor.name for tensor in message.outputs] == ["z"]
    assert message.raw_output_contents[0] == bytes(binary_data(ARRAYS["INT64"]))
    np.testing.assert_array_equal(codec.decode_response(message)["z"], ARRAYS["INT64"])


def _set_region(parameters: object) -> None:
    parameters["shared_memory_region"].string_param = "region"  # type: ignore[index]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.inputs[0].shape.__setitem__(1, 3), r"shape \[1,3\] does not match \[-1,2\]"),
        (lambda m: setattr(m.inputs[0], "datatype", "INT32"), "datatype INT32, expected FP32"),
        (lambda m: setattr(m.inputs[0], "name", "w"), "unknown input 'w'"),
        (lambda m: m.raw_input_contents.extend([b"", b""]), "give every input raw, or none"),
        (lambda m: m.raw_input_contents.append(b""), "raw or in 'contents', not both"),
        (lambda m: m.inputs[0].contents.fp32_contents.append(1.0), "needs 2 elements, got 3"),
        (lambda m: _set_region(m.inputs[0].parameters), "the shared memory extension"),
        (lambda m: m.outputs.add(name="nope"), "unknown output 'nope'"),
        (lambda m: _set_region(m.outputs.add(name="y").parameters), "shared memory extension"),
        (
            lambda m: setattr(
                m.outputs.add(name="y").parameters["classification"], "string_param", "3"
            ),
            "parameters.classification must be an integer >= 0, got '3'",
        ),
    ],
)
def test_faults_are_invalid_requests_naming_the_tensor(change: object, message: str) -> None:
    request = _typed("FP32", ARRAYS["FP32"])
    change(request)  # type: ignore[operator]
    with pytest.raises(InvalidRequest, match=message):
        codec.decode_request(request, _metadata("FP32"))


def test_typed_integers_out_of_range_are_refused() -> None:
    request = _typed("INT16", np.array([[0, 0]], dtype=np.int16))
    request.inputs[0].contents.int_contents[1] = 40_000
    with pytest.raises(InvalidRequest, match="value 40000 is out of range for INT16"):
        codec.decode_request(request, _metadata("INT16"))


def test_a_malformed_pod_answer_is_an_upstream_error() -> None:
    message = pb.ModelInferResponse(model_name="m")
    message.outputs.add(name="y", datatype="FP32", shape=[1, 2])
    message.raw_output_contents.append(b"\x00" * 7)
    with pytest.raises(UpstreamError, match="malformed inference response"):
        codec.decode_response(message)


def test_an_output_asked_to_classify_answers_its_top_classes() -> None:
    """``tritonclient.grpc``'s ``InferRequestedOutput(name, class_count=k)``, as over HTTP."""
    metadata = ModelMetadata(
        "m",
        "1",
        "test",
        (TensorSpec("x", "FP32", (-1, 3)),),
        (TensorSpec("y", "FP32", (-1, 3)), TensorSpec("z", "FP32", (-1, 3))),
        8,
        labels=("cat", "dog"),
    )
    message = _typed("FP32", np.zeros((2, 3), dtype=np.float32))
    message.inputs[0].shape[:] = [2, 3]
    message.inputs[0].contents.fp32_contents[:] = [0.0] * 6
    message.outputs.add(name="y").parameters["classification"].int64_param = 2
    request = codec.decode_request(message, metadata)
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4]], dtype=np.float32)
    answer = codec.answer(request, metadata, {"y": scores, "z": scores})
    assert [(t.name, t.datatype, list(t.shape)) for t in answer.outputs] == [("y", "BYTES", [2, 2])]
    top = codec.decode_response(answer)["y"]
    assert top.tolist() == [
        [b"0.700000:1:dog", b"0.200000:2"],
        [b"0.500000:0:cat", b"0.400000:2"],
    ]
