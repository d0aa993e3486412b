"""Progressive rollout of a candidate version, judged on the candidate's own answers.

A model whose traffic policy has a ``rollout`` (``protocol.traffic.RolloutPolicy``) sends the
candidate ``steps[i]`` percent of its unversioned requests at step i (the other versions
share the rest by their weights). The catalog records every request the candidate answers
(``Rollout.record``: its time and whether it failed 5xx) and calls ``Rollout.tick`` every
second; ``judge`` decides, a pure function of the step's sample:

* fewer than ``min_requests`` candidate requests (or shadowed rows, when agreement is
  bounded) in the step: hold, there is no evidence yet;
* the step's p99 over ``max_p99_ms``, its 5xx rate over ``max_error_rate``, or the rows
  shadowed to the candidate agreeing less than ``min_agreement``: roll back, the candidate
  to 0 %, the reason logged, counted (``bazaar_gateway_rollbacks_total{reason}``) and in
  ``/stats``;
* else, once the step has lasted ``step_s``: advance; after the last step (100 %) it is done.
  At 100 % nothing is shadowed to the candidate (it serves every request), so that step is
  judged on latency and errors alone.

Without a ``RolloutRecord`` the state lives in this process: a gateway restarted
mid-rollout starts it again at its first step, and each gateway judges on its own. With one
(in Kubernetes, ``gateway.rollout_record``: the model Service's ``bazaar.dev/rollout``
annotation and a Lease), the progress (``SavedRollout``: which rollout, its step and state)
outlives the process and one gateway decides: the one the record says is ``deciding`` judges
and saves each change; the others follow what is saved (``Rollout.follow``), so every
gateway routes with the same weights and a restarted one resumes at the saved step. A step
resumed or taken over starts its own clock and sample again: a restart costs the step time,
never a judgement on too little evidence. A step's latencies are kept up to ``MAX_SAMPLES``
(the latest), so a long step costs bounded memory.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from protocol.metrics import outcome_of
from protocol.traffic import RolloutPolicy, version_order

log = logging.getLogger(__name__)

MAX_SAMPLES = 10_000
"""The most candidate latencies kept per step."""
REASONS = ("latency", "errors", "agreement")
"""Why a rollout was rolled back: the label values of ``bazaar_gateway_rollbacks_total``."""
STATES = ("running", "done", "rolled_back")


@dataclass(frozen=True, slots=True)
class SavedRollout:
    """A rollout's progress as kept beyond one gateway: which rollout, and where it stands."""

    policy: dict[str, Any]
    """Its ``RolloutPolicy.to_json()``: progress saved for another policy does not apply."""
    step: int
    state: str
    reason: str | None = None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "step": self.step,
            "state": self.state,
            "reason": self.reason,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, data: Any) -> SavedRollout:
        """``ValueError`` naming what is wrong when ``data`` is not a saved rollout."""
        if not isinstance(data, dict) or not isinstance(data.get("policy"), dict):
            raise ValueError("expected an object with a policy object")
        step, state = data.get("step"), data.get("state")
        steps = data["policy"].get("steps")
        if not isinstance(steps, list) or not isinstance(step, int):
            raise ValueError("expected an integer step and the policy's steps")
        if not 0 <= step < len(steps) or state not in STATES:
            raise ValueError(f"step {step!r} of {len(steps)}, state {state!r}")
        reason = data.get("reason")
        if reason is not None and reason not in REASONS:
            raise ValueError(f"reason {reason!r}")
        return cls(data["policy"], step, state, reason, str(data.get("detail", "")))


class RolloutRecord(Protocol):
    """Where rollouts' progress is kept beyond one gateway, and whether this one decides.

    ``load`` and ``save`` never raise: a record that cannot be read says None (nothing is
    known: the gateway goes on as it was), one that cannot be written says False (the
    deciding gateway tries again at its next judgement)."""

    @property
    def deciding(self) -> bool: ...

    async def load(self, model: str) -> SavedRollout | None: ...

    async def save(self, model: str, saved: SavedRollout) -> bool: ...


@dataclass(frozen=True, slots=True)
class StepSample:
    """What the candidate did during the current step."""

    elapsed_s: float
    requests: int
    errors: int
    p99_s: float | None
    shadowed_rows: int
    agreed_rows: int


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str
    """``hold``, ``advance`` or ``rollback``."""
    reason: str | None = None
    """For a rollback: one of ``REASONS``."""
    detail: str = ""


def judge(sample: StepSample, policy: RolloutPolicy) -> Verdict:
    """The step's verdict (see the module's docstring)."""
    if sample.requests < policy.min_requests:
        return Verdict("hold", detail=f"{sample.requests} of {policy.min_requests} requests")
    if policy.max_p99_ms is not None and sample.p99_s is not None:
        p99_ms = sample.p99_s * 1000
        if p99_ms > policy.max_p99_ms:
            detail = f"p99 {p99_ms:.1f} ms over {policy.max_p99_ms:g} ms"
            return Verdict("rollback", "latency", detail)
    if policy.max_error_rate is not None:
        rate = sample.errors / sample.requests
        if rate > policy.max_error_rate:
            detail = f"error rate {rate:.2%} over {policy.max_error_rate:.2%}"
            return Verdict("rollback", "errors", detail)
    if policy.min_agreement is not None:
        if sample.shadowed_rows < policy.min_requests:
            rows = f"{sample.shadowed_rows} of {policy.min_requests} shadowed rows"
            return Verdict("hold", detail=rows)
        agreement = sample.agreed_rows / sample.shadowed_rows
        if agreement < policy.min_agreement:
            detail = f"agreement {agreement:.2%} under {policy.min_agreement:.2%}"
            return Verdict("rollback", "agreement", detail)
    if sample.elapsed_s < policy.step_s:
        return Verdict("hold", detail=f"{sample.elapsed_s:.0f} of {policy.step_s:g} s")
    return Verdict("advance")


class Rollout:
    """One model's rollout in progress: its step, and the candidate's sample in it."""

    def __init__(self, model: str, policy: RolloutPolicy, now: float) -> None:
        self.model = model
        self.policy = policy
        self.step = 0
        self.state = "running"
        """``running``, ``done`` or ``rolled_back``."""
        self.reason: str | None = None
        """Why it was rolled back (one of ``REASONS``), with ``detail``."""
        self.detail = ""
        self._started = now
        self._latencies: deque[float] = deque(maxlen=MAX_SAMPLES)
        self._requests = 0
        self._errors = 0
        self._rows_at_start = (0, 0)

    @property
    def percent(self) -> float:
        """The candidate's share of unversioned requests now, in percent."""
        if self.state == "rolled_back":
            return 0.0
        return 100.0 if self.state == "done" else self.policy.steps[self.step]

    def record(self, version: str, seconds: float, status: int) -> None:
        """One request answered by ``version`` (counted when it is the candidate's)."""
        if version != self.policy.version or self.state != "running":
            return
        self._requests += 1
        self._latencies.append(seconds)
        if outcome_of(status) == "server_error":
            self._errors += 1

    def tick(self, now: float, shadowed_rows: int, agreed_rows: int) -> Verdict:
        """Judge the step (``shadowed_rows``, ``agreed_rows``: the shadow's totals so far)
        and act on the verdict."""
        if self.state != "running":
            return Verdict("hold")
        rows0, agreed0 = self._rows_at_start
        latencies = np.fromiter(self._latencies, dtype=np.float64)
        sample = StepSample(
            now - self._started,
            self._requests,
            self._errors,
            float(np.percentile(latencies, 99)) if latencies.size else None,
            shadowed_rows - rows0,
            agreed_rows - agreed0,
        )
        policy = self.policy
        if self.percent == 100.0:
            # Nothing is shadowed to a candidate that serves every request: agreement can no
            # longer be measured, and waiting for it would hold the last step for ever.
            policy = dataclasses.replace(policy, min_agreement=None)
        verdict = judge(sample, policy)
        steps = len(self.policy.steps)
        if verdict.action == "rollback":
            self.state, self.reason, self.detail = "rolled_back", verdict.reason, verdict.detail
            log.warning(
                "%s: rolled back version %s at step %d/%d (%g %%): %s",
                self.model,
                self.policy.version,
                self.step + 1,
                steps,
                self.policy.steps[self.step],
                verdict.detail,
            )
        elif verdict.action == "advance":
            if self.step + 1 == steps:
                self.state = "done"
                log.info("%s: rollout of version %s done: 100 %%", self.model, self.policy.version)
            else:
                self.step += 1
                log.info(
                    "%s: rollout of version %s at step %d/%d: %g %%",
                    self.model,
                    self.policy.version,
                    self.step + 1,
                    steps,
                    self.policy.steps[self.step],
                )
            self._started = now
            self._latencies.clear()
            self._requests = self._errors = 0
            self._rows_at_start = (shadowed_rows, agreed_rows)
        return verdict

    def saved(self) -> SavedRollout:
        return SavedRollout(self.policy.to_json(), self.step, self.state, self.reason, self.detail)

    def follow(self, saved: SavedRollout, now: float, shadowed_rows: int, agreed_rows: int) -> bool:
        """Take the saved progress when it is this rollout's and differs, its step's sample
        starting now (``shadowed_rows``, ``agreed_rows``: the shadow's totals so far); True
        if taken."""
        if saved.policy != self.policy.to_json() or saved == self.saved():
            return False
        self.step, self.state = saved.step, saved.state
        self.reason, self.detail = saved.reason, saved.detail
        self._started = now
        self._latencies.clear()
        self._requests = self._errors = 0
        self._rows_at_start = (shadowed_rows, agreed_rows)
        log.info(
            "%s: rollout of version %s is at step %d/%d (%g %%), %s, as saved",
            self.model,
            self.policy.version,
            self.step + 1,
            len(self.policy.steps),
            self.percent,
            self.state,
        )
        return True

    def to_json(self) -> dict[str, object]:
        return {
            "version": self.policy.version,
            "state": self.state,
            "step": self.step + 1,
            "steps": len(self.policy.steps),
            "percent": self.percent,
            "reason": self.reason,
            "detail": self.detail,
        }


def rollout_weights(
    weights: tuple[tuple[str, float], ...],
    candidate: str,
    percent: float,
    served: Collection[str],
) -> tuple[tuple[str, float], ...]:
    """``weights`` with the candidate at ``percent`` and the other served versions sharing
    the rest by their own weights; when the policy weighs none of them, the highest of them
    takes the rest."""
    others = [(v, w) for v, w in weights if v != candidate and v in served and w > 0]
    if not others:
        rest = sorted((v for v in served if v != candidate), key=version_order)
        if not rest:
            return ((candidate, 1.0),)  # nothing else could serve
        others = [(rest[-1], 1.0)]
    total = sum(weight for _, weight in others)
    shared = [(version, weight / total * (100.0 - percent)) for version, weight in others]
    return tuple(sorted([*shared, (candidate, percent)], key=lambda pair: version_order(pair[0])))
