"""The demo repository: files, configs, and the models' answers checked by ONNX Runtime.

The repository is built once per session by the ``demo_repository`` fixture (tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from models.config import resolve_metadata
from models.demo import (
    MIN_DIGITS_ACCURACY,
    MLP_WIDTHS,
    build_demo_repository,
    build_digits,
    build_mlp,
    digits_samples,
)
from models.repository import ModelRepository
from protocol.schema import ModelMetadata, TensorSpec

ORT_DATATYPES = {"tensor(float)": "FP32", "tensor(int64)": "INT64"}


def session(root: Path, name: str) -> ort.InferenceSession:
    path = root / name / "1" / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def specs(args: list[Any]) -> tuple[TensorSpec, ...]:
    """ONNX Runtime's view of a graph's tensors, as the runtime hands it to resolve_metadata."""
    return tuple(
        TensorSpec(
            arg.name,
            ORT_DATATYPES[arg.type],
            tuple(dim if isinstance(dim, int) else -1 for dim in arg.shape),
        )
        for arg in args
    )


def numpy_forward(model: onnx.ModelProto, rows: np.ndarray) -> np.ndarray:
    """Run an MLP graph node by node with numpy, from its own initializers."""
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    values["input"] = rows
    ops: dict[str, Callable[..., np.ndarray]] = {
        "MatMul": np.matmul,
        "Add": np.add,
        "Relu": lambda x: np.maximum(x, 0),
    }
    for node in model.graph.node:
        values[node.output[0]] = ops[node.op_type](*(values[name] for name in node.input))
    return values["output"]


def test_the_demo_repository_holds_three_models(demo_repository: Path) -> None:
    repository = ModelRepository(demo_repository)
    assert repository.model_names() == ["digits", "mlp", "mlp_wide"]
    for name in repository.model_names():
        config = repository.load_config(name)
        [files] = repository.versions(name, config)
        assert files.version == 1
        assert files.path == (demo_repository / name / "1" / "model.onnx").resolve()
        assert (demo_repository / name / "config.yaml").read_text().startswith(f"# {name}: ")


@pytest.mark.parametrize(
    ("name", "inputs", "outputs", "max_batch_size"),
    [
        (
            "digits",
            (TensorSpec("input", "FP32", (-1, 64)),),
            (TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 10))),
            64,
        ),
        (
            "mlp",
            (TensorSpec("input", "FP32", (-1, 256)),),
            (TensorSpec("output", "FP32", (-1, 10)),),
            32,
        ),
        (
            "mlp_wide",
            (TensorSpec("input", "FP32", (-1, 1024)),),
            (TensorSpec("output", "FP32", (-1, 1024)),),
            32,
        ),
    ],
)
def test_metadata_as_the_runtime_will_resolve_it(
    demo_repository: Path,
    name: str,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    max_batch_size: int,
) -> None:
    model = session(demo_repository, name)
    config = ModelRepository(demo_repository).load_config(name)
    metadata = resolve_metadata(
        name, "1", config, specs(model.get_inputs()), specs(model.get_outputs()), name
    )
    assert metadata == ModelMetadata(name, "1", "onnxruntime_onnx", inputs, outputs, max_batch_size)


def test_mlp_is_work_conserving_and_mlp_wide_waits_for_batches(demo_repository: Path) -> None:
    repository = ModelRepository(demo_repository)
    assert repository.load_config("mlp").dynamic_batching.max_queue_delay_ms == 0
    assert repository.load_config("mlp_wide").dynamic_batching.max_queue_delay_ms == 2.0


def test_digits_samples_are_held_out_rows() -> None:
    images, labels = digits_samples(360)
    assert images.shape == (360, 64)
    assert images.dtype == np.float32
    assert labels.shape == (360,)
    assert labels.dtype == np.int64
    assert set(labels.tolist()) == set(range(10))
    assert np.array_equal(digits_samples(5)[0], images[:5])
    with pytest.raises(ValueError, match="there are 360 held-out digits, asked for 361"):
        digits_samples(361)


def test_digits_answers_correctly_in_onnx_runtime(demo_repository: Path) -> None:
    images, labels = digits_samples(360)
    predicted, probabilities = session(demo_repository, "digits").run(None, {"input": images})
    assert predicted.dtype == np.int64
    assert probabilities.shape == (360, 10)
    assert np.mean(predicted == labels) >= MIN_DIGITS_ACCURACY
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert np.array_equal(predicted, probabilities.argmax(axis=1))


@pytest.mark.parametrize("batch", [1, 32])
def test_mlp_equals_a_numpy_forward_pass(demo_repository: Path, batch: int) -> None:
    path = demo_repository / "mlp" / "1" / "model.onnx"
    rows = np.random.default_rng(batch).standard_normal((batch, 256), dtype=np.float32)
    [output] = session(demo_repository, "mlp").run(None, {"input": rows})
    expected = numpy_forward(onnx.load(path), rows)
    assert output.shape == (batch, 10)
    np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-4)
    # Non-trivial: the ReLUs did not zero everything, and rows differ.
    assert output.std() > 0.1


def test_mlp_rows_do_not_depend_on_their_batch(demo_repository: Path) -> None:
    rows = np.random.default_rng(0).standard_normal((32, 256), dtype=np.float32)
    mlp = session(demo_repository, "mlp")
    [batched] = mlp.run(None, {"input": rows})
    [single] = mlp.run(None, {"input": rows[7:8]})
    np.testing.assert_allclose(single[0], batched[7], rtol=1e-5, atol=1e-5)


def test_mlp_wide_runs_and_matches_numpy(demo_repository: Path) -> None:
    rows = np.random.default_rng(0).standard_normal((2, 1024), dtype=np.float32)
    [output] = session(demo_repository, "mlp_wide").run(None, {"input": rows})
    model = onnx.load(demo_repository / "mlp_wide" / "1" / "model.onnx")
    np.testing.assert_allclose(output, numpy_forward(model, rows), rtol=1e-4, atol=1e-4)
    assert output.std() > 0.1


def test_a_candidate_version_agrees_with_version_1_on_most_digits_and_few_mlp_rows(
    demo_repository: Path, tmp_path: Path
) -> None:
    build_demo_repository(tmp_path, version=2)
    assert sorted(path.name for path in (tmp_path / "digits").iterdir()) == ["2", "config.yaml"]
    images, labels = digits_samples(360)

    def answers(root: Path, name: str, version: str, rows: np.ndarray) -> np.ndarray:
        path = root / name / version / "model.onnx"
        runtime = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.asarray(runtime.run(None, {"input": rows})[0])

    v1, v2 = (
        answers(demo_repository, "digits", "1", images),
        answers(tmp_path, "digits", "2", images),
    )
    assert (v2 == labels).mean() >= MIN_DIGITS_ACCURACY
    assert 0.9 < (v1 == v2).mean() < 1.0  # another split: a candidate that mostly agrees
    rows = np.random.default_rng(0).standard_normal((200, MLP_WIDTHS[0]), dtype=np.float32)
    mlp1, mlp2 = answers(demo_repository, "mlp", "1", rows), answers(tmp_path, "mlp", "2", rows)
    assert (mlp1.argmax(axis=1) == mlp2.argmax(axis=1)).mean() < 0.5


def test_builds_are_deterministic() -> None:
    assert (
        build_mlp(MLP_WIDTHS, 1).SerializeToString() == build_mlp(MLP_WIDTHS, 1).SerializeToString()
    )
    assert (
        build_mlp(MLP_WIDTHS, 1).SerializeToString() != build_mlp(MLP_WIDTHS, 2).SerializeToString()
    )
    assert build_digits().SerializeToString() == build_digits().SerializeToString()


def test_build_mlp_stacks_the_given_widths() -> None:
    model = build_mlp((3, 5, 2), seed=0)
    assert [node.op_type for node in model.graph.node] == ["MatMul", "Add", "Relu", "MatMul", "Add"]
    shapes = [tuple(init.dims) for init in model.graph.initializer]
    assert shapes == [(3, 5), (5,), (5, 2), (2,)]
    rows = np.ones((4, 3), dtype=np.float32)
    [output] = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, {"input": rows})
    np.testing.assert_allclose(output, numpy_forward(model, rows), rtol=1e-6)
