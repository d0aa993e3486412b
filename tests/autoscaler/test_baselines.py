"""The baselines reproduce the examples in their own documentation (docs/autoscaling.md)."""

from __future__ import annotations

import pytest

from autoscaler.policy import Sample
from autoscaler.simulation.baselines import (
    Hpa,
    HpaState,
    Keda,
    KedaState,
    Kpa,
    KpaState,
    Ray,
    RayState,
    hpa_normalize,
    hpa_pods_replicas,
)


def sample(replicas: int, outstanding: float, ready: int | None = None) -> Sample:
    ready = replicas if ready is None else ready
    return Sample(0.0, replicas, ready, replicas - ready, outstanding, 0.0, 0.0, 0.0, 1.0, None)


@pytest.mark.parametrize(
    ("ratio", "expected"), [(2.0, 8), (0.5, 2), (1.05, 4), (0.95, 4), (1.2, 5), (0.8, 4)]
)
def test_hpa_ratio(ratio: float, expected: int) -> None:
    # 4 pods at ratio x target: 2.0 doubles, 0.5 halves, within ±0.1 nothing changes.
    assert hpa_pods_replicas(4 * 10.0 * ratio, 4, 0, 4, 10.0) == expected


def test_hpa_missing_pods_dampen_both_ways() -> None:
    # Up: 2 ready pods at 2x target, 2 loading count 0 → ratio 1.0 over 4 pods: no change.
    assert hpa_pods_replicas(40.0, 2, 2, 4, 10.0) == 4
    # Down: 2 ready at half target, 2 missing count 100 % → 0.75 over 4 pods → 3.
    assert hpa_pods_replicas(10.0, 2, 2, 4, 10.0) == 3


def test_hpa_default_scale_up_sequence() -> None:
    hpa, state, replicas, seen = Hpa(max_replicas=64), HpaState(), 1, []
    for tick in range(4):
        outcome = hpa.decide(sample(replicas, 1000.0 * replicas), state, 15.0 * tick)
        state, replicas = outcome.state, outcome.replicas
        seen.append(replicas)
    assert seen == [5, 10, 20, 40]


def test_hpa_scale_down_waits_for_the_window() -> None:
    state, replicas = HpaState(), 10
    replicas, state = hpa_normalize(10, replicas, state, 0.0, (1, 64))
    for t in range(15, 300, 15):
        replicas, state = hpa_normalize(2, replicas, state, float(t), (1, 64))
        assert replicas == 10
    replicas, state = hpa_normalize(2, replicas, state, 300.0, (1, 64))
    assert replicas == 2  # then to any size at once (Percent 100)


def test_hpa_is_inactive_at_zero() -> None:
    assert Hpa().decide(sample(0, 50.0), HpaState(), 0.0).replicas == 0


def test_keda_average_value_ignores_the_current_count() -> None:
    keda = Keda(threshold=5.0)
    for current in (1, 2, 8):
        state = KedaState(last_poll_s=0.0, last_active_s=0.0)
        assert keda.decide(sample(current, 20.0), state, 15.0).replicas == 4


def test_keda_activation_and_cooldown() -> None:
    keda = Keda(threshold=5.0)
    assert keda.decide(sample(0, 0.0), KedaState(), 0.0).replicas == 0
    woke = keda.decide(sample(0, 3.0), KedaState(last_poll_s=0.0), 30.0)
    assert (woke.replicas, woke.reason) == (1, "activated: 3 > 0")
    state = KedaState(last_poll_s=270.0, last_active_s=0.0)
    assert keda.decide(sample(1, 0.0), state, 299.0).replicas == 1  # not a poll yet
    assert keda.decide(sample(1, 0.0), state, 300.0).replicas == 0


def test_keda_activation_overrides_scaling() -> None:
    keda = Keda(threshold=10.0, activation=50.0)
    assert keda.decide(sample(0, 40.0), KedaState(), 0.0).replicas == 0


def test_kpa_pods_from_concurrency() -> None:
    # 100 concurrent at containerConcurrency 10 and 70 % → 15 pods.
    kpa = Kpa(target=10 * 0.7)
    assert kpa.decide(sample(1, 100.0), KpaState(started=True), 0.0).replicas == 15


def test_kpa_panics_and_never_scales_down_while_panicking() -> None:
    kpa = Kpa(target=10.0)
    state, replicas, seen = KpaState(started=True), 2, []
    loads = [20.0] * 3 + [100.0] + [20.0] * 40
    for i, load in enumerate(loads):
        outcome = kpa.decide(sample(replicas, load), state, 2.0 * i)
        state, replicas = outcome.state, outcome.replicas
        seen.append((replicas, state.panic_since_s is not None))
    assert seen[3] == (5, True)  # panic average 40/10 → 4 ≥ 2 x 2 ready, stable peak 5
    panicking = [r for r, p in seen if p]
    assert panicking == sorted(panicking)  # only up while panicking
    exit_at = next(i for i, (_, p) in enumerate(seen) if i > 3 and not p)
    assert 2.0 * exit_at > 2.0 * 3 + 60.0  # left 60 s after the last over-threshold tick
    assert seen[exit_at][0] < seen[exit_at - 1][0]


def test_kpa_halves_at_most_per_tick() -> None:
    kpa = Kpa(target=10.0)
    outcome = kpa.decide(sample(16, 0.0), KpaState(started=True), 0.0)
    assert outcome.replicas == 8


def test_ray_gain_and_delays() -> None:
    assert Ray(upscaling_factor=0.5).desired(total=10 * 11.2, current=2) == 6
    ray, state = Ray(interval_s=1), RayState()
    for t in range(30):
        outcome = ray.decide(sample(2, 100.0), state, float(t))
        state = outcome.state
        assert outcome.replicas == 2, t  # 30 ticks of wanting up are not enough...
    assert ray.decide(sample(2, 100.0), state, 30.0).replicas == 9  # ...the 31st is
    # Down waits 600 ticks (600 s), the Ray default.
    state = RayState()
    for t in range(600):
        outcome = ray.decide(sample(9, 10.0), state, float(t))
        state = outcome.state
        assert outcome.replicas == 9, t
    assert ray.decide(sample(9, 10.0), state, 600.0).replicas == 1
