"""WorkerSupervisor with real ``bazaar model-server`` processes on loopback.

Worker processes are found through /proc (children of this process whose command line
names the model), so the tests see what really runs, not what the supervisor believes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest

from bazaar.supervisor import WorkerSupervisor
from protocol.grpc import grpc_service_pb2 as pb
from protocol.grpc.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from tests.gateway.scale import write_scale
from tests.support import eventually

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="finds workers through /proc")


class Listener:
    """Records every (model, endpoints) call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, model: str, endpoints: list[str]) -> None:
        self.calls.append((model, endpoints))

    def latest(self, model: str) -> list[str] | None:
        return next((e for m, e in reversed(self.calls) if m == model), None)


def worker_pids(model: str) -> dict[str, int]:
    """URL -> pid of this process's live model-server children serving ``model``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            args = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue  # exited meanwhile
        # Fields after the parenthesised command name: state, ppid, ...
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) != os.getpid() or state == "Z" or "--model" not in args:
            continue
        if args[args.index("--model") + 1] == model:
            host, port = args[args.index("--host") + 1], args[args.index("--port") + 1]
            found[f"http://{host}:{port}"] = int(entry.name)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def listener() -> Listener:
    return Listener()


@pytest.fixture
async def supervisors(listener: Listener) -> AsyncIterator[list[WorkerSupervisor]]:
    """Supervisors a test made; all stopped afterwards, however the test ended."""
    made: list[WorkerSupervisor] = []
    yield made
    for supervisor in made:
        await supervisor.stop()


@pytest.fixture
def supervisor(
    demo_repository: Path, listener: Listener, supervisors: list[WorkerSupervisor]
) -> WorkerSupervisor:
    made = WorkerSupervisor(demo_repository, listener, log_level="warning", startup_timeout_s=30)
    supervisors.append(made)
    return made


async def ready_endpoints(listener: Listener, model: str, count: int) -> list[str]:
    await eventually(
        lambda: len(listener.latest(model) or []) == count, 30, f"{count} ready {model} workers"
    )
    return listener.latest(model) or []


async def test_scaled_workers_become_ready_endpoints(
    supervisor: WorkerSupervisor, listener: Listener
) -> None:
    await supervisor.scale("mlp", 2)
    assert supervisor.workers("mlp") == 2

    endpoints = await ready_endpoints(listener, "mlp", 2)

    assert supervisor.endpoints("mlp") == endpoints
    assert set(worker_pids("mlp")) == set(endpoints)
    async with httpx.AsyncClient(timeout=5) as client:
        for url in endpoints:
            assert (await client.get(f"{url}/v2/models/mlp/ready")).status_code == 200


async def test_each_version_has_its_own_workers_and_the_model_hears_of_them_all(
    tmp_path: Path, listener: Listener, supervisors: list[WorkerSupervisor]
) -> None:
    """``scale@1`` and ``scale@2`` are two groups of workers, each serving its version only
    (``--model scale@V``); the gateway hears of ``scale`` with both groups' workers, and a
    version scaled away leaves the other's in place."""
    root = write_scale(tmp_path, [1, 2])
    supervisor = WorkerSupervisor(root, listener, log_level="warning", startup_timeout_s=30)
    supervisors.append(supervisor)
    await supervisor.scale("scale@1", 1)
    await supervisor.scale("scale@2", 2)
    endpoints = await ready_endpoints(listener, "scale", 3)
    assert [m for m, _ in listener.calls] == ["scale"] * len(listener.calls)
    by_version = {v: supervisor.endpoints(f"scale@{v}") for v in "12"}
    assert sorted(endpoints) == sorted(by_version["1"] + by_version["2"])
    assert set(worker_pids("scale@2")) == set(by_version["2"])
    async with httpx.AsyncClient(timeout=5) as client:
        for version, urls in by_version.items():
            other = "2" if version == "1" else "1"
            for url in urls:
                ready = await client.get(f"{url}/v2/models/scale/versions/{version}/ready")
                assert ready.status_code == 200
                unserved = await client.get(f"{url}/v2/models/scale/versions/{other}/ready")
                assert unserved.status_code == 404
    await supervisor.scale("scale@2", 0)
    assert listener.latest("scale") == by_version["1"]


async def test_with_the_grpc_hop_each_worker_serves_grpc_where_grpc_target_says(
    demo_repository: Path, listener: Listener, supervisors: list[WorkerSupervisor]
) -> None:
    supervisor = WorkerSupervisor(
        demo_repository, listener, log_level="warning", startup_timeout_s=30, grpc_hop=True
    )
    supervisors.append(supervisor)
    await supervisor.scale("mlp", 2)
    endpoints = await ready_endpoints(listener, "mlp", 2)
    targets = [supervisor.grpc_target(url) for url in endpoints]
    assert all(targets) and len(set(targets)) == 2, targets
    for target in targets:
        assert target is not None
        async with grpc.aio.insecure_channel(target) as channel:
            stub = GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            ready = await stub.ModelReady(pb.ModelReadyRequest(name="mlp"), timeout=10)
            assert ready.ready
    await supervisor.scale("mlp", 1)
    retired = endpoints[1]
    await eventually(lambda: supervisor.grpc_target(retired) is None, 30, "the target forgotten")
    assert supervisor.grpc_target(endpoints[0]) == targets[0]


async def test_without_the_grpc_hop_no_worker_has_a_grpc_target(
    supervisor: WorkerSupervisor, listener: Listener
) -> None:
    await supervisor.scale("mlp", 1)
    (url,) = await ready_endpoints(listener, "mlp", 1)
    assert supervisor.grpc_target(url) is None


async def test_a_killed_worker_leaves_the_endpoints_and_is_restarted(
    supervisor: WorkerSupervisor, listener: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    await supervisor.scale("mlp", 2)
    endpoints = await ready_endpoints(listener, "mlp", 2)
    killed_url, survivor_url = endpoints
    killed_pid = worker_pids("mlp")[killed_url]
    seen = len(listener.calls)

    os.kill(killed_pid, signal.SIGKILL)

    await eventually(lambda: len(listener.calls) > seen, 10, "the listener to hear of the exit")
    assert listener.calls[seen] == ("mlp", [survivor_url])
    restarted = await ready_endpoints(listener, "mlp", 2)
    assert survivor_url in restarted
    assert supervisor.workers("mlp") == 2
    assert not alive(killed_pid)
    assert set(worker_pids("mlp")) == set(restarted)
    assert any("exited with code -9" in r.getMessage() for r in caplog.records)


async def test_scaling_to_zero_empties_the_endpoints_first_then_ends_the_workers(
    supervisor: WorkerSupervisor, listener: Listener
) -> None:
    await supervisor.scale("mlp", 2)
    await ready_endpoints(listener, "mlp", 2)
    pids = list(worker_pids("mlp").values())

    await supervisor.scale("mlp", 0)

    # Before the workers get SIGTERM, so the gateway sends them nothing more.
    assert listener.latest("mlp") == []
    assert supervisor.workers("mlp") == 0
    assert supervisor.endpoints("mlp") == []
    await eventually(lambda: not any(map(alive, pids)), 15, "the workers to exit")
    assert worker_pids("mlp") == {}


async def test_stop_ends_every_worker_and_nothing_restarts(
    supervisor: WorkerSupervisor, listener: Listener
) -> None:
    await supervisor.scale("mlp", 2)
    await supervisor.scale("digits", 1)
    await ready_endpoints(listener, "mlp", 2)
    await ready_endpoints(listener, "digits", 1)
    pids = [*worker_pids("mlp").values(), *worker_pids("digits").values()]
    assert len(pids) == 3

    await supervisor.stop()
    await supervisor.stop()

    assert not any(map(alive, pids))
    assert listener.latest("mlp") == [] and listener.latest("digits") == []
    # No supervisor task is left that could start a process again.
    assert asyncio.all_tasks() == {asyncio.current_task()}
    with pytest.raises(RuntimeError):
        await supervisor.scale("mlp", 1)


async def test_a_worker_that_cannot_start_is_retried_with_growing_backoff(
    tmp_path: Path,
    listener: Listener,
    supervisors: list[WorkerSupervisor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bazaar.supervisor")
    # Not a repository: the model server exits with code 2 as soon as it starts.
    supervisor = WorkerSupervisor(
        tmp_path / "missing", listener, min_restart_delay_s=0.05, max_restart_delay_s=0.1
    )
    supervisors.append(supervisor)

    def restarts() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "bazaar.supervisor" and "restarting in" in r.getMessage()
        ]

    await supervisor.scale("mlp", 1)
    await eventually(lambda: len(restarts()) >= 3, 20, "three failed starts")
    await supervisor.stop()

    delays = [message.rsplit("restarting in ", 1)[1] for message in restarts()[:3]]
    assert delays == ["0.05 s", "0.10 s", "0.10 s"]
    assert all("exited with code 2 before it was ready" in m for m in restarts())
    started = [r for r in caplog.records if r.getMessage().startswith("started mlp worker 1")]
    assert len(started) >= 3
    assert listener.calls == []
    assert worker_pids("mlp") == {}
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_a_worker_never_ready_is_killed_after_the_startup_timeout(
    demo_repository: Path,
    listener: Listener,
    supervisors: list[WorkerSupervisor],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The model is not in the repository: the server runs but its load fails, so it is
    # never ready and only the startup timeout ends it.
    supervisor = WorkerSupervisor(
        demo_repository,
        listener,
        log_level="warning",
        min_restart_delay_s=0.05,
        startup_timeout_s=2,
    )
    supervisors.append(supervisor)

    await supervisor.scale("ghost", 1)
    await eventually(
        lambda: any("was not ready after 2 s" in r.getMessage() for r in caplog.records),
        10,
        "the startup timeout",
    )
    await eventually(lambda: len(worker_pids("ghost")) == 1, 10, "the restarted worker")
    await supervisor.stop()

    assert worker_pids("ghost") == {}
    assert listener.calls == []
