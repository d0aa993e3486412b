"""KEDA's external scaler, answered with bazaar's own decisions: KEDA and its HPA scale.

With ``bazaar autoscaler --keda`` the control loop runs as always (signals → ``decide``), but
its scaler is :class:`KedaScaler`, which lists the model Deployments and patches nothing: every
decision, held or changed, goes to :class:`Answers`, and :class:`ExternalScaler` serves them
over gRPC to KEDA's operator (a ``ScaledObject`` trigger of type ``external`` or
``external-push`` whose ``scalerMetadata`` names the model: ``model: mlp``).

The arithmetic that makes KEDA land on bazaar's count ``D`` for a Deployment at ``N`` replicas:

- ``GetMetricSpec`` asks for a target of 1 per replica. KEDA's default ``metricType`` is
  ``AverageValue``, so its HPA gets an External metric with ``averageValue: 1``;
- ``GetMetrics`` reports ``D``. The HPA's ``GetExternalPerPodMetricReplicas`` computes
  ``ratio = D / (1 x N)`` and, outside its tolerance, ``ceil(D / 1) = D`` replicas, whatever
  ``N`` is;
- ``IsActive`` (and ``StreamIsActive``) is ``D > 0``: KEDA itself takes the Deployment from 0
  to 1 (then the HPA to ``D``) and, after its ``cooldownPeriod`` of ``D = 0``, back to 0. The
  HPA never sees 0: KEDA's HPA has ``minReplicas`` 1 at least.

What the HPA adds, and how the ScaledObject of ``deploy/components/keda`` takes it out: its
tolerance keeps ``N`` while ``|D/N - 1| <= 0.1``, which below 10 replicas never happens for
``D != N`` (a step of one is already more than 10 %), and from 10 up holds changes of 10 % or
less until they grow (unless the cluster lowers ``--horizontal-pod-autoscaler-tolerance``, or sets
``behavior.*.tolerance`` where the HPAConfigurableTolerance gate is on); its default behaviour
(a 300 s scale-down window, at most doubling per 15 s) would delay what bazaar's policy already
windowed, so the example passes a behaviour without windows or rate limits. The HPA reads the
metric every 15 s: a decision reaches the Deployment within a sync period.

The answers are per namespace (the one ``--namespace`` names): a ``ScaledObjectRef`` of another
namespace, or a model no Deployment there carries, is ``NOT_FOUND`` (KEDA logs the message
and, with ``fallback`` set, falls back after ``failureThreshold`` errors); a listed model
without a decision yet (the first tick runs) is ``UNAVAILABLE``. ``StreamMetricSpec`` keeps the
generated ``UNIMPLEMENTED``, which KEDA takes as "pull the spec": the spec never changes.
Leader election does not apply: nothing is patched, so every autoscaler replica decides and
answers on its own signals.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any, NoReturn

import grpc

from autoscaler.keda import externalscaler_pb2 as pb
from autoscaler.keda.externalscaler_pb2_grpc import (
    ExternalScalerServicer,
    add_ExternalScalerServicer_to_server,
)
from autoscaler.loop import Scaler, ScaleTarget

log = logging.getLogger(__name__)

METRIC_NAME = "bazaar-desired-replicas"
"""The one metric of every model's trigger (KEDA prefixes it with the trigger's index)."""
MODEL_KEY = "model"
"""The ``scalerMetadata`` key that names the model."""
MAX_MESSAGE_BYTES = 64 * 1024
"""A ScaledObjectRef is a name, a namespace and a few metadata strings."""
MAX_CONCURRENT_RPCS = 256
"""Open StreamIsActive calls count: one per ``external-push`` trigger."""


class UnknownModel(LookupError):
    """No Deployment of the namespace carries the model (or the namespace is another one)."""


class NoDecisionYet(LookupError):
    """The model is listed, and the loop has not decided for it yet."""


class Answers:
    """bazaar's desired replicas per model of one namespace, as the control loop decides them.

    ``retain`` (each listing) forgets models whose Deployment is gone; ``publish`` (each
    decision) records a count; ``changed`` is an event set at the next change of any answer, for
    the streams that push activity.
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._listed: frozenset[str] = frozenset()
        self._replicas: dict[str, int] = {}
        self._changed = asyncio.Event()

    @property
    def changed(self) -> asyncio.Event:
        """Set when an answer next changes (a new event each time)."""
        return self._changed

    def retain(self, models: Iterable[str]) -> None:
        self._listed = frozenset(models)
        gone = self._replicas.keys() - self._listed
        for model in gone:
            del self._replicas[model]
        if gone:
            self._notify()

    def publish(self, model: str, replicas: int) -> None:
        if self._replicas.get(model) != replicas:
            self._replicas[model] = replicas
            self._notify()

    def desired(self, namespace: str, model: str) -> int:
        """The model's last decision; raises UnknownModel or NoDecisionYet."""
        if namespace != self.namespace or model not in self._listed:
            raise UnknownModel(
                f"no Deployment labelled with model {model!r} in namespace {namespace!r} "
                f"(this autoscaler decides for namespace {self.namespace!r})"
            )
        replicas = self._replicas.get(model)
        if replicas is None:
            raise NoDecisionYet(f"model {model!r}: no decision yet (the first tick is running)")
        return replicas

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


class KedaScaler:
    """``loop.Scaler`` for ``--keda``: lists through ``lister``, patches nothing.

    The loop publishes each decision to the ``Answers`` (``Autoscaler(publish=...)``); scaling
    is KEDA's, from those answers.
    """

    def __init__(self, lister: Scaler, answers: Answers) -> None:
        self.lister = lister
        self.answers = answers

    async def targets(self) -> list[ScaleTarget]:
        targets = await self.lister.targets()
        self.answers.retain(target.name for target in targets)
        return targets

    async def scale(self, model: str, replicas: int, reason: str) -> None:
        """Nothing to do: the decision is published, and KEDA's HPA applies it."""


class ExternalScaler(ExternalScalerServicer):
    """``externalscaler.ExternalScaler`` over :class:`Answers`."""

    def __init__(self, answers: Answers) -> None:
        self.answers = answers

    async def IsActive(
        self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.IsActiveResponse:
        return pb.IsActiveResponse(result=await self._desired(request, context) > 0)

    async def StreamIsActive(
        self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.IsActiveResponse]:
        """The activity now, then each change of it, until KEDA cancels the call (or the
        model's Deployment goes: ``NOT_FOUND``)."""
        sent = None
        while True:
            changed = self.answers.changed  # taken before reading, so no change slips by
            active = await self._desired(request, context) > 0
            if active != sent:
                yield pb.IsActiveResponse(result=active)
                sent = active
            await changed.wait()

    async def GetMetricSpec(
        self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetMetricSpecResponse:
        await self._desired(request, context)  # an unknown model fails here already
        spec = pb.MetricSpec(metricName=METRIC_NAME, targetSize=1, targetSizeFloat=1.0)
        return pb.GetMetricSpecResponse(metricSpecs=[spec])

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetMetricsResponse:
        if request.metricName != METRIC_NAME:
            await _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"unknown metric {request.metricName!r}: the only one is {METRIC_NAME!r}",
            )
        replicas = await self._desired(request.scaledObjectRef, context)
        value = pb.MetricValue(
            metricName=METRIC_NAME, metricValue=replicas, metricValueFloat=float(replicas)
        )
        return pb.GetMetricsResponse(metricValues=[value])

    async def _desired(
        self, ref: pb.ScaledObjectRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> int:
        model = ref.scalerMetadata.get(MODEL_KEY)
        if not model:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"ScaledObject {ref.namespace}/{ref.name}: the trigger's metadata needs "
                f"{MODEL_KEY!r} (the model's name, its Deployment's bazaar.dev/model label)",
            )
        try:
            return self.answers.desired(ref.namespace, model)
        except UnknownModel as exc:
            await _abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        except NoDecisionYet as exc:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, str(exc))


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str
) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # it raises; this tells the type checker


def keda_server(answers: Answers, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """The server (not started; start and stop it in the serving loop) and its bound port
    (``port`` 0 binds a free one)."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # KEDA holds its connection and its streams open: ping to find dead peers.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS)
    add_ExternalScalerServicer_to_server(ExternalScaler(answers), server)  # type: ignore[no-untyped-call]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return server, server.add_insecure_port(address)
