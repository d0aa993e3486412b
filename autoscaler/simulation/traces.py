"""Workload traces for the simulator: an intensity per second and the arrivals drawn from it.

A trace is generated once per (trace, seed) and shared by every policy, so policies are compared
on byte-identical input. Arrivals are Poisson within each second: the count of second ``s`` is
drawn from ``Poisson(rate_per_s[s])`` and its arrivals fall uniformly in that second, in integer
milliseconds (a non-homogeneous Poisson process at 1 s resolution). The intensity is kept beside
the arrivals because the oracle reference provisions from it.

Built-in shapes (docs/autoscaling.md, "The simulation benchmark"): ``step`` 200 → 1600 → 200
req/s, ``diurnal`` one period of ``800 (1 + 0.75 sin(2πt/3600))``, ``bursty`` two-state
(300/1500 req/s, mean stays 300/60 s), ``flash`` 200 then a 10 s ramp to 3000, 120 s hold and an
exponential decay, ``sparse`` six 60 s bursts at 50 req/s after 600 s of silence. A trace file is
a one-column CSV whose header says what the rows are: ``timestamp_s`` (one arrival per row,
seconds) or ``rate_per_s`` (one second per row). A file of timestamps is replayed as is; its
intensity is the per-second count.
"""

from __future__ import annotations

import csv
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


def builtin(name: str, seed: int) -> Trace:
    """One of the five built-in traces, generated with ``seed``."""
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


def load(name_or_path: str, seed: int) -> Trace:
    """A built-in trace by name, or a trace file by path."""
    if name_or_path in TRACES:
        return builtin(name_or_path, seed)
    path = Path(name_or_path)
    if not path.is_file():
        raise TraceError(f"{name_or_path!r} is neither a built-in trace nor a file")
    return from_file(path, seed)


def from_file(path: Path, seed: int) -> Trace:
    """A CSV of arrival timestamps (``timestamp_s``) or of per-second rates (``rate_per_s``)."""
    with path.open(newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    if not rows:
        raise TraceError(f"{path}: empty trace file")
    header = rows[0][0].strip()
    try:
        values = np.array([float(row[0]) for row in rows[1:]], dtype=np.float64)
    except ValueError as e:
        raise TraceError(f"{path}: {e}") from None
    if len(values) == 0 or not np.all(np.isfinite(values)) or np.any(values < 0):
        raise TraceError(f"{path}: needs at least one finite, non-negative value")
    if header == "rate_per_s":
        return from_rates(path.stem, values, seed)
    if header == "timestamp_s":
        arrivals = np.sort(np.round((values - values.min()) * 1000.0).astype(np.int64))
        duration_s = int(arrivals[-1] // 1000) + 1
        rates = np.bincount(arrivals // 1000, minlength=duration_s).astype(np.float64)
        return Trace(path.stem, rates, arrivals)
    raise TraceError(f"{path}: the header must be 'timestamp_s' or 'rate_per_s', not {header!r}")
