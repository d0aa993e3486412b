"""``scale``, a model whose every version says which it is: version v answers ``y = v * x``
(``x`` FP32 [batch, 4]); and real ``bazaar model-server`` processes serving it."""

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


def write_scale(root: Path, versions: list[int], config: str = "") -> Path:
    """A repository with ``scale`` at ``versions``, every one served; ``config``: more of
    its ``config.yaml``."""
    for version in versions:
        (root / "scale" / str(version)).mkdir(parents=True)
        onnx.save(build_scale(version), root / "scale" / str(version) / "model.onnx")
    base = "max_batch_size: 8\nversion_policy: {all: true}\n"
    (root / "scale" / "config.yaml").write_text(base + config)
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
