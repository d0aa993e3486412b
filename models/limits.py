"""What the repository API may ask of a pod: the operator's bounds on load requests.

Whoever can reach the control port can load models with a config of their own. Unbounded,
one request takes the pod down: ``max_batch_size: 4194304`` allocates gigabytes at warm-up
(MemoryError, the model never ready), ``intra_op_threads: 1000`` starts a thousand threads,
and every name ever tried would stay in the model table. ``ModelLimits`` bounds those, and
``check_override`` refuses a config over them with ``ConfigError`` (400) naming the key, the
value and the limit.

Only configs from the API are bounded. A repository's ``config.yaml`` is written by the
same operator who sets these limits, ships with the model and was tested with it; a limit
that refused it would turn a pod upgrade into an outage for no one's protection.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from models.config import ModelConfig
from protocol.errors import BazaarError, ConfigError


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask, which a container's cpuset sets)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """Bounds on load requests over the repository API (not on ``config.yaml`` files)."""

    max_batch_size: int = 1024
    """Largest ``max_batch_size`` a load request may set. Default 1024: the gateway forms
    batches up to it and the pod warms up every power of two up to it, so it bounds both
    the memory of one batch and the load time; past a few hundred rows a batch gains no
    throughput on a CPU or a single GPU anyway."""
    max_threads: int = field(default_factory=cpu_count)
    """Largest ``intra_op_threads`` and ``inter_op_threads`` (each) a load request may set.
    Default: the CPUs this process may use; more threads than cores only contend."""
    max_instances: int = 8
    """Largest ``instances`` (batches of one model computing at once). Default 8: each is a
    thread and a batch's memory, and the gateway keeps at most a few batches per pod in
    flight (``max_batches_per_endpoint``, default 2), so more would sit idle."""
    max_models: int = 64
    """Entries in the pod's model table (loaded, loading, failed or unloaded). Start-up
    models always have one; an API load of a further model first evicts an unloaded or
    failed entry, and is refused when every entry is loaded or loading. Default 64."""

    def check_override(self, config: ModelConfig, where: str) -> None:
        """``ConfigError`` naming the first key over its limit."""
        bounded = [
            ("max_batch_size", config.max_batch_size or 0, self.max_batch_size),
            ("intra_op_threads", config.intra_op_threads, self.max_threads),
            ("inter_op_threads", config.inter_op_threads, self.max_threads),
            ("instances", config.instances, self.max_instances),
            # A benchmark aid that slows every batch: for a repository's own config.yaml only.
            ("min_batch_time_ms", config.min_batch_time_ms, 0),
        ]
        for key, value, limit in bounded:
            if value > limit:
                raise ConfigError(where, key, f"{value} is over this pod's limit of {limit}")


class ModelTableFull(BazaarError):
    """Every entry of the pod's model table is a loaded or loading model (409)."""

    status = 409

    def __init__(self, name: str, limit: int) -> None:
        super().__init__(
            f"cannot load model '{name}': this pod holds {limit} models, its limit;"
            " unload one first"
        )
