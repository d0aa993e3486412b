"""Traces: the built-in shapes say what their docs say, and trace files as users have them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autoscaler.simulation import traces
from autoscaler.simulation.benchmark import make_policy
from autoscaler.simulation.catalog import TRACES
from autoscaler.simulation.command import main
from autoscaler.simulation.simulator import SimConfig


def write(tmp_path: Path, text: str, name: str = "mine.csv") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_file_says_its_floor(tmp_path: Path) -> None:
    zero = traces.load(write(tmp_path, "# min_replicas: 0\nrate_per_s\n5\n0\n"), 1)
    assert zero.min_replicas == 0
    assert zero.rate_per_s.tolist() == [5.0, 0.0]
    assert traces.load(write(tmp_path, "rate_per_s\n5\n", "plain.csv"), 1).min_replicas == 1
    stamps = traces.load(write(tmp_path, "#min_replicas:3\n\ntimestamp_s\n1\n2\n", "s.csv"), 1)
    assert stamps.min_replicas == 3


def test_a_floor_of_zero_lets_the_policies_go_to_zero(tmp_path: Path) -> None:
    trace = traces.load(write(tmp_path, "# min_replicas: 0\nrate_per_s\n5\n"), 1)
    policy = make_policy("bazaar", trace, SimConfig(), 500)
    assert policy.config.min_replicas == 0  # type: ignore[attr-defined]
    assert policy.config.scale_to_zero_after_s is not None  # type: ignore[attr-defined]


def test_rates_at_timestamps_hold_until_the_next_row(tmp_path: Path) -> None:
    # Epoch seconds, as exported data has them: replayed from the first row.
    text = "time_s,rate_per_s\n1700000100,5\n1700000103,10\n1700000105,0\n"
    trace = traces.load(write(tmp_path, text), 1)
    # The last row lasts as long as the one before it (2 s).
    assert trace.rate_per_s.tolist() == [5.0, 5.0, 5.0, 10.0, 10.0, 0.0, 0.0]
    per_second = np.bincount(trace.arrivals_ms // 1000, minlength=7)
    assert per_second[5:].tolist() == [0, 0]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("# floor: 0\nrate_per_s\n5\n", "unknown setting 'floor'"),
        ("# min_replicas: -1\nrate_per_s\n5\n", "min_replicas must be an integer >= 0"),
        ("# min_replicas: 0\n", "no header"),
        ("rate\n5\n", "the header must be"),
        ("time_s,rate_per_s\n0,5\n0.2,6\n", "grow by at least 1 s"),
        ("time_s,rate_per_s\n0\n", "row of 2 finite"),
        ("rate_per_s\n-1\n", "non-negative"),
        ("rate_per_s\nmany\n", "could not convert"),
    ],
)
def test_a_bad_file_is_refused_with_the_reason(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(traces.TraceError, match=says):
        traces.load(write(tmp_path, text), 1)


def test_the_command_refuses_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "# floor: 0\nrate_per_s\n5\n")
    assert main(["--trace", path, "--out", str(tmp_path / "out")]) == 2
    assert "unknown setting" in capsys.readouterr().err


def test_help_documents_trace_files(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in ("# min_replicas: 0", "timestamp_s", "rate_per_s", "time_s,rate_per_s", *TRACES):
        assert name in text


@pytest.mark.parametrize("name", TRACES)
def test_every_builtin_loads(name: str) -> None:
    trace = traces.builtin(name, 1)
    assert trace.duration_s > 0 and len(trace.arrivals_ms) > 0
    assert np.all(np.diff(trace.arrivals_ms) >= 0)
    assert trace.arrivals_ms[-1] < trace.duration_s * 1000


def test_ramp_climbs_for_an_hour() -> None:
    rates = traces.builtin("ramp", 1).rate_per_s
    assert (len(rates), rates[0], rates[-1]) == (3600, 40.0, 1700.0)
    assert np.all(np.diff(rates) > 0)


def test_drop_goes_to_zero_and_back() -> None:
    trace = traces.builtin("drop", 1)
    assert trace.min_replicas == 0
    assert trace.rate_per_s[600:1200].max() == 0.0
    assert trace.rate_per_s[:600].min() == trace.rate_per_s[1200:].min() == 400.0
    assert not np.any((trace.arrivals_ms >= 600_000) & (trace.arrivals_ms < 1_200_000))


def test_weekly_has_five_busy_days_and_two_quiet_ones() -> None:
    days = traces.builtin("weekly", 1).rate_per_s.reshape(7, 600)
    peaks = days.max(axis=1)
    assert peaks[:5] == pytest.approx([1200.0] * 5, rel=1e-3)
    assert peaks[5:] == pytest.approx([400.0] * 2, rel=1e-3)
    assert days[:, 0] == pytest.approx([60.0] * 7, rel=1e-3)  # midnight


def test_heavy_tail_spikes_are_mostly_small_and_sometimes_huge() -> None:
    rates = traces.builtin("heavy-tail", 1).rate_per_s
    assert rates.min() == 150.0
    assert np.all(rates[-600:] == 150.0)  # the last spike's release is in the trace
    starts = np.nonzero(np.diff(rates) > 0)[0] + 1
    heights = rates[starts] - 150.0
    assert len(heights) >= 8
    assert np.median(heights) < 400.0 < 1000.0 < heights.max()


def test_a_trace_compressed_keeps_its_shape_at_the_peak_asked_for() -> None:
    step = traces.builtin("step", 1)  # 300 s at 200, 600 s at 1600, 300 s at 200 req/s
    replay = traces.compressed(step, 120, 1, peak_rps=150.0)
    assert replay.duration_s == 120
    assert replay.rate_per_s.tolist() == [18.75] * 30 + [150.0] * 60 + [18.75] * 30
    # Arrivals drawn from it: about its mean rate over its length.
    assert len(replay.arrivals_ms) == pytest.approx(replay.rate_per_s.sum(), rel=0.05)
    assert replay.arrivals_ms.max() < 120_000


def test_a_trace_compressed_without_a_peak_keeps_its_rates_and_floor() -> None:
    drop = traces.builtin("drop", 1)  # 600 s at 400, 600 s at nothing, 600 s at 400 req/s
    fast = traces.compressed(drop, 90, 2)
    assert fast.rate_per_s.tolist() == [400.0] * 30 + [0.0] * 30 + [400.0] * 30
    assert fast.min_replicas == 0


@pytest.mark.parametrize("duration_s", [0, 1201])
def test_a_trace_compresses_only_to_a_length_it_has(duration_s: int) -> None:
    with pytest.raises(
        traces.TraceError, match="lasts 1200 s: it compresses to 1 to that many seconds"
    ):
        traces.compressed(traces.builtin("step", 1), duration_s, 1)
