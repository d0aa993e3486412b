"""What the benchmarks read from ``/proc`` (``loadtests.procs``)."""

from __future__ import annotations

import os

import pytest

from loadtests.procs import core_times
from loadtests.wrk import BenchError


def test_a_cores_times_are_read_from_proc_stat_and_only_grow() -> None:
    core = min(os.sched_getaffinity(0))
    first = core_times(core)
    second = core_times(core)
    assert 0.0 <= first.busy <= second.busy
    assert 0.0 <= first.steal <= second.steal


def test_a_core_the_machine_lacks_is_named_in_the_error() -> None:
    missing = (os.cpu_count() or 1) + 1000
    with pytest.raises(BenchError, match=f"cpu{missing}"):
        core_times(missing)
