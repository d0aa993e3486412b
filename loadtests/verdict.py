"""Outcomes of requests, and the SLO verdict over a run's tally.

Pure functions, stdlib only: the locustfile imports ``classify`` and ``latency_bucket`` inside
Locust's processes, and the runner judges the tally those processes wrote.

The verdict has two checks. The p99 latency is over successful requests alone, since a shed
request answered in a millisecond would otherwise improve it. The error rate counts every
request that did not succeed (shed, expired, client and server errors, transport errors)
plus, in open loop, the requests the generator could not send on schedule, over all the
requests that were due. A run without one success fails: there is nothing to judge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

OUTCOMES = (
    "ok",
    "shed",
    "expired",
    "client_error",
    "server_error",
    "transport_error",
    "missed_schedule",
)
"""``missed_schedule``: open loop only, due but not sent (the outstanding bound was reached)."""


def classify(status: int) -> str:
    """The outcome of an HTTP status (0 = no answer)."""
    if status == 200:
        return "ok"
    if status in (429, 503):
        return "shed"
    if status == 504:
        return "expired"
    if status == 0:
        return "transport_error"
    return "client_error" if 400 <= status < 500 else "server_error"


def latency_bucket(ms: float) -> int:
    """Locust's rounding: whole milliseconds below 100, then two significant digits."""
    if ms < 100:
        return round(ms)
    return int(round(ms, -1 if ms < 1000 else -2))


def percentile(histogram: Mapping[int, int], fraction: float) -> float | None:
    """The smallest bucket at or below which ``fraction`` of the counts fall; None if empty."""
    total = sum(histogram.values())
    if not total:
        return None
    wanted = fraction * total
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= wanted:
            return float(bucket)
    return float(max(histogram))


@dataclass(frozen=True, slots=True)
class Slo:
    p99_ms: float
    """Highest acceptable p99 latency of successful requests, in milliseconds."""
    max_error_rate: float
    """Highest acceptable fraction of due requests that did not succeed (0..1)."""


@dataclass(frozen=True, slots=True)
class RunResult:
    """What the load generator saw, from the tally its processes wrote."""

    outcomes: Mapping[str, Mapping[str, int]]
    """Model -> outcome -> requests."""
    ok_ms: Mapping[int, int]
    """Latency histogram of successful requests: rounded milliseconds -> requests."""
    elapsed_s: float

    @classmethod
    def from_tally(cls, tally: Mapping[str, object]) -> RunResult:
        outcomes: dict[str, dict[str, int]] = {}
        counts = tally.get("outcomes")
        assert isinstance(counts, dict)
        for key, count in counts.items():
            model, _, outcome = key.rpartition("/")
            outcomes.setdefault(model, dict.fromkeys(OUTCOMES, 0))[outcome] = int(count)
        ok_ms = tally.get("ok_ms")
        assert isinstance(ok_ms, dict)
        started, stopped = tally.get("started"), tally.get("stopped")
        elapsed = (
            float(stopped) - float(started)
            if isinstance(started, float | int) and isinstance(stopped, float | int)
            else 0.0
        )
        return cls(outcomes, {int(ms): int(n) for ms, n in ok_ms.items()}, max(elapsed, 0.0))

    def total(self, outcome: str) -> int:
        return sum(counts.get(outcome, 0) for counts in self.outcomes.values())

    @property
    def sent(self) -> int:
        """Requests that left the generator (every outcome but a missed schedule)."""
        return sum(self.total(o) for o in OUTCOMES if o != "missed_schedule")

    @property
    def due(self) -> int:
        return self.sent + self.total("missed_schedule")

    @property
    def error_rate(self) -> float:
        return (self.due - self.total("ok")) / self.due if self.due else 0.0

    def latency_ms(self, fraction: float) -> float | None:
        return percentile(self.ok_ms, fraction)

    @property
    def throughput_rps(self) -> float:
        """Successful requests per second of the run."""
        return self.total("ok") / self.elapsed_s if self.elapsed_s else 0.0


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    measured: str
    required: str
    passed: bool


def judge(result: RunResult, slo: Slo) -> tuple[Check, ...]:
    p99 = result.latency_ms(0.99)
    return (
        Check(
            "p99 latency of successes",
            "no success" if p99 is None else f"{p99:g} ms",
            f"<= {slo.p99_ms:g} ms",
            p99 is not None and p99 <= slo.p99_ms,
        ),
        Check(
            "error rate",
            f"{result.error_rate:.2%}",
            f"<= {slo.max_error_rate:.2%}",
            result.due > 0 and result.error_rate <= slo.max_error_rate,
        ),
    )


def verdict_table(checks: tuple[Check, ...]) -> str:
    rows = [("check", "measured", "required", "verdict")]
    rows += [(c.name, c.measured, c.required, "PASS" if c.passed else "FAIL") for c in checks]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def outcome_line(result: RunResult) -> str:
    """``1200 sent: 1190 ok, 10 shed, ...``: every outcome by name, zeros included."""
    parts = [f"{result.total(o)} {o.replace('_', ' ')}" for o in OUTCOMES]
    return f"{result.sent} sent: " + ", ".join(parts)
