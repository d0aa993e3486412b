"""SIGTERM drains a gateway process, bounded by --drain-timeout even when a pod never answers."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from tests.support import bazaar_process, free_port, models_ready, wait_until

METADATA = {
    "name": "stuck",
    "versions": ["1"],
    "platform": "onnxruntime_onnx",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}],
}


class StalledPod(BaseHTTPRequestHandler):
    """A v2 server that describes its model, then never answers an inference."""

    released: ClassVar[threading.Event] = threading.Event()

    def do_GET(self) -> None:
        if self.path == "/v2/models/stuck":
            body = json.dumps(METADATA).encode()
        elif self.path == "/v2/models/stuck/config":
            body = json.dumps({"name": "stuck", "max_batch_size": 8}).encode()
        else:
            body = json.dumps({"ready": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.released.wait(60)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def stalled_pod() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StalledPod)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    StalledPod.released.set()
    server.shutdown()
    server.server_close()


def test_a_stalled_pod_cannot_hold_the_drain_past_its_bound(
    stalled_pod: str, tmp_path: Path
) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(json.dumps({"models": {"stuck": [stalled_pod]}}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["gateway", "--endpoints", str(endpoints), "--port", str(port), "--drain-timeout", "1"]
    with bazaar_process(args, tmp_path / "gateway.log", models_ready(url, ["stuck"])) as process:
        body = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}

        def infer() -> None:
            # The connection is closed when the bound is reached.
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{url}/v2/models/stuck/infer", json=body, timeout=30)

        in_flight = threading.Thread(target=infer)
        in_flight.start()
        wait_until(
            lambda: httpx.get(f"{url}/stats").json()["models"]["stuck"]["inflight_batches"] == 1,
            10,
            "the request to reach the pod",
        )
        process.send_signal(signal.SIGTERM)
        # Without the bound the drain waits for the pod call's own timeout (60 s).
        assert process.wait(timeout=15) == 0
        in_flight.join(timeout=15)
