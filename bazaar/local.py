"""``bazaar serve``'s endpoint source: local model workers, autoscaled.

Every model in the repository starts with ``workers`` ``bazaar model-server`` processes
from the ``WorkerSupervisor``. With autoscaling on (the default), the same control loop the
Kubernetes autoscaler runs reads the gateway's own ``/stats`` and the workers' ``/metrics``
every second and scales each model within the ``ScaleConfig``'s bounds through the local
scaler; its metrics join the gateway's ``/metrics``, and the workers' are served together on
the gateway's ``/metrics/workers`` (``bazaar.worker_metrics``). A model scaled to zero keeps its
metadata in the gateway, so its next request is validated and held in the queue, where the
autoscaler sees it and starts a worker. With ``gateway_token`` (the gateway takes API keys),
the autoscaler presents it to read ``/stats``, on a session of its own: the workers never see
it. Stopping ends the loop first, so nothing scales while the workers are being stopped.

A model placed alone whose config serves several versions gets workers per version
(``NAME@VERSION``, each serving that version only), and each version is a scale target of
its own, sized on that version's queue and work in flight (the rows shadowed to it
included) and its workers' load, as each version's Deployment is in Kubernetes: a
candidate's workers follow its share of the traffic, not the model's.

With ``worker_bytes``, small models share workers (``bazaar.placement``): each group of
models is ``workers`` processes named ``shared-N``, and the gateway hears of each model with
its group's workers, so it routes a model's batches only to workers that hold it. A model
placed alone keeps its own workers; a group's workers are autoscaled as one target, on the
sum of its models' queues and work in flight and of their busy ratios in its workers
(``autoscaler.sources``), so a group whose models all go idle scales to zero like a model,
and the first request for any of them brings a worker back. Every ``LOAD_CHECK_S`` the shared
workers' busy ratios are read per model, and a model busy for half its workers' time or more
(``bazaar.placement.busy_alone``) moves to workers of its own: they start, it is routed to
them alone once one is ready, and from then on it is its own autoscaling target; the shared
workers keep it loaded until they restart. With ``memory_budget`` each
worker pages its models within it (``bazaar.supervisor``): packed with ``worker_bytes``
larger than the budget, a worker serves more models than it holds at once.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry

from autoscaler.loop import Autoscaler
from autoscaler.metrics import AutoscalerMetrics
from autoscaler.policy import ScaleConfig
from autoscaler.sources import GatewayStats, PodMetrics, Signals
from bazaar.placement import busy_alone, estimated_bytes, place
from bazaar.scaler import LocalScaler
from bazaar.supervisor import WorkerSupervisor
from gateway.catalog import EndpointListener
from models.repository import ModelRepository
from protocol.auth import bearer
from protocol.errors import ConfigError, ModelNotFound
from protocol.support import cancel_and_wait

log = logging.getLogger(__name__)

LOAD_CHECK_S = 5.0
"""How often the shared workers' load is read for placement by load."""


class LocalWorkers:
    def __init__(
        self,
        repository: Path,
        gateway_url: str,
        *,
        workers: int,
        autoscale: ScaleConfig | None,
        log_level: str,
        gateway_token: str | None = None,
        worker_bytes: int | None = None,
        grpc_hop: bool = False,
        memory_budget: int | None = None,
    ) -> None:
        self.repository = repository
        models = ModelRepository(repository)
        self.models = models.model_names()
        self.groups: dict[str, tuple[str, ...]] = {model: (model,) for model in self.models}
        """Each worker's name and the models it serves: one apiece without ``worker_bytes``."""
        if worker_bytes is not None:
            sizes = {model: estimated_bytes(models, model) for model in self.models}
            placed = place(sizes, worker_bytes)
            shared = [group for group in placed if len(group) > 1]
            self.groups = {group[0]: group for group in placed if len(group) == 1}
            self.groups |= {f"shared-{n}": group for n, group in enumerate(shared, 1)}
        for model in self.models:
            if self.groups.get(model) == (model,):
                versions = _served_versions(models, model)
                if len(versions) > 1:
                    del self.groups[model]
                    self.groups |= {f"{model}@{v}": (f"{model}@{v}",) for v in versions}
        self.gateway_url = gateway_url
        self.workers = workers
        self.autoscale = autoscale
        self.log_level = log_level
        self.gateway_token = gateway_token
        self.grpc_hop = grpc_hop
        self.memory_budget = memory_budget
        """Each worker pages its models within this many bytes; None: it holds them all."""
        self.supervisor: WorkerSupervisor | None = None
        self._autoscaler: asyncio.Task[None] | None = None
        self._scaler: LocalScaler | None = None
        self._placing: asyncio.Task[None] | None = None

    async def start(self, listener: EndpointListener, registry: CollectorRegistry) -> None:
        self.supervisor = WorkerSupervisor(
            self.repository,
            listener,
            log_level=self.log_level,
            grpc_hop=self.grpc_hop,
            memory_budget_bytes=self.memory_budget,
        )
        for model in self.models:
            listener(model, [])  # known at once: requests wait for a worker instead of 404
        for name, models in self.groups.items():
            await self.supervisor.scale(name, self.workers, models)
        if self.autoscale is not None:
            shared = {name: models for name, models in self.groups.items() if models != (name,)}
            configs = dict.fromkeys(self.groups, self.autoscale)
            scaler = self._scaler = LocalScaler(self.supervisor, configs, shared)
            self._autoscaler = asyncio.create_task(self._run_autoscaler(scaler, registry))
            log.info(
                "autoscaling each model (each version, where it has several) between %d and "
                "%d workers",
                self.autoscale.min_replicas,
                self.autoscale.max_replicas,
            )

        if any(len(models) > 1 for models in self.groups.values()):
            self._placing = asyncio.create_task(self._place_by_load(), name="place-by-load")

    def worker_urls(self) -> dict[str, str]:
        """``MODEL/N`` -> URL of every running worker (``WorkerSupervisor.worker_urls``)."""
        return {} if self.supervisor is None else self.supervisor.worker_urls()

    def grpc_target(self, url: str) -> str | None:
        """The gRPC ``host:port`` of the worker at ``url``, with ``grpc_hop``
        (``WorkerSupervisor.grpc_target``)."""
        return None if self.supervisor is None else self.supervisor.grpc_target(url)

    async def stop(self) -> None:
        await cancel_and_wait(self._autoscaler, self._placing)
        if self.supervisor is not None:
            await self.supervisor.stop()

    async def _place_by_load(self) -> None:
        """Move every busy shared model to workers of its own, checking every
        ``LOAD_CHECK_S`` until cancelled."""
        assert self.supervisor is not None
        async with aiohttp.ClientSession() as session:
            pods = PodMetrics(session=session)
            while True:
                await asyncio.sleep(LOAD_CHECK_S)
                for group, models in list(self.groups.items()):
                    if len(models) < 2:
                        continue
                    busy = await pods.busy_by_model(self.supervisor.endpoints(group))
                    for model in busy_alone(models, busy):
                        log.info(
                            "%s is busy for %.0f %% of the %s workers' time: it gets workers of "
                            "its own",
                            model,
                            100 * busy[model],
                            group,
                        )
                        await self._alone(group, model)

    async def _alone(self, group: str, model: str) -> None:
        """Start ``model``'s own workers and take it out of ``group``: the group's workers
        no longer tell the gateway of it, its own do once ready."""
        assert self.supervisor is not None
        remaining = tuple(name for name in self.groups[group] if name != model)
        self.groups[group] = remaining
        self.groups[model] = (model,)
        await self.supervisor.scale(group, self.supervisor.workers(group), remaining)
        await self.supervisor.scale(model, self.workers, (model,))
        if self._scaler is not None and self.autoscale is not None:
            self._scaler.shared[group] = remaining
            self._scaler.configs[model] = self.autoscale

    async def _run_autoscaler(self, scaler: LocalScaler, registry: CollectorRegistry) -> None:
        headers = {} if self.gateway_token is None else bearer(self.gateway_token)
        async with (
            aiohttp.ClientSession() as session,
            aiohttp.ClientSession(headers=headers) as gateway_session,
        ):
            signals = Signals(
                GatewayStats([self.gateway_url], session=gateway_session),
                PodMetrics(session=session),
            )
            await Autoscaler(scaler, signals, AutoscalerMetrics(registry)).run()


def _served_versions(repository: ModelRepository, model: str) -> list[int]:
    """The versions the model's config serves; none known when it cannot be read (its
    workers then say why, as they fail to load it)."""
    try:
        files = repository.versions(model, repository.load_config(model))
    except (ConfigError, ModelNotFound):
        return []
    return [version.version for version in files]
