"""A request's ``parameters.timeout`` at the pod: a batch that cannot start in time is
answered 504 and never computed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import CollectorRegistry

from models.repository import ModelRepository
from models.server import create_app
from models.store import ModelStore
from tests.support import eventually

WIDTH = 1024
LAYERS = 24


def _slow_model(root: Path) -> None:
    """``slow``: 24 MatMuls by one 1024x1024 weight, ~50 MFLOP a row; one instance."""
    weight = numpy_helper.from_array(np.eye(WIDTH, dtype=np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["input" if i == 0 else f"h{i}", "w"], [f"h{i + 1}"])
        for i in range(LAYERS)
    ]
    nodes.append(helper.make_node("Identity", [f"h{LAYERS}"], ["output"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, WIDTH])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, WIDTH])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (root / "slow" / "1").mkdir(parents=True)
    onnx.save(model, str(root / "slow" / "1" / "model.onnx"))
    (root / "slow" / "config.yaml").write_text("max_batch_size: 256\ninstances: 1\n")


def _body(rows: int, timeout_us: int | None = None) -> dict[str, object]:
    body: dict[str, object] = {
        "inputs": [
            {
                "name": "input",
                "shape": [rows, WIDTH],
                "datatype": "FP32",
                "data": [0.0] * rows * WIDTH,
            }
        ]
    }
    if timeout_us is not None:
        body["parameters"] = {"timeout": timeout_us}
    return body


async def test_a_batch_whose_timeout_passes_while_an_instance_is_busy_is_never_computed(
    tmp_path: Path,
) -> None:
    _slow_model(tmp_path)
    store = ModelStore(ModelRepository(tmp_path))
    await store.load_all()
    registry = CollectorRegistry()
    app = create_app(store, registry)
    runtime = store.get("slow")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://pod", timeout=60) as pod:
        busy = asyncio.create_task(pod.post("/v2/models/slow/infer", json=_body(256)))
        await eventually(lambda: runtime.busy.active == 1, 30, "the slow batch to start")
        late = await pod.post("/v2/models/slow/infer", json=_body(1, timeout_us=10_000))
        assert runtime.busy.active == 1, "the slow batch must still be computing"
        assert late.status_code == 504, late.text
        assert "timeout" in late.json()["error"]
        assert (await busy).status_code == 200
        # Once an instance is free, the same timeout is no obstacle: it bounds the wait only.
        assert (await pod.post("/v2/models/slow/infer", json=_body(1, 10_000))).status_code == 200
        refused = await pod.post("/v2/models/slow/infer", json=_body(1, timeout_us=-1))
        assert refused.status_code == 400
        assert "timeout" in refused.json()["error"]
    batches = registry.get_sample_value(
        "bazaar_model_inference_batches_total", {"model": "slow", "outcome": "success"}
    )
    failed = registry.get_sample_value(
        "bazaar_model_inference_batches_total", {"model": "slow", "outcome": "failure"}
    )
    assert (batches, failed) == (2, None)
    expired = registry.get_sample_value(
        "bazaar_model_inference_requests_total", {"model": "slow", "outcome": "expired"}
    )
    assert expired == 1  # the pod's outcomes are the gateway's: a 504 is expired at both
    await asyncio.to_thread(store.close)
