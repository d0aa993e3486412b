"""The alerting and recording rules: deploy/prometheus/rules.yaml and the PrometheusRule made
from it, checked and unit-tested with promtool (tests/deploy/promtool.sh puts it on PATH; make
test runs it), and held to the metrics bazaar exports, so a renamed metric or outcome fails
here rather than in a silent alert.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from autoscaler.metrics import AutoscalerMetrics
from autoscaler.policy import Decision, PolicyState, Sample
from gateway.metrics import OUTCOMES, SHED_REASONS, GatewayMetrics

ROOT = Path(__file__).parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
RULES_TEST = Path(__file__).with_name("rules_test.yaml")
KUBE_STATE_METRICS = {"kube_deployment_status_replicas_unavailable"}
"""Metrics the rules take from kube-state-metrics, not from bazaar."""


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: run tests/deploy/promtool.sh (make test does)")
    return path


def generator() -> ModuleType:
    path = ROOT / "deploy" / "prometheus" / "prometheusrule.py"
    spec = importlib.util.spec_from_file_location("prometheusrule", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_test_rules_passes() -> None:
    done = subprocess.run(
        [promtool(), "test", "rules", str(RULES_TEST)], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_fires_on_a_synthetic_series_and_stays_silent_on_a_healthy_one() -> None:
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    fired: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    assert fired == alerts
    assert silent == alerts


def test_the_prometheus_rule_is_the_plain_file(tmp_path: Path) -> None:
    made_from = generator()
    written = made_from.PROMETHEUS_RULE.read_text()
    assert written == made_from.render(), "run make prometheus-rules"
    resource = yaml.safe_load(written)
    assert resource["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    # The operator hands spec to Prometheus as a rules file: promtool must accept it as one.
    as_rules_file = tmp_path / "prometheusrule.yaml"
    as_rules_file.write_text(yaml.safe_dump(resource["spec"]))
    for path in (RULES, as_rules_file):
        done = subprocess.run(
            [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr


def exported_metric_names() -> set[str]:
    """What a gateway and an autoscaler put on /metrics once they have seen a model."""
    registry = CollectorRegistry()
    GatewayMetrics(registry).for_model("mlp")
    autoscaler = AutoscalerMetrics(registry)
    sample = Sample(
        time_s=0.0, replicas=1, ready_replicas=1, starting_replicas=0, queued=0.0, inflight=0.0,
        arrival_rate=0.0, completion_rate=0.0, busy_ratio=0.0, gpu_utilization=None,
    )  # fmt: skip
    autoscaler.observe("mlp", sample, Decision(1, PolicyState(), "hold 1", "hold"), "hold")
    text = generate_latest(registry).decode()
    return set(re.findall(r"^([a-z_:]+)[{ ]", text, re.MULTILINE))


def test_the_rules_use_metrics_and_labels_bazaar_exports() -> None:
    expressions = " ".join(rule["expr"] for rule in rules())
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used = set(re.findall(r"\b(?:bazaar|kube)_[a-z_:0-9]+", expressions)) - recorded
    assert used - KUBE_STATE_METRICS <= exported_metric_names()
    for values in re.findall(r'outcome[=!]~?"([^"]+)"', expressions):
        assert set(values.split("|")) <= set(OUTCOMES), values
    for values in re.findall(r'reason=~?"([^"]+)"', expressions):
        assert set(values.split("|")) <= set(SHED_REASONS), values
