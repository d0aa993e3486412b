"""bazaar's policy over table-driven sequences of samples, on an injected clock."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from autoscaler.policy import Decision, PolicyState, Sample, ScaleConfig, decide

CONFIG = ScaleConfig(min_replicas=1, max_replicas=64, replica_throughput_rps=160.0)
"""Full batch answers 160 rows/s; 70 % of it is 112 rows/s per replica."""


def sample(
    replicas: int = 2,
    *,
    ready: int | None = None,
    starting: int = 0,
    queued: float | None = 0.0,
    inflight: float | None = 8.0,
    rate: float | None = 200.0,
    done: float | None = 200.0,
    busy: float | None = 1.0,
) -> Sample:
    ready = replicas - starting if ready is None else ready
    return Sample(0.0, replicas, ready, starting, queued, inflight, rate, done, busy, busy)


def run(
    steps: list[tuple[float, Sample]], config: ScaleConfig = CONFIG, follow: bool = True
) -> list[Decision]:
    """Decide each (time, sample) in turn; with ``follow`` the replicas track the decisions."""
    state, decisions, current = PolicyState(), [], None
    for now, s in steps:
        if follow and current is not None and s.replicas == current.replicas:
            s = replace(s, replicas=current.replicas)
        if follow and current is not None:
            s = replace(s, replicas=current.replicas, ready_replicas=current.replicas)
        current = decide(replace(s, time_s=now), state, config, now)
        state = current.state
        decisions.append(current)
    return decisions


def test_steady_load_holds_without_flapping() -> None:
    # 200 rows/s with Poisson-like wobble needs 2 replicas at 112 rows/s each.
    rates = [200, 215, 190, 223, 181, 205, 199, 220, 186, 210] * 30
    decisions = run([(float(t), sample(rate=r, done=r)) for t, r in enumerate(rates)])
    assert {d.replicas for d in decisions} == {2}
    assert all(d.reason for d in decisions)
    assert {d.code for d in decisions} == {"hold"}


def test_burst_panics_up_to_the_need_in_one_step() -> None:
    calm = sample(replicas=4, rate=400.0, done=400.0)
    burst = replace(calm, arrival_rate=1600.0, queued=1300.0, inflight=64.0)
    decisions = run([(0.0, calm), (1.0, burst)], follow=False)
    # 1600 rows/s at 160 per replica, with the Poisson margin the 500 ms objective needs
    # (1607 rows/s), takes 11 to serve; the backlog the new replicas will find (1300 - 4 x 16
    # rows now, growing by 1600 - 4 x 160 rows/s for the 30 s start and a 1 s tick) takes 20
    # more within 10 s.
    assert decisions[0].replicas == 4
    assert decisions[1].replicas == 11 + 20
    assert decisions[1].reason.startswith("panic scale up 4 → 31")
    assert decisions[1].code == "panic_scale_up"


def test_up_step_is_bounded() -> None:
    config = replace(CONFIG, max_scale_up_rate=2.0)
    decisions = run([(0.0, sample(replicas=4, rate=3000.0))], config)
    assert decisions[0].replicas == 8


def test_starting_replicas_are_counted() -> None:
    # 300 rows/s needs 3; 2 ready + 1 loading already make 3, so nothing more is asked for.
    covered = sample(replicas=3, starting=1, rate=300.0, done=300.0)
    assert run([(0.0, covered)], follow=False)[0].replicas == 3
    # ...and replicas asked for a burst that already passed are not cancelled mid-start.
    passed = sample(replicas=15, starting=13, rate=200.0, done=200.0)
    steps = [(float(t), passed) for t in range(200)]
    decisions = run(steps, follow=False)
    assert {d.replicas for d in decisions} == {15}
    assert decisions[-1].code == "hold_starting_or_backlog"


def test_scale_down_only_after_its_window() -> None:
    # Rates wobble every second, as a gateway read directly reports them.
    steps = [
        (float(t), sample(replicas=12, rate=(1600.0 if t < 200 else 200.0) + t % 3, done=200.0))
        for t in range(400)
    ]
    decisions = run(steps)
    assert decisions[199].code == "hold"  # 11 serve 1600 rows/s; 10 % more is kept
    first_down = next(t for (t, _), d in zip(steps, decisions, strict=True) if d.replicas < 12)
    assert first_down == 199 + CONFIG.scale_down_window_s  # the last high need was at 199
    assert decisions[-1].replicas == 2
    assert "highest need over 120 s" in decisions[int(first_down)].reason
    assert decisions[int(first_down)].code == "scale_down"


def test_no_scale_down_before_a_window_of_history() -> None:
    decisions = run([(float(t), sample(replicas=10)) for t in range(130)])
    assert [d.replicas for d in decisions[:120]] == [10] * 120
    assert {d.code for d in decisions[:120]} == {"hold_short_history"}
    assert decisions[-1].replicas < 10


@pytest.mark.parametrize("missing", ["queued", "inflight", "arrival_rate"])
def test_a_missing_demand_signal_never_scales_down(missing: str) -> None:
    without: dict[str, Any] = {missing: None}
    s = replace(sample(replicas=10), **without)
    decisions = run([(float(t), s) for t in range(300)])
    assert {d.replicas for d in decisions} == {10}
    assert {d.code for d in decisions} == {"hold_demand_unknown"}


def test_without_demand_utilisation_sizes_up_only() -> None:
    s = sample(replicas=4, queued=None, inflight=None, rate=None, done=None, busy=1.0)
    decision = run([(0.0, s)], follow=False)[0]
    assert decision.replicas == 6  # ceil(4 x 1.0 / 0.7)
    assert "demand unknown" in decision.reason
    assert decision.code == "scale_up"


def test_no_signal_at_all_holds() -> None:
    s = sample(replicas=3, queued=None, inflight=None, rate=None, done=None, busy=None)
    decision = run([(0.0, s)], follow=False)[0]
    assert (decision.replicas, decision.reason) == (3, "hold 3: no demand or utilisation signal")
    assert decision.code == "hold_no_signal"


ZERO = replace(CONFIG, min_replicas=0, scale_to_zero_after_s=60.0)


def test_scale_to_zero_after_the_idle_period() -> None:
    idle = sample(replicas=1, queued=0.0, inflight=0.0, rate=0.0, done=0.0, busy=0.0)
    decisions = run([(float(t), idle) for t in range(0, 130)], ZERO)
    zero_at = next(t for t, d in enumerate(decisions) if d.replicas == 0)
    assert zero_at == 60
    assert decisions[zero_at].reason == "scale to zero: idle for 60 s"
    assert decisions[zero_at].code == "scale_to_zero"


def test_idle_is_not_assumed_when_signals_are_missing() -> None:
    unknown = sample(replicas=1, queued=None, inflight=None, rate=None, done=None, busy=None)
    decisions = run([(float(t), unknown) for t in range(0, 400)], ZERO)
    assert {d.replicas for d in decisions} == {1}


def test_scale_from_zero_on_the_first_queued_request() -> None:
    at_zero = sample(replicas=0, ready=0, queued=0.0, inflight=0.0, rate=0.0, busy=None)
    first = replace(at_zero, queued=1.0)
    decisions = run([(0.0, at_zero), (1.0, first)], ZERO, follow=False)
    assert decisions[0].replicas == 0
    assert decisions[1].replicas == 1
    assert decisions[1].reason.startswith("scale from zero")
    assert [d.code for d in decisions] == ["stay_at_zero", "scale_from_zero"]


def test_bounds_hold() -> None:
    config = replace(CONFIG, min_replicas=3, max_replicas=5)
    assert run([(0.0, sample(replicas=1, rate=10.0))], config)[0].replicas == 3
    assert run([(0.0, sample(replicas=4, rate=9000.0))], config)[0].replicas == 5


def test_capacity_is_learned_from_sustained_saturation() -> None:
    config = replace(CONFIG, replica_throughput_rps=None)
    saturated = sample(replicas=2, queued=500.0, inflight=32.0, rate=400.0, done=300.0, busy=1.0)
    decisions = run([(float(t), saturated) for t in range(16)], config, follow=False)
    # Saturated for 10 s, and the ready count held for the signals' age (15 s: the signals
    # never changed, so no refresh interval is added).
    assert [d.state.capacity_rps for d in decisions[:15]] == [None] * 15
    assert decisions[-1].state.capacity_rps == pytest.approx(150.0)


def _refreshing(t: int, refresh_s: int, base: float) -> float:
    """A rate that a source refreshing every ``refresh_s`` seconds reports at second ``t``."""
    return base + (t // refresh_s) % 3


@pytest.mark.parametrize(
    ("refresh_s", "signal_delay_s", "first_learned_s"),
    [
        (1, 15.0, 5 + 15 + 2 * 1),  # gateways read directly, default lag allowance
        (15, 15.0, 5 + 15 + 2 * 15),  # Prometheus: 15 s scrape and rate window, 15 s lag
        (1, 0.0, 10),  # no lag: 10 s of saturation is the longer wait
    ],
)
def test_capacity_is_not_learned_from_rates_older_than_the_ready_count(
    refresh_s: int, signal_delay_s: float, first_learned_s: int
) -> None:
    config = replace(CONFIG, replica_throughput_rps=None, signal_delay_s=signal_delay_s)
    # A third replica turns ready at t=5 while a backlog waits: rates measured before it (or
    # reported late) would divide two replicas' completions by three.
    steps = [
        (
            float(t),
            sample(
                replicas=2 if t < 5 else 3,
                queued=500.0,
                inflight=48.0,
                rate=_refreshing(t, refresh_s, 400.0),
                done=_refreshing(t, refresh_s, 300.0),
            ),
        )
        for t in range(80)
    ]
    decisions = run(steps, config, follow=False)
    learned = [t for (t, _), d in zip(steps, decisions, strict=True) if d.state.capacity_rps]
    assert learned[0] == first_learned_s
    assert decisions[first_learned_s].state.capacity_rps == pytest.approx(
        _refreshing(first_learned_s, refresh_s, 300.0) / 3
    )


@pytest.mark.parametrize(
    ("refresh_s", "signal_delay_s", "first_down_s"),
    [
        (1, 15.0, 200 + 15 + 2 * 1),
        (15, 15.0, 200 + 15 + 2 * 15),
        (15, 30.0, 200 + 30 + 2 * 15),  # Prometheus with a 30 s lag
        (1, 0.0, 200 + 2 * 1),
    ],
)
def test_no_scale_down_on_signals_older_than_the_ready_count(
    refresh_s: int, signal_delay_s: float, first_down_s: int
) -> None:
    config = replace(CONFIG, signal_delay_s=signal_delay_s)
    # 10 replicas for 200 rows/s (2 needed); the last one turns ready at t=200. Until signals
    # taken with it in service arrive, what they say (a rate admitted through a full queue,
    # say) belongs to the count before.
    steps = [
        (
            float(t),
            sample(
                replicas=10,
                starting=1 if t < 200 else 0,
                rate=_refreshing(t, refresh_s, 200.0),
                done=_refreshing(t, refresh_s, 200.0),
            ),
        )
        for t in range(300)
    ]
    decisions = run(steps, config, follow=False)
    first_down = next(t for (t, _), d in zip(steps, decisions, strict=True) if d.replicas < 10)
    assert first_down == first_down_s
    assert decisions[first_down_s].state.refresh_s == refresh_s
    assert "old" in decisions[first_down_s - 1].reason
    assert decisions[first_down_s - 1].code == "hold_stale_signals"


def test_a_long_still_stretch_is_not_taken_for_a_slow_source() -> None:
    still = sample(replicas=10, rate=200.0, done=200.0)
    moving = [(float(t), sample(replicas=10, rate=201.0 + t % 2, done=200.0)) for t in (90, 91)]
    decisions = run([(float(t), still) for t in range(90)] + moving, follow=False)
    assert decisions[89].state.refresh_s is None  # nothing changed yet
    assert decisions[90].state.refresh_s is None  # 90 s still: load held, not a 90 s scrape
    assert decisions[91].state.refresh_s == 1.0


def test_a_rising_rate_is_sized_for_the_forecast_a_start_up_ahead() -> None:
    # 5 rows/s more every second; replicas take 60 s to start, so the rate then matters.
    config = replace(CONFIG, replica_startup_s=60.0)
    rates = [100.0 + 5.0 * t for t in range(60)]
    steps = [(float(t), sample(rate=r, done=r)) for t, r in enumerate(rates)]
    decisions = run(steps, config, follow=False)
    t, up = next((t, d) for t, d in enumerate(decisions) if d.replicas > 2)
    # Two replicas serve up to about 310 rows/s: a policy sizing for now would wait till then.
    assert rates[t] < 250.0
    assert "in 61 s" in up.reason  # the start-up and a tick
    assert up.code == "scale_up"


def test_a_falling_rate_is_sized_for_now_not_for_the_forecast() -> None:
    steps = [(float(t), sample(rate=1600.0 - 10.0 * t, done=1600.0)) for t in range(100)]
    last = run(steps, follow=False)[-1]
    assert "arrival 610 rows/s, 610 in 31 s" in last.reason


def test_the_start_up_is_learned_from_the_replicas_that_turn_ready() -> None:
    calm = sample(replicas=2, rate=200.0, done=200.0)
    burst = replace(calm, arrival_rate=1000.0, completion_rate=320.0)
    decisions = run([(0.0, calm), (1.0, burst)], follow=False)
    asked = decisions[-1].replicas
    assert asked > 2
    state = decisions[-1].state
    # The new replicas start for 45 s, then all turn ready.
    for t in range(2, 47):
        rate = 1000.0 + t % 3  # as read: every second a little different
        starting = sample(replicas=asked, starting=asked - 2 if t < 46 else 0, rate=rate)
        decision = decide(replace(starting, time_s=float(t)), state, CONFIG, float(t))
        state = decision.state
    assert state.startup_s == 45.0
    assert state.asked_s == ()
    # The forecast now looks the learned start-up and a tick ahead.
    assert state.forecast is not None and state.forecast.due[-1][0] == 46.0 + 46.0


@pytest.mark.parametrize(("slo_s", "expected"), [(0.5, 10), (0.15, 11)])
def test_the_headroom_is_what_the_objective_needs(slo_s: float, expected: int) -> None:
    # 1580 rows/s. Poisson arrivals queue even below capacity; a 500 ms objective leaves 400 ms
    # of waiting after a full batch, 150 ms only 50 ms. Both far under 70 % utilisation's 15.
    config = replace(CONFIG, latency_slo_s=slo_s)
    decision = run([(0.0, sample(replicas=10, rate=1580.0))], config, follow=False)[0]
    assert decision.replicas == expected


def test_demand_at_a_replica_boundary_does_not_flap() -> None:
    # 300 rows/s needs 2 replicas, 330 needs 3; the load moves between them every 150 s.
    steps = [
        (float(t), sample(replicas=3, rate=330.0 if t // 150 % 2 == 0 else 300.0, done=300.0))
        for t in range(1200)
    ]
    decisions = run(steps)
    assert {d.replicas for d in decisions} == {3}


def _down_then_back(back: list[float]) -> list[Decision]:
    """12 replicas serving 1600 rows/s, a drop to 200 for long enough to scale down, then
    ``back``, one rate per second."""
    rates = [1600.0] * 200 + [200.0] * 250 + back
    return run([(float(t), sample(replicas=12, rate=r, done=r)) for t, r in enumerate(rates)])


def test_a_surge_after_a_scale_down_doubles_the_window() -> None:
    decisions = _down_then_back([1600.0] * 30)
    up = next(d for d in decisions[450:] if d.code in ("scale_up", "panic_scale_up"))
    assert "scale-down window now 240 s" in up.reason
    assert up.state.down_window_s == 240.0


def test_the_window_doubles_up_to_twelve_minutes() -> None:
    rates = [1600.0] * 200 + [200.0] * 250 + [1600.0] * 30
    steps = [(float(t), sample(replicas=12, rate=r, done=r)) for t, r in enumerate(rates)]
    state, decisions = PolicyState(), []
    for now, seen in steps:
        replicas = decisions[-1].replicas if decisions else seen.replicas
        seen = replace(seen, time_s=now, replicas=replicas, ready_replicas=replicas)
        before = state
        decisions.append(decide(seen, state, CONFIG, now))
        state = decisions[-1].state
        if "window now" in decisions[-1].reason:
            break
    assert state.down_window_s == 240.0
    # The same surge after a window of 480 s (two releases judged premature before): 720, the
    # longest; after 720, 720 still.
    for held, doubled in ((480.0, 720.0), (720.0, 720.0)):
        again = decide(seen, replace(before, down_window_s=held), CONFIG, now)
        assert again.state.down_window_s == doubled
        assert f"scale-down window now {doubled:.0f} s" in again.reason


def test_a_rise_the_forecast_follows_keeps_the_window() -> None:
    decisions = _down_then_back([200.0 + 5.0 * t for t in range(120)])
    ups = [d for d in decisions[450:] if d.code in ("scale_up", "panic_scale_up")]
    assert ups
    assert all(d.state.down_window_s == 120.0 for d in ups)
    assert all("window now" not in d.reason for d in ups)
