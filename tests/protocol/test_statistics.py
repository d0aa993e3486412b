"""Triton's statistics extension: what is counted when, and the JSON Triton answers."""

from __future__ import annotations

from protocol.statistics import InferenceStatistics

MODEL_STAT_FIELDS = {
    "name",
    "version",
    "last_inference",
    "inference_count",
    "execution_count",
    "inference_stats",
    "response_stats",
    "batch_stats",
    "memory_usage",
}
"""Triton's ``$model_stat`` (``extension_statistics.md``)."""
INFERENCE_STATS_FIELDS = {
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
}


def test_a_new_model_version_has_every_field_at_zero() -> None:
    stat = InferenceStatistics(clock=lambda: 1.0).to_json("m", "1")
    assert set(stat) == MODEL_STAT_FIELDS
    assert (stat["name"], stat["version"]) == ("m", "1")
    assert (stat["last_inference"], stat["inference_count"], stat["execution_count"]) == (0, 0, 0)
    assert set(stat["inference_stats"]) == INFERENCE_STATS_FIELDS
    assert all(d == {"count": 0, "ns": 0} for d in stat["inference_stats"].values())
    assert (stat["response_stats"], stat["batch_stats"], stat["memory_usage"]) == ({}, [], [])


def test_requests_and_batches_count_as_triton_counts_them() -> None:
    now = [1_700_000_000.25]
    statistics = InferenceStatistics(clock=lambda: now[0])
    # Two requests (2 and 3 rows) ran in one batch of 5; a third ran alone; a fourth failed.
    statistics.executed(5, 2, queue_s=0.003, input_s=0.001, infer_s=0.010, output_s=0.002)
    statistics.answered(True, 2, 0.020)
    statistics.answered(True, 3, 0.021)
    now[0] += 1
    statistics.executed(1, 1, queue_s=0.0, input_s=0.0005, infer_s=0.004, output_s=0.001)
    statistics.answered(True, 1, 0.006)
    statistics.answered(False, 0, 0.0001)

    stat = statistics.to_json("m", "3")
    assert stat["last_inference"] == 1_700_000_001_250
    assert stat["inference_count"] == 6  # rows, not requests
    assert stat["execution_count"] == 2
    stats = stat["inference_stats"]
    assert stats["success"] == {"count": 3, "ns": 47_000_000}
    assert stats["fail"] == {"count": 1, "ns": 100_000}
    assert stats["queue"] == {"count": 3, "ns": 3_000_000}
    # Each request counts its whole batch's compute: 2 x batch one + 1 x batch two.
    assert stats["compute_input"] == {"count": 3, "ns": 2 * 1_000_000 + 500_000}
    assert stats["compute_infer"] == {"count": 3, "ns": 2 * 10_000_000 + 4_000_000}
    assert stats["compute_output"] == {"count": 3, "ns": 2 * 2_000_000 + 1_000_000}
    assert stat["batch_stats"] == [
        {
            "batch_size": 1,
            "compute_input": {"count": 1, "ns": 500_000},
            "compute_infer": {"count": 1, "ns": 4_000_000},
            "compute_output": {"count": 1, "ns": 1_000_000},
        },
        {
            "batch_size": 5,
            "compute_input": {"count": 1, "ns": 1_000_000},
            "compute_infer": {"count": 1, "ns": 10_000_000},
            "compute_output": {"count": 1, "ns": 2_000_000},
        },
    ]


def test_last_inference_never_goes_back_with_the_wall_clock() -> None:
    now = [100.0]
    statistics = InferenceStatistics(clock=lambda: now[0])
    statistics.executed(1, 1, 0, 0, 0, 0)
    now[0] = 50.0  # NTP stepped the clock back
    statistics.executed(1, 1, 0, 0, 0, 0)
    assert statistics.to_json("m", "1")["last_inference"] == 100_000
