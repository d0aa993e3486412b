"""A deterministic discrete-event simulation of one model behind the gateway, driven by a policy.

Time is integer milliseconds; events are ordered by ``(time, sequence)``; the only randomness is
in the trace, drawn once per (trace, seed). A run is therefore a pure function of the trace, the
policy and the config: same inputs, same numbers, on any machine at any load.

The model (AUTOSCALING.md): the gateway holds one FIFO of requests, bounded at ``queue_bound``
(arrivals beyond it are rejected) and dropping requests that waited longer than
``queue_timeout_s``; at zero replicas requests simply wait there. A replica is ``pending``
(``pending_s``), then ``loading`` (``cold_start_s``, no metrics), then ``ready``: an idle ready
replica takes ``b = min(queue, max_batch)`` requests and is busy ``20 ms + 5 ms x b``. A removed
replica that is running a batch drains (finishes it, takes nothing new); pending and loading
replicas are cancelled first, then idle ready ones, newest first.

Every second the simulator records what the gateway and the pods would export (queued and
in-flight rows, admitted and completed counters, each ready replica's busy ratio over that second)
and at each of the policy's decision times it hands the policy a :class:`Sample` built exactly as
the real sources build theirs: ``direct`` reads the latest second, rates over ``rate_window_s``;
``prometheus`` reads the last 15 s scrape taken at least ``lag_s`` ago, rates over the scrape
interval, and nothing before the first scrape. Replica counts always come live, as they do from
the Kubernetes API. The policy's answer is applied at once, like a write to the scale subresource.

Speed: requests are never objects. The queue is a list of admitted arrival times with a head
index, and completions are written in FIFO order, so a batch costs a few list operations and one
heap push; an hour at 800 req/s runs in seconds.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from autoscaler.policy import Sample
from autoscaler.traces import Trace

StateT = TypeVar("StateT")

MAX_BATCH_THROUGHPUT_RPS = 160.0
"""What one replica answers at full batch: 16 rows per 100 ms. Targets of all policies derive
from it (AUTOSCALING.md, the common set point)."""


@dataclass(frozen=True, slots=True)
class Outcome(Generic[StateT]):
    """A policy's answer: :class:`autoscaler.policy.Decision` with the policy's own state type."""

    replicas: int
    state: StateT
    reason: str


class ScalePolicy(Protocol[StateT]):
    """What the simulator drives: bazaar's policy (through an adapter) and every baseline."""

    @property
    def name(self) -> str: ...

    @property
    def interval_s(self) -> int:
        """Seconds between decisions."""
        ...

    def initial_state(self) -> StateT: ...

    def decide(self, sample: Sample, state: StateT, now: float) -> Outcome[StateT]: ...


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The replica, gateway and metric-path model."""

    cold_start_s: int = 30
    """Loading time of a replica after it is scheduled (10, 30 or 60 in the benchmark)."""
    pending_s: int = 2
    """Scheduling time before loading starts."""
    max_batch: int = 16
    """Largest batch a replica takes."""
    batch_base_ms: int = 20
    """Fixed cost of a batch."""
    batch_row_ms: int = 5
    """Cost per row of a batch."""
    queue_bound: int = 20_000
    """Requests the gateway holds; arrivals beyond it are rejected."""
    queue_timeout_s: int = 30
    """Requests waiting longer in the gateway are dropped."""
    metrics: Literal["direct", "prometheus"] = "direct"
    """How signals reach the policy."""
    lag_s: int = 0
    """Extra age of Prometheus data (0, 15 or 30 s); ignored on the direct path."""
    scrape_s: int = 15
    """Prometheus scrape interval."""
    rate_window_s: int = 5
    """Window of the direct path's arrival and completion rates."""
    max_replicas: int = 64
    """Ceiling every policy is given."""


@dataclass(frozen=True, slots=True)
class Action:
    """One change of the replica count."""

    time_s: float
    before: int
    after: int
    reason: str


@dataclass(frozen=True, slots=True)
class Run:
    """Everything one simulation produced; metrics are derived from it in :mod:`report`."""

    trace: str
    policy: str
    duration_s: int
    admitted_ms: npt.NDArray[np.int64]
    """Arrival times of the requests the gateway admitted, in FIFO order."""
    finished_ms: npt.NDArray[np.int64]
    """Completion time of each admitted request; -1 where it timed out in the queue."""
    rejected_ms: npt.NDArray[np.int64]
    """Arrival times of requests rejected at the full queue."""
    replicas: npt.NDArray[np.int64]
    """Replicas asked for (pending + loading + ready) at each second."""
    ready: npt.NDArray[np.int64]
    """Ready replicas at each second."""
    actions: tuple[Action, ...]
    replica_seconds: float
    """Integral of all live replicas (pending, loading, ready, draining) over the trace."""


PENDING, LOADING, READY, DRAINING, GONE = range(5)
_BATCH_DONE, _LOADING, _READY, _WAKE, _TICK = range(5)


class _Replica:
    """Mutable per-replica bookkeeping, private to one run."""

    __slots__ = ("batch", "born_ms", "busy_mark_ms", "busy_ms", "busy_until_ms", "state")

    def __init__(self, state: int, born_ms: int) -> None:
        self.state = state
        self.born_ms = born_ms
        self.batch = 0
        self.busy_ms = 0
        self.busy_until_ms = 0
        self.busy_mark_ms = 0

    def busy_by(self, t_ms: int) -> int:
        """Milliseconds spent executing batches up to ``t_ms``."""
        return self.busy_ms - max(0, self.busy_until_ms - t_ms)


def initial_replicas(trace: Trace, target_fraction: float = 0.7) -> int:
    """Replicas ready at t=0: enough for the first second's rate at the common target."""
    rate = float(trace.rate_per_s[0]) if trace.duration_s else 0.0
    needed = math.ceil(rate / (target_fraction * MAX_BATCH_THROUGHPUT_RPS))
    return max(trace.min_replicas, needed)


def simulate(
    trace: Trace,
    policy: ScalePolicy[StateT],
    config: SimConfig,
    initial: int | None = None,
) -> Run:
    """Replay ``trace`` against ``policy``; ``initial`` ready replicas at t=0 (default: enough)."""
    arr: list[int] = trace.arrivals_ms.tolist()
    adm: list[int] = []
    fin: list[int] = []
    rejected: list[int] = []
    head = pos = 0
    inflight = completed = 0
    timeout_ms = config.queue_timeout_s * 1000
    end_ms = trace.duration_s * 1000 + timeout_ms + 1000
    cold_ms = config.cold_start_s * 1000
    heap: list[tuple[int, int, int, _Replica | None]] = []
    seq = 0
    idle: list[_Replica] = []
    live: list[_Replica] = []
    wake_at = -1
    area_ms = 0
    area_mark = 0
    cost_ms = 0.0

    def push(t: int, kind: int, r: _Replica | None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (t, seq, kind, r))

    def account(t: int) -> None:
        nonlocal area_ms, area_mark
        area_ms += len(live) * (min(t, trace.duration_s * 1000) - area_mark)
        area_mark = min(t, trace.duration_s * 1000)

    def admit(t: int) -> None:
        nonlocal head, pos
        if head < len(adm) and adm[head] < t - timeout_ms:
            cut = bisect_left(adm, t - timeout_ms, head)
            fin.extend([-1] * (cut - head))
            head = cut
        new = bisect_right(arr, t, pos)
        if new > pos:
            take = min(new - pos, config.queue_bound - (len(adm) - head))
            adm.extend(arr[pos : pos + take])
            rejected.extend(arr[pos + take : new])
            pos = new

    def dispatch(t: int) -> None:
        nonlocal head, inflight, wake_at
        while idle and head < len(adm):
            r = idle.pop()
            b = min(len(adm) - head, config.max_batch)
            done = t + config.batch_base_ms + config.batch_row_ms * b
            fin.extend([done] * b)
            head += b
            inflight += b
            r.batch, r.busy_until_ms = b, done
            r.busy_ms += done - t
            push(done, _BATCH_DONE, r)
        # An idle replica takes the next arrival the moment it comes.
        if idle and pos < len(arr) and (wake_at < t or arr[pos] < wake_at):
            wake_at = arr[pos]
            push(wake_at, _WAKE, None)

    def add(t: int, state: int) -> _Replica:
        account(t)
        r = _Replica(state, t)
        live.append(r)
        return r

    def remove(t: int, r: _Replica) -> None:
        account(t)
        r.state = GONE
        live.remove(r)

    def scale_to(t: int, n: int) -> None:
        spec = [r for r in live if r.state != DRAINING]
        for _ in range(n - len(spec)):
            push(t + config.pending_s * 1000, _LOADING, add(t, PENDING))
        if n >= len(spec):
            return
        # Cancel cold starts first, then idle replicas, then the least-loaded busy ones;
        # newest first within each group.
        victims = sorted(spec, key=lambda r: (_victim_rank(r, idle), -r.born_ms))
        for r in victims[: len(spec) - n]:
            if r.state == READY and r not in idle:
                r.state = DRAINING
                continue
            if r in idle:
                idle.remove(r)
            remove(t, r)

    for _ in range(initial if initial is not None else initial_replicas(trace)):
        idle.append(add(0, READY))

    seconds = end_ms // 1000 + 1
    queued_s = [0] * seconds
    inflight_s = [0] * seconds
    admitted_s = [0] * seconds
    completed_s = [0] * seconds
    busy_s: list[float | None] = [None] * seconds
    replicas_s = [0] * seconds
    ready_s = [0] * seconds
    replicas_s[0] = ready_s[0] = len(live)
    actions: list[Action] = []
    state = policy.initial_state()
    interval_ms = policy.interval_s * 1000
    for k in range(1, seconds):
        push(k * 1000, _TICK, None)
    dispatch(0)

    while heap:
        t, _, kind, r = heapq.heappop(heap)
        if t > end_ms:
            break
        if kind == _BATCH_DONE:
            assert r is not None
            inflight -= r.batch
            completed += r.batch
            r.batch = 0
            if r.state == DRAINING:
                remove(t, r)
                continue
            idle.append(r)
            admit(t)
            dispatch(t)
        elif kind == _LOADING:
            assert r is not None
            if r.state == PENDING:
                r.state = LOADING
                push(t + cold_ms, _READY, r)
        elif kind == _READY:
            assert r is not None
            if r.state == LOADING:
                r.state = READY
                r.busy_mark_ms = t
                idle.append(r)
                admit(t)
                dispatch(t)
        elif kind == _WAKE:
            admit(t)
            dispatch(t)
        else:
            admit(t)
            dispatch(t)
            s = t // 1000
            queued_s[s] = len(adm) - head
            inflight_s[s] = inflight
            admitted_s[s] = len(adm)
            completed_s[s] = completed
            ratios = []
            for x in live:
                if x.state == READY:
                    elapsed = t - max(x.busy_mark_ms, t - 1000)
                    if elapsed > 0:
                        ratios.append((x.busy_by(t) - x.busy_by(t - elapsed)) / elapsed)
                    x.busy_mark_ms = t
            busy_s[s] = sum(ratios) / len(ratios) if ratios else None
            if t == trace.duration_s * 1000:
                account(t)
                cost_ms = area_ms
            if t % interval_ms == 0:
                n_ready = sum(1 for x in live if x.state == READY)
                n_start = sum(1 for x in live if x.state in (PENDING, LOADING))
                sample = _sample(
                    config, s, n_ready + n_start, n_ready, n_start,
                    queued_s, inflight_s, admitted_s, completed_s, busy_s,
                )  # fmt: skip
                outcome = policy.decide(sample, state, t / 1000)
                state = outcome.state
                wanted = max(0, outcome.replicas)
                if wanted != n_ready + n_start:
                    actions.append(Action(t / 1000, n_ready + n_start, wanted, outcome.reason))
                    scale_to(t, wanted)
                    dispatch(t)
            replicas_s[s] = sum(1 for x in live if x.state != DRAINING)
            ready_s[s] = sum(1 for x in live if x.state == READY)

    fin.extend([-1] * (len(adm) - len(fin)))
    duration = trace.duration_s + 1
    return Run(
        trace=trace.name,
        policy=policy.name,
        duration_s=trace.duration_s,
        admitted_ms=np.array(adm, dtype=np.int64),
        finished_ms=np.array(fin, dtype=np.int64),
        rejected_ms=np.array(rejected, dtype=np.int64),
        replicas=np.array(replicas_s[:duration], dtype=np.int64),
        ready=np.array(ready_s[:duration], dtype=np.int64),
        actions=tuple(actions),
        replica_seconds=cost_ms / 1000,
    )


def _victim_rank(r: _Replica, idle: list[_Replica]) -> tuple[int, int]:
    """Removal order: not yet ready, then idle, then busy with the fewest rows in flight."""
    if r.state != READY:
        return (0, 0)
    if r in idle:
        return (1, 0)
    return (2, r.batch)


def _sample(
    config: SimConfig,
    s: int,
    replicas: int,
    ready: int,
    starting: int,
    queued: list[int],
    inflight: list[int],
    admitted: list[int],
    completed: list[int],
    busy: list[float | None],
) -> Sample:
    """The snapshot the real signal sources would give at second ``s`` on the configured path."""
    if config.metrics == "direct":
        at, window = s, min(config.rate_window_s, s)
    else:
        at = (s - config.lag_s) // config.scrape_s * config.scrape_s
        window = min(config.scrape_s, at)
    if at <= 0 or window <= 0:
        return Sample(float(s), replicas, ready, starting, None, None, None, None, None, None)
    ratio = busy[at] if ready else None
    return Sample(
        time_s=float(s),
        replicas=replicas,
        ready_replicas=ready,
        starting_replicas=starting,
        queued=float(queued[at]),
        inflight=float(inflight[at]),
        arrival_rate=(admitted[at] - admitted[at - window]) / window,
        completion_rate=(completed[at] - completed[at - window]) / window,
        busy_ratio=ratio,
        # One GPU per replica: NVML's "a kernel ran" is exactly the busy ratio here.
        gpu_utilization=ratio,
    )
