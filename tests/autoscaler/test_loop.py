"""The control loop with a fake scaler, fake signals and an injected policy."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from autoscaler.loop import Autoscaler, ScalerError, ScaleTarget
from autoscaler.metrics import KINDS, AutoscalerMetrics, decision_kind
from autoscaler.policy import (
    REASON_CODES,
    Decision,
    PolicyState,
    ReasonCode,
    Sample,
    ScaleConfig,
)

MODELS = ("a", "b", "steady", "busy", "blind", "broken", "stuck", "ok", "mlp")


def config_of(model: str) -> ScaleConfig:
    """A config per model, so the fake policy (which sees no model name) knows whose it is."""
    return ScaleConfig(max_replicas=10 + MODELS.index(model))


def model_of(config: ScaleConfig) -> str:
    return MODELS[config.max_replicas - 10]


def target(model: str, replicas: int, ready: int | None = None) -> ScaleTarget:
    ready = replicas if ready is None else ready
    return ScaleTarget(model, config_of(model), replicas, ready, replicas - ready, ())


@dataclass
class FakeScaler:
    listed: list[ScaleTarget]
    scaled: list[tuple[str, int, str]] = field(default_factory=list)
    listing_failures: int = 0
    failing_models: set[str] = field(default_factory=set)

    async def targets(self) -> list[ScaleTarget]:
        if self.listing_failures:
            self.listing_failures -= 1
            raise RuntimeError("listing broke")
        return list(self.listed)

    async def scale(self, model: str, replicas: int, reason: str) -> None:
        if model in self.failing_models:
            raise ScalerError(f"cannot scale {model}")
        self.scaled.append((model, replicas, reason))
        self.listed = [
            ScaleTarget(t.model, t.config, replicas, t.ready_replicas, 0, t.pod_urls)
            if t.model == model
            else t
            for t in self.listed
        ]


@dataclass
class FakeSignals:
    queued: float | None = 8.0
    busy_ratio: float | None = None
    failing_models: set[str] = field(default_factory=set)

    async def read(self, target: ScaleTarget) -> Sample:
        if target.model in self.failing_models:
            raise RuntimeError(f"signals of {target.model} broke")
        return Sample(
            time_s=0.0,
            replicas=target.replicas,
            ready_replicas=target.ready_replicas,
            starting_replicas=target.starting_replicas,
            queued=self.queued,
            inflight=2.0,
            arrival_rate=None,
            completion_rate=None,
            busy_ratio=self.busy_ratio,
            gpu_utilization=None,
        )


@dataclass
class FakePolicy:
    """Wants ``wanted[model]`` replicas (a negative number: raises); records its calls."""

    wanted: dict[str, int]
    calls: list[tuple[str, PolicyState, float]] = field(default_factory=list)

    def __call__(
        self, sample: Sample, state: PolicyState, config: ScaleConfig, now: float
    ) -> Decision:
        model = model_of(config)
        self.calls.append((model, state, now))
        wanted = self.wanted[model]
        if wanted < 0:
            raise ValueError("the policy broke")
        code: ReasonCode = "hold" if wanted == sample.replicas else "scale_up"
        return Decision(wanted, PolicyState(), f"{model} wants {wanted}", code)


def autoscaler(
    scaler: FakeScaler, signals: FakeSignals, wanted: dict[str, int]
) -> tuple[Autoscaler, FakePolicy, CollectorRegistry]:
    policy = FakePolicy(wanted)
    registry = CollectorRegistry()
    loop = Autoscaler(
        scaler,
        signals,
        AutoscalerMetrics(registry),
        interval_s=0.01,
        decide=policy,
        clock=lambda: 42.0,
    )
    return loop, policy, registry


async def test_scales_only_models_whose_replicas_change() -> None:
    scaler = FakeScaler([target("steady", 2), target("busy", 3)])
    loop, policy, _ = autoscaler(scaler, FakeSignals(), {"steady": 2, "busy": 5})

    decisions = dict(await loop.run_once())

    assert {model: d.replicas for model, d in decisions.items()} == {"steady": 2, "busy": 5}
    assert scaler.scaled == [("busy", 5, "busy wants 5")]
    assert {now for _, _, now in policy.calls} == {42.0}


async def test_each_model_gets_back_the_state_its_last_decision_left() -> None:
    scaler = FakeScaler([target("a", 1), target("b", 1)])
    loop, policy, _ = autoscaler(scaler, FakeSignals(), {"a": 1, "b": 1})
    first = dict(await loop.run_once())
    policy.calls.clear()
    await loop.run_once()
    received = {model: state for model, state, _ in policy.calls}
    assert received["a"] is first["a"].state and received["b"] is first["b"].state


async def test_one_models_failure_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scaler = FakeScaler(
        [target("blind", 1), target("broken", 1), target("stuck", 1), target("ok", 1)]
    )
    scaler.failing_models = {"stuck"}
    signals = FakeSignals(failing_models={"blind"})
    loop, _, _ = autoscaler(scaler, signals, {"blind": 2, "broken": -1, "stuck": 2, "ok": 2})

    with caplog.at_level(logging.WARNING, "autoscaler.loop"):
        decisions = dict(await loop.run_once())

    assert set(decisions) == {"ok"}  # "stuck" decided, but its scale call failed
    assert scaler.scaled == [("ok", 2, "ok wants 2")]
    failures = {r.getMessage().split(":")[0]: r for r in caplog.records}
    assert set(failures) == {"model blind", "model broken", "model stuck"}
    assert failures["model blind"].exc_info  # a bug: its traceback helps
    assert not failures["model stuck"].exc_info  # a ScalerError says it all


async def test_decisions_are_logged_changes_at_info_steady_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scaler = FakeScaler([target("steady", 2), target("busy", 3)])
    loop, _, _ = autoscaler(scaler, FakeSignals(), {"steady": 2, "busy": 5})
    with caplog.at_level(logging.DEBUG, "autoscaler.loop"):
        await loop.run_once()
    logged = {r.getMessage(): r.levelno for r in caplog.records}
    assert logged == {
        "model steady: hold 2 -> 2: steady wants 2": logging.DEBUG,
        "model busy: scale_up 3 -> 5: busy wants 5": logging.INFO,
    }


async def test_metrics_export_replicas_decisions_and_present_signals() -> None:
    scaler = FakeScaler([target("mlp", 3, ready=2)])
    loop, _, registry = autoscaler(scaler, FakeSignals(queued=8.0, busy_ratio=None), {"mlp": 5})
    await loop.run_once()
    await loop.run_once()  # now at 5: a hold

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"model": "mlp", **labels})

    assert value("bazaar_autoscaler_desired_replicas") == 5
    assert value("bazaar_autoscaler_current_replicas") == 5
    assert value("bazaar_autoscaler_ready_replicas") == 2
    assert value("bazaar_autoscaler_decisions_total", kind="scale_up") == 1
    assert value("bazaar_autoscaler_decisions_total", kind="hold") == 1
    # Kinds not decided yet read 0, so rate() over them is 0 rather than nothing.
    assert value("bazaar_autoscaler_decisions_total", kind="scale_down") == 0
    assert value("bazaar_autoscaler_queued_rows") == 8.0
    assert value("bazaar_autoscaler_inflight_rows") == 2.0
    assert value("bazaar_autoscaler_busy_ratio") is None  # missing: absent, not zero
    assert value("bazaar_autoscaler_last_decision", kind="hold", reason="hold") == 1
    assert loop.metrics.stats() == {
        "mlp": {
            "desired_replicas": 5,
            "current_replicas": 5,
            "ready_replicas": 2,
            "kind": "hold",
            "reason_code": "hold",
            "reason": "mlp wants 5",
            "signals": {
                "queued": 8.0,
                "inflight": 2.0,
                "arrival_rate": None,
                "completion_rate": None,
                "busy_ratio": None,
                "gpu_utilization": None,
            },
            "time_s": 0.0,
        }
    }


@dataclass
class MovingSignals:
    """A queue and an arrival rate that differ on every read, as live signals do."""

    clock: list[float]
    reads: int = 0

    async def read(self, target: ScaleTarget) -> Sample:
        self.reads += 1
        queued = float(self.reads * 37 % 211)
        rate = 50.0 + self.reads * 13 % 97
        return Sample(
            time_s=self.clock[0],
            replicas=target.replicas,
            ready_replicas=target.ready_replicas,
            starting_replicas=target.starting_replicas,
            queued=queued,
            inflight=8.0,
            arrival_rate=rate,
            completion_rate=rate,
            busy_ratio=0.5,
            gpu_utilization=None,
        )


async def test_the_last_decision_is_one_series_per_model_whatever_the_numbers() -> None:
    # The real policy on moving signals: its sentences differ every tick, its labels do not.
    models = ("a", "b", "mlp")
    clock = [0.0]
    registry = CollectorRegistry()
    loop = Autoscaler(
        FakeScaler([target(model, 2) for model in models]),
        MovingSignals(clock),
        AutoscalerMetrics(registry),
        clock=lambda: clock[0],
    )
    sentences: set[str] = set()
    codes: set[str] = set()
    for second in range(360):
        clock[0] = float(second)
        sentences |= {decision.reason for _, decision in await loop.run_once()}
        series = [
            sample.labels
            for family in registry.collect()
            if family.name == "bazaar_autoscaler_last_decision"
            for sample in family.samples
        ]
        assert sorted(labels["model"] for labels in series) == sorted(models)
        assert all(labels["reason"] in REASON_CODES for labels in series)
        assert all(labels["kind"] in KINDS for labels in series)
        codes |= {labels["reason"] for labels in series}
    assert len(sentences) > 100  # the old label made one series per sentence
    assert len(codes) > 1


async def test_models_that_disappear_are_forgotten() -> None:
    scaler = FakeScaler([target("a", 1), target("b", 1)])
    loop, policy, registry = autoscaler(scaler, FakeSignals(), {"a": 1, "b": 1})
    await loop.run_once()
    scaler.listed = scaler.listed[:1]
    await loop.run_once()
    assert registry.get_sample_value("bazaar_autoscaler_desired_replicas", {"model": "b"}) is None
    labels = {"model": "b", "kind": "hold"}
    assert registry.get_sample_value("bazaar_autoscaler_decisions_total", labels) is None
    scaler.listed = [target("a", 1), target("b", 1)]
    policy.calls.clear()
    await loop.run_once()
    assert {model: state for model, state, _ in policy.calls}["b"] == PolicyState()


async def test_a_failed_listing_is_logged_and_the_tick_ends() -> None:
    scaler = FakeScaler([target("a", 1)], listing_failures=1)
    loop, policy, _ = autoscaler(scaler, FakeSignals(), {"a": 1})
    assert await loop.run_once() == []
    assert policy.calls == []


async def test_run_survives_errors_until_cancelled() -> None:
    scaler = FakeScaler([target("a", 1)], listing_failures=3)
    signals = FakeSignals()
    loop, policy, _ = autoscaler(scaler, signals, {"a": -1})  # the policy fails too
    task = asyncio.create_task(loop.run())
    deadline = asyncio.get_running_loop().time() + 5
    while len(policy.calls) < 2:  # listing failed 3 times, then the policy failed twice
        assert asyncio.get_running_loop().time() < deadline, "the loop stopped ticking"
        await asyncio.sleep(0.01)
    policy.wanted["a"] = 4
    while not scaler.scaled:
        assert asyncio.get_running_loop().time() < deadline, "the loop never scaled"
        await asyncio.sleep(0.01)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert scaler.scaled[0] == ("a", 4, "a wants 4")


@pytest.mark.parametrize(
    ("current", "desired", "kind"),
    [
        (3, 3, "hold"),
        (0, 0, "hold"),
        (3, 5, "scale_up"),
        (5, 3, "scale_down"),
        (0, 2, "from_zero"),
        (2, 0, "to_zero"),
    ],
)
def test_decision_kind(current: int, desired: int, kind: str) -> None:
    assert decision_kind(current, desired) == kind
