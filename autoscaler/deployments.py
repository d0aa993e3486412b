"""The Kubernetes scaler: the model Deployments of one namespace, scaled through ``/scale``.

Every tick ``targets()`` lists the Deployments that carry the model label
(``bazaar.dev/model=<model>``) and, for each: parses its ``bazaar.dev/*`` annotations into a
``ScaleConfig``, reads ``deployments/{name}/scale`` for the replicas asked for, takes the
ready count from the Deployment's status, and lists its ready pods for their ``/metrics``.
``scale()`` patches the same ``/scale`` subresource. Every call goes through the Kubernetes
seam (``cluster``), which retries what a retry can fix and logs RBAC refusals once.

When a call fails for good: listing the Deployments or patching raises ``ScalerError``,
which the loop logs before going on; reading one Deployment's scale skips that model for the
tick; listing its pods leaves its pod signals missing. A 403 is never raised: the scaler does
without (no targets, no pod URLs, no scaling). A Deployment with bad annotations, or a model
label on two Deployments, is skipped and logged once per distinct problem.
"""

from __future__ import annotations

import asyncio
import logging

from autoscaler.annotations import scale_config
from autoscaler.loop import ScalerError, ScaleTarget
from cluster import deployments
from cluster.api import Cluster, Forbidden, KubernetesError
from cluster.deployments import ModelDeployment
from protocol.errors import ConfigError
from protocol.support import ProblemLog

log = logging.getLogger(__name__)

REQUIRED_RBAC = deployments.SCALING_RBAC


class KubernetesScaler:
    """A ``Scaler`` over the model Deployments of ``cluster``'s namespace; ``close()``
    closes the cluster's client."""

    def __init__(self, cluster: Cluster, label: str = "bazaar.dev/model") -> None:
        self.cluster = cluster
        self.label = label
        """The label key whose value names the model."""
        self._deployments: dict[str, str] = {}
        """Model → Deployment name, from the last listing."""
        self._problems = ProblemLog(log, logging.ERROR)

    def close(self) -> None:
        self.cluster.close()

    async def targets(self) -> list[ScaleTarget]:
        try:
            listing = await deployments.model_deployments(self.cluster, self.label)
        except Forbidden:
            return []
        except KubernetesError as exc:
            raise ScalerError(str(exc)) from None
        by_model: dict[str, list[ModelDeployment]] = {}
        for deployment in listing:
            by_model.setdefault(deployment.model, []).append(deployment)
        unique = {}
        problems = {}
        namespace = self.cluster.namespace
        for model, found in sorted(by_model.items()):
            if len(found) == 1:
                unique[model] = found[0]
                continue
            names = ", ".join(sorted(deployment.name for deployment in found))
            problems[model] = (
                f"model {model!r} is on several Deployments ({names}) in namespace "
                f"{namespace}; none of them is scaled until one remains"
            )
        targets = await asyncio.gather(
            *(self._target(deployment, problems) for deployment in unique.values())
        )
        self._problems.only(problems)
        self._deployments = {model: deployment.name for model, deployment in unique.items()}
        return [target for target in targets if target is not None]

    async def scale(self, model: str, replicas: int, reason: str) -> None:
        name = self._deployments.get(model)
        if name is None:
            raise ScalerError(f"no Deployment for model {model!r} in the last listing")
        try:
            await deployments.scale(self.cluster, name, replicas)
        except Forbidden:
            return
        except KubernetesError as exc:
            raise ScalerError(str(exc)) from None
        namespace = self.cluster.namespace
        log.debug("scaled deployment %s/%s to %d: %s", namespace, name, replicas, reason)

    async def _target(
        self, deployment: ModelDeployment, problems: dict[str, str]
    ) -> ScaleTarget | None:
        model = deployment.model
        where = f"deployment {self.cluster.namespace}/{deployment.name}"
        try:
            settings = scale_config(deployment.annotations, where)
        except ConfigError as exc:
            problems[model] = f"{exc}; the model is not scaled until this is fixed"
            return None
        try:
            replicas = await deployments.replicas(self.cluster, deployment.name)
        except Forbidden:
            return None
        except KubernetesError as exc:
            log.warning("%s; model %s is skipped this tick", exc, model)
            return None
        try:
            pod_urls = await deployments.ready_pod_urls(self.cluster, deployment)
        except Forbidden:
            pod_urls = ()
        except KubernetesError as exc:
            log.warning("%s; the pods' signals are missing this tick", exc)
            pod_urls = ()
        return ScaleTarget(
            model=model,
            config=settings,
            replicas=replicas,
            ready_replicas=deployment.ready_replicas,
            starting_replicas=max(0, replicas - deployment.ready_replicas),
            pod_urls=pod_urls,
        )
