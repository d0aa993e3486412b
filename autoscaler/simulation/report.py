"""Metrics of a simulated run, and the table, JSON and plots ``bazaar simulate`` writes.

All metrics are computed from the run's per-request arrays with numpy; nothing here feeds back
into a simulation. SLO attainment counts every arrival: rejected and timed-out requests are
misses. A reversal is a change of direction between consecutive replica changes. Step response
(traces with a step): time to the first scale-up, time until ready replicas at full batch cover
the new rate, and time until the 30 s rolling p99 stays under the SLO for 60 s.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from autoscaler.simulation.simulator import MAX_BATCH_THROUGHPUT_RPS, Run
from autoscaler.simulation.traces import Trace

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BIN_S = 10
"""Latency series resolution, seconds."""


def _outcomes(run: Run, slo_ms: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """(arrival ms, latency ms with drops as infinity) of every request."""
    done = run.finished_ms >= 0
    latency = np.where(done, run.finished_ms - run.admitted_ms, np.inf).astype(np.float64)
    arrivals = np.concatenate([run.admitted_ms, run.rejected_ms])
    latencies = np.concatenate([latency, np.full(len(run.rejected_ms), np.inf)])
    return arrivals, latencies


def reversals(deltas: list[int]) -> int:
    """Direction changes between consecutive non-zero replica changes."""
    signs = [d > 0 for d in deltas if d != 0]
    return sum(1 for a, b in itertools.pairwise(signs) if a != b)


def summarize(run: Run, trace: Trace, slo_ms: int) -> dict[str, Any]:
    """The table's numbers for one run."""
    arrivals, latencies = _outcomes(run, slo_ms)
    completed = latencies[np.isfinite(latencies)]
    total = len(latencies)
    result: dict[str, Any] = {
        "trace": run.trace,
        "policy": run.policy,
        "requests": total,
        "p50_ms": _percentile(completed, 50),
        "p99_ms": _percentile(completed, 99),
        # No requests, no attainment: "100 %" of nothing would read as a result.
        "slo_attainment": round(float(np.sum(latencies <= slo_ms)) / total, 6) if total else None,
        "dropped_queue_full": len(run.rejected_ms),
        "dropped_timeout": int(np.sum(run.finished_ms < 0)),
        "replica_seconds": round(run.replica_seconds, 1),
        "scaling_actions": len(run.actions),
        "reversals": reversals([a.after - a.before for a in run.actions]),
    }
    if trace.step_at_s is not None and trace.step_rate is not None:
        result |= _step_response(run, trace.step_at_s, trace.step_rate, arrivals, latencies, slo_ms)
    return result


def _percentile(values: npt.NDArray[np.float64], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


def _step_response(
    run: Run,
    step_s: float,
    rate: float,
    arrivals: npt.NDArray[np.int64],
    latencies: npt.NDArray[np.float64],
    slo_ms: int,
) -> dict[str, float | None]:
    ups = [a.time_s - step_s for a in run.actions if a.time_s >= step_s and a.after > a.before]
    enough = np.nonzero(run.ready[int(step_s) :] * MAX_BATCH_THROUGHPUT_RPS >= rate)[0]
    # p99 of a window is under the SLO when at most 1 % of its requests missed it.
    seconds = run.duration_s + 1
    second = np.minimum(arrivals // 1000, seconds - 1)
    count = np.bincount(second, minlength=seconds).cumsum()
    late = np.bincount(second, weights=latencies > slo_ms, minlength=seconds).cumsum()
    window = 30
    rolling_n = count[window:] - count[:-window]
    rolling_late = late[window:] - late[:-window]
    good = rolling_late <= 0.01 * np.maximum(rolling_n, 1)
    recover: float | None = None
    streak = 0
    for i in range(max(0, int(step_s) - window), len(good)):
        streak = streak + 1 if good[i] else 0
        if streak >= 60:
            recover = float(i - 59 + window - step_s)
            break
    return {
        "react_s": round(ups[0], 1) if ups else None,
        "capacity_s": float(enough[0]) if len(enough) else None,
        "recover_s": recover,
    }


def series(run: Run, slo_ms: int) -> dict[str, list[float | None]]:
    """Per-second load and replicas, p99 per ``BIN_S`` by arrival (drops shown as 30 s).

    Only whole windows get a p99, and a window without arrivals gets None (a gap in the plot):
    an empty or partial window drawn as 0 ms would read as the best latency of the run. Load
    is per second of the trace, without the empty second after its end (drawn as a drop to 0).
    """
    arrivals, latencies = _outcomes(run, slo_ms)
    # Arrivals per second of the trace; the replica series also have the instant it ends.
    load = np.bincount(arrivals // 1000, minlength=run.duration_s)[: run.duration_s]
    windows = run.duration_s // BIN_S
    bins = arrivals // (BIN_S * 1000)
    inside = bins < windows
    order = np.argsort(bins[inside], kind="stable")
    capped = np.minimum(latencies[inside][order], 30_000.0)
    splits = np.searchsorted(bins[inside][order], np.arange(1, windows))
    chunks = np.split(capped, splits) if windows else []
    p99 = [round(float(np.percentile(c, 99)), 1) if len(c) else None for c in chunks]
    return {
        "load_rps": load.astype(float).tolist(),
        "replicas": run.replicas.astype(float).tolist(),
        "ready": run.ready.astype(float).tolist(),
        "p99_ms": p99,
    }


def progress(result: dict[str, Any]) -> str:
    """One line on a finished run, for the terminal while the others run."""
    attainment = result["slo_attainment"]
    slo = "no requests" if attainment is None else f"SLO {attainment:.2%}"
    return (
        f"{result['trace']} {result['policy']}: {slo}, "
        f"{result['replica_seconds']:.0f} replica-s, {result['reversals']} reversals"
    )


COLUMNS = (
    ("trace", "trace", "{}"),
    ("policy", "policy", "{}"),
    ("p50_ms", "p50 ms", "{:.0f}"),
    ("p99_ms", "p99 ms", "{:.0f}"),
    ("slo_attainment", "SLO %", "{:.2%}"),
    ("dropped_queue_full", "rejected", "{}"),
    ("dropped_timeout", "timed out", "{}"),
    ("replica_seconds", "replica-s", "{:.0f}"),
    ("scaling_actions", "actions", "{}"),
    ("reversals", "reversals", "{}"),
    ("react_s", "react s", "{:.0f}"),
    ("capacity_s", "capacity s", "{:.0f}"),
    ("recover_s", "recover s", "{:.0f}"),
)


def table(results: list[dict[str, Any]]) -> str:
    """A Markdown table, one row per trace x policy."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |"]
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for r in results:
        cells = [
            "-" if r.get(key) is None else fmt.format(r[key]).replace("%", " %")
            for key, _, fmt in COLUMNS
        ]
        if r["slo_attainment"] is None:
            cells[[key for key, _, _ in COLUMNS].index("slo_attainment")] = "no requests"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, settings: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """Settings and every run's metrics and series; same seed, same bytes."""
    path.write_text(json.dumps({"settings": settings, "runs": results}, sort_keys=True) + "\n")


def plot(path: Path, trace: Trace, runs: list[dict[str, Any]], slo_ms: int) -> None:
    """:func:`figure`, as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = figure(trace, runs, slo_ms)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def figure(trace: Trace, runs: list[dict[str, Any]], slo_ms: int) -> Figure:
    """Load, replicas and p99 latency over time, one column per policy; close it when done."""
    # Imported here: matplotlib costs half a second, and only the plots need it (the benchmark's
    # workers and the tests summarise runs without it).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        3, len(runs), figsize=(3.2 * len(runs), 7), sharex=True, sharey="row", squeeze=False
    )
    for col, r in enumerate(runs):
        s = r["series"]
        axes[0][col].plot(np.arange(len(s["load_rps"])), s["load_rps"], lw=0.5, color="tab:gray")
        axes[0][col].set_title(r["policy"])
        t = np.arange(len(s["replicas"]))
        axes[1][col].step(t, s["replicas"], where="post", lw=0.8, label="asked")
        axes[1][col].step(t, s["ready"], where="post", lw=0.8, label="ready")
        # Each window's p99 at its middle; None (no arrivals) is a gap, not 0 ms.
        tb = (np.arange(len(s["p99_ms"])) + 0.5) * BIN_S
        p99 = np.array([np.nan if v is None else max(v, 1.0) for v in s["p99_ms"]])
        axes[2][col].plot(tb, p99, lw=0.8, color="tab:red", label=f"p99 per {BIN_S} s")
        axes[2][col].axhline(slo_ms, lw=0.5, ls="--", color="black", label=f"SLO {slo_ms} ms")
        axes[2][col].set_yscale("log")
        axes[2][col].set_xlabel("time (s)")
        if r["slo_attainment"] is None:
            axes[2][col].text(
                0.5, 0.5, "no requests", transform=axes[2][col].transAxes, ha="center"
            )
    axes[0][0].set_ylabel("arrivals (req/s)")
    axes[1][0].set_ylabel("replicas")
    axes[1][0].legend(loc="upper left", fontsize="small")
    axes[2][0].set_ylabel(f"p99 per {BIN_S} s (ms)")
    axes[2][0].legend(loc="upper left", fontsize="small")
    fig.suptitle(f"{trace.name}: load, replicas, latency")
    fig.tight_layout()
    return fig
