"""The local scaler: ``bazaar serve``'s worker processes are its replicas.

Each model's replicas are ``bazaar model-server --model NAME`` workers kept by the
``WorkerSupervisor``, or each version's (``NAME@VERSION``: a target of its own, sized on
that version's demand and load, as a version's Deployment is in Kubernetes); scaling asks
it for a new count, which starts workers (they join the gateway once ready) or retires the
newest (they leave the gateway first, then drain).
Workers that are starting count as starting replicas, so the policy does not ask twice for
capacity that is already on its way. Workers shared by several models (``bazaar.placement``)
are one target, named by their group, sized on those models' demand and load summed
(``ScaleTarget.models``).
"""

from __future__ import annotations

from collections.abc import Mapping

from autoscaler.loop import ScaleTarget
from autoscaler.policy import ScaleConfig
from bazaar.supervisor import WorkerSupervisor


class LocalScaler:
    """Implements ``loop.Scaler`` over local worker processes."""

    def __init__(
        self,
        supervisor: WorkerSupervisor,
        configs: Mapping[str, ScaleConfig],
        shared: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.supervisor = supervisor
        self.configs = dict(configs)
        self.shared = dict(shared or {})
        """Each group of shared workers among ``configs``, and the models they serve."""

    async def targets(self) -> list[ScaleTarget]:
        targets = []
        for name, config in self.configs.items():
            workers = self.supervisor.workers(name)
            ready = self.supervisor.endpoints(name)
            model, _, version = name.partition("@")
            targets.append(
                ScaleTarget(
                    model=model,
                    config=config,
                    replicas=workers,
                    ready_replicas=len(ready),
                    starting_replicas=max(0, workers - len(ready)),
                    pod_urls=tuple(ready),
                    version=version or None,
                    models=self.shared.get(name, ()),
                )
            )
        return targets

    async def scale(self, model: str, replicas: int, reason: str) -> None:
        await self.supervisor.scale(model, replicas)  # the target's name: model[@version]
