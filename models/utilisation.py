"""Utilisation reporting: how busy a model's runtime is, and the GPUs where NVML exists.

``BusyTracker`` integrates the number of batches executing over wall time. Its ratio over
the last window (busy seconds / (window x instances)) is the accelerator-load signal the
autoscaler reads, on CPU and GPU alike: it says how much of the runtime's capacity was in
use, which GPU utilisation cannot (that saturates at 100 % at any batch size).

Worker threads call ``begin``/``end`` and the event loop reads ``ratio``, so all state sits
behind one lock. Memory stays bounded under any request rate: snapshots are kept at most
every ``window_s / 10`` seconds.

``GpuMonitor`` reads NVML when the library and a GPU are present. Without them it reports
nothing at all, so a missing GPU shows up as absent series, never as a zero.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class BusyTracker:
    """Busy time of a runtime that executes at most ``instances`` batches at once."""

    def __init__(
        self,
        instances: int,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.instances = instances
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._active = 0
        self._busy_s = 0.0
        self._last_change = clock()
        self._created = self._last_change
        self._snapshots: deque[tuple[float, float]] = deque([(self._created, 0.0)])

    def begin(self) -> None:
        with self._lock:
            self._advance(self._clock(), +1)

    def end(self) -> None:
        with self._lock:
            self._advance(self._clock(), -1)

    @property
    def active(self) -> int:
        return self._active

    def busy_seconds(self) -> float:
        """Cumulative executing time, counting batches still running."""
        with self._lock:
            return self._busy_at(self._clock())

    def ratio(self) -> float:
        """Fraction of capacity used over the last ``window_s`` (0..1)."""
        with self._lock:
            now = self._clock()
            self._snapshot(now)
            start, busy_then = self._snapshots[0]
            for t, busy in self._snapshots:
                if t > now - self.window_s:
                    break
                start, busy_then = t, busy
            elapsed = now - start
            if elapsed <= 0:
                return 0.0
            return min(1.0, (self._busy_at(now) - busy_then) / (elapsed * self.instances))

    def _busy_at(self, now: float) -> float:
        return self._busy_s + self._active * (now - self._last_change)

    def _advance(self, now: float, delta: int) -> None:
        self._busy_s = self._busy_at(now)
        self._last_change = now
        self._active += delta
        self._snapshot(now)

    def _snapshot(self, now: float) -> None:
        if now - self._snapshots[-1][0] >= self.window_s / 10:
            self._snapshots.append((now, self._busy_at(now)))
        # Keep one snapshot at or before the window's start, drop the older ones.
        while len(self._snapshots) > 1 and self._snapshots[1][0] <= now - self.window_s:
            self._snapshots.popleft()


@dataclass(frozen=True, slots=True)
class GpuReading:
    index: int
    name: str
    utilization: float
    """Fraction of the last sample period in which a kernel ran (0..1)."""
    memory_used_bytes: int
    memory_total_bytes: int


class GpuMonitor:
    """NVML readings per GPU; ``available`` is False where NVML or a GPU is missing."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._count = int(pynvml.nvmlDeviceGetCount())
            self._nvml = pynvml
            log.info("NVML found %d GPU(s)", self._count)
        except Exception as exc:  # ImportError, or NVMLError when there is no driver or GPU
            log.info("no GPU metrics: %s", exc)

    @property
    def available(self) -> bool:
        return self._nvml is not None and self._count > 0

    def read(self) -> list[GpuReading]:
        if not self.available:
            return []
        nvml = self._nvml
        readings = []
        for index in range(self._count):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            util = nvml.nvmlDeviceGetUtilizationRates(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            readings.append(
                GpuReading(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    utilization=float(util.gpu) / 100.0,
                    memory_used_bytes=int(memory.used),
                    memory_total_bytes=int(memory.total),
                )
            )
        return readings
