from __future__ import annotations

import pytest

from autoscaler.annotations import parse_duration, scale_config
from autoscaler.policy import ScaleConfig
from protocol.errors import ConfigError

WHERE = "deployment ns/bazaar-model-mlp"


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({}, ScaleConfig()),
        (
            {"unrelated.io/thing": "x", "bazaar.dev/max-replicas": " 4 "},
            ScaleConfig(max_replicas=4),
        ),
        (
            {"bazaar.dev/min-replicas": "2", "bazaar.dev/max-replicas": "2"},
            ScaleConfig(min_replicas=2, max_replicas=2),
        ),
        (
            {"bazaar.dev/target-queue-per-replica": "32", "bazaar.dev/target-utilization": "0.5"},
            ScaleConfig(target_queue_per_replica=32.0, target_utilization=0.5),
        ),
        ({"bazaar.dev/target-utilization": "1"}, ScaleConfig(target_utilization=1.0)),
        (
            {"bazaar.dev/min-replicas": "0", "bazaar.dev/scale-to-zero-after": "5m"},
            ScaleConfig(min_replicas=0, scale_to_zero_after_s=300.0),
        ),
        (
            {"bazaar.dev/scale-to-zero-after": "300s"},
            ScaleConfig(scale_to_zero_after_s=300.0),
        ),
        (
            {"bazaar.dev/scale-to-zero-after": "90"},
            ScaleConfig(scale_to_zero_after_s=90.0),
        ),
        ({"bazaar.dev/signal-delay": "45s"}, ScaleConfig(signal_delay_s=45.0)),
        ({"bazaar.dev/latency-objective": "200ms"}, ScaleConfig(latency_slo_s=0.2)),
        ({"bazaar.dev/latency-objective": "2"}, ScaleConfig(latency_slo_s=2.0)),
    ],
)
def test_good_annotations(annotations: dict[str, str], expected: ScaleConfig) -> None:
    assert scale_config(annotations, WHERE) == expected


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        (
            {"bazaar.dev/min-replicas": "-1"},
            "bazaar.dev/min-replicas: must be an integer >= 0, got '-1'",
        ),
        (
            {"bazaar.dev/min-replicas": "1.5"},
            "bazaar.dev/min-replicas: must be an integer >= 0, got '1.5'",
        ),
        (
            {"bazaar.dev/max-replicas": "ten"},
            "bazaar.dev/max-replicas: must be an integer >= 1, got 'ten'",
        ),
        (
            {"bazaar.dev/max-replicas": "0"},
            "bazaar.dev/max-replicas: must be an integer >= 1, got '0'",
        ),
        (
            {"bazaar.dev/min-replicas": "5", "bazaar.dev/max-replicas": "3"},
            "bazaar.dev/max-replicas: must be >= bazaar.dev/min-replicas (5), got '3'",
        ),
        (
            {"bazaar.dev/min-replicas": "0"},
            "bazaar.dev/min-replicas: 0 needs bazaar.dev/scale-to-zero-after (how long idle "
            "first), got '0'",
        ),
        (
            {"bazaar.dev/target-queue-per-replica": "0"},
            "bazaar.dev/target-queue-per-replica: must be a number > 0, got '0'",
        ),
        (
            {"bazaar.dev/target-queue-per-replica": "nan"},
            "bazaar.dev/target-queue-per-replica: must be a number > 0, got 'nan'",
        ),
        (
            {"bazaar.dev/target-utilization": "70%"},
            "bazaar.dev/target-utilization: must be a number > 0, got '70%'",
        ),
        (
            {"bazaar.dev/target-utilization": "70"},
            "bazaar.dev/target-utilization: must be a fraction in (0, 1], like 0.7, got '70'",
        ),
        (
            {"bazaar.dev/signal-delay": "-3s"},
            'bazaar.dev/signal-delay: must be a duration > 0 like "300", "300s", "5m" or '
            "\"1h30m\", got '-3s'",
        ),
        (
            {"bazaar.dev/scale-to-zero-after": "5 minutes"},
            'bazaar.dev/scale-to-zero-after: must be a duration > 0 like "300", "300s", "5m" or '
            "\"1h30m\", got '5 minutes'",
        ),
        (
            {"bazaar.dev/scale-to-zero-after": "0s"},
            'bazaar.dev/scale-to-zero-after: must be a duration > 0 like "300", "300s", "5m" or '
            "\"1h30m\", got '0s'",
        ),
        (
            {"bazaar.dev/max-replica": "4"},
            "bazaar.dev/max-replica: unknown annotation; known: bazaar.dev/min-replicas, "
            "bazaar.dev/max-replicas, bazaar.dev/target-queue-per-replica, "
            "bazaar.dev/target-utilization, bazaar.dev/scale-to-zero-after, "
            "bazaar.dev/signal-delay, bazaar.dev/latency-objective",
        ),
        (
            {"bazaar.dev/latency-objective": "0ms"},
            'bazaar.dev/latency-objective: must be a duration > 0 like "300", "300s", "5m" or '
            "\"1h30m\", got '0ms'",
        ),
    ],
)
def test_bad_annotations(annotations: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        scale_config(annotations, WHERE)
    assert str(raised.value) == f"{WHERE}: {message}"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("300", 300.0), ("2.5", 2.5), ("300s", 300.0), ("5m", 300.0), ("1h30m", 5400.0),
     ("1m30s", 90.0), ("500ms", 0.5), (" 10s ", 10.0)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "5x", "5 m", "m5", "1h-30m", "inf", "5m5"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)
