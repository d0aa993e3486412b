"""The goal table: the foresight arithmetic, the cost floor, and each way to miss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from autoscaler.simulation import goal, traces
from autoscaler.simulation.command import main


def flat(rate: float = 100.0, seconds: int = 100) -> traces.Trace:
    return traces.from_rates("flat", np.full(seconds, rate), 1)


def test_a_flat_trace_needs_no_foresight() -> None:
    assert goal.foresight_free_attainment(flat(), 33, 0.5) == 1.0


def test_a_burst_after_idle_needs_foresight() -> None:
    rates = np.concatenate([np.zeros(100), np.full(100, 100.0)])
    trace = traces.from_rates("burst", rates, 1, min_replicas=0)
    # Nothing serves for the 10 s lead: 1000 rows wait. Then 2 replicas (1.25 x the oracle's
    # one) drain 220 rows/s; the queue stays above 0.4 s of capacity (128 rows) for 3 s more.
    assert goal.foresight_free_attainment(trace, 10, 0.5) == pytest.approx(1 - 1300 / 10_000)


def test_the_cost_floor_is_just_enough_fully_busy_replicas() -> None:
    trace = traces.from_rates("t", np.array([100.0, 200.0, 0.0]), 1)
    assert goal.cost_floor(trace) == 1 + 2 + 1  # the floor of one replica holds at 0 rows/s


def runs(trace: str, **numbers: tuple[float, float, int]) -> list[dict[str, Any]]:
    """Rows for every policy: (attainment, replica-seconds, reversals), defaults poor."""
    everyone = {p: (0.3, 1000.0, 5) for p in ("bazaar", "oracle", *goal.BASELINES)}
    everyone |= numbers
    return [
        {"trace": trace, "policy": p, "slo_attainment": a, "replica_seconds": c, "reversals": r}
        for p, (a, c, r) in everyone.items()
    ]


def test_the_full_goal_is_met() -> None:
    rows = runs("flat", bazaar=(0.999, 120.0, 1), oracle=(1.0, 100.0, 1), ray=(1.0, 200.0, 1))
    verdict = goal.judge(flat(), rows, 33, 500)
    assert verdict is not None and verdict.met and not verdict.foresight_bound
    assert (verdict.cheapest, verdict.cost_vs_cheapest) == ("ray", 0.6)
    assert verdict.best == "ray"


@pytest.mark.parametrize(
    ("bazaar", "ray_cost", "missed"),
    [
        ((0.99, 120.0, 1), 200.0, "attainment 99.00% < 99.5%"),
        ((0.999, 130.0, 1), 200.0, "cost 1.30x the oracle's"),
        ((0.999, 124.0, 1), 150.0, "cost 0.83x ray's"),
        ((0.999, 100.0, 2), 200.0, "reversals 2 > ray's 1"),
    ],
)
def test_each_way_to_miss_the_full_goal(
    bazaar: tuple[float, float, int], ray_cost: float, missed: str
) -> None:
    rows = runs("flat", bazaar=bazaar, oracle=(1.0, 100.0, 1), ray=(1.0, ray_cost, 1))
    verdict = goal.judge(flat(), rows, 33, 500)
    assert verdict is not None
    assert verdict.missed == (missed,)


def test_a_cost_no_policy_can_reach_says_so() -> None:
    # 100 rows/s for 100 s: one replica, 100 replica-seconds, even 100 % busy.
    rows = runs("flat", bazaar=(1.0, 100.0, 0), oracle=(1.0, 100.0, 0), keda=(1.0, 110.0, 0))
    verdict = goal.judge(flat(), rows, 33, 500)
    assert verdict is not None
    assert verdict.missed == ("cost 0.91x keda's (100% busy replicas: 0.91x)",)


def test_a_trace_that_needs_foresight_is_held_to_the_best_baseline() -> None:
    rates = np.concatenate([np.zeros(600), np.full(60, 50.0)])
    trace = traces.from_rates("sparse", rates, 1, min_replicas=0)
    rows = runs("sparse", bazaar=(0.6, 70.0, 1), oracle=(1.0, 40.0, 1), hpa=(0.5, 100.0, 1))
    verdict = goal.judge(trace, rows, 33, 500)
    assert verdict is not None and verdict.foresight_bound and verdict.met
    assert (verdict.best, verdict.cost_vs_cheapest) == ("hpa", 0.7)
    rows = runs("sparse", bazaar=(0.4, 90.0, 2), oracle=(1.0, 40.0, 1), hpa=(0.5, 100.0, 1))
    worse = goal.judge(trace, rows, 33, 500)
    assert worse is not None and worse.missed == (
        "attainment 40.00% < hpa's 50.00%",
        "cost 0.90x hpa's",
        "reversals 2 > hpa's 1",
    )


def test_no_verdict_without_every_policy() -> None:
    rows = [r for r in runs("flat") if r["policy"] != "kpa"]
    assert goal.judge(flat(), rows, 33, 500) is None


def test_the_command_prints_the_goal_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "tiny.csv"
    csv.write_text("rate_per_s\n" + "\n".join(["100"] * 20 + ["300"] * 40) + "\n")
    assert main(["--trace", str(csv), "--jobs", "1", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "Goal (docs/autoscaling.md): " in out
    judged = out.split("Goal (docs/autoscaling.md): ")[1]
    row = next(line for line in judged.splitlines() if line.startswith("| tiny | "))
    assert "PASS" in row or "MISS" in row
    only_ours = ["--trace", str(csv), "--policy", "bazaar", "--out", str(tmp_path / "b")]
    assert main(only_ours) == 0
    assert "Goal" not in capsys.readouterr().out
