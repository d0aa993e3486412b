"""Real v2 servers of other projects, each from its own venv outside the checkout (their
pins conflict with ours), built by the set-up script next to this file (make test runs it)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.support import http_ok, wait_until

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bazaar"


def venv(name: str, script: str) -> Path:
    """A set-up script's venv; the test fails, saying how to build it, when it is missing."""
    path = CACHE / name
    if not (path / ".complete").exists():
        pytest.fail(f"{path} is missing: run tests/upstreams/{script} (make test does)")
    return path


@contextlib.contextmanager
def upstream_process(
    args: Sequence[str],
    cwd: Path,
    log_path: Path,
    ready: str,
    timeout_s: float = 60.0,
    env: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server until ``ready`` answers 200; stop it (SIGTERM, then SIGKILL) afterwards.
    Its output goes to ``log_path``, shown when it fails to start."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(args),
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        try:
            wait_until(lambda: process.poll() is None and http_ok(ready), timeout_s, ready)
        except AssertionError:
            raise AssertionError(
                f"{' '.join(args)} did not become ready; its log:\n{log_path.read_text()}"
            ) from None
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
