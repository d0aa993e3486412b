from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import bazaar_process, free_port


@pytest.fixture
def own_server(demo_repository: Path, tmp_path: Path) -> Iterator[str]:
    """A server of this test's own, for tests that load and unload models."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["model-server", "--model-repository", str(demo_repository), "--port", str(port)]
    args.append("--enable-model-control")
    with bazaar_process(args, tmp_path / "server.log", f"{url}/v2/health/ready"):
        yield url
