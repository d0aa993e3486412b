"""Rollouts' progress in the model Service, decided by the gateway holding a Lease.

In Kubernetes, several gateway replicas route one model's traffic, and each may restart at
any time. So the progress of a rollout (``gateway.rollout.SavedRollout``: which rollout, its
step and state, why it was rolled back) is kept as JSON in the model Service's
``bazaar.dev/rollout`` annotation, beside the ``bazaar.dev/traffic`` policy it belongs to,
and one gateway decides: the holder of the Lease ``bazaar-gateway-rollouts``
(``cluster.lease``, client-go's algorithm). The holder judges on its own samples, plus the
other gateways' with ``gateway.rollout_peers``, and saves each step it takes; the other
gateways read the annotation at every judgement and follow it, so they route with the same
weights within ``rollout_check_s`` of a step; a restarted gateway reads it before its first
judgement and resumes at the saved step. When the holder dies another takes the Lease
within its duration (15 s), resuming from the annotation.

Least privilege (``ROLLOUT_RBAC``): ``services: list`` (which the discovery already has) and
``patch`` (a merge patch of the one annotation), and ``leases: get, create`` and ``update``
of its own Lease only. Reading the other gateways' samples needs nothing more (their
addresses come from DNS, their samples from their ``/stats``).

Failure modes: a read or write that fails (after the seam's retries) is logged once while it
lasts, and the gateway goes on with what it has: a follower keeps its last step, the holder
retries the save at its next judgement. An annotation that does not parse is logged and
ignored (the holder overwrites it at its next save). A gateway that cannot reach the API
server long enough to keep its Lease stops deciding before another may start.
"""

from __future__ import annotations

import asyncio
import json
import logging

from cluster.api import Cluster, Forbidden, KubernetesError
from cluster.lease import LEASE_RBAC, LeaderElection
from cluster.services import (
    SERVICE_ANNOTATION_RBAC,
    annotate_model_service,
    model_service_annotation,
)
from gateway.rollout import SavedRollout
from protocol.support import ProblemLog, cancel_and_wait

log = logging.getLogger(__name__)

ROLLOUT_ANNOTATION = "bazaar.dev/rollout"
"""The model Service annotation holding its rollout's progress (``SavedRollout`` as JSON)."""
LEASE_NAME = "bazaar-gateway-rollouts"
ROLLOUT_RBAC = SERVICE_ANNOTATION_RBAC | LEASE_RBAC
"""Every (apiGroup, resource, verb) called here; the gateway's Role grants these."""


class ServiceRolloutRecord:
    """A ``gateway.rollout.RolloutRecord`` over the model Services of ``cluster``'s
    namespace, deciding while ``election`` leads; ``stop()`` closes the cluster's client."""

    def __init__(
        self, cluster: Cluster, election: LeaderElection, label: str = "bazaar.dev/model"
    ) -> None:
        self.cluster = cluster
        self.election = election
        self.label = label
        """The Service label whose value names the model."""
        self._problems = ProblemLog(log)
        self._task: asyncio.Task[None] | None = None

    @property
    def deciding(self) -> bool:
        return self.election.leading

    async def start(self) -> None:
        """Take part in the election from now on."""
        self._task = asyncio.create_task(self.election.run(), name="rollout-lease")

    async def stop(self) -> None:
        """Leave the election, handing the Lease over at once if held, and close."""
        await cancel_and_wait(self._task)
        await self.election.release()
        self.cluster.close()

    async def load(self, model: str) -> SavedRollout | None:
        try:
            _, value = await model_service_annotation(
                self.cluster, self.label, model, ROLLOUT_ANNOTATION
            )
        except (Forbidden, KubernetesError) as exc:
            self._problems.failing(("read", model), self._cannot("read", model, exc))
            return None
        self._problems.ok(("read", model), f"{model}: its rollout's progress is read again")
        if value is None:
            return None
        try:
            saved = SavedRollout.from_json(json.loads(value))
        except ValueError as exc:  # json's errors are ValueErrors too
            problem = f"{model}: annotation {ROLLOUT_ANNOTATION} is not a rollout's progress, "
            self._problems.failing(("parse", model), problem + f"ignored: {exc}")
            return None
        self._problems.ok(("parse", model))
        return saved

    async def save(self, model: str, saved: SavedRollout) -> bool:
        value = json.dumps(saved.to_json(), separators=(",", ":"))
        try:
            await annotate_model_service(self.cluster, self.label, model, ROLLOUT_ANNOTATION, value)
        except (Forbidden, KubernetesError) as exc:
            self._problems.failing(("write", model), self._cannot("save", model, exc))
            return False
        self._problems.ok(("write", model), f"{model}: its rollout's progress is saved again")
        return True

    def _cannot(self, what: str, model: str, exc: Exception) -> str:
        problem = str(exc) or "forbidden (RBAC)"
        return f"{model}: cannot {what} its rollout's progress ({ROLLOUT_ANNOTATION}): {problem}"
