"""The transports benchmark runs end to end at a small size, as the command users run: a
row per caller count and case in both tables, every call answered (its figures are for
BENCHMARKS.md, not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_every_transport_and_hop_reports_a_row(demo_repository: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "loadtests.transports", str(demo_repository)]
    command += ["--calls", "32", "--rounds", "1", "--logs", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("cpus ") and "load average before" in lines[0]
    assert lines[-1].startswith("load average after")
    hop = lines.index("hop (client: http-binary)")
    assert lines[1] == "clients (hop: grpc)"
    clients = [line.split() for line in lines[3:hop]]
    hops = [line.split() for line in lines[hop + 2 : -1]]
    assert [(row[0], row[1]) for row in clients] == [
        (callers, case) for callers in ("1", "16") for case in ("http-json", "http-binary", "grpc")
    ]
    assert [(row[0], row[1]) for row in hops] == [
        (callers, case) for callers in ("1", "16") for case in ("hop-http", "hop-grpc")
    ]
    assert all(float(row[2]) > 0 for row in clients + hops)  # calls per second
    assert [row[-1] for row in clients + hops if row[1] in ("http-json", "hop-http")] == [
        "1.00"
    ] * 4
