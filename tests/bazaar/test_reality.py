"""``bazaar replay``'s arithmetic and its accelerator repository; the replay itself is a
benchmark (BENCHMARKS.md), run by hand."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bazaar.reality import (
    accelerator_repository,
    batch_and_hop_seconds,
    cold_starts,
    replica_seconds,
)
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


async def test_the_hop_is_the_gateways_mean_pod_call_less_the_workers_mean_compute() -> None:
    """Against a stand-in for ``bazaar serve``'s two metrics pages; another model's series
    must not count."""
    pages = {
        "/metrics": "# TYPE bazaar_gateway_pod_seconds histogram\n"
        'bazaar_gateway_pod_seconds_sum{model="mlp",version=""} 26.0\n'
        'bazaar_gateway_pod_seconds_count{model="mlp",version=""} 100.0\n'
        'bazaar_gateway_pod_seconds_sum{model="other",version=""} 900.0\n'
        'bazaar_gateway_pod_seconds_count{model="other",version=""} 1.0\n',
        "/metrics/workers": "# TYPE bazaar_model_compute_seconds histogram\n"
        'bazaar_model_compute_seconds_sum{model="mlp"} 10.0\n'
        'bazaar_model_compute_seconds_count{model="mlp"} 50.0\n'
        'bazaar_model_compute_seconds_sum{model="other"} 1.0\n'
        'bazaar_model_compute_seconds_count{model="other"} 1.0\n',
    }

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=pages[request.path])

    app = web.Application()
    for path in pages:
        app.router.add_get(path, page)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        batch_s, hop_s = await batch_and_hop_seconds(session, str(server.make_url("")).rstrip("/"))
    assert (batch_s, hop_s) == pytest.approx((0.2, 0.06))
