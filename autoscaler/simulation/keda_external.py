"""bazaar's policy as KEDA's external scaler: KEDA's operator and HPA scale on its answers.

What ``bazaar autoscaler --keda`` and the ScaledObject of ``deploy/components/keda`` do,
behind the simulator's policy seam. Every second bazaar's ``decide`` runs on the sample, as the
autoscaler's loop does, and its count ``D`` is the answer (:mod:`autoscaler.keda.service`);
the replicas change only when KEDA or its HPA acts on it:

- **activation** (trigger ``external-push``: ``StreamIsActive`` tells KEDA at once): at 0
  replicas and ``D > 0``, KEDA scales to ``max(1, minReplicaCount)`` in the same second; with
  ``D = 0`` for ``cooldown_s``, checked every ``polling_s``, it scales to 0;
- **the HPA**, every ``hpa_sync_s`` from 1 replica up: External metric ``D``, ``AverageValue``
  target 1, so ``ceil(D / 1) = D`` unless ``|D / N - 1| <= 0.1`` (its tolerance keeps ``N``);
  the example's ``behavior`` has no stabilisation window and no rate limit below bazaar's own,
  so the HPA applies that count within ``[max(1, min), max]``.

What it adds to bazaar's own scaler is therefore the HPA's delay (a decision waits for the
next sync, 7.5 s on average) and its tolerance above 10 replicas; the table row
``bazaar-keda`` measures what that costs against ``bazaar``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from autoscaler.policy import PolicyState, Sample, ScaleConfig, decide
from autoscaler.simulation.simulator import Outcome

HPA_TOLERANCE = 0.1
"""``--horizontal-pod-autoscaler-tolerance``'s default."""


@dataclass(frozen=True, slots=True)
class KedaExternalState:
    bazaar: PolicyState = field(default_factory=PolicyState)
    """bazaar's policy state: the autoscaler's loop keeps it between ticks."""
    last_sync_s: float | None = None
    """The HPA's last sync."""
    last_poll_s: float | None = None
    """KEDA's last poll for the scale to zero."""
    last_active_s: float | None = None
    """When bazaar last answered ``D > 0``."""


@dataclass(frozen=True, slots=True)
class KedaExternal:
    """bazaar's answers, applied by KEDA (0 ↔ 1) and its HPA (1 ↔ N)."""

    config: ScaleConfig
    """bazaar's settings: ``min_replicas`` and ``max_replicas`` are also the ScaledObject's."""
    hpa_sync_s: float = 15.0
    polling_s: float = 15.0
    """The example ScaledObject's ``pollingInterval``."""
    cooldown_s: float = 15.0
    """The example's ``cooldownPeriod``: bazaar has waited its own idle period already."""
    name: str = "bazaar-keda"
    interval_s: int = 1
    """bazaar's loop ticks every second; KEDA and the HPA keep their own periods."""

    def initial_state(self) -> KedaExternalState:
        return KedaExternalState()

    def decide(
        self, sample: Sample, state: KedaExternalState, now: float
    ) -> Outcome[KedaExternalState]:
        decision = decide(sample, state.bazaar, self.config, now)
        answer, current = decision.replicas, sample.replicas
        last_active = now if answer > 0 or state.last_active_s is None else state.last_active_s
        state = replace(state, bazaar=decision.state, last_active_s=last_active)
        if current == 0:
            if answer > 0:
                wanted = max(1, self.config.min_replicas)
                return Outcome(wanted, state, f"KEDA activates: bazaar answers {answer}")
            return Outcome(0, state, "inactive")
        if state.last_poll_s is None or now - state.last_poll_s >= self.polling_s:
            state = replace(state, last_poll_s=now)
            if self.config.min_replicas == 0 and now - last_active >= self.cooldown_s:
                return Outcome(0, state, f"KEDA: inactive for {self.cooldown_s:.0f} s")
        if state.last_sync_s is not None and now - state.last_sync_s < self.hpa_sync_s:
            return Outcome(current, state, f"bazaar answers {answer}; HPA waits for its sync")
        state = replace(state, last_sync_s=now)
        desired = hpa_external_average_value(answer, current)
        low, high = max(1, self.config.min_replicas), self.config.max_replicas
        replicas = min(max(desired, low), high)
        return Outcome(replicas, state, f"HPA: bazaar answers {answer} → {replicas}")


def hpa_external_average_value(total: float, status_replicas: int, target: float = 1.0) -> int:
    """``GetExternalPerPodMetricReplicas``: ``ceil(total / target)`` outside the tolerance,
    else the current count."""
    ratio = total / (target * status_replicas)
    if abs(1.0 - ratio) <= HPA_TOLERANCE:
        return status_replicas
    return math.ceil(total / target)
