"""Schemathesis against ``bazaar serve``: every operation of the gateway's ``/openapi.json``.

The gateway runs as users run it, with real workers for two demo models, and schemathesis
runs as users run it, its command line: requests built from the document (its examples,
the boundary values of every schema, then random ones, valid and invalid, JSON and binary
bodies: ``schemathesis_hooks.py``), each answer checked to be no server error and to have
the status, content type, headers and body the document gives.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import bazaar_process, free_port, models_ready

MODELS = ("digits", "mlp")
HOOKS = Path(__file__).with_name("schemathesis_hooks.py").resolve()
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
]
MAX_EXAMPLES = 10
"""Random requests per operation (fuzzing); examples and boundary values come on top."""
REQUEST_TIMEOUT_S = 10
"""Longest one request may take: a hang is a failure, not a stalled test."""


@pytest.fixture(scope="module")
def gateway(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``bazaar serve`` over digits and mlp, one worker each; yields its URL."""
    repository = tmp_path_factory.mktemp("openapi-repository")
    for model in MODELS:
        shutil.copytree(demo_repository / model, repository / model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--model-repository", str(repository), "--port", str(port), "--no-autoscale"]
    log = tmp_path_factory.mktemp("openapi-serve") / "serve.log"
    with bazaar_process(args, log, models_ready(url, MODELS)):
        yield url


@pytest.mark.timeout(240)
def test_schemathesis_finds_no_server_error_and_no_answer_unlike_the_document(
    gateway: str, tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{gateway}/openapi.json"]
    command += ["--checks", ",".join(CHECKS), "--phases", "examples,coverage,fuzzing"]
    command += ["--max-examples", str(MAX_EXAMPLES), "--request-timeout", str(REQUEST_TIMEOUT_S)]
    # One worker: two raced in hypothesis' own code (schemathesis 4.32, hypothesis 6.170).
    command += ["--workers", "1"]
    environment = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "NO_COLOR": "1"}
    started = time.monotonic()
    # In a directory of its own: hypothesis keeps its example database in the working directory.
    run = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True)
    print(f"schemathesis ran {time.monotonic() - started:.1f} s:\n{run.stdout[-3000:]}")
    assert run.returncode == 0, run.stdout + run.stderr
