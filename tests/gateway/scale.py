"""Test models whose versions differ in known ways, and real ``bazaar model-server``
processes serving them: ``scale`` at version v answers ``y = v * x`` (``x`` FP32 [batch, 4]),
so an answer says which version computed it; ``pick``, a two-class classifier whose version
2 adds 1 to the second class's score, so its top-1 differs from version 1's exactly on the
inputs whose first score leads by less than 1."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.demo import IR_VERSION, OPSET
from tests.support import bazaar_process, free_port

WIDTH = 4


def build_scale(factor: float) -> onnx.ModelProto:
    """``x`` FP32 [batch, 4] -> ``y = factor * x``."""
    weight = numpy_helper.from_array(np.array(factor, dtype=np.float32), "factor")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "factor"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        [weight],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )


def build_pick(version: int) -> onnx.ModelProto:
    """``x`` FP32 [batch, 2] -> ``scores = x + [0, version - 1]``."""
    offset = np.array([0.0, version - 1.0], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "offset"], ["scores"])],
        "pick",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(offset, "offset")],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )


def write_scale(root: Path, versions: list[int], config: str = "", model: str = "scale") -> Path:
    """A repository with ``model`` (``scale`` or ``pick``) at ``versions``, every one
    served; ``config``: more of its ``config.yaml``."""
    build = build_scale if model == "scale" else build_pick
    for version in versions:
        (root / model / str(version)).mkdir(parents=True)
        onnx.save(build(version), root / model / str(version) / "model.onnx")
    base = "max_batch_size: 8\nversion_policy: {all: true}\n"
    (root / model / "config.yaml").write_text(base + config)
    return root


def pod_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@contextlib.contextmanager
def model_server(root: Path, url: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    port = url.rsplit(":", 1)[1]
    args = ["model-server", "--model-repository", str(root), "--port", port]
    with bazaar_process(args, log, f"{url}/v2/health/ready") as process:
        yield process


def body(*values: float) -> dict[str, object]:
    """A JSON request of one row per value, every feature that value."""
    data = [v for v in values for _ in range(WIDTH)]
    return {
        "inputs": [{"name": "x", "shape": [len(values), WIDTH], "datatype": "FP32", "data": data}]
    }


def answered(response: httpx.Response) -> list[float]:
    """Each row's first output: its value times the version that computed it."""
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    return [float(v) for v in output["data"][::WIDTH]]
