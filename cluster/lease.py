"""Leader election on a ``coordination.k8s.io/v1`` Lease, so that one replica acts at a time.

The algorithm is client-go's ``leaderelection``. Every ``retry_period_s`` each candidate
reads the Lease:

- none yet: create it, holding it;
- held by this candidate: renew it (``renewTime``), guarded by its resourceVersion;
- held by another whose record has not changed for ``lease_duration_s``, as *this* candidate
  observed it on its own clock: take it over (``leaseTransitions`` + 1), guarded the same
  way. Comparing local observations, never timestamps written by other nodes, makes the
  election immune to clock skew between nodes.

Two candidates racing for the same write are decided by the API server: one update wins,
the other gets 409 Conflict and stays a follower. The leader keeps ``leading`` true while its
last successful renewal is younger than ``renew_deadline_s``; since that is shorter than
``lease_duration_s``, it steps down before anyone else may take the Lease, so two leaders
never overlap (given clocks that run at the same rate, not the same time). Failure modes: an
API server that is unreachable for longer than the renew deadline leaves no leader until it
answers again, which for an autoscaler only means no scaling meanwhile; ``release()`` on a
clean stop hands the Lease over at once instead of after its duration.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable
from typing import Any

from kubernetes.client import CoordinationV1Api

from cluster.api import RETRYABLE_STATUS, Cluster, Forbidden, KubernetesError, Permission

log = logging.getLogger(__name__)

GET_LEASE = Permission("coordination.k8s.io", "leases", "get")
CREATE_LEASE = Permission("coordination.k8s.io", "leases", "create")
UPDATE_LEASE = Permission("coordination.k8s.io", "leases", "update")
LEASE_RBAC = frozenset({GET_LEASE, CREATE_LEASE, UPDATE_LEASE})
"""Every (apiGroup, resource, verb) called here."""

_GUARDED = RETRYABLE_STATUS - {409}


class LeaderElection:
    """One candidate for the Lease ``name`` in ``cluster``'s namespace (see the module)."""

    def __init__(
        self,
        cluster: Cluster,
        name: str,
        identity: str,
        *,
        lease_duration_s: float = 15.0,
        renew_deadline_s: float = 10.0,
        retry_period_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not retry_period_s < renew_deadline_s < lease_duration_s:
            raise ValueError("needs retry period < renew deadline < lease duration")
        self.cluster = cluster
        self.name = name
        self.identity = identity
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self.clock = clock
        self._api = CoordinationV1Api(cluster.client)
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._renewed_at: float | None = None

    @property
    def leading(self) -> bool:
        """This candidate holds the Lease and renewed it within the renew deadline."""
        renewed = self._renewed_at
        return renewed is not None and self.clock() - renewed < self.renew_deadline_s

    async def run(self) -> None:
        """Acquire and renew every retry period, until cancelled."""
        while True:
            was_leading = self.leading
            try:
                await self.try_acquire_or_renew()
            except (Forbidden, KubernetesError) as exc:
                log.warning("lease %s: %s", self.name, exc or type(exc).__name__)
            if self.leading != was_leading:
                state = "leads" if self.leading else "no longer leads"
                log.info("%s %s (lease %s)", self.identity, state, self.name)
            await asyncio.sleep(self.retry_period_s)

    async def try_acquire_or_renew(self) -> bool:
        """One round of the algorithm; True when this candidate holds the Lease after it."""
        now = self.clock()
        timeout = self.cluster.request_timeout_s
        namespace = self.cluster.namespace
        try:
            lease = await self.cluster.call(
                GET_LEASE,
                lambda: self._api.read_namespaced_lease(
                    self.name, namespace, _request_timeout=timeout
                ),
            )
        except KubernetesError as exc:
            if exc.status != 404:
                raise
            return await self._write(CREATE_LEASE, self._body(None, 0, None), now)
        spec = lease.spec
        version = lease.metadata.resource_version if lease.metadata else None
        holder = spec.holder_identity if spec else None
        record = (holder, spec.renew_time if spec else None, version)
        if record != self._observed:
            self._observed, self._observed_at = record, now
        transitions = (spec.lease_transitions if spec else None) or 0
        if holder == self.identity:
            acquired = spec.acquire_time if spec else None
            return await self._write(UPDATE_LEASE, self._body(version, transitions, acquired), now)
        if holder and now - self._observed_at < self.lease_duration_s:
            self._renewed_at = None
            return False
        return await self._write(UPDATE_LEASE, self._body(version, transitions + 1, None), now)

    async def release(self) -> None:
        """Give the Lease up (a clean stop), so another candidate need not wait it out."""
        if not self.leading:
            return
        self._renewed_at = None
        body = self._body(None, 0, None)
        body["spec"] = {"leaseDurationSeconds": 1, "renewTime": body["spec"]["renewTime"]}
        namespace = self.cluster.namespace
        try:
            lease = await self.cluster.call(
                GET_LEASE, lambda: self._api.read_namespaced_lease(self.name, namespace)
            )
            spec = lease.spec
            if spec is None or spec.holder_identity != self.identity:
                return
            if lease.metadata is not None:
                body["metadata"]["resourceVersion"] = lease.metadata.resource_version
            await self._write(UPDATE_LEASE, body, self.clock())
        except (Forbidden, KubernetesError) as exc:
            log.warning("lease %s: cannot release it: %s", self.name, exc)
        self._renewed_at = None

    async def _write(self, permission: Permission, body: dict[str, Any], now: float) -> bool:
        """Create or replace the Lease; False when another candidate wrote first (409)."""
        # The client serialises a datetime with isoformat(), which drops the fraction at
        # .000000 and breaks MicroTime: the bodies are plain JSON with explicit strings.
        namespace = self.cluster.namespace
        timeout = self.cluster.request_timeout_s
        try:
            if permission == CREATE_LEASE:
                await self.cluster.call(
                    permission,
                    lambda: self._api.create_namespaced_lease(
                        namespace,
                        body,  # type: ignore[arg-type]
                        _request_timeout=timeout,
                    ),
                    _GUARDED,
                )
            else:
                await self.cluster.call(
                    permission,
                    lambda: self._api.replace_namespaced_lease(
                        self.name,
                        namespace,
                        body,  # type: ignore[arg-type]
                        _request_timeout=timeout,
                    ),
                    _GUARDED,
                )
        except KubernetesError as exc:
            if exc.status != 409:
                raise
            return False  # another candidate wrote first
        self._renewed_at = now
        return True

    def _body(
        self, resource_version: str | None, transitions: int, acquired: datetime.datetime | None
    ) -> dict[str, Any]:
        """The Lease held by this candidate, renewed now; acquired now unless ``acquired``."""
        stamp = _micro_time(datetime.datetime.now(datetime.UTC))
        metadata: dict[str, Any] = {"name": self.name}
        if resource_version is not None:
            metadata["resourceVersion"] = resource_version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": round(self.lease_duration_s),
                "acquireTime": stamp if acquired is None else _micro_time(acquired),
                "renewTime": stamp,
                "leaseTransitions": transitions,
            },
        }


def _micro_time(moment: datetime.datetime) -> str:
    """Kubernetes' MicroTime: RFC 3339 with microseconds, in UTC."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
