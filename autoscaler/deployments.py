"""The Kubernetes scaler: the model Deployments of one namespace, scaled through ``/scale``.

Every tick ``targets()`` lists the Deployments that carry the model label
(``bazaar.dev/model=<model>``) and, for each: parses its ``bazaar.dev/*`` annotations into a
``ScaleConfig``, reads ``deployments/{name}/scale`` for the replicas asked for, and takes the
ready count from the Deployment's status. The pods whose ``/metrics`` it reads are the ready
endpoints of the model's Services on their ``metrics`` port: the very pods the gateway
routes to (on ``http``), found the same way (``cluster.endpoints``).
``scale()`` patches the same ``/scale`` subresource. Every call goes through the Kubernetes
seam (``cluster``), which retries what a retry can fix and logs RBAC refusals once.

A model's versions can be scaled apart: Deployments labelled ``bazaar.dev/version`` (one per
version, behind the model's one Service) are one target each, ``model@version``, sized on
that version's own queue and work in flight in the gateways (shadowed requests included:
the candidate computes them) and on its own busy ratio in the pods. A Deployment without
the label serves the model, sized on all of its versions together.

A model group (``deploy/overlays/model-group``: one Deployment labelled
``bazaar.dev/group=<group>`` whose pods serve several models) is one target, named by the
group: its models are those whose model Services select its pods (a selector its pod
template's labels match), and it is sized on their queues and work in flight summed and on
the sum of their busy ratios in its pods (``ScaleTarget.models``). A group that no model
Service selects, or named as a model is, is skipped and logged.

With a ``LeaderElection``, only the replica that holds the Lease scales: the others list no
targets and patch nothing, so two autoscaler replicas never both scale (one takes over
within the Lease's duration when the leader dies). ``listed_at`` is when the loop last asked
for targets, once a tick: ``/healthz`` fails when that stops (a stuck loop).

When a call fails for good: listing the Deployments or patching raises ``ScalerError``,
which the loop logs before going on; reading one Deployment's scale skips that model for the
tick; listing its pods leaves its pod signals missing. A 403 is never raised: the scaler does
without (no targets, no pod URLs, no scaling). A Deployment with bad annotations, or a model
label on two Deployments that do not each name a version of their own, is skipped and
logged once per distinct problem.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from autoscaler.annotations import scale_config
from autoscaler.loop import ScalerError, ScaleTarget, target_name
from cluster import deployments
from cluster.api import Cluster, Forbidden, KubernetesError
from cluster.deployments import GROUP_LABEL, VERSION_LABEL, ModelDeployment
from cluster.endpoints import DISCOVERY_RBAC, model_endpoints, model_selectors
from cluster.lease import LEASE_RBAC, LeaderElection
from protocol.errors import ConfigError
from protocol.support import ProblemLog

log = logging.getLogger(__name__)

METRICS_PORT = "metrics"
"""The model Services' port (and EndpointSlice port) name for the pods' ``/metrics``."""
REQUIRED_RBAC = deployments.SCALING_RBAC | DISCOVERY_RBAC | LEASE_RBAC
"""Everything the scaler calls; the autoscaler's Role grants exactly this."""


class KubernetesScaler:
    """A ``Scaler`` over the model Deployments of ``cluster``'s namespace; ``close()``
    closes the cluster's client."""

    def __init__(
        self,
        cluster: Cluster,
        label: str = "bazaar.dev/model",
        election: LeaderElection | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cluster = cluster
        self.label = label
        """The label key whose value names the model."""
        self.election = election
        self.clock = clock
        self.listed_at = clock()
        """When the loop last asked for targets (start-up counts as the first time)."""
        self._deployments: dict[str, str] = {}
        """Target name (``ScaleTarget.name``) → Deployment name, from the last listing."""
        self._problems = ProblemLog(log, logging.ERROR)

    def close(self) -> None:
        self.cluster.close()

    async def targets(self) -> list[ScaleTarget]:
        self.listed_at = self.clock()
        if self.election is not None and not self.election.leading:
            return []  # another replica scales; this one forgets its models meanwhile
        try:
            listing = await deployments.model_deployments(self.cluster, self.label)
            named = {deployment.name for deployment in listing}
            groups = [
                group
                for group in await deployments.model_deployments(self.cluster, GROUP_LABEL)
                if group.name not in named  # labelled with a model too: that model's
            ]
        except Forbidden:
            return []
        except KubernetesError as exc:
            raise ScalerError(str(exc)) from None
        by_model: dict[str, list[ModelDeployment]] = {}
        for deployment in listing:
            by_model.setdefault(deployment.model, []).append(deployment)
        scalable = []
        problems = {}
        namespace = self.cluster.namespace
        for model, found in sorted(by_model.items()):
            versions = [deployment.version for deployment in found]
            if len(found) == 1 or (None not in versions and len(set(versions)) == len(found)):
                scalable.extend(found)
                continue
            names = ", ".join(sorted(deployment.name for deployment in found))
            problems[model] = (
                f"model {model!r} is on several Deployments ({names}) in namespace "
                f"{namespace} that do not each name a version of their own "
                f"({VERSION_LABEL}); none of them is scaled until they do"
            )
        pod_urls = await self._pod_urls()
        grouped = await self._group_models(groups, {d.model for d in scalable}, problems)
        targets = await asyncio.gather(
            *(self._target(d, pod_urls.get(d.model, ()), problems) for d in scalable),
            *(
                self._target(group, _urls_of(models, pod_urls), problems, models)
                for group, models in grouped
            ),
        )
        self._problems.only(problems)
        self._deployments = {
            target_name(deployment.model, deployment.version): deployment.name
            for deployment in [*scalable, *(group for group, _ in grouped)]
        }
        return [target for target in targets if target is not None]

    async def scale(self, model: str, replicas: int, reason: str) -> None:
        """Scale the Deployment of ``model``: a target's name, ``model@version`` for one
        version's Deployment."""
        if self.election is not None and not self.election.leading:
            raise ScalerError(f"not scaling {model}: this replica no longer holds the lease")
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

    async def _pod_urls(self) -> dict[str, tuple[str, ...]]:
        """Each model's serving pods, at their metrics port; {} when they cannot be listed."""
        try:
            endpoints = await model_endpoints(self.cluster, self.label, METRICS_PORT)
        except Forbidden:
            return {}
        except KubernetesError as exc:
            log.warning("%s; the pods' signals are missing this tick", exc)
            return {}
        return {model: tuple(urls) for model, urls in endpoints.items()}

    async def _group_models(
        self, groups: list[ModelDeployment], models: set[str], problems: dict[str, str]
    ) -> list[tuple[ModelDeployment, tuple[str, ...]]]:
        """Each group Deployment with the models whose Services select its pods; groups
        without any, or named as a model is, are left out (and said so in ``problems``)."""
        if not groups:
            return []
        try:
            selectors = await model_selectors(self.cluster, self.label)
        except Forbidden:
            return []
        except KubernetesError as exc:
            log.warning("%s; the model groups are not scaled this tick", exc)
            return []
        grouped = []
        where = f"in namespace {self.cluster.namespace}"
        for group in groups:
            labels = group.pod_labels.items()
            served = tuple(
                sorted(
                    model
                    for model, found in selectors.items()
                    if any(selector.items() <= labels for selector in found)
                )
            )
            if group.model in models:
                problems[group.model] = (
                    f"model group {group.model!r} (deployment {group.name}) is named as a "
                    f"model is {where}; it is not scaled until it has a name of its own"
                )
            elif not served:
                problems[group.model] = (
                    f"model group {group.model!r} (deployment {group.name}): no Service "
                    f"labelled {self.label} {where} selects its pods; it is not scaled"
                )
            else:
                grouped.append((group, served))
        return grouped

    async def _target(
        self,
        deployment: ModelDeployment,
        pod_urls: tuple[str, ...],
        problems: dict[str, str],
        models: tuple[str, ...] = (),
    ) -> ScaleTarget | None:
        model = deployment.model
        where = f"deployment {self.cluster.namespace}/{deployment.name}"
        try:
            settings = scale_config(deployment.annotations, where)
        except ConfigError as exc:
            problems[target_name(model, deployment.version)] = (
                f"{exc}; the model is not scaled until this is fixed"
            )
            return None
        try:
            replicas = await deployments.replicas(self.cluster, deployment.name)
        except Forbidden:
            return None
        except KubernetesError as exc:
            log.warning("%s; model %s is skipped this tick", exc, model)
            return None
        return ScaleTarget(
            model=model,
            config=settings,
            replicas=replicas,
            ready_replicas=deployment.ready_replicas,
            starting_replicas=max(0, replicas - deployment.ready_replicas),
            pod_urls=pod_urls,
            version=deployment.version,
            models=models,
        )


def _urls_of(models: tuple[str, ...], pod_urls: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The pods serving any of ``models``: a group's pods, each once."""
    return tuple(sorted({url for model in models for url in pod_urls.get(model, ())}))
