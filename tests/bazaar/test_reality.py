"""``bazaar replay``'s arithmetic and its accelerator repository; the replay itself is a
benchmark (BENCHMARKS.md), run by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from bazaar.reality import accelerator_repository, cold_starts, replica_seconds
from models.config import load_config
from models.repository import ModelRepository


def test_cold_starts_are_read_from_the_supervisors_log() -> None:
    log = """\
2026-12-01 17:41:10,225 INFO    bazaar.supervisor: started mlp worker 1 on http://h:1 (pid 9)
2026-12-01 17:41:12,483 INFO    bazaar.supervisor: mlp worker 1 on http://h:1 is ready
2026-12-01 17:41:57,400 INFO    bazaar.supervisor: started mlp worker 2 on http://h:2 (pid 9)
2026-12-01 17:41:57,500 INFO    bazaar.supervisor: started mlp worker 3 on http://h:3 (pid 9)
2026-12-01 17:41:58,000 INFO    autoscaler.loop: model mlp: scale_up 3 -> 4: ...
2026-12-01 17:42:00,400 INFO    bazaar.supervisor: mlp worker 2 on http://h:2 is ready
2026-12-01 17:42:04,500 INFO    bazaar.supervisor: mlp worker 3 on http://h:3 is ready
2026-12-01 17:42:05,000 INFO    bazaar.supervisor: started mlp worker 4 on http://h:4 (pid 9)
"""
    # Worker 1 starts with the gateway, worker 4 never got ready: neither counts.
    assert cold_starts(log) == pytest.approx([3.0, 7.0])


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
