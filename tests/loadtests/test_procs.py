"""What the benchmarks read from ``/proc`` (``loadtests.procs``)."""

from __future__ import annotations

import os

import pytest

from loadtests.procs import steal_seconds
from loadtests.wrk import BenchError


def test_the_hypervisors_steal_is_read_per_core_and_only_grows() -> None:
    core = min(os.sched_getaffinity(0))
    first = steal_seconds(core)
    assert 0.0 <= first <= steal_seconds(core)


def test_a_core_the_machine_lacks_is_named_in_the_error() -> None:
    missing = (os.cpu_count() or 1) + 1000
    with pytest.raises(BenchError, match=f"cpu{missing}"):
        steal_seconds(missing)
