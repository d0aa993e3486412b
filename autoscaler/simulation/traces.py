"""Workload traces for the simulator: an intensity per second and the arrivals drawn from it.

A trace is generated once per (trace, seed) and shared by every policy, so policies are compared
on byte-identical input. Arrivals are Poisson within each second: the count of second ``s`` is
drawn from ``Poisson(rate_per_s[s])`` and its arrivals fall uniformly in that second, in integer
milliseconds (a non-homogeneous Poisson process at 1 s resolution). The intensity is kept beside
the arrivals because the oracle reference provisions from it.

Built-in shapes (docs/autoscaling.md, "The simulation benchmark"): ``step`` 200 → 1600 → 200
req/s, ``diurnal`` one period of ``800 (1 + 0.75 sin(2πt/3600))``, ``bursty`` two-state
(300/1500 req/s, mean stays 300/60 s), ``flash`` 200 then a 10 s ramp to 3000, 120 s hold and an
exponential decay, ``sparse`` six 60 s bursts at 50 req/s after 600 s of silence,
``heavy-tail`` spikes of Pareto-distributed height and length on a 150 req/s floor, ``ramp`` an
hour from 40 to 1700 req/s, ``drop`` 400 req/s, ten minutes of nothing (scale to zero) and back,
``weekly`` a week compressed to 70 minutes (five busy days, two quiet ones).

A trace file is a CSV. Lines starting with ``#`` before the header are settings, ``# name:
value``; the one setting is ``min_replicas``, the floor every policy gets (default 1; 0 lets
them scale to zero). The header says what the rows are: ``timestamp_s`` (one arrival per row,
seconds, replayed as is from the first), ``rate_per_s`` (one second per row), or
``time_s,rate_per_s`` (a rate from that time, seconds, until the next row's; the last row lasts
as long as the one before it), so per-minute counts and epoch timestamps need no resampling.
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from autoscaler.simulation.catalog import TRACES


@dataclass(frozen=True, slots=True)
class Trace:
    """One workload: what arrives, when."""

    name: str
    """Built-in name or the file's stem."""
    rate_per_s: npt.NDArray[np.float64]
    """Arrival intensity of each second (requests per second); its length is the duration."""
    arrivals_ms: npt.NDArray[np.int64]
    """Arrival times, sorted, integer milliseconds from the start."""
    min_replicas: int = 1
    """Floor every policy gets on this trace (0 where scaling to zero is the point)."""
    step_at_s: float | None = None
    """When the trace steps up, for the step-response metrics; None without a step."""
    step_rate: float | None = None
    """The rate after the step (requests per second)."""

    @property
    def duration_s(self) -> int:
        return len(self.rate_per_s)

    def truncated(self, duration_s: int) -> Trace:
        """The first ``duration_s`` seconds of this trace."""
        end = int(np.searchsorted(self.arrivals_ms, duration_s * 1000, side="left"))
        step = (
            self.step_at_s if self.step_at_s is not None and self.step_at_s < duration_s else None
        )
        return Trace(
            self.name,
            self.rate_per_s[:duration_s],
            self.arrivals_ms[:end],
            self.min_replicas,
            step,
            self.step_rate if step is not None else None,
        )


class TraceError(ValueError):
    """A trace name or file that cannot be used; the message says why."""


def poisson_arrivals(
    rate_per_s: npt.NDArray[np.float64], rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """Poisson arrivals within each second of a piecewise-constant intensity, sorted, in ms."""
    counts = rng.poisson(rate_per_s)
    starts = np.repeat(np.arange(len(rate_per_s), dtype=np.int64) * 1000, counts)
    offsets = rng.integers(0, 1000, size=len(starts), dtype=np.int64)
    return np.sort(starts + offsets)


def from_rates(
    name: str,
    rate_per_s: npt.NDArray[np.float64],
    seed: int,
    *,
    min_replicas: int = 1,
    step_at_s: float | None = None,
    step_rate: float | None = None,
) -> Trace:
    """A trace with Poisson arrivals drawn from ``rate_per_s`` with ``seed``."""
    rng = np.random.default_rng(seed)
    return Trace(
        name, rate_per_s, poisson_arrivals(rate_per_s, rng), min_replicas, step_at_s, step_rate
    )


def compressed(trace: Trace, duration_s: int, seed: int, peak_rps: float | None = None) -> Trace:
    """``trace`` in ``duration_s`` seconds, each the mean of its share of the original (so the
    rate at each moment is the original's at the same point of the trace), scaled so that its
    busiest second is ``peak_rps`` when one is given; arrivals drawn anew with ``seed``."""
    if not 0 < duration_s <= trace.duration_s:
        raise TraceError(
            f"{trace.name} lasts {trace.duration_s} s: it compresses to 1 to that many seconds, "
            f"not {duration_s}"
        )
    edges = np.linspace(0, trace.duration_s, duration_s + 1).round().astype(int)
    rates = np.array([trace.rate_per_s[a:b].mean() for a, b in itertools.pairwise(edges)])
    if peak_rps is not None:
        rates *= peak_rps / rates.max()
    return from_rates(f"{trace.name}-compressed", rates, seed, min_replicas=trace.min_replicas)


def builtin(name: str, seed: int) -> Trace:
    """One of the built-in traces, generated with ``seed``."""
    if name == "step":
        rates = np.concatenate([np.full(300, 200.0), np.full(600, 1600.0), np.full(300, 200.0)])
        return from_rates(name, rates, seed, step_at_s=300.0, step_rate=1600.0)
    if name == "diurnal":
        t = np.arange(3600) + 0.5
        return from_rates(name, 800.0 * (1.0 + 0.75 * np.sin(2 * math.pi * t / 3600.0)), seed)
    if name == "bursty":
        return from_rates(name, _two_state(3600, seed), seed)
    if name == "flash":
        t = np.arange(1200) + 0.5
        ramp = 200.0 + 2800.0 * np.clip((t - 300.0) / 10.0, 0.0, 1.0)
        decay = 200.0 + 2800.0 * np.exp(-(t - 430.0) / 180.0)
        rates = np.where(t < 430.0, ramp, decay)
        return from_rates(name, rates, seed, step_at_s=300.0, step_rate=3000.0)
    if name == "sparse":
        cycle = np.concatenate([np.zeros(600), np.full(60, 50.0)])
        return from_rates(name, np.tile(cycle, 6), seed, min_replicas=0)
    if name == "heavy-tail":
        return from_rates(name, _pareto_spikes(3600, seed), seed)
    if name == "ramp":
        return from_rates(name, np.linspace(40.0, 1700.0, 3600), seed)
    if name == "drop":
        rates = np.concatenate([np.full(600, 400.0), np.zeros(600), np.full(600, 400.0)])
        return from_rates(name, rates, seed, min_replicas=0)
    if name == "weekly":
        return from_rates(name, _week(600), seed)
    raise TraceError(f"unknown trace {name!r}: use one of {', '.join(TRACES)} or a CSV file")


def _two_state(duration_s: int, seed: int) -> npt.NDArray[np.float64]:
    """Markov-modulated intensity: 300 req/s for Exp(300 s), then 1500 req/s for Exp(60 s), ..."""
    # A generator of its own, so the state path does not shift the arrival draws.
    rng = np.random.default_rng([seed, 2])
    rates = np.empty(duration_s)
    t, high = 0, False
    while t < duration_s:
        stay = max(1, round(rng.exponential(60.0 if high else 300.0)))
        rates[t : t + stay] = 1500.0 if high else 300.0
        t += stay
        high = not high
    return rates


def _pareto_spikes(duration_s: int, seed: int) -> npt.NDArray[np.float64]:
    """150 req/s with spikes every Exp(240 s): height 150 x Pareto(1.5) req/s on top (at most
    4000), length 20 x Pareto(1.5) s (at most 600): most spikes small and short, a few huge.
    None starts in the last 600 s, so the release after every spike is part of the trace."""
    rng = np.random.default_rng([seed, 3])
    rates = np.full(duration_s, 150.0)
    t = round(rng.exponential(240.0))
    while t < duration_s - 600:
        height = min(4000.0, 150.0 * (1.0 + rng.pareto(1.5)))
        length = min(600, round(20.0 * (1.0 + rng.pareto(1.5))))
        rates[t : t + length] += height
        t += length + max(1, round(rng.exponential(240.0)))
    return rates


def _week(day_s: int) -> npt.NDArray[np.float64]:
    """Seven days of ``day_s`` seconds each: 60 req/s at night, a midday peak of 1200 req/s on
    the five weekdays and of 400 req/s at the weekend."""
    phase = (np.arange(day_s) + 0.5) / day_s
    shape = np.sin(np.pi * phase) ** 2
    peaks = [1200.0] * 5 + [400.0] * 2
    days = [60.0 + (peak - 60.0) * shape for peak in peaks]
    return np.concatenate(days)


def load(name_or_path: str, seed: int) -> Trace:
    """A built-in trace by name, or a trace file by path."""
    if name_or_path in TRACES:
        return builtin(name_or_path, seed)
    path = Path(name_or_path)
    if not path.is_file():
        raise TraceError(f"{name_or_path!r} is neither a built-in trace nor a file")
    return from_file(path, seed)


def from_file(path: Path, seed: int) -> Trace:
    """A CSV of arrival timestamps, of per-second rates, or of rates at timestamps, after its
    settings (module docstring)."""
    with path.open(newline="") as f:
        lines = f.read().splitlines()
    settings = {"min_replicas": 1}
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        setting = lines.pop(0).lstrip("#").strip()
        if setting:
            settings |= _setting(path, setting, settings)
    rows = [row for row in csv.reader(lines) if row]
    if not rows:
        raise TraceError(f"{path}: no header (timestamp_s, rate_per_s or time_s,rate_per_s)")
    header = ",".join(cell.strip() for cell in rows[0])
    columns = 2 if header == "time_s,rate_per_s" else 1
    try:
        values = np.array([[float(v) for v in row[:columns]] for row in rows[1:]], np.float64)
    except ValueError as e:
        raise TraceError(f"{path}: {e}") from None
    if len(values) == 0 or values.shape[1] != columns or not np.all(np.isfinite(values)):
        raise TraceError(f"{path}: needs at least one row of {columns} finite number(s)")
    if np.any(values[:, -1] < 0):
        raise TraceError(f"{path}: needs non-negative values")
    floor = settings["min_replicas"]
    if header == "rate_per_s":
        return from_rates(path.stem, values[:, 0], seed, min_replicas=floor)
    if header == "time_s,rate_per_s":
        return from_rates(path.stem, _held_rates(path, values), seed, min_replicas=floor)
    if header == "timestamp_s":
        stamps = values[:, 0]
        arrivals = np.sort(np.round((stamps - stamps.min()) * 1000.0).astype(np.int64))
        duration_s = int(arrivals[-1] // 1000) + 1
        rates = np.bincount(arrivals // 1000, minlength=duration_s).astype(np.float64)
        return Trace(path.stem, rates, arrivals, floor)
    raise TraceError(
        f"{path}: the header must be 'timestamp_s', 'rate_per_s' or 'time_s,rate_per_s', "
        f"not {header!r}"
    )


def _setting(path: Path, line: str, settings: dict[str, int]) -> dict[str, int]:
    """One ``name: value`` line of a trace file's settings, checked."""
    name, _, value = (part.strip() for part in line.partition(":"))
    if name not in settings:
        raise TraceError(f"{path}: unknown setting {name!r} (known: {', '.join(settings)})")
    if not value.isdigit():
        raise TraceError(f"{path}: {name} must be an integer >= 0, not {value!r}")
    return {name: int(value)}


def _held_rates(path: Path, rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Per-second rates from (time, rate) rows, each rate held until the next row's time."""
    starts = np.round(rows[:, 0] - rows[0, 0]).astype(np.int64)
    if np.any(np.diff(starts) < 1):
        raise TraceError(f"{path}: time_s must grow by at least 1 s from row to row")
    last = int(starts[-1] - starts[-2]) if len(starts) > 1 else 1
    lengths = np.diff(np.append(starts, starts[-1] + last))
    return np.repeat(rows[:, 1], lengths)
