from __future__ import annotations

import platform

import pytest
from prometheus_client import Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from protocol import __version__
from protocol.metrics import process_registry


def test_a_process_registry_has_the_process_collectors_and_build_info() -> None:
    registry = process_registry("pod")
    names = {family.name for family in registry.collect()}
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds"} <= names
    assert {"python_info", "python_gc_objects_collected"} <= names
    labels = {"version": __version__, "python": platform.python_version(), "component": "pod"}
    assert registry.get_sample_value("bazaar_build_info", labels) == 1


def test_counters_have_no_created_series() -> None:
    registry = process_registry("gateway")
    Counter("answers", "Answers.", ["outcome"], registry=registry).labels("success").inc()
    text = generate_latest(registry).decode()
    assert "_created" not in text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert any(s.name == "answers_total" and s.value == 1 for s in samples)


def test_an_unknown_component_is_refused() -> None:
    with pytest.raises(ValueError, match="component must be one of"):
        process_registry("gatewy")
