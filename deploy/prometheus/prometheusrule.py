"""Write deploy/components/prometheus-operator/rules.yaml: rules.yaml's groups as a
PrometheusRule, for a Prometheus run by the Prometheus operator (``make prometheus-rules``).

The plain file is the source; tests/deploy/test_rules.py fails when the two differ.
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).parent
RULES = HERE / "rules.yaml"
PROMETHEUS_RULE = HERE.parent / "components" / "prometheus-operator" / "rules.yaml"
HEADER = """\
# Generated from deploy/prometheus/rules.yaml by `make prometheus-rules`: edit that file.
# The operator's Prometheus selects rules by label (kube-prometheus-stack: `release: <its
# Helm release>`, or ruleSelectorNilUsesHelmValues: false); see kustomization.yaml.
"""


class _Literal(str):
    """A multi-line expression, kept as a block so it reads as in rules.yaml."""


def _literal(dumper: yaml.SafeDumper, text: _Literal) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|")


def prometheus_rule(groups: list[dict[str, object]]) -> dict[str, object]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            # A component's own objects get neither the base's namespace nor its labels.
            "namespace": "bazaar",
            "name": "bazaar",
            "labels": {
                "app.kubernetes.io/name": "bazaar",
                "app.kubernetes.io/component": "monitoring",
                "app.kubernetes.io/part-of": "bazaar",
                "app.kubernetes.io/version": "0.1.0",
            },
        },
        "spec": {"groups": groups},
    }


def render() -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            if "\n" in rule["expr"]:
                rule["expr"] = _Literal(rule["expr"])
    dumper = yaml.SafeDumper
    dumper.add_representer(_Literal, _literal)
    body = yaml.dump(prometheus_rule(groups), Dumper=dumper, sort_keys=False, width=100)
    return HEADER + body


if __name__ == "__main__":
    PROMETHEUS_RULE.write_text(render())
