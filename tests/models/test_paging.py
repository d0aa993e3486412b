"""Paging under a memory budget: cold models are held and answered, idle ones make room, a
model with work in flight is never evicted, and a held request waits no longer than its
timeout."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import CollectorRegistry

from models.paging import allocated_bytes, choose_victims
from models.repository import ModelRepository
from models.server import create_app
from models.store import ModelStore
from protocol.errors import DeadlineExceeded
from protocol.support import cancel_and_wait
from tests.support import bazaar_process, eventually, free_port

DIGITS = [f"d{i}" for i in range(1, 5)]
SLOW_WIDTH = 1024


def _repository(demo_repository: Path, root: Path, names: Iterable[str]) -> ModelRepository:
    for name in names:
        shutil.copytree(demo_repository / "digits", root / name)
    return ModelRepository(root)


def _slow(root: Path, name: str, max_batch_size: int) -> None:
    """24 MatMuls by one 1024x1024 weight: a batch of 256 rows computes for a while."""
    weight = numpy_helper.from_array(np.eye(SLOW_WIDTH, dtype=np.float32), "w")
    layers = 24
    nodes = [
        helper.make_node("MatMul", ["input" if i == 0 else f"h{i}", "w"], [f"h{i + 1}"])
        for i in range(layers)
    ]
    nodes.append(helper.make_node("Identity", [f"h{layers}"], ["output"]))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, SLOW_WIDTH])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, SLOW_WIDTH])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (root / name / "1").mkdir(parents=True)
    onnx.save(model, str(root / name / "1" / "model.onnx"))
    (root / name / "config.yaml").write_text(f"max_batch_size: {max_batch_size}\n")


async def _footprint(repository: ModelRepository, name: str) -> int:
    """What ``name`` measures when it loads, in a store of its own: the middle one of three
    loads, as the first load in a process also carries ONNX Runtime's one-time
    allocations."""
    probe = ModelStore(repository, [name])
    await probe.load_all()
    footprints = [probe.models[name].footprint_bytes]
    for _ in range(2):
        await probe.load(name)
        footprints.append(probe.models[name].footprint_bytes)
    footprint = sorted(footprints)[1]
    await asyncio.to_thread(probe.close)
    return footprint


@pytest.fixture
async def paging(demo_repository: Path, tmp_path: Path) -> AsyncIterator[ModelStore]:
    """d1..d4, copies of the digits classifier, under a budget that holds two of them."""
    repository = _repository(demo_repository, tmp_path, DIGITS)
    budget = int(2.5 * await _footprint(repository, "d1"))
    store = ModelStore(repository, memory_budget_bytes=budget)
    pager = asyncio.create_task(store.load_all())
    await eventually(store.ready, 30, "every model to have been in once")
    assert set(store.models) == {"d3", "d4"}, (budget, store._footprints)
    yield store
    await cancel_and_wait(pager)
    await asyncio.to_thread(store.close)


def _digits(rows: int = 1) -> dict[str, np.ndarray]:
    return {"input": np.full((rows, 64), 8.0, dtype=np.float32)}


def _loaded(store: ModelStore) -> set[str]:
    return set(store.models)


def test_the_least_recently_used_idle_models_make_room() -> None:
    loaded = [("a", 10), ("b", 10), ("c", 10)]
    assert choose_victims(loaded, set(), 10, 40) == []
    assert choose_victims(loaded, set(), 10, 30) == ["a"]
    assert choose_victims(loaded, set(), 15, 30) == ["a", "b"]
    assert choose_victims(loaded, {"a"}, 10, 30) == ["b"]  # busy: passed over, not waited for
    assert choose_victims(loaded, {"a", "b", "c"}, 10, 30) is None
    assert choose_victims(loaded, {"c"}, 25, 30) is None  # all the idle ones are not enough


def test_a_footprint_is_what_the_allocator_handed_out() -> None:
    before = allocated_bytes()
    assert before is not None, "glibc's mallinfo2 is on every machine we run on"
    held = bytearray(8 * 1024 * 1024)
    after = allocated_bytes()
    assert after is not None and after - before >= len(held)


async def test_start_up_sweeps_every_model_in_and_keeps_the_most_recent(
    paging: ModelStore,
) -> None:
    # The fixture holds d3 and d4, the last two in: the sweep evicted d1 and d2 for them.
    index = {entry["name"]: entry for entry in paging.index()}
    assert index["d4"]["state"] == "READY"
    assert index["d1"]["state"] == "UNAVAILABLE"
    assert index["d1"]["reason"].startswith("evicted")
    assert all(paging.is_ready(name) for name in DIGITS)  # each pages in on demand
    assert paging.memory_used_bytes() <= (paging.memory_budget_bytes or 0)
    assert paging.view("d1").metadata.max_batch_size == 64  # read at its first load


async def test_a_cold_models_first_request_is_held_and_answered(paging: ModelStore) -> None:
    registry = CollectorRegistry()
    app = create_app(paging, registry)
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [8.0] * 64}]}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://pod", timeout=30) as pod:
        metadata = await pod.get("/v2/models/d1")  # evicted: answered from its last load
        assert metadata.status_code == 200
        assert (await pod.get("/v2/models/d1/ready")).status_code == 200
        answer = await pod.post("/v2/models/d1/infer", json=body)
        assert answer.status_code == 200, answer.text
        assert [o["name"] for o in answer.json()["outputs"]] == ["label", "probabilities"]
        index = (await pod.post("/v2/repository/index", json={})).json()
    states = {entry["name"]: entry["state"] for entry in index}
    assert states == {"d1": "READY", "d2": "UNAVAILABLE", "d3": "UNAVAILABLE", "d4": "READY"}
    assert registry.get_sample_value("bazaar_model_load_seconds_count", {"model": "d1"}) == 2
    assert registry.get_sample_value("bazaar_model_eviction_seconds_count", {"model": "d3"}) == 1
    assert registry.get_sample_value("bazaar_model_memory_used_bytes") == paging.memory_used_bytes()


async def test_the_least_recently_used_model_goes_first(paging: ModelStore) -> None:
    async with paging.serving("d3", None, None) as runtime:  # d3 is now the more recent
        await runtime.infer(_digits(), ["label"])
    async with paging.serving("d1", None, None):
        pass
    assert _loaded(paging) == {"d3", "d1"}


async def test_a_model_with_work_in_flight_is_not_evicted(
    demo_repository: Path, tmp_path: Path
) -> None:
    # s1..s3 compute slowly; a batch on s2, the least recently used, is in flight while s1's
    # load needs room: s3 goes, not s2, and s2's batch is answered. s1 warms up one row only,
    # so it loads well within s2's batch of 2048 rows.
    _slow(tmp_path, "s1", 1)
    for name in ("s2", "s3"):
        _slow(tmp_path, name, 256)
    repository = ModelRepository(tmp_path)
    budget = int(2.5 * await _footprint(repository, "s2"))
    store = ModelStore(repository, memory_budget_bytes=budget)
    pager = asyncio.create_task(store.load_all())
    await eventually(store.ready, 60, "every model to have been in once")
    assert _loaded(store) == {"s2", "s3"}

    async def batch(name: str, rows: int) -> np.ndarray:
        inputs = {"input": np.ones((rows, SLOW_WIDTH), dtype=np.float32)}
        async with store.serving(name, None, None) as runtime:
            outputs, _ = await runtime.infer(inputs, ["output"])
        return outputs["output"]

    slow = asyncio.create_task(batch("s2", 2048))
    await eventually(lambda: store.models["s2"].default.busy.active == 1, 30, "s2 to compute")
    await batch("s3", 1)  # s3 used since: s2 is the least recently used, and busy
    cold = await batch("s1", 1)
    assert store.models["s2"].default.busy.active == 1, "s2's batch must still be computing"
    assert _loaded(store) == {"s2", "s1"}
    np.testing.assert_array_equal(await slow, np.ones((2048, SLOW_WIDTH), dtype=np.float32))
    np.testing.assert_array_equal(cold, np.ones((1, SLOW_WIDTH), dtype=np.float32))
    await cancel_and_wait(pager)
    await asyncio.to_thread(store.close)


async def test_with_no_idle_room_a_load_waits_for_work_in_flight_to_end(
    paging: ModelStore,
) -> None:
    answered = asyncio.Event()

    async def cold() -> None:
        async with paging.serving("d1", None, None) as runtime:
            await runtime.infer(_digits(), ["label"])
        answered.set()

    async with paging.serving("d3", None, None), paging.serving("d4", None, None):
        request = asyncio.create_task(cold())
        await eventually(lambda: "d1" in paging._page_ins, 5, "d1's page-in to be asked for")
        assert paging._requests is not None
        # Taken off the queue: the pager has run up to its wait for room, and had its chance
        # to take d3's or d4's.
        await eventually(paging._requests.empty, 5, "the pager to take d1's page-in")
        assert _loaded(paging) == {"d3", "d4"}
        assert not answered.is_set()
    await request
    assert "d1" in _loaded(paging) and len(_loaded(paging)) == 2


async def test_a_held_requests_wait_is_bounded_by_its_timeout(paging: ModelStore) -> None:
    loop = asyncio.get_running_loop()
    async with paging.serving("d3", None, None), paging.serving("d4", None, None):
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="timeout passed while the model was loading"):
            async with paging.serving("d1", None, loop.time() + 0.3):
                pass
        waited = time.monotonic() - started
        assert 0.3 <= waited < 1.0, waited
    # The load goes on without the request that gave up: the next one finds d1 in.
    await eventually(lambda: "d1" in paging.models, 5, "d1 to be paged in all the same")


async def test_a_model_larger_than_the_budget_is_unavailable_and_the_pod_unready(
    demo_repository: Path, tmp_path: Path
) -> None:
    # d1's file (4 KB) is over the budget already; d2's file fits it, its sessions do not.
    repository = _repository(demo_repository, tmp_path, ["d1", "d2"])
    store = ModelStore(repository, memory_budget_bytes=5_000)
    (tmp_path / "d1" / "1" / "model.onnx").write_bytes(
        (tmp_path / "d1" / "1" / "model.onnx").read_bytes() + b"\0" * 1000
    )
    pager = asyncio.create_task(store.load_all())
    await eventually(lambda: store._started, 30, "start-up to end")
    assert not store.ready()
    for name in ("d1", "d2"):
        assert store.states[name].state == "UNAVAILABLE"
        assert "over the pod's memory budget of 5000" in store.states[name].reason
        assert not store.is_ready(name)
    assert not store.models
    await cancel_and_wait(pager)
    await asyncio.to_thread(store.close)


def test_a_model_server_with_a_budget_serves_more_models_than_it_holds(
    demo_repository: Path, tmp_path: Path
) -> None:
    names = [f"m{i}" for i in range(8)]
    root = tmp_path / "repository"
    _repository(demo_repository, root, names)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # About three digits classifiers (1.2 MB each; the first load in a process is larger).
    args = ["model-server", "--model-repository", str(root), "--port", str(port)]
    args += ["--memory-budget", "4000000"]
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [8] * 64}]}
    with (
        bazaar_process(args, tmp_path / "pod.log", f"{url}/v2/health/ready"),
        httpx.Client(base_url=url, timeout=30) as pod,
    ):
        before = {e["name"]: e["state"] for e in pod.post("/v2/repository/index").json()}
        for name in names:
            answer = pod.post(f"/v2/models/{name}/infer", json=body)
            assert answer.status_code == 200, answer.text
        metrics = pod.get("/metrics").text
    assert before["m0"] == "UNAVAILABLE" and before["m7"] == "READY"
    assert 1 <= list(before.values()).count("READY") <= 3
    assert 'bazaar_model_eviction_seconds_count{model="m7"}' in metrics
    assert "bazaar_model_memory_budget_bytes 4e+06" in metrics
