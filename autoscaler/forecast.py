"""Arrival-rate forecast: Holt's linear smoothing on irregular samples, and how wrong it runs.

The policy has to size for the rate that will arrive when the replicas it asks for now are
ready, a start-up and a tick ahead. :func:`observe` folds each new rate into a level and a trend
(Holt's linear exponential smoothing, with smoothing weights from the time since the last
observation, so a 1 s direct read and a 15 s Prometheus scrape age alike); :func:`ahead`
extrapolates them. Each observation also files the forecast it makes for one horizon ahead, and
when that moment comes the shortfall (actual minus forecast, when positive) is folded into a
mean square: :attr:`RateForecast.shortfall_rms` is how far the rate has been running above the
forecast lately, the headroom the next start-up may need.

Failure modes: a trend is a straight line, so a turn (the top of a ramp, the end of a burst) is
overshot for a trend time constant, paid for in replica-seconds; a rise faster than the level can
follow is under-forecast until the shortfall catches up, paid for in SLO misses. A burst leaves a
large shortfall that decays over ``SHORTFALL_S``: capacity held for the next burst, which is what
a volatile load needs and a one-off spike does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LEVEL_S = 5.0
"""Time constant of the level, seconds: Poisson noise of a few seconds' rate averages out."""
TREND_S = 30.0
"""Time constant of the trend, seconds: about a start-up, the horizon it extrapolates over."""
SHORTFALL_S = 300.0
"""Time constant of the shortfall's mean square, seconds: how long volatility is remembered."""


@dataclass(frozen=True, slots=True)
class RateForecast:
    """What the forecast remembers between observations."""

    level: float
    """Smoothed rate at ``at_s``, rows/s."""
    trend: float
    """Smoothed change of the rate, rows/s per second."""
    at_s: float
    """Time of the last observation."""
    due: tuple[tuple[float, float], ...]
    """(time, rate forecast for that time) awaiting the rate observed then."""
    shortfall_sq: float
    """Mean square of the recent shortfalls, (rows/s)², from 0 at the first observation."""
    shortfall_at_s: float
    """When a shortfall was last folded in (the first observation before any)."""

    @property
    def shortfall_rms(self) -> float:
        """How far the rate has been running above the forecast lately, rows/s."""
        return math.sqrt(self.shortfall_sq)


def observe(
    forecast: RateForecast | None, rate: float, now: float, horizon_s: float
) -> RateForecast:
    """``forecast`` with ``rate`` observed at ``now``, and a forecast filed ``horizon_s`` ahead."""
    if forecast is None:
        return RateForecast(rate, 0.0, now, ((now + horizon_s, rate),), 0.0, now)
    dt = now - forecast.at_s
    if dt <= 0:
        return forecast
    predicted = forecast.level + forecast.trend * dt
    level = predicted + (1.0 - math.exp(-dt / LEVEL_S)) * (rate - predicted)
    slope = (level - forecast.level) / dt
    trend = forecast.trend + (1.0 - math.exp(-dt / TREND_S)) * (slope - forecast.trend)
    shortfall_sq, shortfall_at = forecast.shortfall_sq, forecast.shortfall_at_s
    matured = [expected for when, expected in forecast.due if when <= now]
    due = [(when, expected) for when, expected in forecast.due if when > now]
    if matured:
        shortfall = max(0.0, rate - min(matured)) ** 2
        kept = math.exp(-(now - shortfall_at) / SHORTFALL_S)
        shortfall_sq, shortfall_at = kept * shortfall_sq + (1.0 - kept) * shortfall, now
    updated = RateForecast(level, trend, now, (), shortfall_sq, shortfall_at)
    due.append((now + horizon_s, max(rate, ahead(updated, horizon_s))))
    return RateForecast(level, trend, now, tuple(due), shortfall_sq, shortfall_at)


def ahead(forecast: RateForecast, horizon_s: float) -> float:
    """The rate forecast ``horizon_s`` after the last observation, never below zero."""
    return max(0.0, forecast.level + forecast.trend * horizon_s)
