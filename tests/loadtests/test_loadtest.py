"""``bazaar loadtest`` end to end: real Locust runs against a real ``bazaar serve`` on loopback.

The gateway serves copies of the demo models digits and mlp (mlp_wide is slow to load). Its
own ``/metrics`` counters are the referee of the harness's accounting, so they are scraped
here, independently of the runner. A small v2 server of the test's own stands for "any other
v2 server": it answers in a fixed cycle of statuses and records them, so the harness's count
of each outcome must match exactly, and it has no bazaar metrics, so the gateway panel and
counts must be absent.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from loadtests.command import add_loadtest_parser, schedule_duration_s
from loadtests.payloads import ModelSpec, build_payload
from loadtests.runner import ROOT, offered_per_s, scrape
from tests.support import bazaar_process, free_port, models_ready

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def gateway(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``bazaar serve`` over digits and mlp; yields its URL."""
    root = tmp_path_factory.mktemp("loadtest-repository")
    for model in ("digits", "mlp"):
        shutil.copytree(demo_repository / model, root / model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    args = ["serve", "--model-repository", str(root), "--port", str(port)]
    with bazaar_process(args, log, models_ready(url, ["digits", "mlp"])):
        yield url


def loadtest(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="bazaar")
    add_loadtest_parser(parser.add_subparsers())
    args = parser.parse_args(["loadtest", *argv])
    return int(args.run(args))


def gateway_counts(url: str) -> Counter[tuple[str, str]]:
    sample = scrape(url)
    assert sample is not None, "bazaar serve exposes its request counters"
    return Counter({key: int(value) for key, value in sample.requests.items()})


def summary_of(results: Path) -> dict[str, Any]:
    return dict(json.loads((results / "summary.json").read_text()))


@pytest.mark.parametrize("model", ["digits", "mlp"])
def test_the_server_accepts_every_payload_and_refuses_a_wrong_shape(
    gateway: str, model: str
) -> None:
    with httpx.Client(base_url=gateway, timeout=10) as client:
        spec = ModelSpec.from_metadata(client.get(f"/v2/models/{model}").json())
        rng = random.Random(3)
        for binary in (False, True):
            for rows in (1, 3):
                payload = build_payload(
                    spec, rng, binary=binary, rows=rows, parameters={"priority": 1}
                )
                answer = client.post(
                    f"/v2/models/{model}/infer", content=payload.body, headers=payload.headers
                )
                assert answer.status_code == 200, answer.text
            wrong = build_payload(spec, rng, binary=binary, wrong_shape=True)
            answer = client.post(
                f"/v2/models/{model}/infer", content=wrong.body, headers=wrong.headers
            )
            assert answer.status_code == 400
            assert "shape" in answer.json()["error"]


def test_a_short_run_writes_the_report_and_counts_what_the_gateway_counted(
    gateway: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = gateway_counts(gateway)
    code = loadtest(
        "--host", gateway, "--duration", "3s", "--users", "3", "--models", "digits:2,mlp:1",
        "--slo-p99-ms", "5000", "--max-error-rate", "0.01", "--results", str(tmp_path),
    )  # fmt: skip
    output = capsys.readouterr().out
    assert code == 0, output
    for name in ("stats_stats.csv", "stats_stats_history.csv", "report.html", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "plot.png").read_bytes().startswith(PNG_MAGIC)
    summary = summary_of(tmp_path)
    counted = gateway_counts(gateway) - before
    requests = summary["requests"]
    assert requests["ok"] > 0
    assert requests["sent"] == requests["ok"] == sum(counted.values())
    assert {m: summary["by_model"][m]["ok"] for m in ("digits", "mlp")} == {
        m: counted[(m, "success")] for m in ("digits", "mlp")
    }
    assert summary["gateway"]["total"] == requests["sent"]
    # Locust rewrites its CSV once a second, so it can miss the last requests of the stop.
    aggregated = (tmp_path / "stats_stats.csv").read_text().splitlines()[-1].split(",")
    assert aggregated[1] == "Aggregated"
    assert 0 < int(aggregated[2]) <= requests["sent"]
    assert "SLO MET" in output and "p99 latency of successes" in output
    page = (tmp_path / "verdict.html").read_text()
    assert "SLO MET</h1>" in page and "<th>p99</th>" in page
    assert "data:image/png;base64," in page and "href='report.html'" in page
    assert f"<td>all</td><td>{requests['ok']}</td>" in page


def test_a_tight_slo_on_the_slow_model_fails(
    gateway: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = loadtest(
        "--host", gateway, "--duration", "2s", "--users", "2", "--models", "mlp",
        "--slo-p99-ms", "0.5", "--results", str(tmp_path),
    )  # fmt: skip
    output = capsys.readouterr().out
    assert code == 1, output
    checks = {c["name"]: c["passed"] for c in summary_of(tmp_path)["checks"]}
    assert checks == {"p99 latency of successes": False, "error rate": True}
    assert "SLO MISSED" in output
    assert "SLO MISSED</h1>" in (tmp_path / "verdict.html").read_text()


def test_wrong_shapes_are_counted_as_client_errors(
    gateway: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = gateway_counts(gateway)
    code = loadtest(
        "--host", gateway, "--duration", "2s", "--users", "2", "--models", "digits",
        "--wrong-shape-ratio", "1", "--results", str(tmp_path),
    )  # fmt: skip
    capsys.readouterr()
    assert code == 1
    requests = summary_of(tmp_path)["requests"]
    counted = gateway_counts(gateway) - before
    assert requests["sent"] > 0
    assert requests["client_error"] == requests["sent"] == counted[("digits", "client_error")]
    assert sum(counted.values()) == requests["sent"]


def test_the_open_loop_offers_its_rate(
    gateway: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = loadtest(
        "--host", gateway, "--scenario", "open", "--rate", "100", "--users", "2",
        "--duration", "3s", "--models", "digits", "--slo-p99-ms", "5000",
        "--max-error-rate", "0.05", "--results", str(tmp_path),
    )  # fmt: skip
    capsys.readouterr()
    assert code == 0
    requests = summary_of(tmp_path)["requests"]
    # 100/s for 3 s, give or take the keepers' start-up and the last tick.
    assert 240 <= requests["due"] <= 320, requests


def test_a_schedule_runs_to_the_end_of_its_last_second_and_counts_each_seconds_due(
    tmp_path: Path,
) -> None:
    schedule = tmp_path / "schedule.txt"
    schedule.write_text("0.010\n0.500\n2.000\n2.999\n")
    assert schedule_duration_s(schedule) == 3.0
    assert offered_per_s(schedule) == [2, 0, 2]


@pytest.mark.parametrize("text", ["", "1.5\n0.5\n", "-1\n", "soon\n"])
def test_a_schedule_that_is_not_due_times_in_order_is_refused(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schedule = tmp_path / "schedule.txt"
    schedule.write_text(text)
    assert loadtest("--schedule", str(schedule), "--results", str(tmp_path)) == 2
    assert f"--schedule {schedule}:" in capsys.readouterr().out


def test_the_trace_scenario_needs_a_schedule_and_a_schedule_the_trace_scenario(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schedule = tmp_path / "schedule.txt"
    schedule.write_text("0.5\n")
    assert loadtest("--scenario", "trace", "--results", str(tmp_path)) == 2
    assert loadtest("--scenario", "open", "--schedule", str(schedule)) == 2
    assert capsys.readouterr().out.count("goes with the trace scenario") == 2


@pytest.fixture(scope="module")
def installed_bazaar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with bazaar installed from a wheel of this checkout (not editable); its bin.

    The dependencies are this interpreter's site-packages, named in a ``.pth`` file of the new
    venv, so nothing is downloaded; the build runs on a copy, so the checkout stays clean.
    """
    work = tmp_path_factory.mktemp("installed")
    source = work / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".bazaar", "results", "build", "*.egg-info", "__pycache__", ".*cache"
        ),
    )
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "bazaar-dependencies.pth").write_text(
        "\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n"
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "--no-build-isolation", str(source)],
        check=True,
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    return venv / "bin"


def outside_the_checkout() -> dict[str, str]:
    """The environment without PYTHONPATH, so only what is installed can be imported."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_an_installed_loadtest_run_from_another_directory_writes_its_results_there(
    gateway: str, installed_bazaar: Path, tmp_path: Path
) -> None:
    package = subprocess.run(
        [str(installed_bazaar / "python"), "-c", "import loadtests; print(loadtests.__file__)"],
        cwd=tmp_path,
        env=outside_the_checkout(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert package.startswith(str(installed_bazaar.parent)), package
    done = subprocess.run(
        [str(installed_bazaar / "bazaar"), "loadtest", "--host", gateway, "--duration", "2s",
         "--users", "2", "--models", "digits", "--slo-p99-ms", "5000"],
        cwd=tmp_path,
        env=outside_the_checkout(),
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (results,) = (tmp_path / "results" / "loadtest").iterdir()
    assert results.name.endswith("-steady")
    assert f"results in {results}/" in done.stdout
    assert summary_of(results)["requests"]["ok"] > 0
    assert (results / "report.html").stat().st_size > 0
    assert (results / "plot.png").read_bytes().startswith(PNG_MAGIC)
    assert not (Path(package).parent.parent / "results").exists()


def test_a_relative_results_folder_is_the_callers(gateway: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bazaar", "loadtest", "--host", gateway, "--duration", "1s",
         "--users", "1", "--models", "digits", "--slo-p99-ms", "5000", "--results", "here"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary_of(tmp_path / "here")["requests"]["ok"] > 0
    assert not (ROOT / "here").exists()


def test_plain_locust_without_a_scenario_honours_users_spawn_rate_and_run_time(
    gateway: str, tmp_path: Path
) -> None:
    # No --scenario and no --model-mix: Locust's own -u/-r/-t, on every ready model. The
    # scenario defaults (10 users for 30 s) used to win over them.
    done = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"),
         "--headless", "--only-summary", "--host", gateway, "-u", "3", "-r", "3", "-t", "3s",
         "--html", "report.html", "--tally-file", "tally.json",
         "--timeline-file", "timeline.jsonl"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "will be ignored" not in done.stderr
    tally = json.loads((tmp_path / "tally.json").read_text())
    assert tally["stopped"] - tally["started"] < 15, tally  # -t 3s, not the scenario's 30 s
    assert {key.split("/")[0] for key in tally["outcomes"]} == {"digits", "mlp"}
    assert all(key.endswith("/ok") for key in tally["outcomes"]), tally["outcomes"]
    timeline = [json.loads(line) for line in (tmp_path / "timeline.jsonl").read_text().splitlines()]
    assert max(point["users"] for point in timeline) == 3
    # Locust's own report charts the verdict's percentile, p99, beside the median.
    assert '"percentiles_to_chart": [0.5, 0.99]' in (tmp_path / "report.html").read_text()


ECHO_METADATA = {
    "name": "echo",
    "versions": ["1"],
    "platform": "fake",
    "inputs": [{"name": "x", "datatype": "INT32", "shape": [-1, 2]}],
    "outputs": [{"name": "x", "datatype": "INT32", "shape": [-1, 2]}],
}


class CyclingV2Server(BaseHTTPRequestHandler):
    """A v2 server with one model that answers inferences in a cycle of statuses."""

    CYCLE = (200, 503, 429, 504, 400, 500)
    lock = threading.Lock()
    answered: ClassVar[Counter[int]] = Counter()
    served: ClassVar[int] = 0

    def do_GET(self) -> None:
        if self.path == "/v2/health/ready":
            self.reply(200, {})
        elif self.path == "/v2/models/echo":
            self.reply(200, ECHO_METADATA)
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            status = self.CYCLE[CyclingV2Server.served % len(self.CYCLE)]
            CyclingV2Server.served += 1
            self.answered[status] += 1
        body = {"model_name": "echo", "outputs": []} if status == 200 else {"error": "no"}
        self.reply(status, body)

    def reply(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        """Quiet: the test reads the counts, not a log."""


@pytest.fixture
def other_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), CyclingV2Server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_another_v2_server_gets_each_outcome_counted_by_name(
    other_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = loadtest(
        "--host", other_server, "--duration", "2s", "--users", "2", "--models", "echo",
        "--max-error-rate", "0.5", "--results", str(tmp_path),
    )  # fmt: skip
    output = capsys.readouterr().out
    summary = summary_of(tmp_path)
    requests = summary["requests"]
    answered = CyclingV2Server.answered
    assert answered[200] > 0
    assert requests["sent"] == sum(answered.values())
    assert requests["ok"] == answered[200]
    assert requests["shed"] == answered[503] + answered[429]
    assert requests["expired"] == answered[504]
    assert requests["client_error"] == answered[400]
    assert requests["server_error"] == answered[500]
    assert requests["transport_error"] == requests["missed_schedule"] == 0
    # Five of every six fail, over the 50% allowed.
    assert code == 1, output
    assert summary["gateway"] is None
    assert (tmp_path / "plot.png").read_bytes().startswith(PNG_MAGIC)
