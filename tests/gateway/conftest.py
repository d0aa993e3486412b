from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from gateway.metrics import GatewayMetrics
from tests.gateway.scale import model_server, pod_url, write_scale


@pytest.fixture
def metrics() -> GatewayMetrics:
    return GatewayMetrics(CollectorRegistry())


@pytest.fixture(scope="session")
def scale_pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two ``bazaar model-server`` processes serving ``scale`` (``tests.gateway.scale``):
    the first version 1, the second versions 1 and 2."""
    urls = []
    with contextlib.ExitStack() as stack:
        for i, versions in enumerate(([1], [1, 2])):
            root = write_scale(tmp_path_factory.mktemp(f"scale-repository{i}"), versions)
            url, log = pod_url(), tmp_path_factory.mktemp("logs") / f"scale-pod{i}.log"
            stack.enter_context(model_server(root, url, log))
            urls.append(url)
        yield urls
