"""Fake pods for dispatcher and router tests: scripted latency and failures, on loop time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gateway.router import Tensors
from protocol.errors import BazaarError, UpstreamError


@dataclass
class Call:
    url: str
    started: float
    rows: int
    inputs: Tensors
    timeout_s: float
    """The bound the pool gave the call (what the HTTP client sends as ``timeout``)."""


@dataclass
class FakePods:
    """Answers ``out = x * 2`` after ``latency_s``; ``fail`` decides per call what to raise."""

    latency_s: float = 0.010
    fail: Callable[[Call], BazaarError | None] = lambda call: None
    healthy: Callable[[str], bool] = lambda url: True
    calls: list[Call] = field(default_factory=list)

    async def infer(self, url: str, model: str, inputs: Tensors, timeout_s: float) -> Tensors:
        x = inputs["x"]
        call = Call(url, asyncio.get_running_loop().time(), int(x.shape[0]), inputs, timeout_s)
        self.calls.append(call)
        await asyncio.sleep(self.latency_s)
        error = self.fail(call)
        if error is not None:
            raise error
        return {"out": x * 2}

    async def ready(self, url: str, model: str) -> bool:
        return self.healthy(url)


def rows_of(*values: float) -> Tensors:
    return {"x": np.array([[v] for v in values], dtype=np.float32)}


def connection_refused(call: Call) -> BazaarError:
    return UpstreamError(f"cannot connect to {call.url}")
