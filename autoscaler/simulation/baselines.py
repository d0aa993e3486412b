"""Baselines as their defaults behave, and two references, behind the simulator's policy seam.

Each baseline is a frozen dataclass of settings with ``decide(sample, state, now)``, a pure
function like bazaar's own policy; formulas and defaults follow docs/autoscaling.md ("Baselines")
and the upstream sources the docstrings name. All of them see the demand the gateway exports,
``L = queued + inflight`` rows, and aim at the same set point: a replica sustains 16 rows in flight
(its full batch, 160 rows/s), and the target is 70 % of that, 11.2 rows per replica. HPA uses it as
a Pods metric (average per pod), KEDA as an External ``AverageValue``, Knative as the concurrency
target (``containerConcurrency`` 16 x 70 %), Ray as ``target_ongoing_requests``. The references
provision 70 % of 160 rows/s per replica.

Simplifications, each the closest the sampled signals allow: the sample only says "starting",
so HPA treats every starting pod as loading (Running, no metric: "missing"), not pending; KPA
averages the samples it is handed every 2 s instead of 1 s buckets; Ray decides every second with
its delays counted in those ticks instead of 0.1 s ticks, and averages the look-back directly
instead of receiving 10 s pushes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from autoscaler.policy import Sample
from autoscaler.simulation.simulator import MAX_BATCH_THROUGHPUT_RPS, Outcome

TARGET_PER_REPLICA = 16 * 0.7
"""Rows in flight per replica every baseline aims at: 70 % of a full batch."""


def windowed(
    samples: tuple[tuple[float, float], ...], now: float, window_s: float, load: float
) -> tuple[tuple[tuple[float, float], ...], float]:
    """The (time, load) samples of the last ``window_s`` with ``load`` added, and their mean."""
    kept = (*(s for s in samples if s[0] > now - window_s), (now, load))
    return kept, sum(c for _, c in kept) / len(kept)


def outstanding(sample: Sample) -> float | None:
    """Queued plus in-flight rows, or None when either is missing."""
    if sample.queued is None or sample.inflight is None:
        return None
    return sample.queued + sample.inflight


@dataclass(frozen=True, slots=True)
class HpaState:
    recommendations: tuple[tuple[float, int], ...] = ()
    """(time, unstabilised desired count) over the scale-down window."""
    events: tuple[tuple[float, int], ...] = ()
    """(time, replicas added (+) or removed (-)) over the rate-limit period."""


def hpa_normalize(
    desired: int,
    current: int,
    state: HpaState,
    now: float,
    bounds: tuple[int, int],
    window_s: float = 300.0,
    period_s: float = 15.0,
) -> tuple[int, HpaState]:
    """HPA's default ``behavior``: scale-down stabilisation, then the rate limits and bounds.

    Up: ``max(+100 %, +4 pods)`` per 15 s from the count at the period's start; down: to the
    highest recommendation of the window, at any rate (Percent 100).
    """
    recs = (*((t, d) for t, d in state.recommendations if t > now - window_s), (now, desired))
    stabilised = min(current, max(d for _, d in recs)) if desired < current else desired
    events = tuple((t, c) for t, c in state.events if t > now - period_s)
    added = sum(c for _, c in events if c > 0)
    removed = -sum(c for _, c in events if c < 0)
    start = current - added + removed
    low, high = bounds
    if stabilised > current:
        limit = max(math.ceil(start * 2.0), start + 4, current)
        stabilised = min(stabilised, high, limit)
    elif stabilised < current:
        stabilised = max(stabilised, low, min(int(start * 0.0), current))
    if stabilised != current:
        events += ((now, stabilised - current),)
    return stabilised, HpaState(recs, events)


def hpa_pods_replicas(
    total: float, ready: int, missing: int, current: int, target: float, tolerance: float = 0.1
) -> int:
    """``replica_calculator.go`` for a Pods metric: desired count with missing-pod dampening.

    Missing pods (running, no metric) count as 100 % of target when the ratio says down and 0 %
    when it says up.
    """
    ratio = total / (ready * target)
    if missing == 0:
        return current if abs(1.0 - ratio) <= tolerance else math.ceil(ratio * ready)
    if ratio < 1.0:
        total += target * missing
    pods = ready + missing
    new_ratio = total / (pods * target)
    if abs(1.0 - new_ratio) <= tolerance or (new_ratio - 1.0) * (ratio - 1.0) < 0:
        return current
    desired = math.ceil(new_ratio * pods)
    if (new_ratio > 1.0 and desired < current) or (new_ratio < 1.0 and desired > current):
        return current
    return desired


@dataclass(frozen=True, slots=True)
class Hpa:
    """Kubernetes HPA (autoscaling/v2), Pods metric "outstanding rows per pod", defaults."""

    min_replicas: int = 1
    max_replicas: int = 64
    target: float = TARGET_PER_REPLICA
    name: str = "hpa"
    interval_s: int = 15

    def initial_state(self) -> HpaState:
        return HpaState()

    def decide(self, sample: Sample, state: HpaState, now: float) -> Outcome[HpaState]:
        current, total = sample.replicas, outstanding(sample)
        if current == 0:
            return Outcome(0, state, "scaling inactive at 0 replicas")
        if total is None or sample.ready_replicas == 0:
            return Outcome(current, state, "no metrics from any pod")
        desired = hpa_pods_replicas(
            total, sample.ready_replicas, sample.starting_replicas, current, self.target
        )
        bounds = (self.min_replicas, self.max_replicas)
        replicas, state = hpa_normalize(desired, current, state, now, bounds)
        return Outcome(replicas, state, f"{total:.0f} outstanding: desired {desired}")


@dataclass(frozen=True, slots=True)
class KedaState:
    hpa: HpaState = HpaState()
    last_poll_s: float | None = None
    last_active_s: float | None = None


@dataclass(frozen=True, slots=True)
class Keda:
    """KEDA ScaledObject, Prometheus trigger on outstanding rows, ``AverageValue``, defaults.

    The operator polls every 30 s (0 → 1 on activation, → 0 after the 300 s cooldown); between,
    its HPA (min 1, default behaviour, 15 s) sets ``ceil(total / threshold)``.
    """

    min_replicas: int = 0
    max_replicas: int = 64
    threshold: float = TARGET_PER_REPLICA
    activation: float = 0.0
    polling_s: float = 30.0
    cooldown_s: float = 300.0
    name: str = "keda"
    interval_s: int = 15

    def initial_state(self) -> KedaState:
        return KedaState()

    def decide(self, sample: Sample, state: KedaState, now: float) -> Outcome[KedaState]:
        current, total = sample.replicas, outstanding(sample)
        if total is None:
            return Outcome(current, state, "scaler error: metric missing")
        if state.last_poll_s is None or now - state.last_poll_s >= self.polling_s:
            active = total > self.activation
            last_active = now if active or state.last_active_s is None else state.last_active_s
            state = replace(state, last_poll_s=now, last_active_s=last_active)
            if current == 0:
                if active and self.min_replicas == 0:
                    return Outcome(1, state, f"activated: {total:.0f} > {self.activation:g}")
            elif self.min_replicas == 0 and now - last_active >= self.cooldown_s:
                return Outcome(0, state, f"inactive for {self.cooldown_s:.0f} s: to zero")
        if current == 0:
            return Outcome(max(0, self.min_replicas), state, "not active")
        status = sample.replicas
        ratio = total / (self.threshold * status)
        desired = status if abs(1.0 - ratio) <= 0.1 else math.ceil(total / self.threshold)
        bounds = (max(1, self.min_replicas), self.max_replicas)
        replicas, hpa = hpa_normalize(desired, current, state.hpa, now, bounds)
        return Outcome(replicas, replace(state, hpa=hpa), f"{total:.0f} / {self.threshold:g}")


@dataclass(frozen=True, slots=True)
class KpaState:
    samples: tuple[tuple[float, float], ...] = ()
    """(time, concurrency) over the stable window."""
    panic_since_s: float | None = None
    """Last tick over the panic threshold; None when not panicking."""
    max_panic_pods: int = 0
    zero_since_s: float | None = None
    """When the stable decision first reached 0 (the grace period runs from here)."""
    started: bool = False


@dataclass(frozen=True, slots=True)
class Kpa:
    """Knative Pod Autoscaler, ``config-autoscaler`` defaults, concurrency = outstanding rows."""

    min_replicas: int = 1
    max_replicas: int = 64
    target: float = TARGET_PER_REPLICA
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    grace_s: float = 30.0
    name: str = "kpa"
    interval_s: int = 2

    def initial_state(self) -> KpaState:
        return KpaState()

    def decide(self, sample: Sample, state: KpaState, now: float) -> Outcome[KpaState]:
        current, load = sample.replicas, outstanding(sample)
        if load is None:
            return Outcome(current, state, "no concurrency reported")
        samples, stable = windowed(state.samples, now, self.stable_window_s, load)
        recent = [c for t, c in samples if t > now - self.panic_window_s]
        panic = sum(recent) / len(recent)
        n = max(1, sample.ready_replicas)
        max_up, max_down = math.ceil(self.max_scale_up_rate * n), n // int(self.max_scale_down_rate)
        dspc, dppc = math.ceil(stable / self.target), math.ceil(panic / self.target)
        stable_pods = min(max(dspc, max_down), max_up)
        panic_pods = min(max(dppc, max_down), max_up)
        panic_since, max_panic = state.panic_since_s, state.max_panic_pods
        # A fresh autoscaler with several ready pods starts panicking: it has no history.
        if not state.started and sample.ready_replicas > 1:
            panic_since, max_panic = now, sample.ready_replicas
        if dppc / n >= self.panic_threshold:
            panic_since = now
        elif panic_since is not None and now > panic_since + self.stable_window_s:
            panic_since, max_panic = None, 0
        if panic_since is not None:
            max_panic = max(max_panic, stable_pods, panic_pods)
            desired, mode = max_panic, "panic"
        else:
            desired, mode = stable_pods, "stable"
        zero_since = state.zero_since_s
        if desired == 0 and self.min_replicas == 0:
            zero_since = now if zero_since is None else zero_since
            if current > 0 and now - zero_since < self.grace_s:
                desired = 1
        else:
            zero_since = None
        if current == 0 and load > 0:
            desired = max(desired, 1)
        replicas = min(max(desired, self.min_replicas), self.max_replicas)
        state = KpaState(samples, panic_since, max_panic, zero_since, True)
        why = f"{mode}: stable {stable:.1f} → {dspc}, panic {panic:.1f} → {dppc} pods"
        return Outcome(replicas, state, why)


@dataclass(frozen=True, slots=True)
class RayState:
    samples: tuple[tuple[float, float], ...] = ()
    counter: int = 0


@dataclass(frozen=True, slots=True)
class Ray:
    """Ray Serve's default queue-length policy: look-back average, delays counted in ticks."""

    min_replicas: int = 1
    max_replicas: int = 64
    target_ongoing: float = TARGET_PER_REPLICA
    look_back_s: float = 30.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    upscaling_factor: float = 1.0
    downscaling_factor: float = 1.0
    name: str = "ray"
    interval_s: int = 1

    def initial_state(self) -> RayState:
        return RayState()

    def decide(self, sample: Sample, state: RayState, now: float) -> Outcome[RayState]:
        current, load = sample.replicas, outstanding(sample)
        if load is None:
            return Outcome(current, state, "no metrics pushed")
        samples, total = windowed(state.samples, now, self.look_back_s, load)
        if current == 0:
            wanted = math.ceil(self.upscaling_factor) if total > 0 else 0
            return Outcome(wanted, RayState(samples, 0), f"cold start: {total:.1f} ongoing")
        desired = self.desired(total, current)
        counter = state.counter
        if desired > current:
            counter = max(counter, 0) + 1
            if counter > int(self.upscale_delay_s / self.interval_s):
                return Outcome(desired, RayState(samples, 0), f"up after delay: {total:.1f}")
        elif desired < current:
            counter = min(counter, 0) - 1
            if counter < -int(self.downscale_delay_s / self.interval_s):
                return Outcome(desired, RayState(samples, 0), f"down after delay: {total:.1f}")
        else:
            counter = 0
        return Outcome(current, RayState(samples, counter), f"{total:.1f} ongoing → {desired}")

    def desired(self, total: float, current: int) -> int:
        """``_calculate_desired_num_replicas``: the gain-scaled step toward ``total / target``."""
        raw = total / self.target_ongoing
        factor = self.upscaling_factor if raw > current else self.downscaling_factor
        scaled = math.ceil(current + factor * (raw - current))
        if math.ceil(raw) < current and scaled == current:
            scaled -= 1
        if total > 0:
            scaled = max(1, scaled)
        return min(max(scaled, self.min_replicas), self.max_replicas)


def replicas_for(rate_rps: float, fraction: float = 0.7) -> int:
    """Replicas that serve ``rate_rps`` at ``fraction`` of full-batch throughput."""
    return math.ceil(rate_rps / (fraction * MAX_BATCH_THROUGHPUT_RPS))


@dataclass(frozen=True, slots=True)
class StaticPeak:
    """Reference: always provisioned for the trace's peak rate at 70 %."""

    replicas: int
    name: str = "static-peak"
    interval_s: int = 1

    def initial_state(self) -> None:
        return None

    def decide(self, sample: Sample, state: None, now: float) -> Outcome[None]:
        return Outcome(self.replicas, None, f"static {self.replicas}")


@dataclass(frozen=True, slots=True)
class Oracle:
    """Reference: knows the intensity ahead and asks for it one cold start early (cost floor)."""

    rate_per_s: npt.NDArray[np.float64]
    lead_s: int
    """Pending plus cold start plus one decision period."""
    min_replicas: int = 1
    name: str = "oracle"
    interval_s: int = 1

    def initial_state(self) -> None:
        return None

    def decide(self, sample: Sample, state: None, now: float) -> Outcome[None]:
        ahead = self.rate_per_s[int(now) : int(now) + self.lead_s + 1]
        peak = float(ahead.max()) if len(ahead) else 0.0
        return Outcome(max(self.min_replicas, replicas_for(peak)), None, f"λ ahead {peak:.0f}")
