"""A model's scaling settings from its Deployment's annotations, validated at load.

Pure: ``scale_config(annotations, where)`` maps the ``bazaar.dev/...`` annotations of one
Deployment to a ``ScaleConfig`` and raises ``ConfigError`` naming the Deployment (``where``),
the annotation and the bad value. A missing annotation takes ``ScaleConfig``'s default.

The ``bazaar.dev/`` annotation prefix on a model's Deployment belongs to bazaar: an unknown
key under it is refused, so a typo (``bazaar.dev/max-replica``) fails loudly instead of
silently scaling with the default.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from autoscaler.policy import ScaleConfig
from protocol.errors import ConfigError

PREFIX = "bazaar.dev/"
MIN_REPLICAS = PREFIX + "min-replicas"
MAX_REPLICAS = PREFIX + "max-replicas"
TARGET_QUEUE = PREFIX + "target-queue-per-replica"
TARGET_UTILIZATION = PREFIX + "target-utilization"
SCALE_TO_ZERO_AFTER = PREFIX + "scale-to-zero-after"
SIGNAL_DELAY = PREFIX + "signal-delay"
LATENCY_OBJECTIVE = PREFIX + "latency-objective"
KNOWN = (
    MIN_REPLICAS,
    MAX_REPLICAS,
    TARGET_QUEUE,
    TARGET_UTILIZATION,
    SCALE_TO_ZERO_AFTER,
    SIGNAL_DELAY,
    LATENCY_OBJECTIVE,
)

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def scale_config(annotations: Mapping[str, str], where: str) -> ScaleConfig:
    """The ScaleConfig the annotations ask for; ``where`` names their owner in errors."""
    for key in annotations:
        if key.startswith(PREFIX) and key not in KNOWN:
            raise ConfigError(where, key, f"unknown annotation; known: {', '.join(KNOWN)}")
    values = _Values(annotations, where)
    defaults = ScaleConfig()
    min_replicas = values.count(MIN_REPLICAS, defaults.min_replicas, minimum=0)
    max_replicas = values.count(MAX_REPLICAS, defaults.max_replicas, minimum=1)
    target_queue = values.number(TARGET_QUEUE, defaults.target_queue_per_replica)
    target_utilization = values.number(TARGET_UTILIZATION, defaults.target_utilization)
    if target_utilization > 1:
        raise values.error(TARGET_UTILIZATION, "must be a fraction in (0, 1], like 0.7")
    to_zero_after_s = values.duration(SCALE_TO_ZERO_AFTER)
    # How far the signals may lag (a Prometheus scrape plus query lag, say).
    signal_delay_s = values.duration(SIGNAL_DELAY)
    # The model's own objective: the policy's headroom is what keeps it.
    latency_objective_s = values.duration(LATENCY_OBJECTIVE)
    if max_replicas < min_replicas:
        raise values.error(MAX_REPLICAS, f"must be >= {MIN_REPLICAS} ({min_replicas})")
    if min_replicas == 0 and to_zero_after_s is None:
        raise values.error(MIN_REPLICAS, f"0 needs {SCALE_TO_ZERO_AFTER} (how long idle first)")
    return ScaleConfig(
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        target_queue_per_replica=target_queue,
        target_utilization=target_utilization,
        scale_to_zero_after_s=to_zero_after_s,
        signal_delay_s=defaults.signal_delay_s if signal_delay_s is None else signal_delay_s,
        latency_slo_s=defaults.latency_slo_s
        if latency_objective_s is None
        else latency_objective_s,
    )


def parse_duration(text: str) -> float:
    """Seconds in ``"300"``, ``"300s"``, ``"5m"``, ``"1h30m"``, ``"500ms"``; ValueError else."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(number + unit for number, unit in parts) != text:
            raise ValueError(text) from None
        seconds = sum(float(number) * _UNIT_S[unit] for number, unit in parts)
    if not math.isfinite(seconds):
        raise ValueError(text)
    return seconds


class _Values:
    """Typed reads of one annotation mapping; every error names the key and the value."""

    def __init__(self, annotations: Mapping[str, str], where: str) -> None:
        self.annotations = annotations
        self.where = where

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.where, key, f"{problem}, got {self.annotations.get(key)!r}")

    def count(self, key: str, default: int, *, minimum: int) -> int:
        text = self.annotations.get(key)
        if text is None:
            return default
        try:
            value = int(text.strip())
        except ValueError:
            raise self.error(key, f"must be an integer >= {minimum}") from None
        if value < minimum:
            raise self.error(key, f"must be an integer >= {minimum}")
        return value

    def number(self, key: str, default: float) -> float:
        text = self.annotations.get(key)
        if text is None:
            return default
        try:
            value = float(text.strip())
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise self.error(key, "must be a number > 0")
        return value

    def duration(self, key: str) -> float | None:
        text = self.annotations.get(key)
        if text is None:
            return None
        try:
            seconds = parse_duration(text)
        except ValueError:
            seconds = math.nan
        if not seconds > 0:  # also refuses NaN
            raise self.error(key, 'must be a duration > 0 like "300", "300s", "5m" or "1h30m"')
        return seconds
