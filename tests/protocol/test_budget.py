"""What decoding may cost: every hostile body shape refused before its cost is paid, large
bodies of a fair shape decoded within their allowance, and the counts the bound rests on.

The shapes are ``loadtests.decodecost``'s, which measures what each costs; here they are a few
MiB, past ``SCAN_FROM_BYTES`` and, for the refused ones, past the allowance too. Before these
checks each of them decoded (or failed late) at 13x to 49x its size in memory.
"""

from __future__ import annotations

import re
import sys
import tracemalloc

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtests.decodecost import CASES, MODEL
from protocol import budget
from protocol.budget import (
    DECODE_ALLOWANCE_BYTES,
    DECODE_FACTOR,
    SCAN_FROM_BYTES,
    allowed_bytes,
    check_json,
)
from protocol.codec import MAX_DIMENSIONS, decode_request, decode_response
from protocol.errors import InvalidRequest, TooCostlyToDecode, UpstreamError
from protocol.tensors import Array

MIB = 1024 * 1024
SIZE = 8 * MIB
"""Past the scan threshold, and large enough that every dense shape is past the allowance."""

REFUSED_BEFORE_PARSING = [
    "json_flat_short",
    "json_nested_rows",
    "json_nested_deep",
    "json_nested_pixels",
    "json_many_inputs",
    "json_many_outputs",
    "json_bytes_tiny",
    "json_parameters_deep",
    "json_parameters_wide",
    "json_unknown_key",
    "json_count_mismatch",
    "json_shape_huge",
]


@pytest.mark.parametrize("case", REFUSED_BEFORE_PARSING)
def test_dense_json_is_refused_413_before_it_is_parsed(case: str) -> None:
    body, header_length = CASES[case](SIZE)
    with pytest.raises(TooCostlyToDecode, match=r"^the JSON header \(.* bytes, whose first") as e:
        decode_request(body, header_length, MODEL)
    assert e.value.status == 413
    assert e.value.message.endswith(
        "would take more than the 64 MiB allowed for its size to decode; send large tensors "
        "with the binary extension, or fewer values per request"
    )


def test_binary_bytes_elements_too_small_for_their_count_are_refused_before_any_is_made() -> None:
    body, header_length = CASES["binary_bytes_tiny"](SIZE)
    tracemalloc.start()
    try:
        with pytest.raises(TooCostlyToDecode, match=r"^input 't': 1,398,101 BYTES elements"):
            decode_request(body, header_length, MODEL)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MIB


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("binary_header_length_lies", "the JSON header is not valid JSON"),
        ("binary_size_lies", r"input 'x': binary_data_size \d+ overruns"),
    ],
)
def test_binary_bodies_that_lie_about_their_layout_are_refused_400(case: str, message: str) -> None:
    body, header_length = CASES[case](SIZE)
    with pytest.raises(InvalidRequest, match=message) as e:
        decode_request(body, header_length, MODEL)
    assert e.value.status == 400


def decoded_bytes(arrays: dict[str, Array], body: bytes) -> int:
    """Memory the decoded arrays hold of their own: views of the body hold none."""
    total = 0
    for array in arrays.values():
        if np.shares_memory(array, np.frombuffer(body, dtype=np.uint8)):
            continue
        total += array.nbytes
        if array.dtype == object:
            total += sum(sys.getsizeof(element) for element in array.ravel().tolist())
    return total


@pytest.mark.parametrize(
    "case", ["json_flat_floats", "json_flat_float32", "json_bytes_huge", "json_bytes_wide"]
)
def test_large_json_of_a_fair_shape_decodes_past_the_allowance(case: str) -> None:
    size = 12 * MIB  # past DECODE_ALLOWANCE_BYTES / DECODE_FACTOR: the factor decides
    body, header_length = CASES[case](size)
    request = decode_request(body, header_length, MODEL)
    assert decoded_bytes(request.inputs, body) <= 4 * len(body)


def test_a_large_binary_tensor_is_a_view_of_the_body() -> None:
    body, header_length = CASES["binary_fp32"](SIZE)
    request = decode_request(body, header_length, MODEL)
    assert request.inputs["x"].size == SIZE // 4
    assert decoded_bytes(request.inputs, body) < 1024


def binary_bytes(element: bytes, size: int) -> tuple[bytes, int]:
    count = size // (4 + len(element))
    chunk = (len(element).to_bytes(4, "little") + element) * count
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]},
                {
                    "name": "t",
                    "datatype": "BYTES",
                    "shape": [count],
                    "parameters": {"binary_data_size": len(chunk)},
                },
            ]
        }
    )
    return header + chunk, len(header)


def test_binary_bytes_elements_within_the_factor_decode_within_it() -> None:
    body, header_length = binary_bytes(b"sixteen bytes...", 12 * MIB)
    request = decode_request(body, header_length, MODEL)
    assert request.inputs["t"][0] == b"sixteen bytes..."
    assert decoded_bytes(request.inputs, body) <= DECODE_FACTOR * len(body)


# -- limits that need no budget ------------------------------------------------------------------


def small_request(x: dict[str, object] | None = None, **extra: object) -> bytes:
    tensor = {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]} | (x or {})
    t = {"name": "t", "datatype": "BYTES", "shape": [1], "data": ["a"]}
    return orjson.dumps({"inputs": [tensor, t], **extra})


def test_data_nested_deeper_than_its_shape_is_refused() -> None:
    body = small_request({"shape": [1, 1], "data": [[[1]]]})
    with pytest.raises(InvalidRequest, match=r"input 'x': 'data' nests deeper than shape \[1,1\]"):
        decode_request(body, None, MODEL)


def test_data_nested_as_its_shape_or_flat_decodes() -> None:
    for data in ([[1, 2]], [1, 2]):
        request = decode_request(small_request({"data": data}), None, MODEL)
        assert request.inputs["x"].tolist() == [[1.0, 2.0]]


def test_json_deeper_than_orjson_allows_is_refused_400() -> None:
    deep = orjson.Fragment(b"[" * 2000 + b"]" * 2000)
    with pytest.raises(InvalidRequest, match=r"not valid JSON.*depth"):
        decode_request(small_request(parameters={"p": deep}), None, MODEL)


def test_tensor_entries_are_read_only_up_to_the_first_unknown_or_repeated_name() -> None:
    """A million entries cost what the model's count plus one does: reading stops at the
    first repeat, before the malformed entries after it are looked at."""
    x = {"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]}
    for extra, message in [
        ([x, x], "input 'x' appears more than once"),
        ([{**x, "name": "q"}], "unknown input 'q': model 'any' has inputs 'x', 't'"),
    ]:
        body = orjson.dumps({"inputs": [*extra, *[3] * 100_000]})
        with pytest.raises(InvalidRequest, match=message):
            decode_request(body, None, MODEL)


def test_shapes_with_more_dimensions_than_a_tensor_can_have_are_refused() -> None:
    shape = [1] * (MAX_DIMENSIONS + 1)
    with pytest.raises(InvalidRequest, match="'shape' has 33 dimensions, more than the 32"):
        decode_request(small_request({"shape": shape}), None, MODEL)
    # In a pod's answer the shape meets no model first; the element count of 40,000 large
    # dimensions took about a minute to compute.
    answer = orjson.dumps(
        {
            "model_name": "m",
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [2**62] * 40_000, "data": []}],
        }
    )
    with pytest.raises(UpstreamError, match="'shape' has 40000 dimensions"):
        decode_response(answer, None)


def test_binary_bytes_shape_needing_more_bytes_than_sent_is_refused_400_not_413() -> None:
    body, header_length = binary_bytes(b"ab", 600)
    header = orjson.loads(body[:header_length])
    header["inputs"][1]["shape"] = [10**12]
    head = orjson.dumps(header)
    with pytest.raises(InvalidRequest, match="needs 1000000000000 elements, at least") as e:
        decode_request(head + body[header_length:], len(head), MODEL)
    assert e.value.status == 400


def test_a_pods_costly_answer_is_an_upstream_error() -> None:
    dense = b'{"model_name":"m","outputs":[],"p":[' + b",".join([b"[]"] * (SIZE // 3)) + b"]}"
    with pytest.raises(UpstreamError, match="malformed inference response: the JSON header"):
        decode_response(dense, None)


# -- the bound and its counts ----------------------------------------------------------------------


def test_small_documents_are_not_scanned_and_within_the_allowance_whatever_they_hold() -> None:
    worst = b"[" * (SCAN_FROM_BYTES - 1)
    check_json(worst, len(worst))  # no refusal: not scanned
    most_per_byte = budget._DOCUMENT_BYTES + budget._VALUE_BYTES + budget._CONTAINER_BYTES
    assert most_per_byte * len(worst) <= DECODE_ALLOWANCE_BYTES
    with pytest.raises(TooCostlyToDecode):
        check_json(worst + b"[[", len(worst) + 2)


def test_the_allowance_is_the_larger_of_the_floor_and_the_factor() -> None:
    assert allowed_bytes(1) == DECODE_ALLOWANCE_BYTES
    assert allowed_bytes(100 * MIB) == DECODE_FACTOR * 100 * MIB


def test_a_refusal_scans_no_further_than_it_needs() -> None:
    document = b"[" + b",".join([b"[]"] * (40 * MIB // 3)) + b"]"
    with pytest.raises(TooCostlyToDecode, match=r"whose first ([\d,]+) hold") as e:
        check_json(document, len(document))
    scanned = int(re.search(r"whose first ([\d,]+) hold", e.value.message)[1].replace(",", ""))
    assert scanned < len(document) / 4


def token_counts(document: bytes, end: int) -> tuple[int, int, int]:
    """Every slice's counts added up: opens, separators, quotes."""
    slices = list(budget._token_counts(document, end))
    assert slices[-1][0] == end
    return (
        sum(counts[0] for _, counts in slices),
        sum(counts[1] for _, counts in slices),
        sum(counts[2] for _, counts in slices),
    )


def test_every_byte_value_counts_as_what_it_is() -> None:
    for value in range(256):
        document = bytes([value]) * 3
        opens, separators, quotes = token_counts(document, len(document))
        assert opens == (3 if chr(value) in "[{" else 0), value
        assert separators == (3 if chr(value) in ",:" else 0), value
        assert quotes == (3 if chr(value) == '"' else 0), value


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 3 * budget._SCAN_SLICE_BYTES),
    st.lists(st.tuples(st.integers(0, 2**22), st.sampled_from(b'[{,:"}]a')), max_size=50),
)
def test_counts_are_exact_across_slice_boundaries(
    length: int, placed: list[tuple[int, int]]
) -> None:
    document = bytearray(length)
    for position, value in placed:
        document[position % length] = value
    raw = bytes(document)
    end = len(raw) - len(raw) // 7
    assert token_counts(raw, end) == (
        raw.count(b"[", 0, end) + raw.count(b"{", 0, end),
        raw.count(b",", 0, end) + raw.count(b":", 0, end),
        raw.count(b'"', 0, end),
    )
