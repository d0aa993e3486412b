"""The headless load-test run: Locust in a subprocess, watched, then judged and reported.

Locust monkey-patches the standard library with gevent when it is imported, which would
break the asyncio code and tests living in the same process, so it only ever runs as
``python -m locust -f loadtests/locustfile.py --headless ...`` in a child process. Nothing
here imports it. The child writes Locust's CSV files and HTML report, a timeline (a JSON line
a second) and, on exit, the tally of outcomes (see the locustfile) into the results folder.

While it runs, once a second the runner reads the new timeline lines for the progress line
and, when the target is bazaar (its ``/metrics`` has ``bazaar_gateway_requests_total``),
scrapes the queue depth and ready endpoints for the plot. Any other v2 server gets the same
run without that panel. Afterwards it judges the tally against the SLO, writes
``summary.json`` and ``plot.png``, and prints the verdict. Exit status: 0 when the SLO is
met, 1 when it is missed, 2 when the run itself failed (target down, Locust died).

In a cluster the gateway runs several replicas behind a Service; each scrape then reaches
one of them, so the queue panel shows that replica's share, and the request counts under
``gateway`` in the summary are not the total.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from prometheus_client.parser import text_string_to_metric_families

from loadtests.page import verdict_page
from loadtests.plot import MetricsSample, TimelinePoint, plot_run
from loadtests.shapes import OPEN_LOOP, TRACE
from loadtests.target import TargetError, ready_models
from loadtests.verdict import OUTCOMES, RunResult, Slo, judge, outcome_line, verdict_table

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
ROOT = LOCUSTFILE.parent.parent
POLL_INTERVAL_S = 1.0
PLAIN_PROGRESS_EVERY_S = 5.0
"""Progress lines when the output is not a terminal (one line rewritten in place otherwise)."""
STOP_TIMEOUT_S = 10
"""Users still busy at the end get this long to finish, so every sent request is counted."""
EXIT_GRACE_S = 60.0
"""How long past its scenario Locust may take to stop before it is killed."""


class LoadTestError(Exception):
    """The run could not be made (not a verdict on the target)."""


@dataclass(frozen=True, slots=True)
class LoadTestConfig:
    host: str
    """Base URL of any v2 server, e.g. ``http://127.0.0.1:8000``."""
    scenario: str
    """A key of ``loadtests.shapes.SCENARIOS``."""
    duration_s: float
    users: int
    """Peak users (closed loop), or schedule keepers sharing the arrival rate (open loop)."""
    arrival_rate: float
    """Requests/s in the open loop; unused otherwise."""
    models: str
    """Model mix ``NAME[:WEIGHT],...``; empty = every ready model, equally."""
    slo: Slo
    results: Path
    """Folder for the report, CSVs, tally and plot; absolute, since Locust runs in it."""
    binary_ratio: float = 0.5
    """Fraction of requests sent with binary tensors (the rest JSON)."""
    priorities: str = ""
    """``1,2``: each request picks one; empty = none sent."""
    timeout_ms: float = 0.0
    """Request ``timeout`` parameter; 0 = none sent."""
    rows: int = 1
    """Batch rows per request."""
    wrong_shape_ratio: float = 0.0
    """Fraction of requests sent with a wrong shape (to see the 400 path counted)."""
    max_outstanding: int = 1000
    """Open loop: requests in flight at most before a due one counts as missed."""
    schedule: Path | None = None
    """The trace scenario's due times (seconds from the start, one a line, in order);
    absolute, as ``results``."""

    def __post_init__(self) -> None:
        if not self.results.is_absolute():
            raise ValueError(f"results must be an absolute path, got {self.results}")
        if (self.schedule is not None) != (self.scenario == TRACE):
            raise ValueError("a schedule is the trace scenario's, and it needs one")
        if self.schedule is not None and not self.schedule.is_absolute():
            raise ValueError(f"schedule must be an absolute path, got {self.schedule}")


def offered_per_s(schedule: Path) -> list[int]:
    """Requests due in each whole second of a schedule file."""
    counts: list[int] = []
    for line in schedule.read_text().split():
        second = int(float(line))
        counts += [0] * (second + 1 - len(counts))
        counts[second] += 1
    return counts


def run(config: LoadTestConfig, out: TextIO | None = None) -> int:
    """Run, report to ``out`` (default: the current ``sys.stdout``) and return the exit status."""
    try:
        return _run(config, out or sys.stdout)
    except LoadTestError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2


def _run(config: LoadTestConfig, out: TextIO) -> int:
    host = config.host.rstrip("/")
    _check_ready(host)
    try:
        mix = config.models or ",".join(ready_models(host))
    except TargetError as exc:
        raise LoadTestError(f"{exc}; name the models with --models") from None
    config.results.mkdir(parents=True, exist_ok=True)
    files = {
        "summary": config.results / "summary.json",
        "verdict": config.results / "verdict.html",
        "html": config.results / "report.html",
        "csv": config.results / "stats_stats.csv",
        "plot": config.results / "plot.png",
        "log": config.results / "locust.log",
    }
    tally_path = config.results / "tally.json"
    timeline_path = config.results / "timeline.jsonl"
    for stale in (tally_path, timeline_path):
        stale.unlink(missing_ok=True)
    before = scrape(host)
    open_loop = config.scenario == OPEN_LOOP
    load = (
        f"{config.arrival_rate:g} req/s from {config.users} keepers"
        if open_loop
        else f"the schedule {config.schedule.name} from {config.users} keepers"
        if config.schedule is not None
        else f"up to {config.users} users"
    )
    print(
        f"loadtest: {config.scenario}, {config.duration_s:g} s, {load}, {mix} at {host}",
        file=out,
    )
    command = _locust_command(config, host, mix, tally_path, timeline_path)
    with files["log"].open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Anything Locust writes by a relative name lands with the results, not in the
            # caller's directory or wherever the package is installed.
            cwd=config.results,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(_pythonpath())},
        )
    try:
        timeline, samples = _watch(process, config, host, timeline_path, before is not None, out)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode != 0 or not tally_path.exists():
        tail = files["log"].read_text(errors="replace")[-3000:]
        raise LoadTestError(f"locust exited with {process.returncode}; {files['log']}:\n{tail}")
    after = scrape(host)
    tally = json.loads(tally_path.read_text())
    result = RunResult.from_tally(tally)
    checks = judge(result, config.slo)
    passed = all(check.passed for check in checks)
    gateway = _gateway_counts(before, after, mix)
    summary = _summary(config, host, mix, result, checks, passed, gateway, files)
    offered: float | list[int] | None = config.arrival_rate if open_loop else None
    if config.schedule is not None:
        offered = offered_per_s(config.schedule)
        sent = {int(second): count for second, count in tally["sent_per_s"].items()}
        summary["offered_per_s"] = offered
        summary["sent_per_s"] = [sent.get(second, 0) for second in range(max(sent, default=-1) + 1)]
    files["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    plot_run(
        files["plot"],
        f"{config.scenario} against {host}: {mix}",
        timeline,
        samples,
        config.slo.p99_ms,
        offered,
    )
    files["verdict"].write_text(verdict_page(summary, files["plot"].read_bytes()))
    _print_report(result, checks, passed, gateway, files, out)
    return 0 if passed else 1


def scrape(host: str) -> MetricsSample | None:
    """bazaar's gateway metrics now; None when the target is not bazaar or does not answer."""
    try:
        with urllib.request.urlopen(f"{host}/metrics", timeout=2) as answer:
            text = answer.read().decode()
    except (urllib.error.URLError, OSError, UnicodeDecodeError):
        return None
    depth: dict[str, float] = {}
    replicas: dict[str, float] = {}
    requests: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # Summed over a model's versions: each has its own series.
            model = sample.labels.get("model", "")
            if sample.name == "bazaar_gateway_queue_depth":
                depth[model] = depth.get(model, 0.0) + sample.value
            elif sample.name == "bazaar_gateway_ready_endpoints":
                replicas[model] = replicas.get(model, 0.0) + sample.value
            elif sample.name == "bazaar_gateway_requests_total":
                key = (model, sample.labels["outcome"])
                requests[key] = requests.get(key, 0.0) + sample.value
    if not requests and not depth:
        return None
    return MetricsSample(time.time(), depth, replicas, requests)


def _check_ready(host: str) -> None:
    try:
        with urllib.request.urlopen(f"{host}/v2/health/ready", timeout=5):
            return
    except (urllib.error.URLError, OSError) as exc:
        raise LoadTestError(f"{host} is not ready (GET /v2/health/ready: {exc})") from None


def _pythonpath() -> list[str]:
    # The locustfile imports loadtests.*, which lives in ROOT: this checkout, or site-packages.
    return [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]


def _locust_command(
    config: LoadTestConfig, host: str, mix: str, tally: Path, timeline: Path
) -> list[str]:
    prefix = config.results / "stats"
    return [
        sys.executable, "-m", "locust",
        "-f", str(LOCUSTFILE),
        "--headless", "--only-summary",
        "--host", host,
        "--csv", str(prefix), "--csv-full-history",
        "--html", str(config.results / "report.html"),
        "--stop-timeout", str(STOP_TIMEOUT_S),
        # Failed requests are the verdict's business; a non-zero exit means Locust itself failed.
        "--exit-code-on-error", "0",
        "--scenario", config.scenario,
        "--scenario-duration", str(config.duration_s),
        "--peak-users", str(config.users),
        "--arrival-rate", str(config.arrival_rate),
        "--schedule-file", str(config.schedule or ""),
        "--max-outstanding", str(config.max_outstanding),
        "--model-mix", mix,
        "--binary-ratio", str(config.binary_ratio),
        "--priorities", config.priorities,
        "--timeout-ms", str(config.timeout_ms),
        "--rows", str(config.rows),
        "--wrong-shape-ratio", str(config.wrong_shape_ratio),
        "--tally-file", str(tally),
        "--timeline-file", str(timeline),
    ]  # fmt: skip


def _watch(
    process: subprocess.Popen[bytes],
    config: LoadTestConfig,
    host: str,
    timeline_path: Path,
    is_bazaar: bool,
    out: TextIO,
) -> tuple[list[TimelinePoint], list[MetricsSample]]:
    """Until Locust exits: read the timeline, scrape the gateway, show progress."""
    timeline: list[TimelinePoint] = []
    samples: list[MetricsSample] = []
    reader = _LineReader(timeline_path)
    give_up = time.monotonic() + config.duration_s + STOP_TIMEOUT_S + EXIT_GRACE_S
    in_place = out.isatty()
    last_plain = 0.0
    while process.poll() is None:
        if time.monotonic() > give_up:
            raise LoadTestError(f"locust did not stop {EXIT_GRACE_S:g} s after the scenario")
        time.sleep(POLL_INTERVAL_S)
        timeline += [_point(line) for line in reader.new_lines()]
        sample = scrape(host) if is_bazaar else None
        if sample is not None:
            samples.append(sample)
        if len(timeline) < 2:
            continue
        line = _progress(timeline, sample, config.duration_s)
        if in_place:
            out.write("\r" + line.ljust(100))
            out.flush()
        elif time.monotonic() - last_plain >= PLAIN_PROGRESS_EVERY_S:
            last_plain = time.monotonic()
            print(line, file=out)
    timeline += [_point(line) for line in reader.new_lines()]
    if in_place:
        out.write("\n")
    return timeline, samples


class _LineReader:
    """The complete lines appended to a file since the last call (it may not exist yet)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new_lines(self) -> list[str]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as file:
            file.seek(self.offset)
            chunk = file.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        return complete.decode().splitlines()


def _point(line: str) -> TimelinePoint:
    data = json.loads(line)
    return TimelinePoint(
        data["t"], data["users"], data["requests"], data["failures"], data["p50_ms"], data["p99_ms"]
    )


def _progress(timeline: Sequence[TimelinePoint], sample: MetricsSample | None, total: float) -> str:
    last, before = timeline[-1], timeline[-2]
    span = max(last.t - before.t, 1e-9)
    sent = (last.requests - before.requests) / span
    failed = (last.failures - before.failures) / span
    p50 = "-" if last.p50_ms is None else f"{last.p50_ms:g}"
    p99 = "-" if last.p99_ms is None else f"{last.p99_ms:g}"
    line = (
        f"[{last.t - timeline[0].t:4.0f}/{total:g} s] users {last.users}  {sent:7.1f} req/s  "
        f"{failed:6.1f} failed/s  p50 {p50} ms  p99 {p99} ms  sent {last.requests}"
    )
    if sample is not None:
        queued = sum(sample.queue_depth.values())
        replicas = sum(sample.replicas.values())
        line += f"  queued {queued:g}  replicas {replicas:g}"
    return line


def _gateway_counts(
    before: MetricsSample | None, after: MetricsSample | None, mix: str
) -> dict[str, dict[str, int]] | None:
    """The gateway's own request counts during the run, per model and outcome."""
    if before is None or after is None:
        return None
    models = {item.partition(":")[0].strip() for item in mix.split(",")}
    counts: dict[str, dict[str, int]] = {}
    for (model, outcome), value in sorted(after.requests.items()):
        if model in models:
            delta = int(value - before.requests.get((model, outcome), 0.0))
            counts.setdefault(model, {})[outcome] = delta
    return counts


def _summary(
    config: LoadTestConfig,
    host: str,
    mix: str,
    result: RunResult,
    checks: Sequence[Any],
    passed: bool,
    gateway: dict[str, dict[str, int]] | None,
    files: dict[str, Path],
) -> dict[str, Any]:
    return {
        "host": host,
        "scenario": config.scenario,
        "duration_s": config.duration_s,
        "users": config.users,
        "arrival_rate": config.arrival_rate if config.scenario == OPEN_LOOP else None,
        "model_mix": mix,
        "slo": asdict(config.slo),
        "passed": passed,
        "checks": [asdict(check) for check in checks],
        "elapsed_s": round(result.elapsed_s, 3),
        "requests": {
            "due": result.due,
            "sent": result.sent,
            **{outcome: result.total(outcome) for outcome in OUTCOMES},
        },
        "error_rate": result.error_rate,
        "throughput_rps": round(result.throughput_rps, 2),
        "latency_ms": {
            name: result.latency_ms(fraction)
            for name, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
        },
        "by_model": result.outcomes,
        "gateway": None
        if gateway is None
        else {"requests": gateway, "total": sum(sum(c.values()) for c in gateway.values())},
        "files": {name: path.name for name, path in files.items()},
    }


def _print_report(
    result: RunResult,
    checks: Sequence[Any],
    passed: bool,
    gateway: dict[str, dict[str, int]] | None,
    files: dict[str, Path],
    out: TextIO,
) -> None:
    latency = ", ".join(
        f"{name} {value:g} ms"
        for name, value in (
            (name, result.latency_ms(fraction))
            for name, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
        )
        if value is not None
    )
    print(f"requests: {outcome_line(result)}", file=out)
    print(
        f"throughput: {result.throughput_rps:.1f} successes/s over {result.elapsed_s:.1f} s; "
        f"latency of successes: {latency or 'none'}",
        file=out,
    )
    if gateway is not None:
        total = sum(sum(counts.values()) for counts in gateway.values())
        print(f"the gateway counted {total} requests ({_gateway_line(gateway)})", file=out)
    print(verdict_table(tuple(checks)), file=out)
    print(f"SLO {'MET' if passed else 'MISSED'}", file=out)
    folder = files["summary"].parent
    print(f"results in {folder}/: " + ", ".join(p.name for p in files.values()), file=out)


def _gateway_line(gateway: dict[str, dict[str, int]]) -> str:
    totals: dict[str, int] = {}
    for counts in gateway.values():
        for outcome, count in counts.items():
            totals[outcome] = totals.get(outcome, 0) + count
    return ", ".join(f"{outcome}: {count}" for outcome, count in totals.items() if count) or "none"
