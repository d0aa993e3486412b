"""ONNX Runtime sessions: providers, warm-up sizes, load errors, dtypes through a real session."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from models.config import ModelConfig
from models.runtime import ModelRuntime, select_providers, warmup_batch_sizes
from protocol.errors import ConfigError, DeadlineExceeded
from tests.support import eventually


@pytest.mark.parametrize(
    "device,available,expected",
    [
        ("cpu", ["CPUExecutionProvider"], ["CPUExecutionProvider"]),
        ("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
        ("auto", ["CPUExecutionProvider"], ["CPUExecutionProvider"]),
        (
            "auto",
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
        ),
        (
            "cuda",
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
        ),
    ],
)
def test_providers_for_each_device(device: str, available: list[str], expected: list[str]) -> None:
    assert select_providers(device, available) == expected


def test_cuda_without_its_provider_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="CUDAExecutionProvider"):
        select_providers("cuda", ["CPUExecutionProvider"])


def test_warmup_covers_every_power_of_two_the_maximum_and_preferred_sizes() -> None:
    assert warmup_batch_sizes(32, ()) == [1, 2, 4, 8, 16, 32]
    assert warmup_batch_sizes(24, (3, 24)) == [1, 2, 3, 4, 8, 16, 24]
    assert warmup_batch_sizes(0, ()) == [0]


def test_a_file_that_is_not_onnx_fails_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"definitely not a protobuf")
    with pytest.raises(ConfigError) as failure:
        ModelRuntime("broken", 1, path, ModelConfig())
    assert str(path) in str(failure.value)
    assert "cannot load" in str(failure.value)


def _mixed_types_model(path: Path) -> None:
    """flags BOOL [N,2] -> Not; counts INT32 [N,3] -> Add 1; names STRING [N] -> Identity."""
    graph = helper.make_graph(
        [
            helper.make_node("Not", ["flags"], ["not_flags"]),
            helper.make_node("Add", ["counts", "one"], ["next_counts"]),
            helper.make_node("Identity", ["names"], ["same_names"]),
        ],
        "mixed",
        [
            helper.make_tensor_value_info("flags", TensorProto.BOOL, ["n", 2]),
            helper.make_tensor_value_info("counts", TensorProto.INT32, ["n", 3]),
            helper.make_tensor_value_info("names", TensorProto.STRING, ["n"]),
        ],
        [
            helper.make_tensor_value_info("not_flags", TensorProto.BOOL, ["n", 2]),
            helper.make_tensor_value_info("next_counts", TensorProto.INT32, ["n", 3]),
            helper.make_tensor_value_info("same_names", TensorProto.STRING, ["n"]),
        ],
        [helper.make_tensor("one", TensorProto.INT32, [], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


async def test_bool_int_and_bytes_tensors_through_a_real_session(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    _mixed_types_model(path)
    runtime = ModelRuntime("mixed", 1, path, ModelConfig())
    try:
        assert [(s.name, s.datatype, s.shape) for s in runtime.metadata.inputs] == [
            ("flags", "BOOL", (-1, 2)),
            ("counts", "INT32", (-1, 3)),
            ("names", "BYTES", (-1,)),
        ]
        assert runtime.metadata.max_batch_size == 32
        inputs = {
            "flags": np.array([[True, False], [False, False]]),
            "counts": np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32),
            "names": np.array([b"caf\xc3\xa9", b"x"], dtype=object),
        }
        outputs, execution = await runtime.infer(inputs, ["not_flags", "next_counts", "same_names"])
        np.testing.assert_array_equal(outputs["not_flags"], ~inputs["flags"])
        np.testing.assert_array_equal(outputs["next_counts"], inputs["counts"] + 1)
        assert list(outputs["same_names"]) == [b"caf\xc3\xa9", b"x"]
        assert execution.infer_s > 0 and execution.queue_s >= 0
        assert runtime.busy.busy_seconds() > 0
    finally:
        runtime.close()


def test_auto_without_cuda_says_loudly_that_it_computes_on_the_cpu(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "model.onnx"
    _mixed_types_model(path)
    with caplog.at_level(logging.WARNING, logger="models.runtime"):
        runtime = ModelRuntime("mixed", 1, path, ModelConfig(device="auto"))
    try:
        assert runtime.providers[0] == "CPUExecutionProvider"
        [warning] = [r.getMessage() for r in caplog.records]
        assert "device 'auto' found no CUDAExecutionProvider" in warning
        assert "CPUExecutionProvider" in warning
    finally:
        runtime.close()


async def test_a_caller_that_leaves_frees_its_instance_only_when_the_run_ends(
    tmp_path: Path,
) -> None:
    """The pod's handler is cancelled when its client disconnects; the ONNX Runtime run it
    started goes on in its thread, so the instance stays taken until that run ends, and a
    batch whose deadline passes meanwhile is dropped, not queued behind it."""
    path = tmp_path / "model.onnx"
    _mixed_types_model(path)
    runtime = ModelRuntime("mixed", 1, path, ModelConfig(instances=1))
    running: list[int] = []
    release = threading.Event()
    real_run = runtime._run

    def slow_run(inputs: Any, names: Any, queued: float) -> Any:
        running.append(len(running))
        release.wait(10)
        return real_run(inputs, names, queued)

    runtime._run = slow_run  # type: ignore[method-assign]
    inputs = {
        "flags": np.array([[True, False]]),
        "counts": np.array([[1, 2, 3]], dtype=np.int32),
        "names": np.array([b"x"], dtype=object),
    }
    try:
        left = asyncio.ensure_future(runtime.infer(inputs, ["not_flags"]))
        await eventually(lambda: running == [0], 10, "the first run to start")
        left.cancel()
        deadline = asyncio.get_running_loop().time() + 0.1
        with pytest.raises(DeadlineExceeded):  # the instance is still on the abandoned run
            await runtime.infer(inputs, ["not_flags"], deadline)
        assert running == [0]
        release.set()
        outputs, _ = await runtime.infer(inputs, ["not_flags"])
        assert running == [0, 1]
        assert outputs["not_flags"].tolist() == [[False, True]]
    finally:
        release.set()
        runtime.close()


async def test_a_minimum_batch_time_holds_the_instance_busy_that_long(tmp_path: Path) -> None:
    """The benchmark's accelerator: a batch that computes in microseconds takes 80 ms of wall
    time, busy, and two batches on one instance take twice that."""
    path = tmp_path / "model.onnx"
    _mixed_types_model(path)
    runtime = ModelRuntime("mixed", 1, path, ModelConfig(instances=1, min_batch_time_ms=80))
    inputs = {
        "flags": np.array([[True, False]]),
        "counts": np.array([[1, 2, 3]], dtype=np.int32),
        "names": np.array([b"x"], dtype=object),
    }
    try:
        started = time.perf_counter()  # wall time: the loop's clock may be looptime's
        runs = [runtime.infer(inputs, ["not_flags"]) for _ in range(2)]
        results = await asyncio.gather(*runs)
        assert time.perf_counter() - started >= 0.16
        assert all(execution.infer_s >= 0.08 for _, execution in results)
        assert runtime.busy.busy_seconds() >= 0.16
    finally:
        runtime.close()
