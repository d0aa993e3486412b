"""--log-format json and --access-log, on a real model server."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import httpx

from protocol.logs import JsonFormatter
from tests.support import bazaar_process, free_port


def test_a_json_log_line_carries_the_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("here",), None)
        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["level"], entry["logger"], entry["message"]) == ("ERROR", "x", "failed here")
    assert entry["time"].endswith("Z")
    assert "ValueError: boom" in entry["exception"]


def test_json_logs_and_the_access_log_from_a_real_server(
    demo_repository: Path, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    args = [
        "--log-format", "json", "model-server", "--model-repository", str(demo_repository),
        "--model", "digits", "--port", str(port), "--access-log",
    ]  # fmt: skip
    with bazaar_process(args, log, f"{url}/v2/health/ready"):
        assert httpx.get(f"{url}/v2/models/digits").status_code == 200
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    assert any("GET /v2/models/digits" in line["message"] for line in access), access
