"""bazaar's answers through KEDA and its HPA, in the simulator (``bazaar-keda``)."""

from __future__ import annotations

import numpy as np
import pytest

from autoscaler.policy import Sample, ScaleConfig
from autoscaler.simulation import report, traces
from autoscaler.simulation.benchmark import make_policy
from autoscaler.simulation.keda_external import KedaExternal, hpa_external_average_value
from autoscaler.simulation.simulator import SimConfig, simulate

SLO_MS = 500
"""The benchmark's latency objective (``bazaar simulate --slo-ms``'s default)."""


@pytest.mark.parametrize(
    ("answer", "current", "expected"),
    [
        (5, 3, 5),  # target 1 per replica: the HPA lands on the answer, whatever the count
        (2, 7, 2),
        (1, 2, 1),
        (10, 9, 10),  # below 10 replicas a step of one is beyond the 10 % tolerance
        (21, 20, 20),  # from 10 up, a change within 10 % is held
        (19, 20, 20),
        (23, 20, 23),
        # At exactly 10 %, float64 decides, as in the HPA's Go: 1 - 11/10 is just above 0.1,
        # 1 - 9/10 just below.
        (11, 10, 11),
        (9, 10, 10),
    ],
)
def test_the_hpa_lands_on_the_answer_outside_its_tolerance(
    answer: int, current: int, expected: int
) -> None:
    assert hpa_external_average_value(answer, current) == expected


def sample(replicas: int, queued: float, rate: float, now: float) -> Sample:
    return Sample(now, replicas, replicas, 0, queued, 0.0, rate, rate, 0.5, None)


def test_keda_activates_at_once_and_the_hpa_follows_at_its_sync() -> None:
    policy = KedaExternal(ScaleConfig(min_replicas=0, max_replicas=8, scale_to_zero_after_s=60))
    state = policy.initial_state()
    # From zero: the pushed activity scales to 1 in the same second.
    outcome = policy.decide(sample(0, 30.0, 0.0, 1.0), state, 1.0)
    assert outcome.replicas == 1 and outcome.reason.startswith("KEDA activates")
    # At 1: the HPA's first sync sizes to bazaar's answer (30 rows at 11.2 per replica: 3);
    # twice the queue then waits for the next sync, 15 s later.
    outcome = policy.decide(sample(1, 30.0, 0.0, 2.0), outcome.state, 2.0)
    assert outcome.replicas == 3 and outcome.reason.startswith("HPA")
    for now in range(3, 17):
        outcome = policy.decide(sample(3, 60.0, 0.0, now), outcome.state, float(now))
        assert outcome.replicas == 3, now
    outcome = policy.decide(sample(3, 60.0, 0.0, 17.0), outcome.state, 17.0)
    assert outcome.replicas == 6


def test_a_run_follows_bazaar_within_the_hpas_sync() -> None:
    """On a step, bazaar through KEDA reaches bazaar's count, each change on an HPA sync."""
    rates = np.concatenate([np.full(60, 100.0), np.full(120, 800.0)])
    trace = traces.from_rates("step", rates, 1, step_at_s=60.0, step_rate=800.0)
    config = SimConfig(cold_start_s=10)
    direct = simulate(trace, make_policy("bazaar", trace, config, SLO_MS), config)
    keda = simulate(trace, make_policy("bazaar-keda", trace, config, SLO_MS), config)
    assert keda.replicas[-1] == direct.replicas[-1]
    first = keda.actions[0].time_s
    assert all((a.time_s - first) % 15 == 0 for a in keda.actions)
    summary = report.summarize(keda, trace, 500)
    assert summary["react_s"] is not None and summary["react_s"] <= 15


def test_keda_takes_the_model_to_zero_after_bazaar_answers_zero() -> None:
    rates = np.concatenate([np.zeros(5), np.full(10, 20.0), np.zeros(150)])
    trace = traces.from_rates("sparse", rates, 1, min_replicas=0)
    config = SimConfig(cold_start_s=10)
    run = simulate(trace, make_policy("bazaar-keda", trace, config, SLO_MS), config, initial=0)
    assert (run.actions[0].before, run.actions[0].after) == (0, 1)
    assert run.actions[-1].after == 0 and run.actions[-1].reason.startswith("KEDA: inactive")
    assert int(np.sum(run.finished_ms < 0)) == len(run.rejected_ms) == 0
