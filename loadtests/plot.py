"""One PNG of a load-test run: where the offered load went, and where the system saturated.

Panels share the time axis (seconds since the start):

1. load: the offered load (users for a closed loop, on the right axis; the arrival rate for
   the open loop, or the requests due each second of a trace's schedule) against the
   throughput that came back (successes and failures per second);
2. latency: p50 and p99 over Locust's last-10-second window, with the SLO's p99 as a line and
   the first moment p99 went over it marked on every panel;
3. only when the target is bazaar: the gateway's queue depth and ready endpoints (replicas)
   per model, read from its ``/metrics`` during the run. Each model's replica line is
   shifted by a few hundredths of a replica, so models with equal counts stay distinguishable.

Legends sit outside the panels, to the right, so they never hide data.

Saturation reads as throughput flattening while the offered load still rises, latency turning
up and the queue growing, all at the same x. ``matplotlib.figure.Figure`` is drawn without
pyplot, so no global backend or figure state is touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


@dataclass(frozen=True, slots=True)
class TimelinePoint:
    """One line of the locustfile's timeline."""

    t: float
    """Unix time, seconds."""
    users: int
    requests: int
    """Sent so far."""
    failures: int
    p50_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True, slots=True)
class MetricsSample:
    """The gateway's ``/metrics`` at one moment (bazaar targets only)."""

    t: float
    queue_depth: Mapping[str, float]
    replicas: Mapping[str, float]
    """Ready endpoints per model."""
    requests: Mapping[tuple[str, str], float]
    """(model, outcome) -> ``bazaar_gateway_requests_total``."""


def rates(timeline: Sequence[TimelinePoint]) -> list[tuple[float, float, float]]:
    """(t, successes/s, failures/s) between consecutive points."""
    out = []
    for before, after in pairwise(timeline):
        span = after.t - before.t
        if span <= 0:
            continue
        failed = after.failures - before.failures
        succeeded = after.requests - before.requests - failed
        out.append((after.t, succeeded / span, failed / span))
    return out


def first_over(timeline: Sequence[TimelinePoint], slo_p99_ms: float) -> float | None:
    """When the windowed p99 first went over the SLO; None if it never did."""
    for point in timeline:
        if point.p99_ms is not None and point.p99_ms > slo_p99_ms:
            return point.t
    return None


REPLICA_SHIFT = 0.04
"""Replicas between two models' lines when their counts are equal."""


def plot_run(
    path: Path,
    title: str,
    timeline: Sequence[TimelinePoint],
    samples: Sequence[MetricsSample],
    slo_p99_ms: float,
    arrival_rate: float | Sequence[float] | None,
) -> None:
    """Draw the run to ``path``; ``arrival_rate`` is the open loop's offered rate (constant, or
    per second from the start), else None."""
    draw_run(title, timeline, samples, slo_p99_ms, arrival_rate).savefig(path, dpi=100)


def draw_run(
    title: str,
    timeline: Sequence[TimelinePoint],
    samples: Sequence[MetricsSample],
    slo_p99_ms: float,
    arrival_rate: float | Sequence[float] | None,
) -> Figure:
    start = timeline[0].t if timeline else samples[0].t if samples else 0.0
    panels = 3 if samples else 2
    figure = Figure(figsize=(11, 3.2 * panels), layout="constrained")
    axes: list[Axes] = list(figure.subplots(panels, 1, sharex=True, squeeze=False)[:, 0])
    figure.suptitle(title)

    load = axes[0]
    flow = rates(timeline)
    load.plot([t - start for t, _, _ in flow], [ok for _, ok, _ in flow], label="successes/s")
    load.plot([t - start for t, _, _ in flow], [bad for _, _, bad in flow], label="failures/s")
    if isinstance(arrival_rate, float | int):
        load.axhline(arrival_rate, linestyle="--", color="black", label="offered (arrivals/s)")
    elif arrival_rate is not None:
        load.step(
            range(len(arrival_rate)),
            arrival_rate,
            where="post",
            linestyle="--",
            color="black",
            label="offered (arrivals/s)",
        )
    load.set_ylabel("requests/s")
    load.set_ylim(bottom=0)
    if arrival_rate is None:
        users = load.twinx()
        users.step(
            [p.t - start for p in timeline],
            [p.users for p in timeline],
            where="post",
            color="grey",
            linestyle="--",
            label="offered (users)",
        )
        users.set_ylabel("users")
        users.set_ylim(bottom=0)
        users.yaxis.set_major_locator(MaxNLocator(integer=True))
        _legend_outside(load, users)
    else:
        _legend_outside(load)
    load.set_title("offered load and throughput")

    latency = axes[1]
    for field, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        points = [(p.t - start, getattr(p, field)) for p in timeline if getattr(p, field)]
        latency.plot([t for t, _ in points], [v for _, v in points], label=label)
    latency.axhline(slo_p99_ms, linestyle="--", color="red", label=f"SLO p99 {slo_p99_ms:g} ms")
    latency.set_ylabel("ms")
    latency.set_ylim(bottom=0)
    latency.set_title("latency (all responses, last 10 s)")
    _legend_outside(latency)

    if samples:
        gateway = axes[2]
        replicas = gateway.twinx()
        models = sorted(samples[-1].queue_depth)
        for index, model in enumerate(models):
            shift = (index - (len(models) - 1) / 2) * REPLICA_SHIFT
            times = [s.t - start for s in samples]
            (queue,) = gateway.plot(
                times, [s.queue_depth.get(model, 0) for s in samples], label=model
            )
            replicas.step(
                times,
                [s.replicas.get(model, 0) + shift for s in samples],
                where="post",
                linestyle="--",
                color=queue.get_color(),
                label=f"{model} replicas",
            )
        most = max((max(s.replicas.values(), default=0) for s in samples), default=0)
        gateway.set_ylabel("queued requests")
        gateway.set_ylim(bottom=0)
        replicas.set_ylabel("ready endpoints")
        replicas.set_ylim(0, most + 1)
        replicas.yaxis.set_major_locator(MaxNLocator(integer=True))
        gateway.set_title("gateway queue depth (solid) and replicas (dashed)")
        _legend_outside(gateway, replicas)

    over = first_over(timeline, slo_p99_ms)
    if over is not None:
        for axis in axes:
            axis.axvline(over - start, color="red", alpha=0.4)
        latency.annotate(
            "p99 over SLO",
            (over - start, slo_p99_ms),
            xytext=(5, 5),
            textcoords="offset points",
            color="red",
        )
    axes[-1].set_xlabel("seconds since start")
    return figure


def _legend_outside(*axes: Axes) -> None:
    """One legend for a panel (and its twin axis), right of the panel."""
    handles = [handle for axis in axes for handle in axis.get_legend_handles_labels()[0]]
    labels = [label for axis in axes for label in axis.get_legend_handles_labels()[1]]
    axes[-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.08, 1), fontsize="small")
