"""Leader election on a Lease: the real client against the in-process API, on a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from cluster.lease import LEASE_RBAC, LeaderElection
from tests.cluster.fake_kubernetes import FakeKubernetes, cluster_at, serving
from tests.support import eventually


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeKubernetes, str]]:
    fake = FakeKubernetes()
    async with serving(fake) as url:
        yield fake, url


def candidate(url: str, identity: str, clock: Clock) -> LeaderElection:
    cluster = cluster_at(url, "autoscaler", "lease")
    return LeaderElection(cluster, "bazaar-autoscaler", identity, clock=clock)


async def test_one_candidate_leads_and_the_other_takes_over_only_after_the_lease_lapses(
    api: tuple[FakeKubernetes, str],
) -> None:
    fake, url = api
    clock = Clock()
    a, b = candidate(url, "a", clock), candidate(url, "b", clock)
    assert await a.try_acquire_or_renew() and a.leading
    assert not await b.try_acquire_or_renew() and not b.leading
    lease = fake.leases["default", "bazaar-autoscaler"]["spec"]
    assert (lease["holderIdentity"], lease["leaseTransitions"]) == ("a", 0)

    clock.now += 8  # a renews: b sees the record change and keeps waiting
    assert await a.try_acquire_or_renew()
    clock.now += 8
    assert not await b.try_acquire_or_renew()
    assert a.leading

    clock.now += 11  # a has stopped renewing: past its renew deadline it stands down...
    assert not a.leading
    assert not await b.try_acquire_or_renew()  # ...and b waits out the lease (15 s unchanged)
    clock.now += 5
    assert await b.try_acquire_or_renew() and b.leading
    lease = fake.leases["default", "bazaar-autoscaler"]["spec"]
    assert (lease["holderIdentity"], lease["leaseTransitions"]) == ("b", 1)
    assert not await a.try_acquire_or_renew()  # a comes back: b holds it now
    assert fake.permissions() == {(p.api_group, p.resource, p.verb) for p in LEASE_RBAC}


async def test_two_candidates_racing_for_a_lapsed_lease_get_one_leader(
    api: tuple[FakeKubernetes, str],
) -> None:
    fake, url = api
    clock = Clock()
    old, a, b = candidate(url, "old", clock), candidate(url, "a", clock), candidate(url, "b", clock)
    assert await old.try_acquire_or_renew()
    assert not await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()
    clock.now += 16
    # a's takeover is held at the API server until b has read the same lapsed record and
    # written first; then a's write, guarded by the old resourceVersion, gets 409.
    update = ("coordination.k8s.io", "leases", "update")
    fake.fail(update, 30.0)
    first = asyncio.create_task(a.try_acquire_or_renew())
    await eventually(
        lambda: sum(r.permission == update for r in fake.requests) == 1, 5.0, "a's write"
    )
    assert await b.try_acquire_or_renew()
    fake.released.set()
    assert not await first
    assert [a.leading, b.leading] == [False, True]
    assert fake.leases["default", "bazaar-autoscaler"]["spec"]["holderIdentity"] == "b"


async def test_release_hands_the_lease_over_at_once(api: tuple[FakeKubernetes, str]) -> None:
    fake, url = api
    clock = Clock()
    a, b = candidate(url, "a", clock), candidate(url, "b", clock)
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()
    await a.release()
    assert not a.leading
    assert fake.leases["default", "bazaar-autoscaler"]["spec"].get("holderIdentity") is None
    assert await b.try_acquire_or_renew()
