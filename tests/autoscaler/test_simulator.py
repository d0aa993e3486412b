"""The simulator: reproducible, fast on tiny traces, faithful to its metric paths and drops."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from autoscaler.policy import Sample
from autoscaler.simulation import benchmark, report, traces
from autoscaler.simulation.benchmark import Bazaar, make_policy
from autoscaler.simulation.command import main
from autoscaler.simulation.simulator import Outcome, SimConfig, simulate


@dataclass(frozen=True, slots=True)
class Fixed:
    """Always the same count; records nothing."""

    replicas: int
    name: str = "fixed"
    interval_s: int = 1

    def initial_state(self) -> None:
        return None

    def decide(self, sample: Sample, state: None, now: float) -> Outcome[None]:
        return Outcome(self.replicas, None, "fixed")


@dataclass(frozen=True, slots=True)
class UpOnQueue:
    """Asks for 4 replicas the first time it sees a queue; remembers when."""

    name: str = "up-on-queue"
    interval_s: int = 1

    def initial_state(self) -> float | None:
        return None

    def decide(self, sample: Sample, state: float | None, now: float) -> Outcome[float | None]:
        if state is None and sample.queued is not None and sample.queued > 100:
            return Outcome(4, now, "queue")
        return Outcome(sample.replicas, state, "hold")


def tiny_step(seed: int = 7) -> traces.Trace:
    rates = np.concatenate([np.full(20, 100.0), np.full(40, 400.0)])
    return traces.from_rates("tiny", rates, seed, step_at_s=20.0, step_rate=400.0)


def test_same_seed_same_json(tmp_path: Path) -> None:
    csv = tmp_path / "tiny.csv"
    csv.write_text("rate_per_s\n" + "\n".join(["100"] * 20 + ["400"] * 40) + "\n")
    outputs = []
    for name in ("a", "b"):
        args = ["--trace", str(csv), "--policy", "bazaar", "--policy", "kpa", "--jobs", "1"]
        args += ["--seed", "3", "--cold-start-s", "10", "--out", str(tmp_path / name)]
        assert main(args) == 0
        outputs.append((tmp_path / name / "results.json").read_bytes())
    assert outputs[0] == outputs[1]
    runs = json.loads(outputs[0])["runs"]
    assert [r["policy"] for r in runs] == ["bazaar", "kpa"]
    assert (tmp_path / "a" / "tiny.png").stat().st_size > 0


def test_a_different_seed_gives_different_arrivals() -> None:
    assert not np.array_equal(tiny_step(1).arrivals_ms, tiny_step(2).arrivals_ms)


def test_service_model_at_fixed_capacity() -> None:
    trace = traces.from_rates("flat", np.full(30, 100.0), 1)
    run = simulate(trace, Fixed(2), SimConfig(), initial=2)
    summary = report.summarize(run, trace, 500)
    assert summary["dropped_queue_full"] == summary["dropped_timeout"] == 0
    assert summary["slo_attainment"] == 1.0
    assert 25 <= summary["p50_ms"] <= 60  # one small batch, 20 ms + 5 ms per row
    assert summary["replica_seconds"] == 60.0
    assert summary["scaling_actions"] == 0


def test_metric_lag_delays_the_reaction() -> None:
    trace = tiny_step()
    reacted = {}
    paths: list[tuple[Literal["direct", "prometheus"], int]] = [
        ("direct", 0),
        ("prometheus", 0),
        ("prometheus", 15),
    ]
    for path, lag in paths:
        config = SimConfig(cold_start_s=10, metrics=path, lag_s=lag)
        run = simulate(trace, UpOnQueue(), config, initial=1)
        reacted[(path, lag)] = run.actions[0].time_s
    assert reacted[("direct", 0)] == 21.0  # the first second with a queue after the step
    assert reacted[("prometheus", 0)] == 30.0  # the next 15 s scrape
    assert reacted[("prometheus", 15)] == 45.0  # that scrape, seen 15 s later


def test_drops_are_counted_by_cause() -> None:
    # 1000 rows/s against one replica (160 rows/s) with a small queue: both causes happen.
    trace = traces.from_rates("flood", np.full(20, 1000.0), 1)
    config = SimConfig(queue_bound=3000, queue_timeout_s=5)
    run = simulate(trace, Fixed(1), config, initial=1)
    summary = report.summarize(run, trace, 500)
    assert summary["dropped_queue_full"] > 0
    assert summary["dropped_timeout"] > 0
    finished = int(np.sum(run.finished_ms >= 0))
    total = finished + summary["dropped_queue_full"] + summary["dropped_timeout"]
    assert total == len(trace.arrivals_ms)
    # Nothing waits longer than the timeout before it is served.
    served = run.finished_ms >= 0
    assert np.max(run.finished_ms[served] - run.admitted_ms[served]) <= 5000 + 100


def test_requests_wait_at_zero_and_scale_from_zero() -> None:
    rates = np.concatenate([np.zeros(10), np.full(5, 20.0), np.zeros(80)])
    trace = traces.from_rates("sparse", rates, 1, min_replicas=0)
    config = SimConfig(cold_start_s=10)
    run = simulate(trace, make_policy("bazaar", trace, config, 500), config, initial=0)
    assert run.actions[0].before == 0 and run.actions[0].after >= 1
    assert run.actions[0].reason.startswith("scale from zero")
    assert run.actions[-1].after == 0
    assert int(np.sum(run.finished_ms < 0)) == len(run.rejected_ms) == 0  # all waited, none lost


def test_bazaar_adapter_runs_the_policy() -> None:
    trace = tiny_step()
    config = SimConfig(cold_start_s=10)
    policy = make_policy("bazaar", trace, config, 500)
    assert isinstance(policy, Bazaar)
    run = simulate(trace, policy, config)
    summary = report.summarize(run, trace, 500)
    assert summary["react_s"] is not None and summary["react_s"] <= 2
    assert all(a.reason for a in run.actions)


def test_reversals() -> None:
    assert report.reversals([1, 2, -1, 0, -3, 4]) == 2
    assert report.reversals([]) == 0


def test_trace_file_of_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "ts.csv"
    path.write_text("timestamp_s\n10.0\n10.5\n11.2\n13.0\n")
    trace = traces.load(str(path), 1)
    assert trace.arrivals_ms.tolist() == [0, 500, 1200, 3000]
    assert trace.rate_per_s.tolist() == [2.0, 1.0, 0.0, 1.0]


def test_the_command_parser_imports_no_numpy(tmp_path: Path) -> None:
    # Every `bazaar` command, --help included, builds this parser: it must stay light.
    heavy = "{'numpy', 'matplotlib', 'autoscaler.simulation.simulator'}"
    script = f"import sys, autoscaler.simulation.command; print(sorted({heavy} & set(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"


@dataclass
class Seen:
    """Holds one replica and records the (queued, in flight) rows of every sample."""

    signals: list[tuple[float | None, float | None]]
    name: str = "seen"
    interval_s: int = 1

    def initial_state(self) -> None:
        return None

    def decide(self, sample: Sample, state: None, now: float) -> Outcome[None]:
        self.signals.append((sample.queued, sample.inflight))
        return Outcome(1, None, "one")


def test_a_replica_holding_two_batches_takes_a_full_one_while_it_computes() -> None:
    """As the gateway pipelines full batches: with two slots a full batch leaves the queue at
    once and waits, in flight, at the busy replica; a batch that could grow stays queued."""
    seen = {}
    for depth in (1, 2):
        trace = traces.Trace("three", np.array([3.0, 0.0]), np.array([0, 10, 10], dtype=np.int64))
        config = SimConfig(
            batch_base_ms=1500, batch_row_ms=0, max_batch=2, batches_per_replica=depth
        )
        policy = Seen([])
        run = simulate(trace, policy, config, initial=1)
        assert run.finished_ms.tolist() == [1500, 3000, 3000]  # the replica is the bottleneck
        seen[depth] = policy.signals[0]  # at 1 s
    assert seen == {1: (2.0, 1.0), 2: (0.0, 3.0)}
    # [10] alone could grow: it waits in the queue, then leaves with [20] as a full batch.
    trace = traces.Trace("four", np.array([4.0, 0.0]), np.array([0, 10, 20, 20], dtype=np.int64))
    config = SimConfig(batch_base_ms=100, batch_row_ms=0, max_batch=2, batches_per_replica=2)
    assert simulate(trace, Fixed(1), config, initial=1).finished_ms.tolist() == [100, 200, 200, 300]


def test_an_answer_comes_a_hop_after_the_compute_and_the_replica_computes_meanwhile() -> None:
    """The real path outside the batch (``bazaar replay`` measured 60 ms on its 200 ms
    batches) keeps rows in flight and the batch slot taken, not the replica's compute."""
    trace = traces.Trace("three", np.array([3.0, 0.0]), np.array([0, 0, 0], dtype=np.int64))
    for depth, answered in ((1, [150, 300, 450]), (2, [150, 250, 350])):
        config = SimConfig(
            batch_base_ms=100, batch_row_ms=0, max_batch=1, batches_per_replica=depth, hop_ms=50
        )
        run = simulate(trace, Fixed(1), config, initial=1)
        # One slot: each batch waits for the last one's answer. Two: the second computes
        # while the first's answer travels, the third takes the slot that answer frees, and
        # the replica computes back to back.
        assert run.finished_ms.tolist() == answered, depth
    # Computed by 100 ms, answered at 1050 ms: at 1 s both rows are still in flight.
    trace = traces.Trace("two", np.array([2.0, 0.0]), np.array([0, 0], dtype=np.int64))
    policy = Seen([])
    config = SimConfig(batch_base_ms=100, batch_row_ms=0, max_batch=1, hop_ms=950)
    assert simulate(trace, policy, config, initial=2).finished_ms.tolist() == [1050, 1050]
    assert policy.signals[0] == (0.0, 2.0)


def test_a_draining_replica_finishes_every_batch_it_holds() -> None:
    trace = traces.Trace("four", np.array([4.0, 0.0, 0.0]), np.array([0, 1, 2, 3], dtype=np.int64))
    config = SimConfig(batch_base_ms=800, batch_row_ms=0, max_batch=1, batches_per_replica=2)

    @dataclass(frozen=True, slots=True)
    class TwoThenOne:
        name: str = "two-then-one"
        interval_s: int = 1

        def initial_state(self) -> None:
            return None

        def decide(self, sample: Sample, state: None, now: float) -> Outcome[None]:
            return Outcome(1, None, "one")

    run = simulate(trace, TwoThenOne(), config, initial=2)
    # Two replicas take two one-row (full) batches each as the rows come (0, 1, 2, 3 ms), back
    # to back; at 1 s one of them drains, and its second batch is answered all the same.
    assert sorted(run.finished_ms.tolist()) == [800, 801, 1600, 1601]
    # 2 replicas for 1 s, the drained one 0.6 s more, the other to the end (3 s).
    assert run.replicas[1] == 1 and run.replica_seconds == pytest.approx(2 + 0.6 + 2, abs=0.002)


def test_an_arrival_reaches_a_second_idle_replica_at_once() -> None:
    """Regression: after an arrival went to one idle replica, the next waited for an unrelated
    event (the first batch's end, or the second's tick) although another replica was idle."""
    trace = traces.Trace("two", np.array([2.0]), np.array([0, 10], dtype=np.int64))
    run = simulate(trace, Fixed(2), SimConfig(), initial=2)
    assert run.finished_ms.tolist() == [25, 35]


def _tiny_csv(tmp_path: Path, name: str = "tiny") -> str:
    path = tmp_path / f"{name}.csv"
    path.write_text("rate_per_s\n" + "\n".join(["100"] * 20 + ["300"] * 40) + "\n")
    return str(path)


def test_progress_is_a_line_per_run_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--trace", _tiny_csv(tmp_path), "--policy", "bazaar", "--policy", "kpa"]
    assert main([*args, "--jobs", "1", "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["[1/2] tiny bazaar", "[2/2] tiny kpa"]
    assert all("replica-s" in line and "SLO " in line for line in lines)
    assert "| tiny | bazaar |" in captured.out and "[1/2]" not in captured.out


class InterruptedTerminal(io.StringIO):
    """A terminal where Ctrl-C comes as the line starting with ``at`` is printed."""

    def __init__(self, at: str) -> None:
        super().__init__()
        self.at = at

    def write(self, text: str) -> int:
        if text.startswith(self.at):
            raise KeyboardInterrupt
        return super().write(text)


def test_an_interrupt_keeps_the_traces_already_done(tmp_path: Path) -> None:
    first, second = tiny_step(1), replace(tiny_step(2), name="second")
    terminal = InterruptedTerminal("[3/4]")
    with pytest.raises(KeyboardInterrupt):
        benchmark.run_and_write(
            tmp_path, {}, [first, second], ["bazaar", "kpa"], SimConfig(), 500, 1, terminal
        )
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["trace"], r["policy"]) for r in runs] == [("tiny", "bazaar"), ("tiny", "kpa")]
    assert (tmp_path / "tiny.png").is_file()
    assert not (tmp_path / "second.png").exists()
    assert terminal.getvalue().count("\n") == 2


def test_a_trace_without_requests_says_so(tmp_path: Path) -> None:
    trace = traces.from_rates("silent", np.zeros(30), 1, min_replicas=0)
    run = simulate(trace, Fixed(0), SimConfig(), initial=0)
    summary = report.summarize(run, trace, 500) | {"series": report.series(run, 500)}
    assert summary["slo_attainment"] is None  # not "100 %" of nothing
    assert "no requests" in report.table([summary])
    assert "no requests" in report.progress(summary)
    assert summary["series"]["p99_ms"] == [None, None, None]
    report.plot(tmp_path / "silent.png", trace, [summary], 500)
    assert (tmp_path / "silent.png").stat().st_size > 0


def test_p99_is_drawn_for_whole_windows_with_arrivals_only() -> None:
    # 25 s: two whole 10 s windows and a partial one; arrivals in the first window only.
    trace = traces.from_rates("edge", np.concatenate([np.full(10, 50.0), np.zeros(15)]), 1)
    run = simulate(trace, Fixed(1), SimConfig(), initial=1)
    series = report.series(run, 500)
    p99 = series["p99_ms"]
    assert len(series["load_rps"]) == 25  # no empty second after the end, drawn as a drop
    assert len(p99) == 2
    assert p99[0] is not None and p99[0] > 20  # a real latency, at least one batch
    assert p99[1] is None  # no arrivals: a gap, not 0 ms (drawn as 1 ms on the log axis)


def test_the_slo_line_is_labelled() -> None:
    trace = tiny_step()
    run = simulate(trace, Fixed(3), SimConfig(), initial=3)
    summary = report.summarize(run, trace, 250) | {"series": report.series(run, 250)}
    fig = report.figure(trace, [summary], 250)
    try:
        latency = fig.axes[2]  # row-major: load, replicas, latency for the one policy
        labels = [text.get_text() for text in latency.get_legend().get_texts()]
        assert "SLO 250 ms" in labels
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
