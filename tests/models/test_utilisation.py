from __future__ import annotations

import pytest

from models.utilisation import BusyTracker, GpuMonitor


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_idle_runtime_has_zero_ratio() -> None:
    clock = FakeClock()
    tracker = BusyTracker(instances=1, window_s=10, clock=clock)
    clock.now += 5
    assert tracker.ratio() == 0.0
    assert tracker.busy_seconds() == 0.0


def test_ratio_counts_running_batches_and_instances() -> None:
    clock = FakeClock()
    tracker = BusyTracker(instances=2, window_s=10, clock=clock)
    tracker.begin()
    clock.now += 4
    # One of two instances busy for the whole 4 s so far, still running.
    assert tracker.ratio() == pytest.approx(0.5)
    assert tracker.busy_seconds() == pytest.approx(4.0)
    tracker.begin()
    clock.now += 4
    tracker.end()
    tracker.end()
    # busy 4 + 2*4 = 12 instance-seconds over 8 s x 2 instances.
    assert tracker.ratio() == pytest.approx(12 / 16)
    assert tracker.active == 0


def test_ratio_forgets_work_older_than_the_window() -> None:
    clock = FakeClock()
    tracker = BusyTracker(instances=1, window_s=10, clock=clock)
    tracker.begin()
    clock.now += 10
    tracker.end()
    assert tracker.ratio() == pytest.approx(1.0)
    for _ in range(25):  # idle for 25 s, read every second as a scraper would
        clock.now += 1
        tracker.ratio()
    assert tracker.ratio() == pytest.approx(0.0)
    assert tracker.busy_seconds() == pytest.approx(10.0)


def test_ratio_over_a_partly_busy_window() -> None:
    clock = FakeClock()
    tracker = BusyTracker(instances=1, window_s=10, clock=clock)
    for _ in range(40):  # 25 % duty cycle: 0.25 s busy every second
        tracker.begin()
        clock.now += 0.25
        tracker.end()
        clock.now += 0.75
    assert tracker.ratio() == pytest.approx(0.25, abs=0.03)


def test_snapshots_stay_bounded_under_many_batches() -> None:
    clock = FakeClock()
    tracker = BusyTracker(instances=1, window_s=10, clock=clock)
    for _ in range(100_000):
        tracker.begin()
        clock.now += 0.0005
        tracker.end()
        clock.now += 0.0005
    assert len(tracker._snapshots) <= 12
    assert tracker.ratio() == pytest.approx(0.5, abs=0.01)


def test_gpu_monitor_without_nvml_reports_nothing() -> None:
    monitor = GpuMonitor()
    if monitor.available:
        pytest.skip("this machine has a GPU; the absent path is for machines without one")
    assert monitor.read() == []
