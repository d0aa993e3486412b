"""What the benchmark found: the targets, judged, and markdown tables of every number.

Pure functions over the collected points, so the same results always print the same way.
A target whose inputs were not measured (``--models`` left a model out) reads ``n/a``,
never PASS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loadtests.ortbench import OrtPoint


@dataclass(frozen=True, slots=True)
class HttpPoint:
    """One closed-loop wrk point."""

    scenario: str
    """Which server and body, e.g. ``bazaar mlp JSON``."""
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    mean_batch: float | None = None
    """Rows per batch the gateway sent to its pod during the point; None off bazaar."""


@dataclass(frozen=True, slots=True)
class BatchLatency:
    """Median time of one batch, through a model server and in-process."""

    model: str
    batch: int
    server_p50_ms: float
    ort_p50_ms: float


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    measured: str
    required: str
    passed: bool | None
    """None when it could not be judged."""

    @property
    def verdict(self) -> str:
        return "n/a" if self.passed is None else "PASS" if self.passed else "MISS"


def find(points: Sequence[HttpPoint], scenario: str, connections: int) -> HttpPoint | None:
    for point in points:
        if point.scenario == scenario and point.connections == connections:
            return point
    return None


def best_batch(points: Sequence[OrtPoint]) -> OrtPoint:
    return max(points, key=lambda point: point.rows_per_s)


def judge(points: Sequence[HttpPoint], ort: dict[str, list[OrtPoint]]) -> list[Target]:
    """The targets for bazaar's mlp JSON at c=64 (and c=1), and mlp_wide binary at c=64."""
    mlp = find(points, "bazaar mlp JSON", 64)
    mlp_c1 = find(points, "bazaar mlp JSON", 1)
    plain = find(points, "plain mlp JSON", 64)
    trivial = find(points, "trivial", 64)
    wide = find(points, "bazaar mlp_wide binary", 64)
    wide_ort = best_batch(ort["mlp_wide"]) if ort.get("mlp_wide") else None
    return [
        _ratio("mlp JSON c=64 throughput vs plain endpoint c=64", mlp, plain, 1.3),
        _ratio("mlp JSON c=64 throughput vs trivial endpoint c=64", mlp, trivial, 0.40),
        Target(
            "mlp JSON c=64 p99",
            "-" if mlp is None else f"{mlp.p99_ms:.2f} ms",
            "<= 40 ms",
            None if mlp is None else mlp.p99_ms <= 40.0,
        ),
        Target(
            "mlp JSON c=1 p50",
            "-" if mlp_c1 is None else f"{mlp_c1.p50_ms:.3f} ms",
            "<= 1 ms",
            None if mlp_c1 is None else mlp_c1.p50_ms <= 1.0,
        ),
        Target(
            "mlp_wide binary c=64 rows/s vs raw ORT best batch",
            "-"
            if wide is None or wide_ort is None
            else f"{wide.rps:.0f} / {wide_ort.rows_per_s:.0f} (batch {wide_ort.batch})"
            f" = {wide.rps / wide_ort.rows_per_s:.2f}x",
            ">= 0.75x",
            None if wide is None or wide_ort is None else wide.rps >= 0.75 * wide_ort.rows_per_s,
        ),
    ]


def _ratio(name: str, ours: HttpPoint | None, theirs: HttpPoint | None, at_least: float) -> Target:
    if ours is None or theirs is None:
        return Target(name, "-", f">= {at_least:.2f}x", None)
    ratio = ours.rps / theirs.rps
    return Target(
        name,
        f"{ours.rps:.0f} / {theirs.rps:.0f} = {ratio:.2f}x",
        f">= {at_least:.2f}x",
        ratio >= at_least,
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def http_table(points: Sequence[HttpPoint]) -> str:
    return table(
        ["scenario", "c", "req/s", "p50 ms", "p99 ms", "mean batch"],
        [
            [
                point.scenario,
                str(point.connections),
                f"{point.rps:.0f}",
                f"{point.p50_ms:.2f}",
                f"{point.p99_ms:.2f}",
                "" if point.mean_batch is None else f"{point.mean_batch:.1f}",
            ]
            for point in points
        ],
    )


def target_table(targets: Sequence[Target]) -> str:
    return table(
        ["target", "measured", "required", "verdict"],
        [[t.name, t.measured, t.required, t.verdict] for t in targets],
    )


def ort_table(ort: dict[str, list[OrtPoint]]) -> str:
    rows = []
    for model, points in ort.items():
        best = best_batch(points)
        for point in points:
            rows.append(
                [
                    model,
                    str(point.batch),
                    f"{point.p50_ms:.3f}",
                    f"{point.rows_per_s:.0f}",
                    "best" if point is best else "",
                ]
            )
    return table(["model", "batch", "p50 ms/call", "rows/s", ""], rows)


def batch_latency_table(latencies: Sequence[BatchLatency]) -> str:
    return table(
        ["model", "batch", "model server p50 ms", "in-process ORT p50 ms", "server overhead ms"],
        [
            [
                item.model,
                str(item.batch),
                f"{item.server_p50_ms:.3f}",
                f"{item.ort_p50_ms:.3f}",
                f"{item.server_p50_ms - item.ort_p50_ms:.3f}",
            ]
            for item in latencies
        ],
    )
