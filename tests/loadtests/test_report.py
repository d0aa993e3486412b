"""The overload benchmark's verdicts (``loadtests.report.judge_overload``)."""

from __future__ import annotations

import dataclasses

from loadtests.report import CLOSED_LOOP, NORMAL, LoadPoint, judge_overload, load_table


def point(scenario: str, p99_ms: float | None, lost: int = 0, steal: float = 0.031) -> LoadPoint:
    return LoadPoint(
        scenario=scenario, load="300 req/s", sent=100, statuses={200: 100 - lost}, lost=lost,
        missed=0, not_connected=0, goodput=300.0, capacity=600.0, p99_ms=p99_ms,
        shed_before_decode=0, shed_after_decode=0, gateway_peak_bytes=0, workers_peak_bytes=0,
        gateway_cpu=0.5, workers_cpu=0.4, server_core_busy=0.97, server_steal=steal,
        client_steal=0.0,
    )  # fmt: skip


def rounds(
    attack: str, *pairs: tuple[float, float | None], steal: float = 0.031
) -> list[LoadPoint]:
    """Rounds of (unloaded p99, attacked p99)."""
    points = []
    for unloaded, attacked in pairs:
        points += [point(NORMAL, unloaded), point(f"{NORMAL} + {attack}", attacked, steal=steal)]
    return points


def test_each_attack_is_judged_against_the_unloaded_point_just_before_it() -> None:
    points = []
    for _ in range(3):
        points += [
            point(NORMAL, 10.0),
            point(f"{NORMAL} + idle", 25.0),  # 2.5x its own baseline
            point(NORMAL, 40.0),
            point(f"{NORMAL} + slow-body", 60.0),  # 1.5x: the largest p99, not the worst ratio
        ]
    p99, lost = judge_overload(points)
    assert p99.measured == "2.50x (25.0 / 10.0 ms, 25.0 / 10.0 ms, 25.0 / 10.0 ms)"
    assert "worst: idle" in p99.name
    assert not p99.passed
    assert lost.passed


def test_attacks_within_twice_their_baselines_pass() -> None:
    p99, _ = judge_overload(rounds("idle", (10.0, 20.0), (10.0, 20.0), (10.0, 20.0)))
    assert p99.passed


def test_an_attack_is_judged_by_the_median_of_its_rounds() -> None:
    one_unlucky_round = rounds("idle", (10.0, 15.0), (10.0, 80.0), (12.0, 18.0))
    p99, _ = judge_overload(one_unlucky_round)
    assert p99.measured == "1.50x (15.0 / 10.0 ms, 80.0 / 10.0 ms, 18.0 / 12.0 ms)"
    assert p99.passed

    two_bad_rounds = rounds("idle", (10.0, 25.0), (10.0, 80.0), (12.0, 18.0))
    p99, _ = judge_overload(two_bad_rounds)
    assert p99.measured.startswith("2.50x")
    assert not p99.passed


def test_the_worst_attack_is_the_one_with_the_worst_median() -> None:
    points = rounds("slow-body", (10.0, 90.0), (10.0, 11.0), (10.0, 12.0))  # one spike: 1.2x
    points += rounds("idle", (10.0, 19.0), (10.0, 19.0), (10.0, 19.0))  # 1.9x every round
    p99, _ = judge_overload(points)
    assert "worst: idle" in p99.name
    assert p99.measured.startswith("1.90x")
    assert p99.passed


def test_a_round_in_which_the_hypervisor_took_much_is_set_aside() -> None:
    # The second round is 8x, with 20 % of a core stolen; the fourth counts in its place.
    points = rounds("idle", (10.0, 15.0))
    points += rounds("idle", (10.0, 80.0), steal=0.2)
    points += rounds("idle", (10.0, 16.0), (10.0, 17.0))
    p99, _ = judge_overload(points)
    assert p99.measured == (
        "1.60x (15.0 / 10.0 ms, 16.0 / 10.0 ms, 17.0 / 10.0 ms; 1 more set aside for steal)"
    )
    assert p99.passed


def test_an_attack_with_too_few_rounds_without_steal_is_not_judged() -> None:
    points = rounds("slow-body", (10.0, 11.0), (10.0, 11.0), (10.0, 11.0))
    points += rounds("idle", (10.0, 11.0))
    points += rounds("idle", (10.0, 80.0), (10.0, 90.0), steal=0.2)
    p99, lost = judge_overload(points)
    assert p99.measured == "not judged: rounds with steal <= 5%: idle 1 of 3"
    assert p99.passed is None
    assert p99.verdict == "n/a"
    assert lost.passed


def test_goodput_under_a_crowd_is_not_judged_on_points_the_hypervisor_took() -> None:
    def closed(load: str, goodput: float, steal: float) -> LoadPoint:
        return dataclasses.replace(
            point(CLOSED_LOOP, 100.0, steal=steal), load=load, goodput=goodput, capacity=600.0
        )

    quiet = judge_overload([closed("c=64", 600.0, 0.01), closed("c=2048", 420.0, 0.01)])[0]
    assert (quiet.measured, quiet.passed) == ("420 / 600 = 0.70x", False)
    crowded = judge_overload([closed("c=64", 600.0, 0.01), closed("c=2048", 420.0, 0.09)])[0]
    assert crowded.measured == "not judged: steal over 5% (420 / 600 = 0.70x)"
    assert crowded.passed is None


def test_an_attacked_round_without_any_200_fails() -> None:
    p99, _ = judge_overload(rounds("idle", (10.0, None), (10.0, None), (10.0, 11.0)))
    assert p99.measured == "no 200s (- / 10.0 ms, - / 10.0 ms, 11.0 / 10.0 ms)"
    assert not p99.passed


def test_each_point_shows_its_cores_use_and_the_hypervisors_steal() -> None:
    row = load_table([point(NORMAL, 10.0)]).splitlines()[2]
    assert "| 50 / 40 | 97 | 3.1 / 0.0 |" in row
