"""Endpoint choice, the in-flight cap, retries and ejection, on virtual loop time (looptime)."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest

from gateway.router import POWER_OF_TWO_ABOVE, Endpoint, EndpointPool, choose_endpoint
from protocol.errors import BazaarError, DeadlineExceeded, InvalidRequest, UpstreamError
from tests.gateway.fakes import Call, FakePods, connection_refused, rows_of

pytestmark = pytest.mark.looptime

MakePool = Callable[..., EndpointPool]


@pytest.fixture
async def make() -> AsyncIterator[MakePool]:
    """Builds pools over fake pods (``pod-0``, ``pod-1``, ...); closes them after the test."""
    pools: list[EndpointPool] = []

    def build(pods: FakePods, endpoints: int = 2, **options: object) -> EndpointPool:
        pool = EndpointPool("m", pods, rng=random.Random(0), **options)  # type: ignore[arg-type]
        pool.set_endpoints([f"http://pod-{i}" for i in range(endpoints)])
        pools.append(pool)
        return pool

    yield build
    for pool in pools:
        await pool.close()


def loaded(*rows: int) -> list[Endpoint]:
    return [Endpoint(f"http://pod-{i}", inflight_rows=r) for i, r in enumerate(rows)]


def urls(pods: FakePods) -> list[str]:
    return [call.url for call in pods.calls]


Script = Callable[[Call], BazaarError | None]


def fail_on(url: str) -> Script:
    """Every call to ``url`` is refused; the others are answered."""
    return lambda call: connection_refused(call) if call.url == url else None


def fail_first(count: int) -> Script:
    """The first ``count`` calls are refused, wherever they go; later ones are answered."""
    seen = itertools.count(1)
    return lambda call: connection_refused(call) if next(seen) <= count else None


def pick(endpoints: list[Endpoint], rng: random.Random) -> str:
    chosen = choose_endpoint(endpoints, 2, rng)
    assert chosen is not None
    return chosen.url


async def send(pool: EndpointPool, *values: float, deadline: float | None = None) -> np.ndarray:
    """Acquire a slot and send ``values`` as a batch; the pod's ``out``."""
    endpoint = pool.acquire(len(values))
    assert endpoint is not None, "no endpoint had room"
    outputs = await pool.call(endpoint, rows_of(*values), len(values), deadline)
    return outputs["out"]


# -- choose_endpoint -------------------------------------------------------------------------


def test_least_rows_in_flight_wins() -> None:
    endpoints = loaded(7, 2, 5)
    rng = random.Random(0)
    assert {pick(endpoints, rng) for _ in range(50)} == {"http://pod-1"}


def test_ties_are_broken_at_random() -> None:
    endpoints = loaded(3, 1, 1)
    rng = random.Random(0)
    picks = Counter(pick(endpoints, rng) for _ in range(400))
    assert set(picks) == {"http://pod-1", "http://pod-2"}
    assert min(picks.values()) > 120  # neither side is starved


def test_ejected_removed_and_full_endpoints_are_skipped() -> None:
    ejected, removed, full, busy = loaded(0, 0, 0, 9)
    ejected.ejected = True
    removed.removed = True
    full.inflight_batches = 2
    busy.inflight_batches = 1
    rng = random.Random(0)
    assert choose_endpoint([ejected, removed, full, busy], 2, rng) is busy
    busy.inflight_batches = 2
    assert choose_endpoint([ejected, removed, full, busy], 2, rng) is None
    assert choose_endpoint([], 2, rng) is None


def test_up_to_the_threshold_every_endpoint_is_scanned() -> None:
    endpoints = loaded(*range(POWER_OF_TWO_ABOVE, 0, -1))  # the last is the least loaded
    rng = random.Random(0)
    picks = {choose_endpoint(endpoints, 2, rng) for _ in range(200)}
    assert picks == {endpoints[-1]}


def test_large_pools_sample_two_and_keep_the_less_loaded() -> None:
    endpoints = loaded(*range(10))  # pod-i has i rows in flight
    rng = random.Random(0)
    picks = Counter(pick(endpoints, rng) for _ in range(4500))
    # Pod i wins when drawn with a busier one: (9 - i) of the 45 pairs.
    assert "http://pod-9" not in picks
    assert picks.most_common(1)[0][0] == "http://pod-0"
    assert picks["http://pod-0"] == pytest.approx(900, rel=0.15)
    assert picks["http://pod-8"] == pytest.approx(100, rel=0.4)  # sampling, not a full scan


# -- cache affinity --------------------------------------------------------------------------


def test_an_endpoint_holding_the_model_wins_over_a_less_loaded_cold_one() -> None:
    held, cold = loaded(9, 0)
    cold.cold = True
    rng = random.Random(0)
    assert {choose_endpoint([held, cold], 2, rng, backlog_rounds=0) for _ in range(50)} == {held}


def test_a_cold_endpoint_waits_until_each_holding_one_has_a_full_round_queued() -> None:
    first, second, cold = loaded(8, 8, 0)
    first.inflight_batches = second.inflight_batches = 2
    cold.cold = True
    rng = random.Random(0)
    assert choose_endpoint([first, second, cold], 2, rng, backlog_rounds=1.5) is None
    assert choose_endpoint([first, second, cold], 2, rng, backlog_rounds=2) is cold
    # A retry (no backlog said) takes any endpoint with room.
    assert choose_endpoint([first, second, cold], 2, rng) is cold


def test_with_no_healthy_endpoint_holding_the_model_a_cold_one_loads_it() -> None:
    ejected, busy, idle = loaded(0, 5, 1)
    ejected.ejected = True  # it holds the model, but takes no batches
    busy.cold = idle.cold = True
    rng = random.Random(0)
    assert choose_endpoint([ejected, busy, idle], 2, rng, backlog_rounds=0) is idle


def test_large_pools_sample_among_the_endpoints_holding_the_model() -> None:
    endpoints = loaded(*[0] * 12)
    for endpoint in endpoints[2:]:
        endpoint.cold = True
    rng = random.Random(0)
    picks = {pick_with(endpoints, rng, 0) for _ in range(200)}
    assert picks == {"http://pod-0", "http://pod-1"}
    endpoints[1].cold = True
    assert {pick_with(endpoints, rng, 0) for _ in range(50)} == {"http://pod-0"}
    endpoints[0].inflight_batches = 2
    assert choose_endpoint(endpoints, 2, rng, backlog_rounds=0.5) is None
    assert pick_with(endpoints, rng, 1) != "http://pod-0"


def pick_with(endpoints: list[Endpoint], rng: random.Random, backlog_rounds: float) -> str:
    chosen = choose_endpoint(endpoints, 2, rng, backlog_rounds)
    assert chosen is not None
    return chosen.url


async def test_an_endpoint_that_answers_a_batch_holds_the_model_from_then_on(
    make: MakePool,
) -> None:
    pods = FakePods()
    pool = make(pods, endpoints=2)
    pool.set_loaded({"http://pod-0": True, "http://pod-1": False})
    assert [e.cold for e in pool.endpoints] == [False, True]
    pool.endpoints[0].ejected = True  # nobody healthy holds it: the cold one must load it
    assert (await send(pool, 1.0)).tolist() == [[2.0]]
    assert urls(pods) == ["http://pod-1"]
    assert [e.cold for e in pool.endpoints] == [False, False]


async def test_an_endpoint_taking_the_model_in_frees_batches_waiting_for_it(
    make: MakePool,
) -> None:
    pool = make(FakePods(), endpoints=2)
    woken: list[int] = []
    pool.on_capacity(lambda: woken.append(1))
    pool.set_loaded({"http://pod-0": True, "http://pod-1": False})
    assert woken == []
    pool.set_loaded({"http://pod-1": True, "http://elsewhere": False})
    assert woken == [1]
    assert [e.cold for e in pool.endpoints] == [False, False]


# -- the in-flight cap -----------------------------------------------------------------------


async def test_acquire_respects_the_cap_and_calls_give_the_slots_back(make: MakePool) -> None:
    pods = FakePods(latency_s=0.010)
    pool = make(pods, endpoints=2, max_batches_per_endpoint=2)
    acquired = [pool.acquire(3) for _ in range(4)]
    assert None not in acquired
    assert pool.acquire(1) is None
    assert not pool.has_capacity()
    assert [(e.inflight_batches, e.inflight_rows) for e in pool.endpoints] == [(2, 6), (2, 6)]
    results = await asyncio.gather(
        *(pool.call(e, rows_of(1, 2, 3), 3, None) for e in acquired if e is not None)
    )
    assert all(r["out"].tolist() == [[2], [4], [6]] for r in results)
    assert [(e.inflight_batches, e.inflight_rows) for e in pool.endpoints] == [(0, 0), (0, 0)]
    assert pool.has_capacity()
    assert pool.acquire(1) is not None


async def test_acquire_sends_the_next_batch_where_fewer_rows_are_in_flight(
    make: MakePool,
) -> None:
    pool = make(FakePods(), endpoints=2, max_batches_per_endpoint=2)
    big = pool.acquire(8)
    small = pool.acquire(1)
    assert big is not None and small is not None and big is not small
    assert pool.acquire(1) is small  # 1 row in flight there against 8
    # The slots are released by calls; these were never sent, so give them back by sending.
    await asyncio.gather(
        pool.call(big, rows_of(*[0.0] * 8), 8, None),
        pool.call(small, rows_of(0), 1, None),
        pool.call(small, rows_of(0), 1, None),
    )
    assert [e.inflight_rows for e in pool.endpoints] == [0, 0]


# -- retries ---------------------------------------------------------------------------------


async def test_a_failed_call_is_retried_once_on_another_endpoint(make: MakePool) -> None:
    pods = FakePods(latency_s=0.010, fail=fail_first(1))
    pool = make(pods, endpoints=2)
    out = await send(pool, 1.0, 2.0)
    assert out.tolist() == [[2.0], [4.0]]
    assert len(pods.calls) == 2
    assert pods.calls[0].url != pods.calls[1].url
    assert pods.calls[1].started == pytest.approx(0.010)  # at once after the failure
    failed = next(e for e in pool.endpoints if e.url == pods.calls[0].url)
    answered = next(e for e in pool.endpoints if e.url == pods.calls[1].url)
    assert (failed.failures, answered.failures) == (1, 0)
    assert [(e.inflight_batches, e.inflight_rows) for e in pool.endpoints] == [(0, 0), (0, 0)]


async def test_a_400_is_not_retried_and_not_counted_as_a_failure(make: MakePool) -> None:
    pods = FakePods(fail=lambda call: InvalidRequest("the pod refused the request: bad shape"))
    pool = make(pods, endpoints=2)
    with pytest.raises(InvalidRequest, match="bad shape"):
        await send(pool, 1.0)
    assert len(pods.calls) == 1
    assert [e.failures for e in pool.endpoints] == [0, 0]
    assert [e.inflight_batches for e in pool.endpoints] == [0, 0]


async def test_no_retry_once_the_deadline_has_passed(make: MakePool) -> None:
    loop = asyncio.get_running_loop()
    pods = FakePods(latency_s=0.010, fail=connection_refused)
    pool = make(pods, endpoints=2, eject_after=1)
    with pytest.raises(DeadlineExceeded, match="deadline passed during a call"):
        await send(pool, 1.0, deadline=0.005)
    assert loop.time() == pytest.approx(0.005)  # the call ends at the deadline
    assert len(pods.calls) == 1
    assert [e.inflight_batches for e in pool.endpoints] == [0, 0]
    # The caller's deadline is no fault of the endpoint: nothing counted, nobody ejected.
    assert [(e.failures, e.ejected) for e in pool.endpoints] == [(0, False), (0, False)]


async def test_the_retry_happens_while_the_deadline_allows(make: MakePool) -> None:
    pods = FakePods(latency_s=0.010, fail=fail_first(1))
    pool = make(pods, endpoints=2)
    assert (await send(pool, 3.0, deadline=0.025)).tolist() == [[6.0]]
    assert len(pods.calls) == 2


async def test_a_call_lasts_until_the_deadline_and_the_pod_is_told_it(make: MakePool) -> None:
    """A stalled pod: the call ends at the deadline, 504, not at ``call_timeout_s`` (60 s)."""
    loop = asyncio.get_running_loop()
    pods = FakePods(latency_s=3600.0)
    pool = make(pods, endpoints=1, eject_after=1, call_timeout_s=60.0)
    with pytest.raises(DeadlineExceeded):
        await send(pool, 1.0, deadline=0.100)
    assert loop.time() == pytest.approx(0.100)
    assert [c.timeout_s for c in pods.calls] == [pytest.approx(0.100)]
    assert (pool.endpoints[0].failures, pool.ready_endpoints) == (0, 1)


async def test_without_a_deadline_a_call_lasts_at_most_call_timeout_s(make: MakePool) -> None:
    loop = asyncio.get_running_loop()
    pods = FakePods(latency_s=3600.0)
    pool = make(pods, endpoints=1, call_timeout_s=2.0)
    with pytest.raises(UpstreamError, match="did not answer within 2 s"):
        await send(pool, 1.0)
    assert loop.time() == pytest.approx(2.0)
    assert [c.timeout_s for c in pods.calls] == [2.0]
    assert pool.endpoints[0].failures == 1  # no answer in call_timeout_s is the pod's fault


async def test_a_retry_with_every_other_slot_taken_waits_for_one(make: MakePool) -> None:
    """A killed pod's batch retries while the other pod's slots are all busy: it takes the
    first slot that frees (ahead of any new batch), instead of failing 502 at once."""
    loop = asyncio.get_running_loop()
    pods = FakePods(latency_s=0.010, fail=fail_on("http://pod-0"))
    pool = make(pods, endpoints=2, max_batches_per_endpoint=1)
    pod_0, pod_1 = pool.endpoints
    assert pool.acquire(1) in (pod_0, pod_1) and pool.acquire(1) is not None
    busy = asyncio.create_task(pool.call(pod_1, rows_of(1), 1, None))
    retried = await pool.call(pod_0, rows_of(2), 1, deadline=1.0)
    assert retried["out"].tolist() == [[4.0]]
    await busy
    assert [(c.url, round(c.started, 6)) for c in pods.calls] == [
        ("http://pod-0", 0.0),
        ("http://pod-1", 0.0),
        ("http://pod-1", 0.010),  # the retry, in the slot pod-1's first batch freed
    ]
    assert loop.time() == pytest.approx(0.020)
    assert [(e.inflight_batches, e.inflight_rows) for e in pool.endpoints] == [(0, 0), (0, 0)]


async def test_a_retry_waits_for_a_slot_no_longer_than_its_deadline(make: MakePool) -> None:
    loop = asyncio.get_running_loop()
    pods = FakePods(latency_s=0.010, fail=fail_on("http://pod-0"))
    pool = make(pods, endpoints=2, max_batches_per_endpoint=1)
    pod_0, pod_1 = pool.endpoints
    assert pool.acquire(1) is not None and pool.acquire(1) is not None
    pods.latency_s = 1.0  # pod-1's batch holds its only slot for a second
    busy = asyncio.create_task(pool.call(pod_1, rows_of(1), 1, None))
    await asyncio.sleep(0)
    pods.latency_s = 0.010
    with pytest.raises(DeadlineExceeded, match="waiting for a slot"):
        await pool.call(pod_0, rows_of(2), 1, deadline=0.050)
    assert loop.time() == pytest.approx(0.050)
    await busy
    assert len(pods.calls) == 2
    assert [(e.inflight_batches, e.inflight_rows) for e in pool.endpoints] == [(0, 0), (0, 0)]


async def test_when_the_retry_fails_too_its_error_propagates(make: MakePool) -> None:
    pods = FakePods(
        latency_s=0.010, fail=lambda call: UpstreamError(f"pod {call.url} answered 503: busy")
    )
    pool = make(pods, endpoints=3)
    with pytest.raises(UpstreamError, match="answered 503") as failed:
        await send(pool, 1.0)
    assert len(pods.calls) == 2  # once, and retried once: not on every endpoint
    assert pods.calls[0].url != pods.calls[1].url
    assert pods.calls[1].url in str(failed.value)
    assert sorted(e.failures for e in pool.endpoints) == [0, 1, 1]
    assert [e.inflight_batches for e in pool.endpoints] == [0, 0, 0]


async def test_with_nowhere_else_to_go_the_first_error_propagates(make: MakePool) -> None:
    pods = FakePods(fail=connection_refused)
    pool = make(pods, endpoints=1)
    with pytest.raises(UpstreamError, match="cannot connect to http://pod-0"):
        await send(pool, 1.0)
    assert len(pods.calls) == 1


# -- ejection --------------------------------------------------------------------------------


async def test_an_endpoint_failing_in_a_row_is_ejected_and_takes_no_more_batches(
    make: MakePool,
) -> None:
    pods = FakePods(latency_s=0.010, fail=fail_on("http://pod-0"), healthy=lambda url: False)
    pool = make(pods, endpoints=2, eject_after=3)
    for value in range(20):
        assert (await send(pool, float(value))).tolist() == [[value * 2.0]]  # retried on pod-1
    assert urls(pods).count("http://pod-0") == 3
    last_failure = max(i for i, url in enumerate(urls(pods)) if url == "http://pod-0")
    assert last_failure < len(pods.calls) - 5
    assert pool.ready_endpoints == 1
    pod_0, pod_1 = pool.endpoints
    assert pod_0.ejected
    # pod-0 has nothing in flight, yet only pod-1 is chosen, until it is full too.
    assert [pool.acquire(1), pool.acquire(1), pool.acquire(1)] == [pod_1, pod_1, None]


async def test_a_success_resets_the_count_of_failures(make: MakePool) -> None:
    script = "xx.xx.xx"  # x: refused, .: answered; never three refusals in a row
    outcomes = iter(script)
    pods = FakePods(fail=lambda call: connection_refused(call) if next(outcomes) == "x" else None)
    pool = make(pods, endpoints=1, eject_after=3)
    for outcome in script:
        if outcome == "x":
            with pytest.raises(UpstreamError):
                await send(pool, 1.0)
        else:
            await send(pool, 1.0)
    assert pool.endpoints[0].failures == 2
    assert not pool.endpoints[0].ejected
    assert pool.ready_endpoints == 1


async def test_an_ejected_endpoint_is_readmitted_when_its_probe_succeeds(make: MakePool) -> None:
    loop = asyncio.get_running_loop()
    pods = FakePods(latency_s=0.010, fail=connection_refused)
    pool = make(pods, endpoints=1, eject_after=2, min_eject_s=0.5)
    joined: list[tuple[float, int]] = []
    pool.on_capacity(lambda: joined.append((round(loop.time(), 6), pool.ready_endpoints)))
    for _ in range(2):
        with pytest.raises(UpstreamError):
            await send(pool, 1.0)
    assert loop.time() == pytest.approx(0.020)
    assert pool.ready_endpoints == 0
    assert pool.acquire(1) is None
    assert not pool.has_capacity()
    pods.fail = lambda call: None
    joined.clear()
    await asyncio.sleep(1.0)
    assert joined == [(0.520, 1)]  # one probe, min_eject_s after the ejection
    assert pool.endpoints[0].failures == 0
    assert (await send(pool, 4.0)).tolist() == [[8.0]]


async def test_probes_back_off_doubling_while_the_endpoint_stays_unhealthy(
    make: MakePool,
) -> None:
    loop = asyncio.get_running_loop()
    probes: list[float] = []

    def healthy(url: str) -> bool:
        probes.append(round(loop.time(), 6))
        return loop.time() >= 2.0

    pods = FakePods(latency_s=0.0, fail=connection_refused, healthy=healthy)
    pool = make(pods, endpoints=1, eject_after=1, min_eject_s=0.5, max_eject_s=30.0)
    back: list[float] = []
    pool.on_capacity(lambda: back.append(loop.time()) if pool.ready_endpoints else None)
    with pytest.raises(UpstreamError):
        await send(pool, 1.0)
    back.clear()
    await asyncio.sleep(10.0)
    assert probes == [0.5, 1.5, 3.5]  # 0.5, then 1 and 2 s apart; healthy from 2.0
    assert back == [pytest.approx(3.5)]
    assert pool.ready_endpoints == 1


async def test_the_probe_interval_stops_doubling_at_max_eject_s(make: MakePool) -> None:
    loop = asyncio.get_running_loop()
    probes: list[float] = []

    def healthy(url: str) -> bool:
        probes.append(round(loop.time(), 6))
        return loop.time() >= 5.0

    pods = FakePods(latency_s=0.0, fail=connection_refused, healthy=healthy)
    pool = make(pods, endpoints=1, eject_after=1, min_eject_s=0.5, max_eject_s=1.0)
    with pytest.raises(UpstreamError):
        await send(pool, 1.0)
    await asyncio.sleep(10.0)
    assert probes == [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]
    assert pool.ready_endpoints == 1


async def test_listeners_hear_of_every_freed_slot_and_new_endpoints(make: MakePool) -> None:
    loop = asyncio.get_running_loop()
    pods = FakePods(latency_s=0.010)
    pool = make(pods, endpoints=1, max_batches_per_endpoint=1)
    heard: list[tuple[float, bool]] = []
    pool.on_capacity(lambda: heard.append((round(loop.time(), 6), pool.has_capacity())))
    first = pool.acquire(1)
    assert first is not None
    assert pool.acquire(1) is None
    await pool.call(first, rows_of(1), 1, None)
    assert heard == [(0.010, True)]  # the slot is free by the time listeners run
    again = pool.acquire(1)
    assert again is first
    await pool.call(again, rows_of(1), 1, None)
    pool.set_endpoints(["http://pod-0", "http://pod-1"])
    assert heard == [(0.010, True), (0.020, True), (0.020, True)]


async def test_removing_an_ejected_endpoint_stops_its_probe(make: MakePool) -> None:
    probed: list[str] = []

    def healthy(url: str) -> bool:
        probed.append(url)
        return False

    pods = FakePods(latency_s=0.0, fail=fail_on("http://pod-0"), healthy=healthy)
    pool = make(pods, endpoints=1, eject_after=1, min_eject_s=0.5)
    with pytest.raises(UpstreamError):
        await send(pool, 1.0)
    assert pool.ready_endpoints == 0
    await asyncio.sleep(0.6)
    assert probed == ["http://pod-0"]
    pool.set_endpoints(["http://pod-1"])
    await asyncio.sleep(60.0)
    assert probed == ["http://pod-0"]
    assert [(e.url, e.ejected) for e in pool.endpoints] == [("http://pod-1", False)]
    assert pool.ready_endpoints == 1


async def test_a_batch_in_flight_on_a_removed_endpoint_finishes_and_releases_its_slot(
    make: MakePool,
) -> None:
    pods = FakePods(latency_s=0.010)
    pool = make(pods, endpoints=1, max_batches_per_endpoint=1)
    gone = pool.acquire(2)
    assert gone is not None
    running = asyncio.create_task(pool.call(gone, rows_of(1, 2), 2, None))
    await asyncio.sleep(0.005)
    pool.set_endpoints(["http://pod-1"])
    assert gone.removed
    replacement = pool.acquire(1)
    assert replacement is not None and replacement.url == "http://pod-1"
    assert (await running)["out"].tolist() == [[2.0], [4.0]]
    assert (gone.inflight_batches, gone.inflight_rows) == (0, 0)
    await pool.call(replacement, rows_of(3), 1, None)
    assert [(e.url, e.inflight_batches, e.inflight_rows) for e in pool.endpoints] == [
        ("http://pod-1", 0, 0)
    ]


async def test_a_removed_endpoint_that_fails_is_not_ejected_and_the_batch_moves_on(
    make: MakePool,
) -> None:
    probed: list[str] = []

    def healthy(url: str) -> bool:
        probed.append(url)
        return True

    pods = FakePods(latency_s=0.010, fail=fail_on("http://pod-0"), healthy=healthy)
    pool = make(pods, endpoints=1, eject_after=1)
    gone = pool.acquire(1)
    assert gone is not None
    running = asyncio.create_task(pool.call(gone, rows_of(5), 1, None))
    await asyncio.sleep(0.005)
    pool.set_endpoints(["http://pod-1"])
    assert (await running)["out"].tolist() == [[10.0]]  # retried on the endpoint that joined
    assert urls(pods) == ["http://pod-0", "http://pod-1"]
    assert not gone.ejected
    await asyncio.sleep(60.0)
    assert probed == []
