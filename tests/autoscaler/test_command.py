"""The ``bazaar autoscaler`` process's HTTP side: /healthz follows the loop, /stats explains;
its gateway token is checked at start."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from autoscaler.command import _app
from autoscaler.metrics import AutoscalerMetrics
from bazaar.cli import main


async def test_healthz_fails_once_the_loop_stops_ticking() -> None:
    ticking = [True]
    app = _app(AutoscalerMetrics(CollectorRegistry()), lambda: ticking[0])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://a"
    ) as http:
        healthy = await http.get("/healthz")
        assert (healthy.status_code, healthy.json()) == (200, {"ticking": True})
        ticking[0] = False
        stuck = await http.get("/healthz")
        assert (stuck.status_code, stuck.json()) == (503, {"ticking": False})
        assert (await http.get("/stats")).json() == {"models": {}}
        assert (await http.get("/metrics")).status_code == 200


@pytest.mark.parametrize(
    "content,words", [("short", "at least 32 visible ASCII characters"), (None, "cannot read")]
)
def test_a_bad_gateway_token_file_stops_the_autoscaler_at_start(
    tmp_path: Path, content: str | None, words: str, caplog: pytest.LogCaptureFixture
) -> None:
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    args = ["autoscaler", "--namespace", "n", "--gateway", "http://g:8000"]
    assert main([*args, "--gateway-token-file", str(token_file)]) == 2
    assert words in caplog.text
