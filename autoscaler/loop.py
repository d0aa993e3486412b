"""The control loop: every tick, for every model, read signals → decide → scale.

One ``Autoscaler`` drives one ``Scaler`` (Kubernetes Deployments, or local worker processes)
with one ``SignalReader``. A tick lists the scaler's targets (a model, or one version of it:
``ScaleTarget.name``), then handles every target concurrently: it reads the target's
``Sample``, calls the pure policy ``decide`` with the state that target's last decision
left, exports the result, and asks the scaler for a new replica count only when the
decision differs from the replicas asked for now. With
``publish``, every decision's count, held or changed, is also handed to it (``--keda``: the
answers KEDA's external scaler serves).

Failure modes: a model whose signals, decision or scale call fails is logged and skipped
for that tick (its policy state is kept), and the other models go on; a tick whose target
listing fails does nothing. ``run`` never dies of an exception, only of cancellation. Over
a long run, models that disappear from the listing are forgotten (state and metrics), so
memory follows the models that exist.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from autoscaler import policy
from autoscaler.metrics import AutoscalerMetrics, decision_kind
from autoscaler.policy import Decision, PolicyState, Sample, ScaleConfig

log = logging.getLogger(__name__)

DecideFn = Callable[[Sample, PolicyState, ScaleConfig, float], Decision]


@dataclass(frozen=True, slots=True)
class ScaleTarget:
    """One model the scaler can scale, as it stands now."""

    model: str
    config: ScaleConfig
    replicas: int
    """Replicas asked for now (the Deployment's spec.replicas, or local workers)."""
    ready_replicas: int
    """Replicas serving now."""
    starting_replicas: int
    """Replicas asked for but not serving yet."""
    pod_urls: tuple[str, ...]
    """Base URLs of the model's ready pods, for their ``/metrics``."""
    version: str | None = None
    """The one version of the model these replicas serve, sized on that version's own
    demand and load; None: the model's, all versions together."""
    models: tuple[str, ...] = ()
    """The models these replicas serve together (a shared worker, a model group, named by
    ``model``), sized on their demand and load summed; (): the one model ``model``."""

    @property
    def name(self) -> str:
        """What the loop knows the target by (its state, metrics, logs, ``Scaler.scale``):
        the model, or ``model@version`` for one version's replicas."""
        return target_name(self.model, self.version)


def target_name(model: str, version: str | None) -> str:
    """``ScaleTarget.name`` of a model's replicas, or of one version's."""
    return model if version is None else f"{model}@{version}"


class ScalerError(Exception):
    """A scaler backend failed in a way its message fully explains (no traceback needed)."""


class Scaler(Protocol):
    """Where replicas live: lists what can be scaled, and scales it (by ``ScaleTarget.name``).

    Both methods raise ``ScalerError`` when the backend fails after its own retries.
    """

    async def targets(self) -> list[ScaleTarget]: ...

    async def scale(self, model: str, replicas: int, reason: str) -> None: ...


class SignalReader(Protocol):
    """Reads one model's signals; a signal it could not read is None in the Sample."""

    async def read(self, target: ScaleTarget) -> Sample: ...


class Autoscaler:
    def __init__(
        self,
        scaler: Scaler,
        signals: SignalReader,
        metrics: AutoscalerMetrics,
        *,
        interval_s: float = 1.0,
        decide: DecideFn = policy.decide,
        clock: Callable[[], float] = time.monotonic,
        publish: Callable[[str, int], None] | None = None,
    ) -> None:
        self.scaler = scaler
        self.signals = signals
        self.metrics = metrics
        self.interval_s = interval_s
        self.decide = decide
        self.clock = clock
        self.publish = publish
        self._states: dict[str, PolicyState] = {}

    async def run(self) -> None:
        """Tick every ``interval_s`` (measured start to start) until cancelled."""
        while True:
            started = self.clock()
            try:
                await self.run_once()
            except Exception:  # run_once guards each step; this is the last line of defence
                log.exception("autoscaler tick failed")
            await asyncio.sleep(max(0.0, self.interval_s - (self.clock() - started)))

    async def run_once(self) -> list[tuple[str, Decision]]:
        """One tick over all targets; the decisions made, by target name."""
        try:
            targets = await self.scaler.targets()
        except Exception as exc:
            log.warning("cannot list the models to scale: %s", exc, exc_info=_traceback_helps(exc))
            return []
        for gone in self._states.keys() - {target.name for target in targets}:
            del self._states[gone]
            self.metrics.forget(gone)
        decisions = await asyncio.gather(*(self._step(target) for target in targets))
        return [
            (target.name, decision)
            for target, decision in zip(targets, decisions, strict=True)
            if decision is not None
        ]

    async def _step(self, target: ScaleTarget) -> Decision | None:
        name = target.name
        try:
            sample = await self.signals.read(target)
            state = self._states.get(name, PolicyState())
            decision = self.decide(sample, state, target.config, self.clock())
            self._states[name] = decision.state
            if self.publish is not None:
                self.publish(name, decision.replicas)
            kind = decision_kind(target.replicas, decision.replicas)
            self.metrics.observe(name, sample, decision, kind)
            changed = decision.replicas != target.replicas
            log.log(
                logging.INFO if changed else logging.DEBUG,
                "model %s: %s %d -> %d: %s",
                name,
                kind,
                target.replicas,
                decision.replicas,
                decision.reason,
            )
            if changed:
                await self.scaler.scale(name, decision.replicas, decision.reason)
            return decision
        except Exception as exc:
            log.warning("model %s: step failed: %s", name, exc, exc_info=_traceback_helps(exc))
            return None


def _traceback_helps(exc: Exception) -> bool:
    """A ScalerError explains itself; anything else is a bug worth its traceback."""
    return not isinstance(exc, ScalerError)
