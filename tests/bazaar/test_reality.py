"""``bazaar replay``'s arithmetic and its accelerator repository; the replay itself is a
benchmark (BENCHMARKS.md), run by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoscaler.simulation.traces import builtin
from bazaar.reality import accelerator_repository, cold_start, compress, replica_seconds
from models.config import load_config
from models.repository import ModelRepository


def test_a_trace_compressed_keeps_its_shape_at_the_peak_asked_for() -> None:
    step = builtin("step", 1)  # 300 s at 200, 600 s at 1600, 300 s at 200 req/s
    replay = compress(step, 120, 150.0, 1)
    assert replay.duration_s == 120
    assert replay.rate_per_s.tolist() == [18.75] * 30 + [150.0] * 60 + [18.75] * 30
    # Arrivals drawn from it: about its mean rate over its length.
    assert len(replay.arrivals_ms) == pytest.approx(replay.rate_per_s.sum(), rel=0.05)
    assert replay.arrivals_ms.max() < 120_000


def test_the_cold_start_is_the_median_scale_up_until_ready() -> None:
    samples = [
        (0.0, 1, 1),
        (1.0, 4, 1),  # up to 4 at 1 s, all ready at 6 s: 5 s
        (2.0, 4, 1),
        (6.0, 4, 4),
        (7.0, 6, 4),  # up to 6 at 7 s, ready at 14 s: 7 s
        (14.0, 6, 6),
        (20.0, 8, 6),  # up to 8 at 20 s, cut to 7 before ready: not a cold start
        (21.0, 7, 6),
        (30.0, 7, 7),
        (31.0, 8, 7),  # up to 8 at 31 s, ready at 34 s: 3 s
        (34.0, 8, 8),
    ]
    assert cold_start(samples) == 5.0
    with pytest.raises(ValueError, match="no scale-up"):
        cold_start([(0.0, 1, 1), (1.0, 1, 1)])


def test_replica_seconds_integrate_the_replicas_asked_for_within_the_trace() -> None:
    samples = [(0.0, 1, 1), (10.0, 4, 1), (20.0, 2, 4), (35.0, 9, 9)]
    assert replica_seconds(samples, 30) == 1 * 10 + 4 * 10 + 2 * 10


def test_the_accelerator_repository_holds_mlp_alone_with_its_batch_time(
    demo_repository: Path, tmp_path: Path
) -> None:
    root = accelerator_repository(demo_repository, tmp_path / "repo", 8, 200.0)
    assert ModelRepository(root).model_names() == ["mlp"]
    config = load_config(root / "mlp" / "config.yaml")
    assert (config.max_batch_size, config.min_batch_time_ms) == (8, 200.0)
    original = load_config(demo_repository / "mlp" / "config.yaml")
    assert config.dynamic_batching == original.dynamic_batching
    model = Path("mlp", "1", "model.onnx")
    assert (root / model).read_bytes() == (demo_repository / model).read_bytes()
