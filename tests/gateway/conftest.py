from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from gateway.metrics import GatewayMetrics


@pytest.fixture
def metrics() -> GatewayMetrics:
    return GatewayMetrics(CollectorRegistry())
