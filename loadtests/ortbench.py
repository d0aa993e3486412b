"""Raw, in-process ONNX Runtime: the ceiling that no server in front of it can beat.

Runs in a child process pinned to the servers' core (``measure_ort`` starts it under
``taskset``), with the model server's session settings (``references.session_for``: one
thread). For each model and batch size it calls ``session.run`` back to back on fixed
random rows, at least ``MIN_CALLS`` times and for at least ``MIN_SECONDS``, and reports the
median call time and rows per second. The data is the same shape a request carries, so the
numbers compare directly with the HTTP points.

Run as ``python -m loadtests.ortbench --repository DIR --out FILE MODEL...``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.references import session_for
from loadtests.wrk import BenchError

BATCH_SIZES = (1, 8, 16, 32)
MIN_CALLS = 200
MIN_SECONDS = 1.0
WARMUP_CALLS = 10


@dataclass(frozen=True, slots=True)
class OrtPoint:
    batch: int
    calls: int
    p50_ms: float
    rows_per_s: float


def model_file(repository: Path, model: str) -> Path:
    """The newest version's ``model.onnx`` of ``model``."""
    versions = sorted(
        (int(path.name) for path in (repository / model).iterdir() if path.name.isdigit()),
        reverse=True,
    )
    for version in versions:
        path = repository / model / str(version) / "model.onnx"
        if path.exists():
            return path
    raise BenchError(f"no model.onnx under {repository / model}")


def sample_rows(model: str, rows: int, width: int) -> np.ndarray[Any, Any]:
    """Seeded input rows: pixel values 0..16 for digits, standard normal for the MLPs."""
    rng = np.random.default_rng(0)
    if model == "digits":
        return rng.integers(0, 17, size=(rows, width)).astype(np.float32)
    return rng.standard_normal((rows, width), dtype=np.float32)


def time_model(path: Path, model: str, batches: tuple[int, ...]) -> list[OrtPoint]:
    session = session_for(path)
    feed = session.get_inputs()[0]
    names = [output.name for output in session.get_outputs()]
    points = []
    for batch in batches:
        inputs = {feed.name: sample_rows(model, batch, int(feed.shape[1]))}
        for _ in range(WARMUP_CALLS):
            session.run(names, inputs)
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < MIN_CALLS or time.perf_counter() - started < MIN_SECONDS:
            before = time.perf_counter()
            session.run(names, inputs)
            times.append(time.perf_counter() - before)
        elapsed = time.perf_counter() - started
        points.append(
            OrtPoint(
                batch=batch,
                calls=len(times),
                p50_ms=statistics.median(times) * 1e3,
                rows_per_s=batch * len(times) / elapsed,
            )
        )
    return points


def measure_ort(
    repository: Path, models: list[str], core: int, out: Path
) -> dict[str, list[OrtPoint]]:
    """Run this module pinned to ``core`` and read back its points per model."""
    command = [
        "taskset", "-c", str(core), sys.executable, "-m", "loadtests.ortbench",
        "--repository", str(repository), "--out", str(out), *models,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"raw ONNX Runtime run failed: {done.stderr.strip()}")
    data = json.loads(out.read_text())
    return {model: [OrtPoint(**point) for point in points] for model, points in data.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()
    results = {
        model: [
            asdict(point)
            for point in time_model(model_file(args.repository, model), model, BATCH_SIZES)
        ]
        for model in args.models
    }
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
