from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import bazaar_process, free_port


@pytest.fixture(scope="session")
def demo_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo repository, built once per test session."""
    from models.demo import build_demo_repository

    root = tmp_path_factory.mktemp("demo-repository")
    build_demo_repository(root)
    return root


@pytest.fixture(scope="session")
def model_server(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``bazaar model-server`` process serving the demo repository; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("logs") / "model-server.log"
    args = ["model-server", "--model-repository", str(demo_repository), "--port", str(port)]
    with bazaar_process(args, log, f"{url}/v2/health/ready"):
        yield url
