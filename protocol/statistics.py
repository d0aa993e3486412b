"""Triton's statistics extension: what one model version has done since it was loaded.

``InferenceStatistics`` keeps Triton's cumulative counts and nanosecond durations, and
``to_json`` answers them as ``GET /v2/models[/{m}[/versions/{v}]]/stats`` and the gRPC
``ModelStatistics`` do (``extension_statistics.md``; Triton's ``infer_stats.cc`` for what
is counted when):

- ``answered``, once per request the model was asked (whatever its outcome): a success adds
  its time to ``success`` and its rows to ``inference_count``; anything else (a bad input,
  an expired deadline, a caller that left) adds its time to ``fail``.
- ``executed``, once per batch that ran: ``execution_count``, ``last_inference`` (wall
  clock, ms since the epoch), ``batch_stats`` for its size, and for every request in it its
  wait in the queue and the batch's compute_input/compute_infer/compute_output durations.
  As in Triton, each request of a batch counts the whole batch's compute time, and the
  queue and compute counts are the success count, so ``ns / count`` is the mean per request.

What the phases are is the server's to say (pods: the wait for an instance, preparing
ONNX Runtime's feeds, the session's run, reading its outputs; the gateway: its queue,
concatenating the batch, the pod's round trip, slicing the answer). Updates come from the
event loop only, so there is no lock; a reloaded model starts again from zero, as in Triton.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class _BatchDurations:
    count: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0


class InferenceStatistics:
    """One model version's cumulative statistics (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        """Wall time in seconds, for ``last_inference``."""
        self.success_count = 0
        self.success_ns = 0
        self.fail_count = 0
        self.fail_ns = 0
        self.queue_ns = 0
        self.compute_input_ns = 0
        self.compute_infer_ns = 0
        self.compute_output_ns = 0
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self._batches: dict[int, _BatchDurations] = {}

    def answered(self, ok: bool, rows: int, seconds: float) -> None:
        """A request of ``rows`` rows was answered after ``seconds``: a success, or not."""
        if ok:
            self.success_count += 1
            self.success_ns += _ns(seconds)
            self.inference_count += rows
        else:
            self.fail_count += 1
            self.fail_ns += _ns(seconds)

    def executed(
        self,
        batch_size: int,
        requests: int,
        queue_s: float,
        input_s: float,
        infer_s: float,
        output_s: float,
    ) -> None:
        """A batch of ``batch_size`` rows ran for ``requests`` requests, which waited
        ``queue_s`` in all; ``input_s``, ``infer_s``, ``output_s``: the batch's phases."""
        self.last_inference_ms = max(self.last_inference_ms, int(self._clock() * 1000))
        self.execution_count += 1
        self.queue_ns += _ns(queue_s)
        self.compute_input_ns += requests * _ns(input_s)
        self.compute_infer_ns += requests * _ns(infer_s)
        self.compute_output_ns += requests * _ns(output_s)
        batch = self._batches.get(batch_size)
        if batch is None:
            batch = self._batches[batch_size] = _BatchDurations()
        batch.count += 1
        batch.input_ns += _ns(input_s)
        batch.infer_ns += _ns(infer_s)
        batch.output_ns += _ns(output_s)

    def to_json(self, name: str, version: str) -> dict[str, Any]:
        """Triton's ``$model_stat`` object for this model version."""
        computed = self.success_count  # Triton's: successes less cache hits (no cache here)
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": _duration(self.success_count, self.success_ns),
                "fail": _duration(self.fail_count, self.fail_ns),
                "queue": _duration(self.success_count, self.queue_ns),
                "compute_input": _duration(computed, self.compute_input_ns),
                "compute_infer": _duration(computed, self.compute_infer_ns),
                "compute_output": _duration(computed, self.compute_output_ns),
                "cache_hit": _duration(0, 0),
                "cache_miss": _duration(0, 0),
            },
            "response_stats": {},  # decoupled models only
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": _duration(batch.count, batch.input_ns),
                    "compute_infer": _duration(batch.count, batch.infer_ns),
                    "compute_output": _duration(batch.count, batch.output_ns),
                }
                for size, batch in sorted(self._batches.items())
            ],
            "memory_usage": [],
        }


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}
