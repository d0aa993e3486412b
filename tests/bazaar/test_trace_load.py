"""``bazaar loadtest --trace``: a compressed trace, sent open loop by Locust to a real
``bazaar serve``, at the rate the trace says, every request accounted for."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bazaar.cli import main
from tests.support import bazaar_process, free_port, models_ready

# A minute at 25 req/s, one at 100, one at 25 (the last row lasts as long as the one
# before): played 12 times faster, five seconds at 25, five at 100, five at 25.
TRACE_CSV = "time_s,rate_per_s\n0,25\n60,100\n120,25\n"
LOW, HIGH = 25.0, 100.0


@pytest.fixture(scope="module")
def gateway(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``bazaar serve`` over digits (a fast model: the generator, not the model, is tested)."""
    root = tmp_path_factory.mktemp("trace-repository")
    shutil.copytree(demo_repository / "digits", root / "digits")
    url = f"http://127.0.0.1:{free_port()}"
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    args = ["serve", "--model-repository", str(root), "--port", url.rsplit(":", 1)[1]]
    with bazaar_process(args, log, models_ready(url, ["digits"])):
        yield url


def test_a_compressed_trace_is_sent_at_its_rate_and_every_request_is_counted(
    gateway: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "low-high-low.csv"
    trace.write_text(TRACE_CSV)
    results = tmp_path / "results"
    code = main(
        ["loadtest", "--host", gateway, "--trace", str(trace), "--compress", "12",
         "--models", "digits", "--users", "4", "--slo-p99-ms", "5000",
         "--max-error-rate", "0.02", "--results", str(results)]
    )  # fmt: skip
    output = capsys.readouterr().out
    assert code == 0, output
    assert "low-high-low, 180 s played in 15 s" in output
    due = [float(line) for line in (results / "schedule.txt").read_text().split()]
    summary = json.loads((results / "summary.json").read_text())
    assert summary["scenario"] == "trace"
    requests = summary["requests"]
    assert requests["due"] == len(due) == sum(summary["offered_per_s"])
    assert requests["ok"] + requests["missed_schedule"] == len(due)
    assert requests["missed_schedule"] == 0
    sent = summary["sent_per_s"]
    assert sum(sent) == requests["sent"]
    # Each second sends what fell due in it, give or take a request crossing a second's edge.
    for second, (offered, out) in enumerate(zip(summary["offered_per_s"], sent, strict=False)):
        assert abs(out - offered) <= 0.2 * offered + 4, (second, summary["offered_per_s"], sent)
    # And the rate that left follows the trace's: low, four times higher, low again.
    high = sent[6:9]  # the middle of the five seconds at 100 req/s
    lows = sent[1:4] + sent[11:14]
    assert sum(high) / len(high) == pytest.approx(HIGH, rel=0.2), sent
    assert sum(lows) / len(lows) == pytest.approx(LOW, rel=0.2), sent


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--trace", "step", "--scenario", "steady"], "--trace is the trace scenario"),
        (["--compress", "4"], "--compress and --peak-rps go with --trace"),
        (["--trace", "nonesuch"], "'nonesuch' is neither a built-in trace nor a file"),
        (
            ["--trace", "step", "--compress", "0.5"],
            "lasts 1200 s: it compresses to 1 to that many seconds, not 2400",
        ),
    ],
)
def test_a_trace_run_that_cannot_be_made_is_refused_with_the_reason(
    argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The host is never reached: the refusal comes first.
    assert (
        main(["loadtest", "--host", "http://127.0.0.1:9", *argv, "--results", str(tmp_path)]) == 2
    )
    assert says in capsys.readouterr().err
