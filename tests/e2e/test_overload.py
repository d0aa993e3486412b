"""``bazaar serve`` past its capacity: every request answered exactly once, nothing shed
after its body was decoded, the gateway's memory bounded.

The gateway serves the demo mlp with one worker and no autoscaler; the load comes from
``loadtests.loadgen`` in this process: JSON requests of ``loadtests.overload.ROWS`` rows
(multi-row, so that a Python generator on two shared cores stays ahead of the gateway).
Two shapes of overload: an open loop at three times the capacity measured just before by a
closed loop on 64 connections, and a closed loop on 2,048 connections. Behaviour is
asserted, never timing: what goodput and latency a run reaches depends on the machine and
on what else runs on it; ``bazaar bench --scenarios overload`` measures those.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtests.loadgen import Tally, closed_loop, open_loop, raise_fd_limit, stop_after
from loadtests.overload import MAX_OPEN_CONNECTIONS, MODEL, overload_request, shed_by_stage
from loadtests.procs import peak_rss_bytes, reset_peak_rss, rss_bytes
from tests.support import bazaar_process, free_port, models_ready

LOAD_S = 4.0
"""Seconds of load per point: enough to fill the queue many times over at any capacity."""
CAPACITY_CONNECTIONS = 64
CROWD_CONNECTIONS = 2048
OPEN_LOOP_LOAD = 3.0
ANSWERS = {200, 429, 503, 504}
"""Served, or refused for load (429, 503) or for time (504); never a 5xx of its own."""
MEMORY_GROWTH_BYTES = 256 * 1024 * 1024
"""The most the gateway's RSS may grow under either overload. 2,048 requests in progress
hold about 50 MB (an 8-row JSON body of about 14 KB, its 8 KB of tensors, the answer); the
queue holds at most 1,024 decoded requests (8 MB of tensors). Five times that leaves the
allocator its slack, and still catches what this guards against: requests piling up
without bound ahead of the queue, or a decode that costs many times its body."""


@pytest.fixture(scope="module")
def serve(
    demo_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, int]]:
    """``bazaar serve`` with mlp alone, one worker, no autoscaler; yields (URL, pid)."""
    # 2,048 connections and more, here and in the gateway (its cap follows its file limit).
    raise_fd_limit(4 * CROWD_CONNECTIONS)
    root = tmp_path_factory.mktemp("overload-repository")
    shutil.copytree(demo_repository / MODEL, root / MODEL)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("overload") / "serve.log"
    args = [
        "serve", "--model-repository", str(root), "--port", str(port),
        "--workers-per-model", "1", "--no-autoscale",
    ]  # fmt: skip
    with bazaar_process(args, log, models_ready(url, [MODEL])) as process:
        yield url, process.pid


async def shed_counts(url: str) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=60) as client:
        metrics = (await client.get(f"{url}/metrics")).text
    return shed_by_stage(metrics, MODEL)


def assert_answered_exactly_once(tally: Tally) -> None:
    assert tally.sent > 0
    assert not tally.connect_errors, tally.connect_errors
    assert not tally.errors, f"{tally.errors} of {tally.sent} sent"
    assert tally.unanswered == 0, f"{tally.unanswered} of {tally.sent} never answered"
    assert tally.unsolicited == 0, "an answer came when no request was waiting"
    assert tally.answered == tally.sent
    assert set(tally.statuses) <= ANSWERS, tally.statuses
    assert tally.statuses[200] > 0, "nothing was served"


def assert_nothing_shed_after_decode(before: dict[str, float], after: dict[str, float]) -> None:
    """Every request that had to be shed was shed before its body was decoded."""
    assert "" not in after, (
        "the gateway counts shed requests without a stage: bazaar_gateway_shed_requests_total"
        f"{{model={MODEL!r}}} = {after['']:g}; it should say whether each was shed before or "
        "after decoding its body (stage=before_decode|after_decode)"
    )
    shed_after_decode = after.get("after_decode", 0.0) - before.get("after_decode", 0.0)
    assert shed_after_decode == 0, f"{shed_after_decode:g} requests shed after their decode"


async def test_an_open_loop_at_three_times_capacity_is_answered_exactly_once(
    serve: tuple[str, int],
) -> None:
    url, pid = serve
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
    request = overload_request()
    capacity = await closed_loop(
        host, port, request, CAPACITY_CONNECTIONS, stop_after(LOAD_S)
    )  # fmt: skip
    assert_answered_exactly_once(capacity)
    shed_before = await shed_counts(url)
    memory_before = rss_bytes(pid)
    reset_peak_rss(pid)
    rate = OPEN_LOOP_LOAD * capacity.goodput
    tally = await open_loop(host, port, request, rate, MAX_OPEN_CONNECTIONS, stop_after(LOAD_S))
    assert_answered_exactly_once(tally)
    assert peak_rss_bytes(pid) - memory_before < MEMORY_GROWTH_BYTES
    assert_nothing_shed_after_decode(shed_before, await shed_counts(url))


async def test_2048_connections_in_a_closed_loop_are_answered_exactly_once(
    serve: tuple[str, int],
) -> None:
    url, pid = serve
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
    shed_before = await shed_counts(url)
    memory_before = rss_bytes(pid)
    reset_peak_rss(pid)
    tally = await closed_loop(
        host, port, overload_request(), CROWD_CONNECTIONS, stop_after(LOAD_S)
    )  # fmt: skip
    assert_answered_exactly_once(tally)
    assert peak_rss_bytes(pid) - memory_before < MEMORY_GROWTH_BYTES
    assert_nothing_shed_after_decode(shed_before, await shed_counts(url))
