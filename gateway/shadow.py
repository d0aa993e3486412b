"""Shadow traffic: a share of a model's requests also goes to a candidate version, whose
answers are compared with the primary's and never returned.

``Shadow.send`` is called once a request has been submitted to its primary version: it
draws whether the request is shadowed (``ShadowPolicy.share``), and if so submits the same
inputs to the candidate's dispatcher, beside the primary, and leaves a task that waits for
both answers and compares them (``compare``). The primary never waits on it:

* nothing of the shadow runs on the request's path but the draw and a non-blocking submit;
* at most ``MAX_INFLIGHT`` shadowed requests per model are in flight; beyond that, and
  whenever the candidate's queue refuses (full, or its wait longer than the queue time),
  the shadow is dropped and counted;
* shadows queue at the candidate's lowest priority level, so they go last wherever the
  candidate also serves real requests (a canary), and are the first to expire under load;
* a shadow has its own deadline (the queue time), not the client's; a client that leaves
  leaves the shadow nothing to compare, and it is counted as failed.

What is measured, per model and candidate version (``/stats`` and metrics): requests
shadowed, dropped, failed (the candidate's error, or the primary's), rows agreeing and not,
the largest absolute and relative differences seen, and the candidate's time to answer.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.dispatcher import Dispatcher
from gateway.metrics import ShadowMetrics
from gateway.router import Tensors
from protocol.errors import BazaarError
from protocol.schema import TensorSpec
from protocol.support import cancel_and_wait
from protocol.traffic import ShadowPolicy

log = logging.getLogger(__name__)

MAX_INFLIGHT = 64
"""Shadowed requests in flight per model at most; more are dropped."""


@dataclass(frozen=True, slots=True)
class Agreement:
    """How a candidate's answer compares with the primary's."""

    rows: int
    agreed: int
    """Rows whose every compared output agrees (``ShadowPolicy.compare``)."""
    max_abs_diff: float
    max_rel_diff: float
    """Over every element of the outputs both have; relative to the larger of the two
    magnitudes (so 0 against 1 is 1, not infinite)."""


def compare(primary: Tensors, candidate: Tensors, rows: int, policy: ShadowPolicy) -> Agreement:
    """Row by row over the outputs both answered; an output whose shape differs disagrees."""
    agreeing = np.ones(rows, dtype=bool)
    max_abs = max_rel = 0.0
    for name, expected in primary.items():
        got = candidate.get(name)
        if got is None or got.shape != expected.shape or expected.ndim == 0:
            agreeing[:] = False
            continue
        if expected.dtype.kind not in "biuf" or got.dtype.kind not in "biuf":
            agreeing &= np.array([np.array_equal(a, b) for a, b in zip(expected, got, strict=True)])
            continue
        want, have = expected.astype(np.float64), got.astype(np.float64)
        diff = np.abs(have - want)
        if diff.size:
            larger = np.maximum(np.abs(want), np.abs(have))
            relative = np.divide(diff, larger, out=np.zeros_like(diff), where=larger > 0)
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float(relative.max()))
        if policy.compare == "top1":
            agreeing &= _top1(want) == _top1(have)
        else:
            close = diff <= policy.atol + policy.rtol * np.abs(want)
            agreeing &= close.reshape(rows, -1).all(axis=1)
    return Agreement(rows, int(agreeing.sum()), max_abs, max_rel)


def _top1(scores: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Per row, the index of the largest score (over the last axis, then every other)."""
    rows = scores.shape[0]
    top: np.ndarray[Any, Any] = scores.reshape(rows, -1, scores.shape[-1]).argmax(axis=-1)
    return top.reshape(rows, -1)[:, 0]


@dataclass(slots=True)
class ShadowStats:
    sent: int = 0
    dropped: int = 0
    failed: int = 0
    compared: int = 0
    rows: int = 0
    agreed_rows: int = 0
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0

    def to_json(self) -> dict[str, Any]:
        agreement = self.agreed_rows / self.rows if self.rows else None
        return {
            "sent": self.sent,
            "dropped": self.dropped,
            "failed": self.failed,
            "compared": self.compared,
            "rows": self.rows,
            "agreed_rows": self.agreed_rows,
            "agreement": agreement,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
        }


class Shadow:
    """One model's shadow: its candidate version's dispatcher and what was measured."""

    def __init__(
        self,
        model: str,
        policy: ShadowPolicy,
        candidate: Dispatcher,
        inputs: tuple[TensorSpec, ...],
        metrics: ShadowMetrics,
        rng: random.Random,
    ) -> None:
        self.model = model
        self.policy = policy
        self.candidate = candidate
        self.inputs = inputs
        """The candidate's inputs: only requests to a version with the same are shadowed."""
        self.metrics = metrics
        self.stats = ShadowStats()
        self._rng = rng
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, inputs: Tensors, rows: int, primary: asyncio.Future[Tensors]) -> None:
        """Shadow this request, if drawn and there is room; never raises, never waits."""
        if self._rng.random() >= self.policy.share:
            return
        if len(self._tasks) >= MAX_INFLIGHT:
            self._drop()
            return
        try:
            self.candidate.admit()
            shadowed = self.candidate.submit(
                inputs, rows, priority=self.candidate.policy.priority_levels
            )
        except BazaarError:
            self._drop()
            return
        self.stats.sent += 1
        self.metrics.requests["sent"].inc()
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._compare(primary, shadowed, rows, loop.time()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        await cancel_and_wait(*self._tasks)

    def _drop(self) -> None:
        self.stats.dropped += 1
        self.metrics.requests["dropped"].inc()

    async def _compare(
        self,
        primary: asyncio.Future[Tensors],
        shadowed: asyncio.Future[Tensors],
        rows: int,
        started: float,
    ) -> None:
        try:
            candidate = await shadowed
            self.metrics.seconds.observe(asyncio.get_running_loop().time() - started)
            # asyncio.wait, not await: this task's end must never cancel the primary.
            await asyncio.wait([primary])
            if primary.cancelled() or primary.exception() is not None:
                raise LookupError("the primary request failed or its caller left")
        except (BazaarError, LookupError):
            self.stats.failed += 1
            self.metrics.requests["failed"].inc()
            return
        finally:
            if not shadowed.done():
                shadowed.cancel()  # this task was cancelled: the candidate need not compute
        agreement = compare(primary.result(), candidate, rows, self.policy)
        stats = self.stats
        stats.compared += 1
        stats.rows += agreement.rows
        stats.agreed_rows += agreement.agreed
        stats.max_abs_diff = max(stats.max_abs_diff, agreement.max_abs_diff)
        stats.max_rel_diff = max(stats.max_rel_diff, agreement.max_rel_diff)
        self.metrics.requests["compared"].inc()
        self.metrics.rows["agreed"].inc(agreement.agreed)
        self.metrics.rows["disagreed"].inc(agreement.rows - agreement.agreed)
