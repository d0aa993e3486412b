"""The many-models benchmark runs end to end at a small size, as the command users run:
every layout answers every request it sends (its figures are for BENCHMARKS.md, not
asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_every_layout_reports_a_row_without_errors(demo_repository: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "loadtests.manymodels", "--digits"]
    command += [str(demo_repository / "digits"), "--models", "6", "--per-model-models", "2"]
    # One paging worker, and 5 models held between two pods: a budget of fewer would not
    # hold the first model a process loads (it carries ONNX Runtime's one-time allocations).
    command += ["--resident", "5", "--paged-workers", "1", "--cold", "2", "--duration", "0.5"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines()[1:]]
    layouts = ["per-model", "shared", "paged", "serve-paged", "paged-pods"]
    assert [row[0] for row in rows] == layouts
    assert [int(row[1]) for row in rows] == [2, 6, 6, 6, 6]  # models
    assert [int(row[2]) for row in rows] == [3, 2, 2, 2, 3]  # gateway and workers, or pods
    assert all(row[-2] == "0" for row in rows), rows  # errors
    # Loads during the Zipf run: none where every model stays loaded.
    assert (int(rows[0][-1]), int(rows[1][-1])) == (0, 0)
