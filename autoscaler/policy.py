"""The scaling policy: a pure function from a snapshot of signals to a replica count.

``decide(sample, state, config, now)`` reads no clock and no network; everything it remembers is
in the :class:`PolicyState` it returns, so the control loop, the simulator and the tests drive the
very same function.

The algorithm, one decision per sample:

1. **Size for the rate ahead.** A replica answers ``μ`` rows/s at full batch. ``μ`` is learned
   from saturated samples (a backlog of at least a full batch per ready replica waits, so every
   replica runs full batches: ``μ = completion_rate / (ready x busy_ratio)``) once the ready count
   has held as long as the signals may lag behind it (below), else taken from
   ``replica_throughput_rps``. Replicas asked for now serve after the start-up ``S`` (learned:
   the time from asking for a replica to the sample where it is ready, smoothed; until one is
   seen, ``replica_startup_s``), and the next decision comes a tick later, so the rate that
   matters is the one ``H = S + tick`` ahead. A Holt linear forecast (:mod:`autoscaler.forecast`)
   of the arrival rate gives it, from the forecast's last reading, which describes the rates of
   up to the signals' age before (below); the policy sizes for ``max(λ now, forecast)`` (a falling
   forecast never sizes below now) plus ``SHORTFALL_Z`` x the recent shortfall (how far the rate
   has run above the forecasts made ``H`` earlier), the headroom a start-up needs.
2. **Headroom from the objective, not a fixed utilisation.** A row may wait ``slack = SLO - one
   full batch``. Capacity ``C = n x μ`` must hold two things: the shortfall over ``H`` builds a
   backlog that ``C x slack`` absorbs, so ``C x (1 + slack / H) >= rate ahead + headroom``; and
   Poisson arrivals queue even below capacity (a reflected Brownian motion exceeds ``x`` with
   probability ``exp(-2 (C - λ) x / λ)``), held to ``MISS_BUDGET`` at ``x = C x slack``. With a
   500 ms objective and 100 ms batches that runs replicas at 90 % and more where the load is
   steady, and keeps more where it is not. Without ``μ`` the count is
   ``outstanding / (target_queue_per_replica x target_utilization)``. Draining the backlog
   within ``backlog_drain_s`` takes ``ceil(backlog / (μ x backlog_drain_s))`` more, where the
   backlog is the queue projected to the moment starting replicas are ready.
3. **Count what is coming.** The comparison is against ``sample.replicas``, which includes
   replicas still pending or loading, so a burst is not answered twice while pods start.
4. **Up at once, down slowly.** Scale-up goes straight to the need in one step (bounded by
   ``max_scale_up_rate``): the panic window is the source's short rate window plus the live queue.
   Scale-down goes only to the highest need of the last window, with ``DOWN_TOLERANCE`` (10 %)
   kept above it, and at most halves per step, so noise, short dips and demand at a replica
   boundary cause no reversals; replicas added only to drain a backlog leave as soon as it is
   drained. Nothing is removed while replicas are starting or a backlog waits, nor before the
   signals can describe the ready count now serving. When demand comes back in a surge (a rate
   ``SURGE_FACTOR`` times the forecast) within five windows of a scale-down, the window doubles
   (up to ``max_scale_down_window_s``): recurring bursts keep their capacity. A rise the forecast
   followed (the next morning of a daily pattern) resets it: that release was right, and a
   one-off step still releases its capacity after ``scale_down_window_s``.
5. **Zero.** From zero, the first queued row brings the need at once (the gateway holds the
   request meanwhile). To zero only after ``scale_to_zero_after_s`` with no queued, in-flight or
   arriving rows, and only when ``min_replicas`` is 0.

Busy ratio and GPU utilisation saturate at 1 as soon as a batching replica has a queue (a
replica at a quarter of its throughput already looks fully busy), so they cannot size; they feed
the capacity estimate, and size only when every demand signal is missing (HPA-style
``ceil(ready x utilisation / target)``, which can at most grow by ``1 / target`` per step).

**Stale signals.** Replica counts are live, but rates and the queue may come late (through
Prometheus: a scrape interval, a rate window and the query lag). The signals may describe the
replicas of ``signal_delay_s + 2 x refresh`` ago, where the refresh interval is inferred as the
shortest gap between two changes of the demand signals (1 s read directly, the scrape interval
through Prometheus). Until the ready count has held that long, completions are not divided by it
and no replica is called spare: a lagged rate admitted through a full queue looks like a fall in
demand, and lagged completions of 2 replicas over 50 live ones look like a slow replica.

Every decision says why twice: a sentence with the numbers (``reason``, for logs and ``/stats``)
and a code from the closed set :data:`REASON_CODES` (``code``, one per way out of ``decide``, safe
as a metric label).

Missing signals are never zeros: without the queue, in-flight rows and arrival rate the policy
never scales down, never counts the time as idle, and never leaves zero. Failure modes: a
forecast is a trend, not foresight: a burst that no reading announced (a step, a flash crowd,
the first request after idle) still waits a whole start-up, and its shortfall then holds extra
capacity for minutes (``forecast.SHORTFALL_S``), paid in replica-seconds whether or not another
burst comes; a trend overshoots at a turn (the top of a ramp) for about ``forecast.TREND_S``.
A learned ``μ`` that is too high under-provisions until the next saturated sample corrects it;
a learned start-up mixes replicas asked for at different times when a Deployment starts them
out of order. A rate window much longer than the cold start delays the reaction to bursts by
that window; a lag longer than ``signal_delay_s`` lets stale rates through again, and several
pods scraped at different moments make the refresh look shorter than the scrape interval, with
the same effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, get_args

from autoscaler.forecast import RateForecast, ahead, observe

SATURATED_FOR_S = 10.0
"""Saturation must last this long before it says what a replica can do: the rate window has to
cover saturated time only."""


MAX_REFRESH_S = 60.0
"""Longest refresh interval believed (Prometheus scrapes every 10 to 60 s): a longer gap between
two changes of the signals is a load that held still, not a slow source."""

SURGE_FACTOR = 1.5
"""A rate this many times what the forecast expected is a surge, not a trend: a return of demand
that the forecast did not see coming, which doubles the scale-down window."""

DOWN_TOLERANCE = 0.1
"""Scale-down keeps the need plus this fraction: demand hovering at a replica boundary does not
flap across it (HPA's tolerance, one-sided)."""

MISS_BUDGET = 0.005
"""Share of rows that may miss the latency objective: the headroom is sized to it."""

SHORTFALL_Z = 2.58
"""Standard deviations of the recent forecast shortfall held as headroom: the normal quantile
of ``1 - MISS_BUDGET``."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One model at one instant, as the signal sources saw it.

    Work is counted in rows (a request of n rows is n units), the unit the pods compute in.
    ``None`` means the signal is missing (no gateway answered, no pod reported): it is never
    read as zero.
    """

    time_s: float
    """When the signals were read (the caller's clock, seconds)."""
    replicas: int
    """Replicas currently asked for (the Deployment's spec.replicas, or local workers)."""
    ready_replicas: int
    """Replicas serving now."""
    starting_replicas: int
    """Replicas asked for but not serving yet (pending, loading)."""
    queued: float | None
    """Rows waiting in the gateway's queue, summed over gateway replicas."""
    inflight: float | None
    """Rows sent to pods and not yet answered."""
    arrival_rate: float | None
    """Rows per second admitted by the gateway, over a short window."""
    completion_rate: float | None
    """Rows per second answered by the pods, over the same window."""
    busy_ratio: float | None
    """Mean busy ratio of the ready replicas (0..1): executing time over wall time."""
    gpu_utilization: float | None
    """Mean GPU utilisation of the ready replicas (0..1), from NVML or DCGM; None without GPU."""


@dataclass(frozen=True, slots=True)
class ScaleConfig:
    """One model's scaling settings (Kubernetes: annotations ``bazaar.dev/...``)."""

    min_replicas: int = 1
    """Never fewer (``bazaar.dev/min-replicas``); 0 only with ``scale_to_zero_after_s``."""
    max_replicas: int = 10
    """Never more (``bazaar.dev/max-replicas``)."""
    target_queue_per_replica: float = 16.0
    """Outstanding rows (queued + in flight) one replica should carry
    (``bazaar.dev/target-queue-per-replica``)."""
    target_utilization: float = 0.7
    """Busy ratio (or GPU utilisation) to hold each replica at before ``μ`` is known, or when
    only utilisation is (``bazaar.dev/target-utilization``), 0..1. With ``μ`` the headroom comes
    from ``latency_slo_s``."""
    scale_to_zero_after_s: float | None = None
    """Idle time after which the model may go to zero replicas; None = never
    (``bazaar.dev/scale-to-zero-after``)."""
    replica_throughput_rps: float | None = None
    """Rows per second one replica answers at full batch; None = learn it from saturated samples
    (sizing by outstanding rows until then). A learned value replaces this one."""
    backlog_drain_s: float = 10.0
    """Time within which extra replicas should drain a backlog, seconds."""
    replica_startup_s: float = 30.0
    """Expected time from asking for a replica to it serving (schedule + model load), seconds,
    until one is observed: the policy learns it from the replicas it asks for."""
    latency_slo_s: float = 0.5
    """Latency objective of a row, seconds: the headroom is what keeps it (module docstring)."""
    scale_down_window_s: float = 120.0
    """Scale down only to the highest serving need seen over this window, seconds. The window
    doubles (up to ``max_scale_down_window_s``) each time demand comes back within five windows
    of a scale-down, and returns to this value when it does not."""
    max_scale_down_window_s: float = 720.0
    """Longest the scale-down window grows to under recurring bursts, seconds."""
    max_scale_up_rate: float = 10.0
    """At most this many times the current replicas (or +4) per step."""
    max_scale_down_rate: float = 2.0
    """At most divide the current replicas by this (or -1) per step."""
    signal_delay_s: float = 15.0
    """Age of the newest signals that the policy cannot see for itself, seconds: about 0 when
    the gateways are read directly, the query lag through Prometheus. The policy adds two
    refresh intervals (the scrape and the rate window), inferred as the shortest gap between
    two changes of the demand signals. Until the ready count has held that long, the signals
    may describe the replicas before the last change: no capacity is learned from them and no
    scale-down is based on them. Too high only slows both; too low learns a wrong capacity and
    scales down on a rate measured behind a full queue."""


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What the policy remembers between decisions (opaque to callers)."""

    started_s: float | None = None
    """Time of the first decision: no scale-down before a full window of history."""
    needs: tuple[tuple[float, int], ...] = ()
    """(time, serving need) over the last ``scale_down_window_s``."""
    last_active_s: float | None = None
    """Last time demand was seen (or could not be ruled out)."""
    capacity_rps: float | None = None
    """Learned rows per second of one replica at full batch."""
    starting_since_s: float | None = None
    """When the oldest scale-up still starting was asked for."""
    down_window_s: float | None = None
    """The scale-down window now in force; None = ``scale_down_window_s``."""
    last_down_s: float | None = None
    """When the policy last scaled down."""
    saturated_since_s: float | None = None
    """Start of the current run of saturated samples (capacity is learned after 10 s of it)."""
    ready_count: int | None = None
    """Ready replicas at the last decision."""
    ready_since_s: float | None = None
    """Since when the ready count has been ``ready_count``."""
    signals: tuple[float | None, ...] = ()
    """Demand signals of the last decision, to tell when the source refreshes them."""
    signals_changed_s: float | None = None
    """When the demand signals last changed."""
    refresh_s: float | None = None
    """Shortest gap seen between two changes of the demand signals: the source's refresh."""
    forecast: RateForecast | None = None
    """The arrival rate's level, trend and recent shortfall."""
    startup_s: float | None = None
    """Observed time from asking for replicas to them serving, smoothed; None = not seen yet."""
    asked_s: tuple[float, ...] = ()
    """When each replica still starting was asked for, oldest first."""
    surged_s: float | None = None
    """When the arrival rate last surged above its forecast (``SURGE_FACTOR``)."""
    decided_s: float | None = None
    """Time of the last decision: the tick is the time since."""


ReasonCode = Literal[
    "scale_from_zero",
    "stay_at_zero",
    "scale_to_zero",
    "scale_up",
    "panic_scale_up",
    "scale_down",
    "hold",
    "hold_no_signal",
    "hold_demand_unknown",
    "hold_short_history",
    "hold_stale_signals",
    "hold_starting_or_backlog",
]
"""Why a decision is what it is, as a closed set: one per way out of :func:`decide`. ``hold``
means the replicas asked for already cover the need; each ``hold_...`` names what stopped a
scale-down (or, ``hold_no_signal``, any decision at all)."""

REASON_CODES: tuple[ReasonCode, ...] = get_args(ReasonCode)
"""Every reason code, for label checks and documentation."""


@dataclass(frozen=True, slots=True)
class Decision:
    replicas: int
    state: PolicyState
    reason: str
    """Why, for people, with the numbers: logged, and served on ``/stats``."""
    code: ReasonCode
    """Why, as a code from :data:`REASON_CODES`: exported as a metric label."""


@dataclass(frozen=True, slots=True)
class _Assessment:
    """What one sample says once the state has taken it in, for the decision to act on."""

    serving_need: int | None
    """Replicas that serve the demand at the target; None when no signal can tell."""
    kept_need: int
    """The serving need with ``DOWN_TOLERANCE`` added: what a scale-down keeps."""
    backlog_replicas: int
    """Extra replicas that drain the backlog within ``backlog_drain_s``."""
    why: str
    """How the need was sized, with its numbers."""
    demand_known: bool
    """Queue, in-flight rows and arrival rate are all present."""
    active: bool
    """Demand is seen now, or cannot be ruled out."""
    idle_s: float
    """Time since demand was last seen (or could not be ruled out)."""
    history_s: float
    """Time since the first decision."""
    signal_age_s: float
    """Oldest moment, seconds back, the signals may describe."""
    signals_current: bool
    """The ready count has held at least ``signal_age_s``: the signals describe it."""


def decide(sample: Sample, state: PolicyState, config: ScaleConfig, now: float) -> Decision:
    """The replica count for ``sample``, the state to pass next time, and why."""
    state, seen = _take_in(sample, state, config, now)
    current = sample.replicas
    why = seen.why
    if seen.serving_need is None:
        return Decision(current, state, f"hold {current}: {why}", "hold_no_signal")
    may_idle = config.min_replicas == 0 and config.scale_to_zero_after_s is not None
    floor = config.min_replicas if may_idle else max(1, config.min_replicas)
    need = seen.serving_need + seen.backlog_replicas

    # Zero: the first queued or arriving row brings the need at once; idle long enough, go.
    if current == 0:
        if not (sample.queued or sample.arrival_rate):
            return Decision(0, state, f"stay at 0: {why}", "stay_at_zero")
        wanted = min(config.max_replicas, max(1, floor, need))
        return _up(
            current, wanted, state, config, now, f"scale from zero: {why}", "scale_from_zero"
        )
    if (
        may_idle
        and not seen.active
        and config.scale_to_zero_after_s is not None
        and seen.idle_s >= config.scale_to_zero_after_s
    ):
        reason = f"scale to zero: idle for {seen.idle_s:.0f} s"
        return Decision(0, replace(state, needs=()), reason, "scale_to_zero")

    # Up: straight to the need, bounded by the step limit and the ceiling.
    floor = max(floor, 1)
    need = max(need, floor)
    if need > current:
        limit = max(current + 4, math.ceil(current * config.max_scale_up_rate))
        wanted = min(need, limit, config.max_replicas)
        if wanted > current:
            if need >= 2 * max(1, sample.ready_replicas):
                reason = f"panic scale up {current} → {wanted}: {why}"
                return _up(current, wanted, state, config, now, reason, "panic_scale_up")
            reason = f"scale up {current} → {wanted}: {why}"
            return _up(current, wanted, state, config, now, reason, "scale_up")

    # Down: only to the highest serving need of the window, and only on signals that can say so.
    window = state.down_window_s or config.scale_down_window_s
    held = max(n for t, n in state.needs if t > now - window)
    kept = seen.kept_need + seen.backlog_replicas
    target = max(floor, min(config.max_replicas, max(kept, held)))
    if target >= current:
        return Decision(current, state, f"hold {current}: {why}", "hold")
    if not seen.demand_known:
        reason = f"hold {current}: demand unknown, no scale-down; {why}"
        return Decision(current, state, reason, "hold_demand_unknown")
    if seen.history_s < window:
        reason = f"hold {current}: history shorter than the window"
        return Decision(current, state, reason, "hold_short_history")
    if not seen.signals_current:
        # The signals may still describe the replica count before the last change (a rate
        # admitted through a full queue, a queue since drained): too early to call them spare.
        reason = f"hold {current}: signals up to {seen.signal_age_s:.0f} s old; {why}"
        return Decision(current, state, reason, "hold_stale_signals")
    if sample.starting_replicas or seen.backlog_replicas:
        # Replicas asked for a burst are not cancelled mid-start, nor drain replicas before the
        # backlog is gone: either would be a reversal the moment the burst is seen again.
        reason = f"hold {current}: replicas starting or backlog; {why}"
        return Decision(current, state, reason, "hold_starting_or_backlog")
    wanted = max(
        target, current - max(1, current - math.ceil(current / config.max_scale_down_rate))
    )
    reason = f"scale down {current} → {wanted}: highest need over {window:.0f} s; {why}"
    return Decision(wanted, replace(state, last_down_s=now), reason, "scale_down")


def _take_in(
    sample: Sample, state: PolicyState, config: ScaleConfig, now: float
) -> tuple[PolicyState, _Assessment]:
    """The bookkeeping: ``state`` updated with ``sample``, and what the sample says.

    Tracks saturation, how long the ready count has held, the source's refresh interval, the
    learned capacity, when demand was last seen, and the serving needs of the longest window.
    """
    saturated_since = None
    if _saturated(sample, config):
        saturated_since = now if state.saturated_since_s is None else state.saturated_since_s
    ready_since = state.ready_since_s
    if ready_since is None or sample.ready_replicas != state.ready_count:
        ready_since = now
    signals = (sample.queued, sample.inflight, sample.arrival_rate, sample.completion_rate)
    changed_s, refresh = state.signals_changed_s, state.refresh_s
    if signals != state.signals:
        changed_s, refresh = now, _refresh(changed_s, refresh, now)
    # Oldest moment the signals may describe: the lag, the scrape and a rate window behind.
    signal_age_s = config.signal_delay_s + 2 * (refresh or 0.0)
    signals_current = now - ready_since >= signal_age_s

    learned = state.capacity_rps
    if saturated_since is not None and now - saturated_since >= SATURATED_FOR_S and signals_current:
        learned = _observed_capacity(sample, learned)
    capacity = learned if learned is not None else config.replica_throughput_rps
    startup, asked = _startup(sample, state, now)
    starting_since = state.starting_since_s if sample.starting_replicas > 0 else None
    # Replicas asked for now serve after a start-up; the next decision comes a tick later.
    tick = now - state.decided_s if state.decided_s is not None and now > state.decided_s else 1.0
    horizon = (startup if startup is not None else config.replica_startup_s) + tick
    forecast, surged = state.forecast, state.surged_s
    # A new reading, or one that held still longer than any source refreshes: the rate did.
    held_still = forecast is not None and now - forecast.at_s >= MAX_REFRESH_S
    if sample.arrival_rate is not None and (signals != state.signals or held_still):
        if forecast is not None:
            expected = ahead(forecast, now - forecast.at_s)
            surged = now if sample.arrival_rate > SURGE_FACTOR * expected else surged
        forecast = observe(forecast, sample.arrival_rate, now, horizon)
    # The forecast looks from its last observation, which describes the rates of up to
    # ``signal_age_s`` before it (lag, scrape, rate window), to the horizon.
    lead = horizon + signal_age_s + (now - forecast.at_s) if forecast is not None else horizon
    outlook = _Outlook(forecast, horizon, lead, starting_since)
    replicas, backlog, why = _need(sample, config, capacity, outlook, now)
    serving = math.ceil(replicas) if replicas is not None else None
    kept = math.ceil(replicas * (1.0 + DOWN_TOLERANCE)) if replicas is not None else 0
    needs = tuple((t, n) for t, n in state.needs if t > now - config.max_scale_down_window_s)
    if serving is not None:
        needs += ((now, kept),)

    queued, inflight, rate = sample.queued, sample.inflight, sample.arrival_rate
    demand_known = queued is not None and inflight is not None and rate is not None
    active = not demand_known or bool(queued or inflight or rate)
    started = state.started_s if state.started_s is not None else now
    last_active = now if active or state.last_active_s is None else state.last_active_s

    state = replace(
        state,
        started_s=started,
        needs=needs,
        last_active_s=last_active,
        capacity_rps=learned,
        starting_since_s=starting_since,
        saturated_since_s=saturated_since,
        ready_count=sample.ready_replicas,
        ready_since_s=ready_since,
        signals=signals,
        signals_changed_s=changed_s,
        refresh_s=refresh,
        forecast=forecast,
        startup_s=startup,
        asked_s=asked,
        surged_s=surged,
        decided_s=now,
    )
    seen = _Assessment(
        serving_need=serving,
        kept_need=kept,
        backlog_replicas=backlog,
        why=why,
        demand_known=demand_known,
        active=active,
        idle_s=now - last_active,
        history_s=now - started,
        signal_age_s=signal_age_s,
        signals_current=signals_current,
    )
    return state, seen


def _startup(
    sample: Sample, state: PolicyState, now: float
) -> tuple[float | None, tuple[float, ...]]:
    """The start-up time and the replicas still starting, once this sample is seen.

    Replicas turn ready in the order they were asked for: each newly ready one is the oldest
    ask, and the time since it was asked is an observed start-up, smoothed into the last.
    Asks beyond the replicas still starting were cancelled, newest first (as the simulator and
    a Deployment's scale-down remove them).
    """
    startup, asked = state.startup_s, state.asked_s
    if state.ready_count is not None and sample.ready_replicas > state.ready_count:
        came = asked[: sample.ready_replicas - state.ready_count]
        asked = asked[len(came) :]
        for when in came:
            startup = now - when if startup is None else 0.5 * (startup + now - when)
    return startup, asked[: sample.starting_replicas]


def _refresh(changed_s: float | None, refresh: float | None, now: float) -> float | None:
    """The refresh interval once the demand signals changed again at ``now``: the shortest gap
    between two changes, ignoring gaps too long to be a source's refresh."""
    gap = now - changed_s if changed_s is not None else MAX_REFRESH_S
    if 0 < gap < MAX_REFRESH_S:
        return gap if refresh is None else min(refresh, gap)
    return refresh


def _up(
    current: int,
    wanted: int,
    state: PolicyState,
    config: ScaleConfig,
    now: float,
    reason: str,
    code: ReasonCode,
) -> Decision:
    since = state.starting_since_s if state.starting_since_s is not None else now
    window = state.down_window_s or config.scale_down_window_s
    # Demand back in a surge soon after capacity was released: the release was a reversal in
    # the making, so hold capacity longer next time. Flap damping, as the HPA velocity KEP
    # discusses. A rise the forecast followed (the morning of a daily pattern) is no surge: the
    # release before it was right, and holding longer would keep the peak through the night.
    startup = state.startup_s if state.startup_s is not None else config.replica_startup_s
    surging = state.surged_s is not None and now - state.surged_s <= startup
    if surging and state.last_down_s is not None and now - state.last_down_s < 5 * window:
        window = min(2 * window, config.max_scale_down_window_s)
        reason += f" (demand back {now - state.last_down_s:.0f} s after a scale-down: "
        reason += f"scale-down window now {window:.0f} s)"
    else:
        window = config.scale_down_window_s
    asked = state.asked_s + (now,) * (wanted - current)
    state = replace(state, starting_since_s=since, down_window_s=window, asked_s=asked)
    return Decision(wanted, state, reason, code)


def _saturated(sample: Sample, config: ScaleConfig) -> bool:
    """Every ready replica runs full batches: a batch per replica waits behind the busy ones."""
    return (
        sample.queued is not None
        and sample.busy_ratio is not None
        and sample.completion_rate is not None
        and sample.ready_replicas > 0
        and sample.starting_replicas == 0
        and sample.busy_ratio >= 0.9
        and sample.queued >= sample.ready_replicas * config.target_queue_per_replica
    )


def _observed_capacity(sample: Sample, learned: float | None) -> float | None:
    """Rows/s per busy replica, smoothed into what was learned before."""
    if not sample.completion_rate or not sample.busy_ratio:
        return learned
    observed = sample.completion_rate / (sample.ready_replicas * sample.busy_ratio)
    return observed if learned is None else 0.8 * learned + 0.2 * observed


@dataclass(frozen=True, slots=True)
class _Outlook:
    """What the sizing needs to look ahead: the forecast, over what horizon, and since when
    replicas have been starting."""

    forecast: RateForecast | None
    horizon_s: float
    """Start-up plus a tick: when replicas asked for now can first be counted on."""
    lead_s: float
    """How far past the forecast's last observation that moment is."""
    starting_since_s: float | None


def _need(
    sample: Sample, config: ScaleConfig, capacity: float | None, outlook: _Outlook, now: float
) -> tuple[float | None, int, str]:
    """(serving need in replicas, not rounded; extra replicas for the backlog; explanation);
    the need is None when no signal can tell."""
    u = config.target_utilization
    queued, inflight, rate = sample.queued, sample.inflight, sample.arrival_rate
    if capacity is not None and rate is not None:
        serving, why = _serving(rate, capacity, config, outlook)
        if queued is None:
            return serving, 0, why + ", queue unknown"
        # The queue keeps growing by the shortfall of ready capacity until the starting
        # replicas serve; size the drain for the queue they will find.
        left_s = outlook.horizon_s
        if outlook.starting_since_s is not None:
            left_s = max(0.0, left_s - (now - outlook.starting_since_s))
        shortfall = max(0.0, rate - sample.ready_replicas * capacity)
        # Rows waiting for the next free batch slot are normal; only the excess is a backlog.
        excess = max(0.0, queued - sample.ready_replicas * config.target_queue_per_replica)
        backlog = excess + shortfall * left_s
        extra = math.ceil(backlog / (capacity * config.backlog_drain_s)) if backlog >= 1 else 0
        return serving, extra, f"{why}, backlog {backlog:.0f} rows (+{extra})"
    if queued is not None and inflight is not None:
        outstanding = queued + inflight
        per_replica = config.target_queue_per_replica * u
        return (
            outstanding / per_replica,
            0,
            f"{outstanding:.0f} rows outstanding at {per_replica:.1f} per replica",
        )
    utilisation = [v for v in (sample.busy_ratio, sample.gpu_utilization) if v is not None]
    if utilisation and sample.ready_replicas:
        return (
            sample.ready_replicas * max(utilisation) / u,
            0,
            f"demand unknown, busy {max(utilisation):.2f} of target {u:.2f}",
        )
    return None, 0, "no demand or utilisation signal"


def _serving(
    rate: float, capacity: float, config: ScaleConfig, outlook: _Outlook
) -> tuple[float, str]:
    """Replicas (not rounded) that keep the latency objective for the rate ahead, and why.

    Two ways to miss it. The rate may rise above what is provisioned before replicas asked for
    now can serve: size for the forecast over the horizon plus ``SHORTFALL_Z`` times its recent
    shortfall; a shortfall builds a backlog over the horizon, and a backlog that a second of
    capacity drains within the objective's slack is harmless. And Poisson arrivals queue even
    below capacity: as a reflected Brownian motion, the queue exceeds ``x`` with probability
    ``exp(-2 (C - λ) x / λ)``; held to ``MISS_BUDGET`` at ``x = C x slack``, that is
    ``C >= (λ + sqrt(λ² + 2 λ ln(1 / MISS_BUDGET) / slack)) / 2``.
    """
    forecast = outlook.forecast
    expected = rate
    headroom = 0.0
    if forecast is not None:
        expected = max(rate, ahead(forecast, outlook.lead_s))
        headroom = SHORTFALL_Z * forecast.shortfall_rms
    # The time a row may wait: the objective less the full batch it then runs in.
    slack_s = config.latency_slo_s - config.target_queue_per_replica / capacity
    if slack_s <= 0:
        serving = (expected + headroom) / (capacity * config.target_utilization)
        why = f"arrival {expected:.0f} rows/s, objective under a batch: at target utilisation"
        return serving, why
    by_forecast = (expected + headroom) / (1.0 + slack_s / outlook.horizon_s)
    noise = 2.0 * expected * math.log(1.0 / MISS_BUDGET) / slack_s
    by_noise = (expected + math.sqrt(expected * expected + noise)) / 2.0
    serving = max(by_forecast, by_noise) / capacity
    why = (
        f"arrival {rate:.0f} rows/s, {expected:.0f} in {outlook.horizon_s:.0f} s "
        f"+{headroom:.0f} headroom at {capacity:.0f} rows/s per replica"
    )
    return serving, why
