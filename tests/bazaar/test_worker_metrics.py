from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bazaar.worker_metrics import federated_exposition


def _exposition(count: float) -> str:
    registry = CollectorRegistry()
    Counter("answers", "Answers.", ["model"], registry=registry).labels("mlp").inc(count)
    return generate_latest(registry).decode()


def test_each_family_once_with_every_worker_labelled_and_a_silent_worker_down() -> None:
    text = federated_exposition(
        {"mlp/1": _exposition(3), "mlp/2": _exposition(5), "mlp/3": None, "mlp/4": "{garbage"}
    ).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert text.count("# TYPE answers_total counter") == 1
    answers = {s.labels["worker"]: s.value for s in families["answers"].samples}
    assert answers == {"mlp/1": 3.0, "mlp/2": 5.0}
    assert all(s.labels["model"] == "mlp" for s in families["answers"].samples)
    up = {s.labels["worker"]: s.value for s in families["bazaar_worker_up"].samples}
    assert up == {"mlp/1": 1.0, "mlp/2": 1.0, "mlp/3": 0.0, "mlp/4": 0.0}
