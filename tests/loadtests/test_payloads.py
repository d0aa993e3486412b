"""Payload builders, load shapes and the verdict, checked without a server or Locust.

Bodies are decoded by the gateway's own codec (``protocol.codec.decode_request``), the same
wall every request meets in ``bazaar serve``; ``test_loadtest.py`` sends them to a real one.
"""

from __future__ import annotations

import random
import struct

import pytest

from loadtests.payloads import (
    DATATYPES,
    VARIABLE_DIM,
    ModelSpec,
    PayloadError,
    binary_chunk,
    build_payload,
    concrete_shape,
)
from loadtests.payloads import TensorSpec as PayloadTensorSpec
from loadtests.shapes import SCENARIOS, users_at
from loadtests.verdict import RunResult, Slo, classify, judge, percentile, verdict_table
from protocol.codec import decode_request
from protocol.errors import InvalidRequest
from protocol.schema import DATATYPES as GATEWAY_DATATYPES
from protocol.schema import ModelMetadata
from protocol.schema import TensorSpec as GatewayTensorSpec

# BF16 is a v2 datatype the gateway refuses by name; it is checked byte by byte below.
DECODABLE = [name for name in DATATYPES if name != "BF16"]


def metadata(*inputs: tuple[str, str, tuple[int, ...]], max_batch_size: int = 8) -> ModelMetadata:
    return ModelMetadata(
        name="m",
        version="1",
        platform="test",
        inputs=tuple(GatewayTensorSpec(*spec) for spec in inputs),
        outputs=(GatewayTensorSpec("y", "FP32", (-1, 1)),),
        max_batch_size=max_batch_size,
    )


def spec_of(model: ModelMetadata) -> ModelSpec:
    """The builder reads metadata exactly as a server sends it."""
    return ModelSpec.from_metadata(model.to_json())


def decode(model: ModelMetadata, *, binary: bool, **options: object) -> dict[str, object]:
    payload = build_payload(spec_of(model), random.Random(7), binary=binary, **options)  # type: ignore[arg-type]
    length = payload.headers.get("Inference-Header-Content-Length")
    request = decode_request(payload.body, None if length is None else int(length), model)
    return dict(request.inputs)


def test_the_builder_knows_every_datatype_the_gateway_does() -> None:
    assert set(GATEWAY_DATATYPES) <= set(DATATYPES)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", DECODABLE)
def test_every_datatype_is_accepted_with_its_declared_shape(datatype: str, binary: bool) -> None:
    model = metadata(("x", datatype, (-1, 3, -1)))
    inputs = decode(model, binary=binary, rows=2)
    array = inputs["x"]
    assert array.shape == (2, 3, VARIABLE_DIM)  # type: ignore[attr-defined]
    if datatype == "BYTES":
        assert all(isinstance(item, bytes) and item for item in array.flat)  # type: ignore[attr-defined]
    else:
        assert array.dtype == GATEWAY_DATATYPES[datatype]  # type: ignore[attr-defined]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_many_inputs_of_mixed_datatypes_travel_in_one_body(binary: bool) -> None:
    model = metadata(*((f"in_{dt.lower()}", dt, (-1, 4)) for dt in DECODABLE))
    inputs = decode(model, binary=binary, parameters={"priority": 1, "timeout": 5000})
    assert list(inputs) == [f"in_{dt.lower()}" for dt in DECODABLE]
    assert {array.shape for array in inputs.values()} == {(1, 4)}  # type: ignore[attr-defined]


def test_a_binary_body_carries_its_parameters_and_asks_for_binary_outputs() -> None:
    model = metadata(("x", "FP32", (-1, 2)))
    payload = build_payload(
        spec_of(model), random.Random(1), binary=True, parameters={"priority": 2}
    )
    length = int(payload.headers["Inference-Header-Content-Length"])
    request = decode_request(payload.body, length, model)
    assert request.parameters == {"priority": 2, "binary_data_output": True}
    assert len(payload.body) - length == 2 * 4


def test_bf16_is_the_upper_half_of_float32() -> None:
    assert (
        binary_chunk("BF16", [1.0, -2.0])
        == struct.pack("<f", 1.0)[2:] + struct.pack("<f", -2.0)[2:]
    )


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize(
    ("shape", "wrong"),
    [((-1, 64), (1, 65)), ((-1, 3, 5), (1, 3, 6)), ((-1, -1), (1, VARIABLE_DIM, 2))],
)
def test_wrong_shape_mode_makes_only_the_shape_wrong(
    shape: tuple[int, ...], wrong: tuple[int, ...], binary: bool
) -> None:
    spec = PayloadTensorSpec("x", "FP32", shape)
    assert concrete_shape(spec, rows=1, wrong_shape=True) == wrong
    model = metadata(("x", "FP32", shape))
    with pytest.raises(InvalidRequest, match=r"shape|rank"):
        decode(model, binary=binary, wrong_shape=True)


def test_metadata_without_inputs_or_with_unknown_datatypes_is_refused() -> None:
    with pytest.raises(PayloadError, match="unknown datatype 'FP8'"):
        ModelSpec.from_metadata(
            {"name": "m", "inputs": [{"name": "x", "datatype": "FP8", "shape": [1]}]}
        )
    with pytest.raises(PayloadError, match="not v2 model metadata"):
        ModelSpec.from_metadata({"name": "m"})


def test_scenarios_follow_their_shapes_and_end_on_time() -> None:
    at = {s: [users_at(s, t, 10.0, 10) for t in range(11)] for s in SCENARIOS}
    assert at["steady"] == [10] * 10 + [None]
    assert at["open"] == [10] * 10 + [None]
    assert at["ramp"] == [1, 1, 2, 3, 4, 5, 6, 7, 8, 9, None]
    assert at["spike"] == [2, 2, 2, 2, 10, 10, 2, 2, 2, 2, None]
    assert at["step"] == [2, 2, 4, 4, 6, 6, 8, 8, 10, 10, None]
    with pytest.raises(ValueError, match="unknown scenario"):
        users_at("soak", 0.0, 10.0, 10)


def test_statuses_are_counted_by_name() -> None:
    assert {s: classify(s) for s in (200, 429, 503, 504, 400, 404, 500, 502, 0)} == {
        200: "ok",
        429: "shed",
        503: "shed",
        504: "expired",
        400: "client_error",
        404: "client_error",
        500: "server_error",
        502: "server_error",
        0: "transport_error",
    }


def run_result(ok: int, shed: int, missed: int, ok_ms: dict[int, int]) -> RunResult:
    outcomes = {"m/ok": ok, "m/shed": shed, "m/missed_schedule": missed}
    tally = {"outcomes": outcomes, "ok_ms": {str(k): v for k, v in ok_ms.items()}}
    return RunResult.from_tally({**tally, "started": 100.0, "stopped": 110.0})


def test_percentiles_come_from_the_histogram_of_successes() -> None:
    histogram = {1: 90, 5: 9, 40: 1}
    assert percentile(histogram, 0.5) == 1
    assert percentile(histogram, 0.99) == 5
    assert percentile(histogram, 1.0) == 40
    assert percentile({}, 0.99) is None


def test_the_verdict_passes_and_fails_on_each_bound() -> None:
    slo = Slo(p99_ms=10, max_error_rate=0.05)
    good = run_result(ok=98, shed=1, missed=1, ok_ms={3: 98})
    assert good.sent == 99 and good.due == 100 and good.error_rate == pytest.approx(0.02)
    assert good.throughput_rps == pytest.approx(9.8)
    assert [c.passed for c in judge(good, slo)] == [True, True]
    slow = run_result(ok=100, shed=0, missed=0, ok_ms={3: 90, 20: 10})
    assert [c.passed for c in judge(slow, slo)] == [False, True]
    # Missed schedule slots count as errors: load offered and never served.
    starved = run_result(ok=90, shed=0, missed=10, ok_ms={3: 90})
    assert [c.passed for c in judge(starved, slo)] == [True, False]
    nothing = run_result(ok=0, shed=5, missed=0, ok_ms={})
    checks = judge(nothing, slo)
    assert [c.passed for c in checks] == [False, False]
    table = verdict_table(checks)
    assert "no success" in table and table.count("FAIL") == 2
