"""Triton's classification extension: top-k ``score:index[:label]`` strings."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from protocol.classification import classify
from protocol.codec import RequestedOutput, decode_request
from protocol.errors import InvalidRequest
from protocol.fastpath import answer
from protocol.schema import ModelMetadata, TensorSpec

SCORES = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.9]], dtype=np.float32)


def test_top_k_per_row_best_first_ties_by_index_with_labels() -> None:
    top = classify("output 'y'", SCORES, 2, ["a", "b", "c"], batched=True)
    assert top.shape == (2, 2)
    assert top.tolist() == [
        [b"0.700000:1:b", b"0.200000:2:c"],
        [b"0.900000:2:c", b"0.500000:0:a"],
    ]


def test_without_batching_the_whole_output_is_ranked_and_k_is_cut_to_the_classes() -> None:
    top = classify("output 'y'", np.array([3, 9, 1], dtype=np.int64), 5, [], batched=False)
    assert top.tolist() == [b"9:1", b"3:0", b"1:2"]


def test_labels_missing_for_an_index_leave_it_unlabelled() -> None:
    assert classify("y", SCORES[:1], 1, ["a"], batched=True).tolist() == [[b"0.700000:1"]]


def test_a_bytes_output_cannot_be_classified() -> None:
    with pytest.raises(InvalidRequest, match="numeric output"):
        classify("output 'y'", np.array([b"x"], dtype=object), 1, [], batched=False)


MODEL = ModelMetadata(
    "m", "1", "onnx", (TensorSpec("x", "FP32", (-1, 3)),), (TensorSpec("y", "FP32", (-1, 3)),), 4
)


def test_tritonclient_class_count_is_decoded_and_answered_as_triton_does() -> None:
    """Before, class_count was ignored: a 200 with the raw FP32 scores."""
    tensor = triton.InferInput("x", [2, 3], "FP32").set_data_from_numpy(SCORES)
    output = triton.InferRequestedOutput("y", binary_data=False, class_count=2)
    body, header_length = triton.InferenceServerClient.generate_request_body(
        [tensor], outputs=[output]
    )
    request = decode_request(body, header_length, MODEL)
    assert request.outputs == (RequestedOutput("y", False, 2),)
    labelled = dataclasses.replace(MODEL, labels=("a", "b", "c"))
    encoded, header_length = answer(request, labelled, {"y": SCORES})
    result = triton.InferResult.from_response_body(encoded, False, header_length)
    assert result.as_numpy("y").tolist() == [
        ["0.700000:1:b", "0.200000:2:c"],
        ["0.900000:2:c", "0.500000:0:a"],
    ]


@pytest.mark.parametrize("count", [-1, 1.5, "2", True])
def test_a_bad_class_count_is_refused(count: object) -> None:
    header = {
        "inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}],
        "outputs": [{"name": "y", "parameters": {"classification": count}}],
    }
    with pytest.raises(InvalidRequest, match="classification must be an integer"):
        decode_request(orjson.dumps(header), None, MODEL)
