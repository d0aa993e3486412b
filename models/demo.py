"""The demo model repository that ``bazaar models build-demo DIR`` writes.

Three models, built offline (scikit-learn's bundled digits, seeded weights) and
deterministically, so the same command gives the same bytes and docs and tests can check exact
answers:

- ``digits``: scaler + logistic regression on 8x8 digit images (pixel values 0..16):
  ``input`` FP32 [-1, 64] -> ``label`` INT64 [-1], ``probabilities`` FP32 [-1, 10]. Checks
  correctness end to end; ``digits_samples`` gives held-out rows with their labels.
- ``mlp``: ReLU network 256 -> 1024 -> 1024 -> 10, about 2.6 MFLOP a row; per-call overhead
  is a large share of its latency.
- ``mlp_wide``: 1024 -> 4096 -> 4096 -> 1024, about 50 MFLOP a row and 100 MB of weights. At
  batch 1 every row streams all the weights from memory; a batch reads them once per batch, so
  batching pays.

Every model is version ``1``, unless built as another version (``--model-version``): a
candidate for the demos of versions, canaries and rollouts, whose digits is trained on
another split of the data (so it agrees with version 1 on most rows, not all) and whose MLPs
have other weights (so they agree on almost none). The files use ONNX opset 17 (IR version
8), which any onnxruntime since 1.13 loads.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

OPSET = 17
IR_VERSION = 8

MIN_DIGITS_ACCURACY = 0.95
"""The builder refuses a digits model below this held-out accuracy."""

MLP_WIDTHS = (256, 1024, 1024, 10)
MLP_WIDE_WIDTHS = (1024, 4096, 4096, 1024)

_DIGITS_CONFIG = """\
# digits: scaler + logistic regression on scikit-learn's 8x8 digits (pixel values 0..16).
# input FP32 [-1, 64] -> label INT64 [-1], probabilities FP32 [-1, 10]
max_batch_size: 64
"""

_MLP_CONFIG = """\
# mlp: ReLU network 256 -> 1024 -> 1024 -> 10 with seeded weights, ~2.6 MFLOP a row.
# input FP32 [-1, 256] -> output FP32 [-1, 10]
max_batch_size: 32
dynamic_batching:
  # A row takes well under a millisecond: waiting for company would cost more latency
  # than the batch saves. Work-conserving: batches grow exactly as fast as the pods are busy.
  max_queue_delay_ms: 0
"""

_MLP_WIDE_CONFIG = """\
# mlp_wide: ReLU network 1024 -> 4096 -> 4096 -> 1024 with seeded weights, ~50 MFLOP a row.
# input FP32 [-1, 1024] -> output FP32 [-1, 1024]
max_batch_size: 32
dynamic_batching:
  # Each call reads all 100 MB of weights, so a fuller batch is nearly free per row:
  # worth waiting a little for.
  max_queue_delay_ms: 2.0
"""


def build_demo_repository(root: Path, version: int = 1) -> list[str]:
    """Write the demo models under ``root`` as ``version`` (created if missing, files
    replaced, other versions left); their names."""
    _write(root / "digits", build_digits(split_seed=version - 1), _DIGITS_CONFIG, version)
    _write(root / "mlp", build_mlp(MLP_WIDTHS, seed=version), _MLP_CONFIG, version)
    wide = build_mlp(MLP_WIDE_WIDTHS, seed=version + 1)
    _write(root / "mlp_wide", wide, _MLP_WIDE_CONFIG, version)
    return ["digits", "mlp", "mlp_wide"]


def digits_samples(n: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The first ``n`` held-out digits, never trained on: inputs [n, 64] and their labels [n]."""
    _, images, _, labels = _digits_split()
    if not 0 <= n <= len(labels):
        raise ValueError(f"there are {len(labels)} held-out digits, asked for {n}")
    return images[:n], labels[:n]


def build_mlp(widths: Sequence[int], seed: int) -> onnx.ModelProto:
    """A ReLU network: ``input`` FP32 [batch, widths[0]] -> ``output`` FP32 [batch, widths[-1]].

    Layer i multiplies by a widths[i] x widths[i+1] weight, adds a bias and applies Relu,
    except the last layer, which stays linear. Weights are He-initialised (normal, standard
    deviation sqrt(2 / fan_in)) so activations keep their scale through the layers; biases
    are normal with standard deviation 0.1. All of it comes from one generator seeded with
    ``seed``, and is stored as initializers.
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    current = "input"
    last = len(widths) - 2
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        scale = np.float32(math.sqrt(2.0 / fan_in))
        weight = rng.standard_normal((fan_in, fan_out), dtype=np.float32) * scale
        bias = rng.standard_normal(fan_out, dtype=np.float32) * np.float32(0.1)
        initializers.append(numpy_helper.from_array(weight, f"weight{layer}"))
        initializers.append(numpy_helper.from_array(bias, f"bias{layer}"))
        summed = "output" if layer == last else f"linear{layer}"
        nodes.append(helper.make_node("MatMul", [current, f"weight{layer}"], [f"matmul{layer}"]))
        nodes.append(helper.make_node("Add", [f"matmul{layer}", f"bias{layer}"], [summed]))
        current = summed
        if layer != last:
            current = f"relu{layer}"
            nodes.append(helper.make_node("Relu", [summed], [current]))
    graph = helper.make_graph(
        nodes,
        "mlp_" + "x".join(map(str, widths)),
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", widths[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", widths[-1]])],
        initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="bazaar",
    )
    onnx.checker.check_model(model)
    return model


def build_digits(split_seed: int = 0) -> onnx.ModelProto:
    """Trained on the 80 % of the digits that ``split_seed`` draws (0: the demo's version 1)."""
    train_images, test_images, train_labels, test_labels = _digits_split(split_seed)
    # Standardising the pixels lets lbfgs converge in a few hundred iterations.
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    classifier.fit(train_images, train_labels)
    accuracy = float(classifier.score(test_images, test_labels))
    if accuracy < MIN_DIGITS_ACCURACY:
        raise RuntimeError(
            f"digits: held-out accuracy {accuracy:.3f} is below {MIN_DIGITS_ACCURACY}"
        )
    model: onnx.ModelProto = convert_sklearn(
        classifier,
        initial_types=[("input", FloatTensorType([None, 64]))],
        # Without ZipMap the probabilities come out as a plain [N, 10] tensor.
        options={LogisticRegression: {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": 3},
    )
    # skl2onnx names the graph with a random UUID; a fixed name keeps the file reproducible.
    model.graph.name = "digits"
    return model


def _digits_split(seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """Train on a stratified 80% drawn by ``seed``; the other 20% (360 rows) is held out."""
    images, labels = load_digits(return_X_y=True)
    return tuple(
        train_test_split(
            images.astype(np.float32),
            labels.astype(np.int64),
            test_size=0.2,
            random_state=seed,
            stratify=labels,
        )
    )


def _write(model_dir: Path, model: onnx.ModelProto, config: str, version: int) -> None:
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    onnx.save(model, model_dir / str(version) / "model.onnx")
    (model_dir / "config.yaml").write_text(config, encoding="utf-8")
