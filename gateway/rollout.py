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
never a judgement on too little evidence.

Each gateway sees only the requests sent to it, so the deciding one judges on the sum of
every gateway's samples: each publishes its step's ``StepCounts`` (``Rollout.published``,
in its ``/stats``), counts that add: requests, 5xx, shadowed and agreeing rows, and the
latencies as a histogram over fixed buckets (``LATENCY_BUCKETS_S``, 5 % apart), so that the
p99 of the sum is the p99 of every latency, not an average of p99s. The p99 taken is the
upper bound of its bucket: never under the true one, at most 5 % over. Only samples of the
same rollout at the same step are summed (``Rollout.peer_counts``): a gateway that has not
yet followed a step publishes the previous one's, which no longer counts. A step's
histogram is bounded (its buckets), so a long step costs bounded memory.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from protocol.metrics import outcome_of
from protocol.traffic import RolloutPolicy, version_order

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = tuple(1e-4 * 1.05**i for i in range(289))
"""The upper bounds of the latency histogram's buckets, in seconds: 0.1 ms to 127 s, each 5 %
above the one before (a latency above the last counts in the last)."""
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


def latency_bucket(seconds: float) -> float:
    """The upper bound of the bucket ``seconds`` falls in."""
    index = bisect.bisect_left(LATENCY_BUCKETS_S, seconds)
    return LATENCY_BUCKETS_S[min(index, len(LATENCY_BUCKETS_S) - 1)]


@dataclass(frozen=True, slots=True)
class StepCounts:
    """What the candidate did during a step at one gateway, or at several summed (``+``)."""

    requests: int = 0
    errors: int = 0
    """Of the requests, those answered 5xx."""
    latency_s: Mapping[float, int] = field(default_factory=dict)
    """The requests' latencies: count per bucket, by its upper bound (``LATENCY_BUCKETS_S``)."""
    shadowed_rows: int = 0
    agreed_rows: int = 0

    def __add__(self, other: StepCounts) -> StepCounts:
        return StepCounts(
            self.requests + other.requests,
            self.errors + other.errors,
            dict(Counter(self.latency_s) + Counter(other.latency_s)),
            self.shadowed_rows + other.shadowed_rows,
            self.agreed_rows + other.agreed_rows,
        )

    @property
    def p99_s(self) -> float | None:
        """The upper bound of the bucket holding the 99th percentile latency."""
        total = sum(self.latency_s.values())
        if total == 0:
            return None
        rank, seen = math.ceil(0.99 * total), 0
        for bound in sorted(self.latency_s):
            seen += self.latency_s[bound]
            if seen >= rank:
                return bound
        raise AssertionError("unreachable: the counts add up to the total")

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "latency_s": [[bound, count] for bound, count in sorted(self.latency_s.items())],
            "shadowed_rows": self.shadowed_rows,
            "agreed_rows": self.agreed_rows,
        }

    @classmethod
    def from_json(cls, data: Any) -> StepCounts:
        """``ValueError`` when ``data`` is not ``to_json``'s."""
        try:
            counts = [data[name] for name in ("requests", "errors", "shadowed_rows", "agreed_rows")]
            latency = {float(bound): count for bound, count in data["latency_s"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a step's counts: {exc!r}") from None
        if not all(type(n) is int and n >= 0 for n in [*counts, *latency.values()]):
            raise ValueError("not a step's counts: a count is not a natural number")
        requests, errors, shadowed, agreed = counts
        return cls(requests, errors, latency, shadowed, agreed)


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
        self._latency: Counter[float] = Counter()
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
        self._latency[latency_bucket(seconds)] += 1
        if outcome_of(status) == "server_error":
            self._errors += 1

    def counts(self, shadowed_rows: int, agreed_rows: int) -> StepCounts:
        """This gateway's counts in the step (``shadowed_rows``, ``agreed_rows``: the
        shadow's totals so far)."""
        rows0, agreed0 = self._rows_at_start
        return StepCounts(
            self._requests,
            self._errors,
            dict(self._latency),
            shadowed_rows - rows0,
            agreed_rows - agreed0,
        )

    def published(self, shadowed_rows: int, agreed_rows: int) -> dict[str, Any] | None:
        """What this gateway publishes for the deciding one to sum: its counts in the step,
        with the rollout and step they belong to; None once the rollout is over."""
        if self.state != "running":
            return None
        counts = self.counts(shadowed_rows, agreed_rows).to_json()
        return {"policy": self.policy.to_json(), "step": self.step, **counts}

    def peer_counts(self, published: Iterable[Any]) -> StepCounts:
        """The sum of other gateways' ``published`` counts that are of this rollout at its
        step (any other, or one that does not parse, is of no step judged here)."""
        total = StepCounts()
        for sample in published:
            if not isinstance(sample, dict) or sample.get("policy") != self.policy.to_json():
                continue
            if sample.get("step") != self.step:
                continue
            with contextlib.suppress(ValueError):
                total += StepCounts.from_json(sample)
        return total

    def tick(
        self, now: float, shadowed_rows: int, agreed_rows: int, peers: StepCounts | None = None
    ) -> Verdict:
        """Judge the step on this gateway's counts (``shadowed_rows``, ``agreed_rows``: the
        shadow's totals so far) and the other gateways' (``peers``), and act on the verdict."""
        if self.state != "running":
            return Verdict("hold")
        counts = self.counts(shadowed_rows, agreed_rows) + (peers or StepCounts())
        sample = StepSample(
            now - self._started,
            counts.requests,
            counts.errors,
            counts.p99_s,
            counts.shadowed_rows,
            counts.agreed_rows,
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
            self._latency.clear()
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
        self._latency.clear()
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
