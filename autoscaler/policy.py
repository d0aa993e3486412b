"""The scaling policy: a pure function from a snapshot of signals to a replica count.

(Interface fixed; the algorithm is being written.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sample:
    """One model at one instant, as the signal sources saw it.

    Work is counted in rows (a request of n rows is n units), the unit the pods compute in.
    ``None`` means the signal is missing (no gateway answered, no pod reported): it is never
    read as zero.
    """

    time_s: float
    """When the signals were read (the caller's clock, seconds)."""
    replicas: int
    """Replicas currently asked for (the Deployment's spec.replicas, or local workers)."""
    ready_replicas: int
    """Replicas serving now."""
    starting_replicas: int
    """Replicas asked for but not serving yet (pending, loading)."""
    queued: float | None
    """Rows waiting in the gateway's queue, summed over gateway replicas."""
    inflight: float | None
    """Rows sent to pods and not yet answered."""
    arrival_rate: float | None
    """Rows per second admitted by the gateway, over a short window."""
    completion_rate: float | None
    """Rows per second answered by the pods, over the same window."""
    busy_ratio: float | None
    """Mean busy ratio of the ready replicas (0..1): executing time over wall time."""
    gpu_utilization: float | None
    """Mean GPU utilisation of the ready replicas (0..1), from NVML or DCGM; None without GPU."""


@dataclass(frozen=True, slots=True)
class ScaleConfig:
    """One model's scaling settings (Kubernetes: annotations ``bazaar.dev/...``)."""

    min_replicas: int = 1
    """Never fewer (``bazaar.dev/min-replicas``); 0 only with ``scale_to_zero_after_s``."""
    max_replicas: int = 10
    """Never more (``bazaar.dev/max-replicas``)."""
    target_queue_per_replica: float = 16.0
    """Outstanding rows (queued + in flight) one replica should carry
    (``bazaar.dev/target-queue-per-replica``)."""
    target_utilization: float = 0.7
    """Busy ratio (or GPU utilisation) to hold each replica at
    (``bazaar.dev/target-utilization``), 0..1."""
    scale_to_zero_after_s: float | None = None
    """Idle time after which the model may go to zero replicas; None = never
    (``bazaar.dev/scale-to-zero-after``)."""


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What the policy remembers between decisions (opaque to callers)."""


@dataclass(frozen=True, slots=True)
class Decision:
    replicas: int
    state: PolicyState
    reason: str
    """Why, for people: logged and exported with every decision."""


def decide(sample: Sample, state: PolicyState, config: ScaleConfig, now: float) -> Decision:
    raise NotImplementedError
