"""The rate forecast: Holt's level and trend on irregular samples, and its recent shortfall."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autoscaler.forecast import SHORTFALL_S, RateForecast, ahead, observe


def fed(rates: list[float], every_s: float = 1.0, horizon_s: float = 30.0) -> RateForecast:
    forecast = None
    for i, rate in enumerate(rates):
        forecast = observe(forecast, rate, i * every_s, horizon_s)
    assert forecast is not None
    return forecast


@pytest.mark.parametrize("every_s", [1.0, 15.0])
def test_a_ramp_is_extrapolated_whatever_the_refresh(every_s: float) -> None:
    # 2 rows/s more every second, read every second or scraped every 15 s.
    seconds = np.arange(0.0, 1200.0, every_s)
    forecast = fed([100.0 + 2.0 * t for t in seconds], every_s)
    now = 100.0 + 2.0 * seconds[-1]
    assert forecast.trend == pytest.approx(2.0, rel=0.02)
    assert ahead(forecast, 30.0) == pytest.approx(now + 60.0, rel=0.01)


def test_noise_around_a_flat_rate_has_no_trend() -> None:
    rng = np.random.default_rng(1)
    forecast = fed(list(rng.poisson(800 * 5, 600) / 5))
    assert abs(forecast.trend) < 1.0
    assert ahead(forecast, 30.0) == pytest.approx(800.0, rel=0.03)


def test_never_forecasts_below_zero() -> None:
    forecast = fed([1000.0 - 20.0 * t for t in range(50)] + [0.0] * 5)
    assert forecast.trend < 0
    assert ahead(forecast, 300.0) == 0.0


def test_a_step_leaves_a_shortfall_that_decays() -> None:
    flat = fed([200.0] * 100)
    assert flat.shortfall_rms == 0.0
    stepped = fed([200.0] * 100 + [1600.0] * 60)
    # The forecasts filed before the step, 30 s ahead, fell short by 1400 rows/s.
    assert stepped.shortfall_rms > 200.0
    later = fed([200.0] * 100 + [1600.0] * 60 + [1600.0] * 600)
    expected = stepped.shortfall_rms * math.exp(-600 / SHORTFALL_S / 2)
    assert later.shortfall_rms == pytest.approx(expected, rel=0.05)


def test_over_forecasting_is_no_shortfall() -> None:
    # A drop: every forecast was too high, none too low.
    assert fed([1600.0] * 100 + [200.0] * 100).shortfall_rms == 0.0


def test_an_observation_at_the_same_time_changes_nothing() -> None:
    forecast = fed([100.0, 110.0])
    assert observe(forecast, 500.0, forecast.at_s, 30.0) == forecast
