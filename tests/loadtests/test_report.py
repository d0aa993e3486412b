"""The overload benchmark's verdicts (``loadtests.report.judge_overload``)."""

from __future__ import annotations

from loadtests.report import NORMAL, LoadPoint, judge_overload


def point(scenario: str, p99_ms: float, lost: int = 0) -> LoadPoint:
    return LoadPoint(
        scenario=scenario, load="300 req/s", sent=100, statuses={200: 100 - lost}, lost=lost,
        missed=0, not_connected=0, goodput=300.0, capacity=600.0, p99_ms=p99_ms,
        shed_before_decode=0, shed_after_decode=0, gateway_peak_bytes=0, workers_peak_bytes=0,
        gateway_cpu=0.5, workers_cpu=0.4,
    )  # fmt: skip


def test_each_attack_is_judged_against_the_unloaded_point_just_before_it() -> None:
    points = [
        point(NORMAL, 10.0),
        point(f"{NORMAL} + idle", 25.0),  # 2.5x its own baseline
        point(NORMAL, 40.0),
        point(f"{NORMAL} + slow-body", 60.0),  # 1.5x: the largest p99 but not the worst ratio
    ]
    p99, lost = judge_overload(points)
    assert p99.measured == "25.0 / 10.0 ms = 2.50x"
    assert "worst: idle" in p99.name
    assert not p99.passed
    assert lost.passed


def test_attacks_within_twice_their_baselines_pass() -> None:
    points = [point(NORMAL, 10.0), point(f"{NORMAL} + idle", 20.0)]
    p99, _ = judge_overload(points)
    assert p99.passed
