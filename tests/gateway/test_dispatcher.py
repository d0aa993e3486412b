"""Batch formation, priorities, deadlines and bounds, on virtual loop time (looptime)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest

from gateway.dispatcher import BatchPolicy, Dispatcher
from gateway.metrics import GatewayMetrics
from gateway.router import EndpointPool
from gateway.tenants import Tenant, TenantPolicy
from protocol.errors import BazaarError, DeadlineExceeded, InvalidRequest, Overloaded, UpstreamError
from tests.gateway.fakes import Call, FakePods, rows_of

pytestmark = pytest.mark.looptime

MakeDispatcher = Callable[..., Dispatcher]


@pytest.fixture
async def make(metrics: GatewayMetrics) -> AsyncIterator[MakeDispatcher]:
    """Builds running dispatchers over fake pods; stops them after the test."""
    running: list[tuple[Dispatcher, asyncio.Task[None]]] = []

    def build(
        pods: FakePods, endpoints: int = 1, max_batches: int = 1, **policy: object
    ) -> Dispatcher:
        pool = EndpointPool("m", pods, max_batches_per_endpoint=max_batches, rng=random.Random(0))
        pool.set_endpoints([f"http://pod-{i}" for i in range(endpoints)])
        dispatcher = Dispatcher("m", BatchPolicy(**policy), pool, metrics.for_model("m"))  # type: ignore[arg-type]
        running.append((dispatcher, asyncio.create_task(dispatcher.run())))
        return dispatcher

    yield build
    for dispatcher, task in running:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await dispatcher.pool.close()


def shed(metrics: GatewayMetrics, stage: str, reason: str) -> float | None:
    labels = {"model": "m", "version": "", "stage": stage, "reason": reason}
    return metrics.registry.get_sample_value("bazaar_gateway_shed_requests_total", labels)


def batches(pods: FakePods) -> list[tuple[float, int]]:
    """(start time in ms, rows) of every call."""
    return [(round(c.started * 1000, 3), c.rows) for c in pods.calls]


async def test_work_conserving_sends_at_once_then_batches_what_queued(make: MakeDispatcher) -> None:
    pods = FakePods(latency_s=0.010)
    dispatcher = make(pods, max_batch_size=8)
    first = dispatcher.submit(rows_of(1), 1)
    await asyncio.sleep(0.001)
    rest = [dispatcher.submit(rows_of(v), 1) for v in (2, 3, 4, 5, 6)]
    await asyncio.gather(first, *rest)
    assert batches(pods) == [(0.0, 1), (10.0, 5)]


async def test_full_batch_leaves_at_once_and_the_rest_waits_for_the_delay(
    make: MakeDispatcher,
) -> None:
    pods = FakePods(latency_s=0.001)
    dispatcher = make(pods, endpoints=2, max_batch_size=4, max_queue_delay_s=0.1)
    futures = [dispatcher.submit(rows_of(v), 1) for v in range(6)]
    await asyncio.gather(*futures)
    assert batches(pods) == [(0.0, 4), (100.0, 2)]


async def test_delay_holds_a_partial_batch_exactly_that_long(make: MakeDispatcher) -> None:
    pods = FakePods(latency_s=0.001)
    dispatcher = make(pods, max_batch_size=8, max_queue_delay_s=0.005)
    first = dispatcher.submit(rows_of(1), 1)
    await asyncio.sleep(0.002)
    second = dispatcher.submit(rows_of(2), 1)
    await asyncio.gather(first, second)
    assert batches(pods) == [(5.0, 2)]


async def test_preferred_size_leaves_before_the_delay(make: MakeDispatcher) -> None:
    pods = FakePods(latency_s=0.001)
    dispatcher = make(
        pods, endpoints=2, max_batch_size=8, max_queue_delay_s=0.1, preferred_batch_sizes=(2, 4)
    )
    futures = [dispatcher.submit(rows_of(v), 1) for v in range(3)]
    await asyncio.gather(*futures)
    assert batches(pods) == [(0.0, 2), (100.0, 1)]


async def test_rows_are_counted_and_never_exceed_max_batch_size(make: MakeDispatcher) -> None:
    pods = FakePods(latency_s=0.010)
    dispatcher = make(pods, max_batch_size=8)
    busy = dispatcher.submit(rows_of(0), 1)
    await asyncio.sleep(0)
    futures = [dispatcher.submit(rows_of(*[float(i)] * 3), 3) for i in range(3)]
    await asyncio.gather(busy, *futures)
    assert [rows for _, rows in batches(pods)] == [1, 6, 3]
    for i, future in enumerate(futures):
        np.testing.assert_array_equal(future.result()["out"], rows_of(*[float(i)] * 3)["x"] * 2)


async def test_requests_with_other_inner_shapes_do_not_share_a_batch(make: MakeDispatcher) -> None:
    pods = FakePods(latency_s=0.001)
    dispatcher = make(pods, endpoints=3, max_batch_size=8)
    a = dispatcher.submit({"x": np.ones((1, 2), np.float32)}, 1)
    b = dispatcher.submit({"x": np.ones((1, 3), np.float32)}, 1)
    c = dispatcher.submit({"x": np.ones((1, 2), np.float32)}, 1)
    await asyncio.gather(a, b, c)
    assert sorted(rows for _, rows in batches(pods)) == [1, 1, 1]
    assert b.result()["out"].shape == (1, 3)


async def test_higher_priority_goes_first_and_fifo_within_a_level(make: MakeDispatcher) -> None:
    pods = FakePods(latency_s=0.010)
    dispatcher = make(pods, max_batch_size=1, priority_levels=3, default_priority_level=2)
    busy = dispatcher.submit(rows_of(0), 1)
    await asyncio.sleep(0)
    low_a = dispatcher.submit(rows_of(1), 1, priority=3)
    default = dispatcher.submit(rows_of(2), 1)
    low_b = dispatcher.submit(rows_of(3), 1, priority=3)
    high = dispatcher.submit(rows_of(4), 1, priority=1)
    await asyncio.gather(busy, low_a, default, low_b, high)
    order = [float(c.inputs["x"][0, 0]) for c in pods.calls]
    assert order == [0, 4, 2, 1, 3]


async def test_priority_out_of_range_is_refused(make: MakeDispatcher) -> None:
    dispatcher = make(FakePods(), max_batch_size=4, priority_levels=2)
    with pytest.raises(InvalidRequest, match=r"1\.\.2"):
        dispatcher.submit(rows_of(1), 1, priority=3)


async def test_expired_request_gets_504_and_is_never_computed(
    make: MakeDispatcher, metrics: GatewayMetrics
) -> None:
    pods = FakePods(latency_s=0.020)
    dispatcher = make(pods, max_batch_size=4)
    busy = dispatcher.submit(rows_of(0), 1)
    await asyncio.sleep(0)
    doomed = dispatcher.submit(rows_of(1), 1, timeout_s=0.005)
    survivor = dispatcher.submit(rows_of(2), 1, timeout_s=0.050)
    loop = asyncio.get_running_loop()
    with pytest.raises(DeadlineExceeded, match="past its deadline"):
        await doomed
    assert loop.time() == pytest.approx(0.005)  # answered at its deadline, not later
    await asyncio.gather(busy, survivor)
    computed = [float(v) for c in pods.calls for v in c.inputs["x"][:, 0]]
    assert computed == [0, 2]
    assert dispatcher.stats().queued == 0
    assert (
        metrics.registry.get_sample_value(
            "bazaar_gateway_expired_requests_total", {"model": "m", "version": ""}
        )
        == 1
    )


async def test_request_may_lower_but_not_raise_the_default_timeout(make: MakeDispatcher) -> None:
    pods = FakePods(latency_s=0.100)
    dispatcher = make(pods, max_batch_size=1, default_timeout_s=0.010)
    busy = dispatcher.submit(rows_of(0), 1)
    await asyncio.sleep(0)
    raised = dispatcher.submit(rows_of(1), 1, timeout_s=10.0)
    loop = asyncio.get_running_loop()
    with pytest.raises(DeadlineExceeded):
        await raised
    assert loop.time() == pytest.approx(0.010)
    await busy


async def test_full_queue_refuses_with_retry_after(
    make: MakeDispatcher, metrics: GatewayMetrics
) -> None:
    pods = FakePods(latency_s=0.5)
    dispatcher = make(pods, max_batch_size=1, max_queue_size=3)
    futures = [dispatcher.submit(rows_of(0), 1)]
    await asyncio.sleep(0)  # the first leaves; three queue
    futures += [dispatcher.submit(rows_of(v), 1) for v in (1, 2, 3)]
    with pytest.raises(Overloaded, match="max_queue_size") as refused:
        dispatcher.submit(rows_of(9), 1)
    assert refused.value.status == 503
    assert int(refused.value.headers()["Retry-After"]) >= 1
    await asyncio.gather(*futures)
    assert shed(metrics, "after_decode", "queue_full") == 1


async def test_retry_after_follows_the_drain_rate(make: MakeDispatcher) -> None:
    pods = FakePods(latency_s=0.1)  # one row per 100 ms: 10 rows/s
    dispatcher = make(pods, max_batch_size=1, max_queue_size=20)
    first = [dispatcher.submit(rows_of(v), 1) for v in range(8)]
    await asyncio.gather(*first)
    queued = [dispatcher.submit(rows_of(0), 1)]
    await asyncio.sleep(0)  # the first leaves; twenty queue
    queued += [dispatcher.submit(rows_of(v), 1) for v in range(20)]
    with pytest.raises(Overloaded) as refused:
        dispatcher.submit(rows_of(9), 1)
    # 20 rows queued at 10 rows/s: about 2 s.
    assert refused.value.retry_after_s == pytest.approx(2.0, rel=0.2)
    await asyncio.gather(*queued)


async def test_a_burst_after_an_idle_minute_is_not_refused_for_the_idle_time(
    make: MakeDispatcher,
) -> None:
    # The drain rate's window opened at the last completion before the idle minute, so the
    # burst's first backlogged batch measured 1 row a minute: 5 queued rows looked like 5
    # minutes of work and the burst was refused (503) for its 10 s deadline.
    pods = FakePods(latency_s=0.1)  # one row per 100 ms: 10 rows/s
    dispatcher = make(pods, max_batch_size=1, max_queue_size=100)
    await dispatcher.submit(rows_of(0), 1)
    await asyncio.sleep(60)
    burst = [dispatcher.submit(rows_of(v), 1, timeout_s=10.0) for v in range(6)]
    await asyncio.sleep(0.15)  # the first is answered, with five queued behind it
    burst += [dispatcher.submit(rows_of(v), 1, timeout_s=10.0) for v in range(5)]
    await asyncio.gather(*burst)


async def test_a_failing_batch_fails_only_its_own_requests(make: MakeDispatcher) -> None:
    def fail(call: Call) -> BazaarError | None:
        return UpstreamError("pod crashed") if 13.0 in call.inputs["x"] else None

    pods = FakePods(latency_s=0.010, fail=fail)
    dispatcher = make(pods, max_batch_size=2)
    busy = dispatcher.submit(rows_of(0), 1)
    await asyncio.sleep(0)
    doomed = [dispatcher.submit(rows_of(v), 1) for v in (13, 1)]
    fine = [dispatcher.submit(rows_of(v), 1) for v in (2, 3)]
    results = await asyncio.gather(busy, *doomed, *fine, return_exceptions=True)
    assert [type(r) for r in results[1:3]] == [UpstreamError, UpstreamError]
    assert [r["out"][0, 0] for r in (results[0], *results[3:])] == [0, 4, 6]  # type: ignore[index]


async def test_abandoned_requests_are_not_computed(make: MakeDispatcher) -> None:
    pods = FakePods(latency_s=0.010)
    dispatcher = make(pods, max_batch_size=4)
    busy = dispatcher.submit(rows_of(0), 1)
    await asyncio.sleep(0)
    gone = dispatcher.submit(rows_of(1), 1)
    kept = dispatcher.submit(rows_of(2), 1)
    gone.cancel()  # the client disconnected
    await asyncio.gather(busy, kept)
    assert [float(v) for c in pods.calls for v in c.inputs["x"][:, 0]] == [0, 2]
    assert dispatcher.stats().queued == 0


async def test_every_request_is_answered_exactly_once_with_its_own_rows(
    make: MakeDispatcher,
) -> None:
    rng = random.Random(7)

    def fail(call: Call) -> BazaarError | None:
        return UpstreamError("flaky pod") if rng.random() < 0.1 else None

    pods = FakePods(latency_s=0.003, fail=fail)
    dispatcher = make(
        pods, endpoints=3, max_batches=2, max_batch_size=16, max_queue_delay_s=0.002,
        preferred_batch_sizes=(4, 8), priority_levels=2, max_queue_size=10_000,
    )  # fmt: skip
    futures: list[tuple[float, int, asyncio.Future[dict[str, np.ndarray]]]] = []
    for i in range(2000):
        rows = rng.choice((1, 1, 1, 2, 5))
        value = float(i)
        futures.append(
            (
                value,
                rows,
                dispatcher.submit(
                    rows_of(*[value] * rows),
                    rows,
                    priority=rng.choice((0, 1, 2)),
                    timeout_s=rng.choice((None, 0.05, 0.5)),
                ),
            )
        )
        if rng.random() < 0.3:
            await asyncio.sleep(rng.random() * 0.002)
    results = await asyncio.gather(*(f for _, _, f in futures), return_exceptions=True)
    outcomes = {"ok": 0, "upstream": 0, "expired": 0}
    for (value, rows, _), result in zip(futures, results, strict=True):
        if isinstance(result, UpstreamError):
            outcomes["upstream"] += 1
        elif isinstance(result, DeadlineExceeded):
            outcomes["expired"] += 1
        else:
            assert isinstance(result, dict)
            np.testing.assert_array_equal(result["out"], np.full((rows, 1), value * 2, np.float32))
            outcomes["ok"] += 1
    assert sum(outcomes.values()) == 2000
    assert outcomes["ok"] > 1000
    assert outcomes["upstream"] > 0
    assert all(rows <= 16 for _, rows in batches(pods))
    # A request is computed at most twice (a failed call and its one retry).
    computed = Counter(float(v) for c in pods.calls for v in np.unique(c.inputs["x"]))
    assert max(computed.values()) <= 2
    assert dispatcher.stats().queued == 0
    # Requests that left do not linger (with their inputs) in the deadline heap.
    assert len(dispatcher._queue.deadlines) <= 64


async def test_close_fails_everything_queued(make: MakeDispatcher) -> None:
    pods = FakePods(latency_s=1.0)
    dispatcher = make(pods, max_batch_size=1)
    running = dispatcher.submit(rows_of(0), 1)
    await asyncio.sleep(0)
    queued = [dispatcher.submit(rows_of(v), 1) for v in (1, 2)]
    dispatcher.close()
    for future in queued:
        with pytest.raises(BazaarError, match="shutting down"):
            await future
    with pytest.raises(BazaarError, match="shutting down"):
        dispatcher.submit(rows_of(3), 1)
    await running


async def test_without_endpoints_a_request_waits_at_most_the_queue_time_cap(
    make: MakeDispatcher,
) -> None:
    pods = FakePods()
    dispatcher = make(pods, endpoints=0, max_batch_size=4, max_queue_time_s=30.0)
    loop = asyncio.get_running_loop()
    with pytest.raises(DeadlineExceeded):
        await dispatcher.submit(rows_of(1), 1)
    assert loop.time() == pytest.approx(30.0)
    assert pods.calls == []


async def test_a_request_held_without_endpoints_leaves_when_one_joins(make: MakeDispatcher) -> None:
    pods = FakePods(latency_s=0.001)
    dispatcher = make(pods, endpoints=0, max_batch_size=4)
    held = dispatcher.submit(rows_of(5), 1)
    await asyncio.sleep(2.0)
    dispatcher.pool.set_endpoints(["http://pod-new"])
    result = await held
    assert result["out"][0, 0] == 10
    assert batches(pods) == [(2000.0, 1)]


async def test_waiting_for_a_fuller_batch_never_outlasts_a_deadline(make: MakeDispatcher) -> None:
    pods = FakePods(latency_s=0.001)
    dispatcher = make(pods, max_batch_size=8, max_queue_delay_s=0.005)
    result = await dispatcher.submit(rows_of(3), 1, timeout_s=0.002)
    assert result["out"][0, 0] == 6
    assert batches(pods) == [(0.0, 1)]  # left at once instead of expiring in the wait


async def test_a_busy_endpoint_gets_full_batches_only(make: MakeDispatcher) -> None:
    pods = FakePods(latency_s=0.010)
    dispatcher = make(pods, max_batches=2, max_batch_size=4)
    first = dispatcher.submit(rows_of(0), 1)
    await asyncio.sleep(0)
    # A partial batch waits for the endpoint to go idle, growing meanwhile...
    partial = dispatcher.submit(rows_of(1), 1)
    await asyncio.sleep(0.005)
    assert batches(pods) == [(0.0, 1)]
    # ...but a full one takes the second slot at once, queued behind the first at the pod.
    full = [dispatcher.submit(rows_of(v), 1) for v in (2, 3, 4)]
    await asyncio.gather(first, partial, *full)
    assert batches(pods) == [(0.0, 1), (5.0, 4)]


async def test_an_answered_request_leaves_no_deadline_to_wake_for(make: MakeDispatcher) -> None:
    pods = FakePods(latency_s=0.001)
    dispatcher = make(pods, max_batch_size=4)
    await dispatcher.submit(rows_of(1), 1)
    await asyncio.sleep(0.001)  # the collector's next round
    assert dispatcher._queue.deadlines == []


# -- admission before the body is decoded ----------------------------------------------------


async def test_a_full_queue_refuses_before_decoding_and_a_place_is_free_once_it_leaves(
    make: MakeDispatcher, metrics: GatewayMetrics
) -> None:
    pods = FakePods(latency_s=0.5)
    dispatcher = make(pods, max_batch_size=1, max_queue_size=2)
    running = dispatcher.submit(rows_of(0), 1)
    await asyncio.sleep(0)  # it leaves: the queue is empty
    dispatcher.admit()
    queued = [dispatcher.submit(rows_of(v), 1) for v in (1, 2)]
    with pytest.raises(Overloaded, match="max_queue_size") as refused:
        dispatcher.admit()
    assert refused.value.retry_after_s >= 1
    await asyncio.gather(running, queued[0])
    dispatcher.admit()  # one left for the pod: a place is free again
    await queued[1]
    assert shed(metrics, "before_decode", "queue_full") == 1
    assert shed(metrics, "after_decode", "queue_full") == 0


async def test_a_deadline_the_queue_cannot_meet_is_refused_before_decoding(
    make: MakeDispatcher, metrics: GatewayMetrics
) -> None:
    pods = FakePods(latency_s=0.1)  # one row per 100 ms: 10 rows/s
    dispatcher = make(pods, max_batch_size=1, max_queue_size=100)
    # Never measured under a backlog: the wait is unknown and nobody is refused for it.
    dispatcher.admit(timeout_s=0.001)
    backlog = [dispatcher.submit(rows_of(v), 1) for v in range(30)]
    await asyncio.sleep(1.05)  # ten answered while backlogged: 10 rows/s measured
    assert dispatcher.stats().queued == 19
    # 19 rows at 10 rows/s: about 1.9 s of queue ahead.
    with pytest.raises(Overloaded, match="more than the request's deadline of 1000 ms") as refused:
        dispatcher.admit(timeout_s=1.0)
    assert refused.value.retry_after_s == pytest.approx(1.9, rel=0.1)
    dispatcher.admit(timeout_s=3.0)  # that one can make it
    with pytest.raises(Overloaded, match="deadline"):
        dispatcher.submit(rows_of(9), 1, timeout_s=1.0)  # a body's tighter timeout
    await asyncio.gather(*backlog)
    assert shed(metrics, "before_decode", "deadline") == 1
    assert shed(metrics, "after_decode", "deadline") == 1


async def test_the_drain_rate_is_measured_only_while_backlogged(make: MakeDispatcher) -> None:
    """Light load completes at the arrival rate, not at capacity: it must not count as the
    pods' capacity, or a burst would look like minutes of queue and be refused."""
    pods = FakePods(latency_s=0.001)  # capacity: 1,000 rows/s
    dispatcher = make(pods, max_batch_size=1, max_queue_size=1000)
    for value in range(20):  # one row every 100 ms
        await dispatcher.submit(rows_of(value), 1)
        await asyncio.sleep(0.1)
    burst = [dispatcher.submit(rows_of(v), 1) for v in range(50)]
    dispatcher.admit(timeout_s=0.5)  # 50 rows at 1,000 rows/s is 50 ms: admitted
    await asyncio.gather(*burst)


# -- callers that leave ----------------------------------------------------------------------


async def test_a_cancelled_request_leaves_the_queue_counts_at_once(make: MakeDispatcher) -> None:
    pods = FakePods(latency_s=1.0)
    dispatcher = make(pods, max_batch_size=32, max_queue_size=3)
    running = dispatcher.submit(rows_of(0), 1)
    await asyncio.sleep(0)
    gone = [dispatcher.submit(rows_of(*[1.0] * 32), 32) for _ in range(3)]
    assert (dispatcher.stats().queued, dispatcher.stats().queued_rows) == (3, 96)
    for future in gone:
        future.cancel()
    await asyncio.sleep(0)  # the futures' callbacks
    assert (dispatcher.stats().queued, dispatcher.stats().queued_rows) == (0, 0)
    dispatcher.admit()  # their places are free for others at once
    await running
    await asyncio.sleep(1.0)
    assert [c.rows for c in pods.calls] == [1]  # none of their 96 rows computed


async def test_many_abandoned_requests_do_not_pile_up_with_their_inputs(
    make: MakeDispatcher,
) -> None:
    dispatcher = make(FakePods(), endpoints=0, max_batch_size=4, max_queue_size=10_000)
    for _ in range(1000):
        dispatcher.submit(rows_of(1), 1).cancel()
    await asyncio.sleep(0)
    assert sum(len(level) for level in dispatcher._queue.levels) <= 64
    assert dispatcher.stats().queued == 0


async def test_a_batch_whose_every_caller_left_is_stopped_and_frees_its_slot(
    make: MakeDispatcher,
) -> None:
    loop = asyncio.get_running_loop()
    pods = FakePods(latency_s=10.0)
    dispatcher = make(pods, max_batch_size=4)
    gone = dispatcher.submit(rows_of(1), 1)
    await asyncio.sleep(0.001)  # sent: the pod is working on it
    assert dispatcher.stats().inflight_batches == 1
    gone.cancel()
    await asyncio.sleep(0.001)
    assert dispatcher.stats().inflight_batches == 0
    assert dispatcher.pool.endpoints[0].inflight_batches == 0  # the pod call was cancelled
    kept = await dispatcher.submit(rows_of(2), 1)  # the slot is free: sent at once
    assert kept["out"][0, 0] == 4
    assert loop.time() == pytest.approx(10.002)
    assert [round(c.started, 6) for c in pods.calls] == [0.0, 0.002]


async def test_a_caller_that_left_a_batch_in_flight_costs_only_its_rows(
    make: MakeDispatcher,
) -> None:
    pods = FakePods(latency_s=0.010)
    dispatcher = make(pods, max_batch_size=4)
    busy = dispatcher.submit(rows_of(0), 1)
    await asyncio.sleep(0)
    gone = dispatcher.submit(rows_of(1), 1)
    kept = dispatcher.submit(rows_of(2), 1)
    await asyncio.sleep(0.011)  # both left in one batch
    gone.cancel()
    assert (await kept)["out"][0, 0] == 4
    await busy
    assert [c.rows for c in pods.calls] == [1, 2]


async def test_a_batch_that_never_left_is_not_sent_when_every_caller_is_gone(
    make: MakeDispatcher,
) -> None:
    pods = FakePods(latency_s=0.010)
    dispatcher = make(pods, max_batch_size=4)
    futures = [dispatcher.submit(rows_of(v), 1) for v in (1, 2)]
    for future in futures:  # in the same turn the batch was formed, before it is sent
        future.cancel()
    await asyncio.sleep(0.1)
    assert pods.calls == []
    assert dispatcher.stats().inflight_batches == 0


# -- deadlines at the pod --------------------------------------------------------------------


async def test_a_stalled_pod_is_given_up_on_at_the_requests_deadline(
    make: MakeDispatcher,
) -> None:
    loop = asyncio.get_running_loop()
    pods = FakePods(latency_s=3600.0)
    dispatcher = make(pods, max_batch_size=4)
    with pytest.raises(DeadlineExceeded, match="during a call"):
        await dispatcher.submit(rows_of(1), 1, timeout_s=0.100)
    assert loop.time() == pytest.approx(0.100)
    assert [c.timeout_s for c in pods.calls] == [pytest.approx(0.100)]
    assert (dispatcher.pool.endpoints[0].failures, dispatcher.pool.ready_endpoints) == (0, 1)


async def test_a_batch_is_bounded_by_its_earliest_members_deadline(make: MakeDispatcher) -> None:
    pods = FakePods(latency_s=0.010)
    dispatcher = make(pods, max_batch_size=4)
    busy = dispatcher.submit(rows_of(0), 1)
    await asyncio.sleep(0)
    a = dispatcher.submit(rows_of(1), 1, timeout_s=0.5)
    b = dispatcher.submit(rows_of(2), 1, timeout_s=0.2)
    c = dispatcher.submit(rows_of(3), 1)
    await asyncio.gather(busy, a, b, c)
    assert [round(call.timeout_s, 6) for call in pods.calls] == [60.0, 0.19]


# -- tenants ----------------------------------------------------------------------------------


async def _flood_and_trickle(dispatcher: Dispatcher, flood: Tenant, trickle: Tenant) -> list[float]:
    """Capacity is 100 rows/s: ``flood`` sends 200 requests/s, ``trickle`` 20 (a tenth) for
    2 s. Returns the trickle's times from submission to answer."""
    loop = asyncio.get_running_loop()
    waits: list[float] = []
    refused: list[BaseException] = []

    async def one(tenant: Tenant, record: bool) -> None:
        sent = loop.time()
        try:
            await dispatcher.submit(rows_of(1), 1, tenant=tenant)
        except BazaarError as exc:
            refused.append(exc)
            return
        if record:
            waits.append(loop.time() - sent)

    async def send(tenant: Tenant, rate: float, record: bool) -> None:
        requests = []
        for _ in range(int(2 * rate)):
            requests.append(asyncio.ensure_future(one(tenant, record)))
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*requests)

    await asyncio.gather(send(flood, 200, False), send(trickle, 20, True))
    return waits


async def test_a_flooding_tenant_does_not_delay_another_tenants_trickle(
    make: MakeDispatcher,
) -> None:
    pods = FakePods(latency_s=0.010)
    dispatcher = make(pods, max_batch_size=1, max_queue_size=1000)
    waits = await _flood_and_trickle(
        dispatcher, Tenant("flood", TenantPolicy()), Tenant("trickle", TenantPolicy())
    )
    assert len(waits) == 40  # every trickle request answered
    assert sorted(waits)[-1] <= 0.030  # at most a batch in service and its own


async def test_without_tenants_the_same_flood_delays_everyone(make: MakeDispatcher) -> None:
    """The control for the test above: one tenant, one FIFO, and the trickle waits behind
    the flood's backlog."""
    pods = FakePods(latency_s=0.010)
    dispatcher = make(pods, max_batch_size=1, max_queue_size=1000)
    same = Tenant("everyone", TenantPolicy())
    waits = await _flood_and_trickle(dispatcher, same, same)
    assert sorted(waits)[-1] > 0.5


async def test_weights_share_the_pods_in_proportion(make: MakeDispatcher) -> None:
    pods = FakePods(latency_s=0.010)
    dispatcher = make(pods, max_batch_size=1, max_queue_size=1000)
    heavy = Tenant("heavy", TenantPolicy(weight=3))
    light = Tenant("light", TenantPolicy(weight=1))
    futures = {
        tenant.name: [dispatcher.submit(rows_of(1), 1, tenant=tenant) for _ in range(100)]
        for tenant in (heavy, light)
    }
    await asyncio.sleep(0.405)  # 40 batches of one row
    done = {name: sum(f.done() for f in fs) for name, fs in futures.items()}
    assert done == {"heavy": 30, "light": 10}
    for fs in futures.values():
        await asyncio.gather(*fs)


async def test_a_full_queue_still_admits_a_tenant_under_its_share(
    make: MakeDispatcher, metrics: GatewayMetrics
) -> None:
    pods = FakePods(latency_s=1.0)
    dispatcher = make(pods, max_batch_size=1, max_queue_size=4)
    flood, other = Tenant("flood", TenantPolicy()), Tenant("other", TenantPolicy())
    running = dispatcher.submit(rows_of(0), 1, tenant=flood)
    await asyncio.sleep(0)
    queued = [dispatcher.submit(rows_of(1), 1, tenant=flood) for _ in range(4)]
    with pytest.raises(Overloaded, match="max_queue_size"):
        dispatcher.admit(tenant=flood)
    dispatcher.admit(tenant=other)  # its share of the queue is half: 2
    mine = [dispatcher.submit(rows_of(2), 1, tenant=other) for _ in range(2)]
    with pytest.raises(Overloaded, match="max_queue_size"):
        dispatcher.admit(tenant=other)
    assert dispatcher.stats().queued == 6
    await asyncio.gather(running, *queued, *mine)
    # A tenant with nothing queued starts at the front of the fair order, then they alternate.
    assert [c.inputs["x"][0, 0] for c in pods.calls] == [0, 2, 1, 2, 1, 1, 1]


async def test_a_batch_stops_at_the_pods_body_limit_in_bytes(make: MakeDispatcher) -> None:
    """Rows alone would let requests of the largest allowed size add up to a batch no pod
    reads (one body, under its inference body limit)."""
    pods = FakePods(latency_s=0.010)
    dispatcher = make(pods, max_batch_size=512, max_batch_bytes=3 * 4 * 100)  # 300 FP32 values
    busy = dispatcher.submit(rows_of(0), 1)
    await asyncio.sleep(0.001)  # the pod is busy: the next ones queue together
    big = [dispatcher.submit(rows_of(*[1.0] * 100), 100) for _ in range(4)]
    await asyncio.gather(busy, *big)
    assert [call.rows for call in pods.calls] == [1, 300, 100]
