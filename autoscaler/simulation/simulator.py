"""A deterministic discrete-event simulation of one model behind the gateway, driven by a policy.

Time is integer milliseconds; events are ordered by ``(time, sequence)``; the only randomness is
in the trace, drawn once per (trace, seed). A run is therefore a pure function of the trace, the
policy and the config: same inputs, same numbers, on any machine at any load.

The model (docs/autoscaling.md, "The simulation benchmark"): the gateway holds one FIFO of
requests, bounded at ``queue_bound`` (arrivals beyond it are rejected) and dropping requests that
waited longer than ``queue_timeout_s``; at zero replicas requests simply wait there. A replica is
``pending`` (``pending_s``), then ``loading`` (``cold_start_s``, no metrics), then ``ready``: an
idle ready replica takes ``b = min(queue, max_batch)`` requests and is busy ``20 ms + 5 ms x b``.
With ``batches_per_replica`` above 1 a replica also takes further full batches while it
computes, as the gateway pipelines full batches up to ``max_batches_per_endpoint`` per pod: they
wait at the replica, in flight, and run back to back; a batch that could still grow waits for an
idle replica. A removed replica that holds batches drains (finishes them, takes nothing
new); pending and loading replicas are cancelled first, then idle ready ones, newest first.
A batch is answered ``hop_ms`` after its compute ends (the gateway→pod round trip, encoding
and decoding: 0 in the benchmark, measured by ``bazaar replay``): its rows stay in flight and
its batch slot stays taken until then, while the replica already computes the next batch.

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
from autoscaler.simulation.traces import Trace

StateT = TypeVar("StateT")

MAX_BATCH_THROUGHPUT_RPS = 160.0
"""What one replica answers at full batch: 16 rows per 100 ms. Targets of all policies derive
from it (docs/autoscaling.md, "Baselines": the common set point)."""


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
    batches_per_replica: int = 1
    """Batches a replica holds at once: one computing, the others full and waiting at it (the
    gateway's ``max_batches_per_endpoint``, 2 by default; the benchmark keeps 1)."""
    batch_base_ms: int = 20
    """Fixed cost of a batch."""
    batch_row_ms: int = 5
    """Cost per row of a batch."""
    hop_ms: int = 0
    """Time from a batch's compute ending to its answer at the gateway, which the replica
    spends on the next batch: the real path outside the compute (0: the benchmark's model)."""
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
    """Everything one simulation produced; metrics are derived from it in :mod:`.report`."""

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
    simulation = _Simulation(trace, policy, config)
    return simulation.run(initial if initial is not None else initial_replicas(trace))


# Replica states.
_PENDING, _LOADING, _READY, _DRAINING, _GONE = range(5)

# Event kinds: a batch finishes, a pending replica is scheduled (it starts loading), a loading
# replica is ready, an arrival reaches an idle replica, a second ends (record, maybe decide).
_BATCH_DONE, _SCHEDULED, _LOADED, _ARRIVAL, _SECOND = range(5)


class _Replica:
    """One replica's state and busy time, private to one run."""

    __slots__ = ("batches", "born_ms", "busy_mark_ms", "busy_ms", "busy_until_ms", "state")

    def __init__(self, state: int, born_ms: int) -> None:
        self.state = state
        self.born_ms = born_ms
        self.batches: list[int] = []
        """Rows of each batch it holds, the computing one first; empty when idle."""
        self.busy_ms = 0
        """Milliseconds of every batch it started, including the one running."""
        self.busy_until_ms = 0
        """When its last batch's compute ends (its answer comes ``hop_ms`` later)."""
        self.busy_mark_ms = 0
        """Start of the second its busy ratio is measured over."""

    def busy_by(self, t_ms: int) -> int:
        """Milliseconds spent executing batches up to ``t_ms``."""
        return self.busy_ms - max(0, self.busy_until_ms - t_ms)


class _Exports:
    """What the gateway and the pods export, second by second, and the samples read from it.

    Index ``s`` holds the values at the end of second ``s``: rows queued and in flight, the
    admitted and completed counters, the ready replicas' mean busy ratio over that second (None
    without a ready replica), and the replicas asked for and ready.
    """

    __slots__ = ("admitted", "busy", "completed", "inflight", "queued", "ready", "replicas")

    def __init__(self, seconds: int) -> None:
        self.queued = [0] * seconds
        self.inflight = [0] * seconds
        self.admitted = [0] * seconds
        self.completed = [0] * seconds
        self.busy: list[float | None] = [None] * seconds
        self.replicas = [0] * seconds
        self.ready = [0] * seconds

    def sample(self, config: SimConfig, second: int, ready: int, starting: int) -> Sample:
        """The snapshot the real signal sources would give at ``second`` on the configured path."""
        replicas = ready + starting
        if config.metrics == "direct":
            at, window = second, min(config.rate_window_s, second)
        else:
            at = (second - config.lag_s) // config.scrape_s * config.scrape_s
            window = min(config.scrape_s, at)
        if at <= 0 or window <= 0:
            return Sample(
                float(second), replicas, ready, starting, None, None, None, None, None, None
            )
        ratio = self.busy[at] if ready else None
        return Sample(
            time_s=float(second),
            replicas=replicas,
            ready_replicas=ready,
            starting_replicas=starting,
            queued=float(self.queued[at]),
            inflight=float(self.inflight[at]),
            arrival_rate=(self.admitted[at] - self.admitted[at - window]) / window,
            completion_rate=(self.completed[at] - self.completed[at - window]) / window,
            busy_ratio=ratio,
            # One GPU per replica: NVML's "a kernel ran" is exactly the busy ratio here.
            gpu_utilization=ratio,
        )


class _Simulation(Generic[StateT]):
    """One run: the event heap, the gateway's queue, the replicas and what they export.

    The queue is ``admitted_ms[queue_head:]``: requests before the head were dispatched or timed
    out, and ``finished_ms`` holds their fates in the same order. ``arrivals_ms[next_arrival:]``
    have not reached the gateway yet. ``idle`` holds each ready replica once per batch it can
    still take, taken last-in first-out; ``live`` are all replicas that cost something
    (pending to draining).
    """

    __slots__ = (
        "actions",
        "admitted_ms",
        "arrival_event_ms",
        "arrivals_ms",
        "completed_rows",
        "config",
        "duration_ms",
        "end_ms",
        "event_count",
        "events",
        "exports",
        "finished_ms",
        "idle",
        "inflight_rows",
        "live",
        "next_arrival",
        "policy",
        "policy_state",
        "queue_head",
        "rejected_ms",
        "replica_ms",
        "replica_ms_until",
        "timeout_ms",
        "trace",
    )

    def __init__(self, trace: Trace, policy: ScalePolicy[StateT], config: SimConfig) -> None:
        self.trace = trace
        self.policy = policy
        self.config = config
        self.timeout_ms = config.queue_timeout_s * 1000
        self.duration_ms = trace.duration_s * 1000
        # Requests still queued at the end get their timeout to finish or drop.
        self.end_ms = self.duration_ms + self.timeout_ms + 1000
        self.arrivals_ms: list[int] = trace.arrivals_ms.tolist()
        self.next_arrival = 0
        self.admitted_ms: list[int] = []
        self.queue_head = 0
        self.finished_ms: list[int] = []
        self.rejected_ms: list[int] = []
        self.inflight_rows = 0
        self.completed_rows = 0
        self.events: list[tuple[int, int, int, _Replica | None]] = []
        self.event_count = 0
        self.idle: list[_Replica] = []
        self.live: list[_Replica] = []
        self.arrival_event_ms = -1
        """Time of the latest arrival event pushed for an idle replica."""
        self.replica_ms = 0
        """Integral of live replicas over time, up to ``replica_ms_until``."""
        self.replica_ms_until = 0
        self.exports = _Exports(self.end_ms // 1000 + 1)
        self.actions: list[Action] = []
        self.policy_state = policy.initial_state()

    def run(self, initial: int) -> Run:
        """Start ``initial`` ready replicas, play every event up to the end, and report."""
        for _ in range(initial):
            self.idle.extend([self.add_replica(0, _READY)] * self.config.batches_per_replica)
        self.exports.replicas[0] = self.exports.ready[0] = len(self.live)
        # Second ends go first, so a batch ending on a second is seen after that second's record.
        for second in range(1, len(self.exports.queued)):
            self.push(second * 1000, _SECOND, None)
        self.dispatch(0)
        while self.events:
            t_ms, _, kind, replica = heapq.heappop(self.events)
            if t_ms > self.end_ms:
                break
            if kind == _BATCH_DONE:
                assert replica is not None
                self.finish_batch(t_ms, replica)
            elif kind == _SECOND:
                self.end_second(t_ms)
            elif kind == _ARRIVAL:
                self.admit(t_ms)
                self.dispatch(t_ms)
            elif kind == _SCHEDULED:
                assert replica is not None
                self.start_loading(t_ms, replica)
            else:
                assert replica is not None
                self.become_ready(t_ms, replica)
        return self.report()

    def push(self, t_ms: int, kind: int, replica: _Replica | None) -> None:
        self.event_count += 1
        heapq.heappush(self.events, (t_ms, self.event_count, kind, replica))

    def admit(self, t_ms: int) -> None:
        """Drop the queued requests that timed out, then queue (or reject) the new arrivals."""
        admitted, head = self.admitted_ms, self.queue_head
        oldest_allowed = t_ms - self.timeout_ms
        if head < len(admitted) and admitted[head] < oldest_allowed:
            cut = bisect_left(admitted, oldest_allowed, head)
            self.finished_ms.extend([-1] * (cut - head))
            self.queue_head = head = cut
        arrivals, first = self.arrivals_ms, self.next_arrival
        end = bisect_right(arrivals, t_ms, first)
        if end > first:
            room = self.config.queue_bound - (len(admitted) - head)
            taken = min(end - first, room)
            admitted.extend(arrivals[first : first + taken])
            self.rejected_ms.extend(arrivals[first + taken : end])
            self.next_arrival = end

    def dispatch(self, t_ms: int) -> None:
        """Give every idle replica a batch from the queue; wake at the next arrival if one idles."""
        idle, admitted, config = self.idle, self.admitted_ms, self.config
        head = self.queue_head
        while idle and head < len(admitted):
            rows = min(len(admitted) - head, config.max_batch)
            replica = self.take_idle(full=rows == config.max_batch)
            if replica is None:
                break  # a batch that could grow waits for an idle replica
            start_ms = max(t_ms, replica.busy_until_ms)  # after the batches it holds
            computed_ms = start_ms + config.batch_base_ms + config.batch_row_ms * rows
            done_ms = computed_ms + config.hop_ms
            self.finished_ms.extend([done_ms] * rows)
            head += rows
            self.inflight_rows += rows
            replica.batches.append(rows)
            replica.busy_until_ms = computed_ms
            replica.busy_ms += computed_ms - start_ms
            self.push(done_ms, _BATCH_DONE, replica)
        self.queue_head = head
        # An idle replica takes the next arrival the moment it comes.
        if idle and self.next_arrival < len(self.arrivals_ms):
            next_ms = self.arrivals_ms[self.next_arrival]
            if self.arrival_event_ms <= t_ms or next_ms < self.arrival_event_ms:
                self.arrival_event_ms = next_ms
                self.push(next_ms, _ARRIVAL, None)

    def take_idle(self, full: bool) -> _Replica | None:
        """A free batch slot of the replica that holds the fewest batches (the router sends to
        the least outstanding work), the most recent among equals; a ``full`` batch only may
        queue behind another (the gateway pipelines full batches alone)."""
        idle = self.idle
        if self.config.batches_per_replica == 1:
            return idle.pop()  # every idle replica holds none: no need to look
        best = len(idle) - 1
        for i in range(len(idle) - 2, -1, -1):
            if len(idle[i].batches) < len(idle[best].batches):
                best = i
        if idle[best].batches and not full:
            return None
        return idle.pop(best)

    def finish_batch(self, t_ms: int, replica: _Replica) -> None:
        """Count the batch answered; a drained replica goes, any other serves the queue."""
        rows = replica.batches.pop(0)
        self.inflight_rows -= rows
        self.completed_rows += rows
        if replica.state == _DRAINING:
            if not replica.batches:
                self.remove_replica(t_ms, replica)
            return
        self.idle.append(replica)
        self.admit(t_ms)
        self.dispatch(t_ms)

    def start_loading(self, t_ms: int, replica: _Replica) -> None:
        if replica.state == _PENDING:  # else cancelled while pending
            replica.state = _LOADING
            self.push(t_ms + self.config.cold_start_s * 1000, _LOADED, replica)

    def become_ready(self, t_ms: int, replica: _Replica) -> None:
        if replica.state == _LOADING:  # else cancelled while loading
            replica.state = _READY
            replica.busy_mark_ms = t_ms
            self.idle.extend([replica] * self.config.batches_per_replica)
            self.admit(t_ms)
            self.dispatch(t_ms)

    def end_second(self, t_ms: int) -> None:
        """Serve what arrived, record the second's exports, and let the policy decide on time."""
        self.admit(t_ms)
        self.dispatch(t_ms)
        second, exports = t_ms // 1000, self.exports
        exports.queued[second] = len(self.admitted_ms) - self.queue_head
        exports.inflight[second] = self.inflight_rows
        exports.admitted[second] = len(self.admitted_ms)
        exports.completed[second] = self.completed_rows
        exports.busy[second] = self.busy_ratio(t_ms)
        if t_ms % (self.policy.interval_s * 1000) == 0:
            self.decide(t_ms, second)
        exports.replicas[second] = sum(1 for r in self.live if r.state != _DRAINING)
        exports.ready[second] = sum(1 for r in self.live if r.state == _READY)

    def busy_ratio(self, t_ms: int) -> float | None:
        """Mean busy ratio of the ready replicas over the second ending at ``t_ms``."""
        ratios = []
        for replica in self.live:
            if replica.state == _READY:
                # A replica that became ready within the second is measured since then.
                elapsed = t_ms - max(replica.busy_mark_ms, t_ms - 1000)
                if elapsed > 0:
                    busy = replica.busy_by(t_ms) - replica.busy_by(t_ms - elapsed)
                    ratios.append(busy / elapsed)
                replica.busy_mark_ms = t_ms
        return sum(ratios) / len(ratios) if ratios else None

    def decide(self, t_ms: int, second: int) -> None:
        """Hand the policy its sample and apply its answer at once."""
        ready = sum(1 for r in self.live if r.state == _READY)
        starting = sum(1 for r in self.live if r.state in (_PENDING, _LOADING))
        sample = self.exports.sample(self.config, second, ready, starting)
        outcome = self.policy.decide(sample, self.policy_state, t_ms / 1000)
        self.policy_state = outcome.state
        wanted = max(0, outcome.replicas)
        if wanted != ready + starting:
            self.actions.append(Action(t_ms / 1000, ready + starting, wanted, outcome.reason))
            self.scale_to(t_ms, wanted)
            self.dispatch(t_ms)

    def scale_to(self, t_ms: int, wanted: int) -> None:
        """Start replicas up to ``wanted``, or remove the cheapest ones down to it."""
        asked_for = [r for r in self.live if r.state != _DRAINING]
        for _ in range(wanted - len(asked_for)):
            replica = self.add_replica(t_ms, _PENDING)
            self.push(t_ms + self.config.pending_s * 1000, _SCHEDULED, replica)
        if wanted >= len(asked_for):
            return
        # Cancel cold starts first, then idle replicas, then the least-loaded busy ones;
        # newest first within each group.
        victims = sorted(asked_for, key=lambda r: (self.removal_rank(r), -r.born_ms))
        for replica in victims[: len(asked_for) - wanted]:
            if replica in self.idle:
                self.idle = [r for r in self.idle if r is not replica]
            if replica.state == _READY and replica.batches:
                replica.state = _DRAINING
                continue
            self.remove_replica(t_ms, replica)

    def removal_rank(self, replica: _Replica) -> tuple[int, int]:
        """Removal order: not yet ready, then idle, then busy with the fewest rows in flight."""
        if replica.state != _READY:
            return (0, 0)
        if not replica.batches:
            return (1, 0)
        return (2, sum(replica.batches))

    def add_replica(self, t_ms: int, state: int) -> _Replica:
        self.account(t_ms)
        replica = _Replica(state, t_ms)
        self.live.append(replica)
        return replica

    def remove_replica(self, t_ms: int, replica: _Replica) -> None:
        self.account(t_ms)
        replica.state = _GONE
        self.live.remove(replica)

    def account(self, t_ms: int) -> None:
        """Add the live replicas' time since the last change to the cost, within the trace."""
        until = min(t_ms, self.duration_ms)
        self.replica_ms += len(self.live) * (until - self.replica_ms_until)
        self.replica_ms_until = until

    def report(self) -> Run:
        # The cost stops at the trace's end: the replicas live since the last change up to it.
        self.account(self.duration_ms)
        # Requests still queued when the events ran out never finished.
        self.finished_ms.extend([-1] * (len(self.admitted_ms) - len(self.finished_ms)))
        seconds = self.trace.duration_s + 1
        return Run(
            trace=self.trace.name,
            policy=self.policy.name,
            duration_s=self.trace.duration_s,
            admitted_ms=np.array(self.admitted_ms, dtype=np.int64),
            finished_ms=np.array(self.finished_ms, dtype=np.int64),
            rejected_ms=np.array(self.rejected_ms, dtype=np.int64),
            replicas=np.array(self.exports.replicas[:seconds], dtype=np.int64),
            ready=np.array(self.exports.ready[:seconds], dtype=np.int64),
            actions=tuple(self.actions),
            replica_seconds=self.replica_ms / 1000,
        )
