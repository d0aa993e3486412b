"""Write deploy/grafana-dashboard.json: the Grafana dashboard, from the panels below
(``make grafana-dashboard``).

The panels are written here, short, and expanded into Grafana's JSON, so every query has
the same selectors: ``namespace="$namespace"`` on every series and ``instance=~"$instance"``
on the gateways' (the autoscaler's and the pods' come from other targets). The model list
comes from the gateways' own request counter, so it fills behind ``bazaar gateway`` alone.
tests/deploy/test_dashboard.py fails when the JSON differs from what this writes, and runs
every query against a real Prometheus scraping a real ``bazaar serve`` under load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DASHBOARD = Path(__file__).parent / "grafana-dashboard.json"

NS = 'namespace="$namespace"'
MODEL = 'model=~"$model"'
GATEWAY = f'{NS}, {MODEL}, instance=~"$instance"'
"""The selector of a per-model gateway series."""
RATE = "[$__rate_interval]"


@dataclass(frozen=True, slots=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    unit: str
    description: str
    queries: tuple[Query, ...]
    width: int = 12
    needs_gpu: bool = False
    """Its series exist only on GPU pods: empty elsewhere, never zero."""


def _quantile(q: float, histogram: str, selector: str, by: str = "model") -> str:
    return (
        f"histogram_quantile({q}, sum by (le, {by}) (rate({histogram}_bucket{{{selector}}}{RATE})))"
    )


PANELS = (
    Panel(
        "Requests/s by outcome",
        "reqps",
        "Inference requests answered by the gateways, by outcome (success, client_error, "
        "rate_limited: 429, shed: 503, expired: 504, server_error, cancelled).",
        (
            Query(
                f"sum by (model, outcome) (rate(bazaar_gateway_requests_total{{{GATEWAY}}}{RATE}))",
                "{{model}} {{outcome}}",
            ),
        ),
    ),
    Panel(
        "Rows/s admitted and answered",
        "short",
        "Rows (batch elements) per second: admitted to the queue, and answered. A gap is work "
        "piling up.",
        (
            Query(
                f"sum by (model) (rate(bazaar_gateway_admitted_rows_total{{{GATEWAY}}}{RATE}))",
                "{{model}} admitted rows/s",
            ),
            Query(
                f"sum by (model) (rate(bazaar_gateway_completed_rows_total{{{GATEWAY}}}{RATE}))",
                "{{model}} answered rows/s",
            ),
        ),
    ),
    Panel(
        "Error ratio",
        "percentunit",
        "Requests not answered 200 (any outcome but success) over all requests.",
        (
            Query(
                "sum by (model) (rate(bazaar_gateway_requests_total"
                f'{{{GATEWAY}, outcome!="success"}}{RATE})) / '
                f"sum by (model) (rate(bazaar_gateway_requests_total{{{GATEWAY}}}{RATE}))",
                "{{model}}",
            ),
        ),
    ),
    Panel(
        "Shed (503) and expired (504) per second",
        "reqps",
        "Shed: refused at admission, queue full or deadline unreachable (by stage: before "
        "or after the body was decoded). Expired: the deadline passed in the queue.",
        (
            Query(
                "sum by (model, stage) (rate(bazaar_gateway_shed_requests_total"
                f"{{{GATEWAY}}}{RATE}))",
                "{{model}} shed {{stage}}",
            ),
            Query(
                "sum by (model) (rate(bazaar_gateway_requests_total"
                f'{{{GATEWAY}, outcome="expired"}}{RATE}))',
                "{{model}} expired",
            ),
        ),
    ),
    Panel(
        "Request latency p50 / p99",
        "s",
        "End-to-end time in the gateway, and the time requests waited in its queue.",
        (
            Query(_quantile(0.99, "bazaar_gateway_request_seconds", GATEWAY), "{{model}} p99"),
            Query(_quantile(0.5, "bazaar_gateway_request_seconds", GATEWAY), "{{model}} p50"),
            Query(
                _quantile(0.99, "bazaar_gateway_queue_wait_seconds", GATEWAY),
                "{{model}} queue wait p99",
            ),
        ),
    ),
    Panel(
        "Pod time p50 / p99",
        "s",
        "A batch's round trip from the gateway to its pod, and the pods' own compute time.",
        (
            Query(
                _quantile(0.99, "bazaar_gateway_pod_seconds", GATEWAY), "{{model}} round trip p99"
            ),
            Query(
                _quantile(0.99, "bazaar_model_compute_seconds", f"{NS}, {MODEL}"),
                "{{model}} compute p99",
            ),
            Query(
                _quantile(0.5, "bazaar_model_compute_seconds", f"{NS}, {MODEL}"),
                "{{model}} compute p50",
            ),
        ),
    ),
    Panel(
        "Queue depth (rows, all gateways)",
        "short",
        "Rows waiting in the gateways' queues, and rows sent to pods and not yet answered.",
        (
            Query(f"sum by (model) (bazaar_gateway_queue_rows{{{GATEWAY}}})", "{{model}} queued"),
            Query(
                f"sum by (model) (bazaar_gateway_inflight_batches{{{GATEWAY}}})",
                "{{model}} batches in flight",
            ),
        ),
    ),
    Panel(
        "Batch size (rows per batch)",
        "short",
        "Rows per batch the gateways sent to pods: the mean, and the 99th percentile.",
        (
            Query(
                f"sum by (model) (rate(bazaar_gateway_batch_size_sum{{{GATEWAY}}}{RATE})) / "
                f"sum by (model) (rate(bazaar_gateway_batch_size_count{{{GATEWAY}}}{RATE}))",
                "{{model}} mean",
            ),
            Query(_quantile(0.99, "bazaar_gateway_batch_size", GATEWAY), "{{model}} p99"),
        ),
    ),
    Panel(
        "Replicas: desired / asked / ready / endpoints",
        "short",
        "What the policy wants, what the Deployment asks for, what is ready, and the ready "
        "endpoints the gateways route to (the most any gateway sees).",
        (
            Query(f"bazaar_autoscaler_desired_replicas{{{NS}, {MODEL}}}", "{{model}} desired"),
            Query(
                f"bazaar_autoscaler_current_replicas{{{NS}, {MODEL}}}",
                "{{model}} asked (spec.replicas)",
            ),
            Query(f"bazaar_autoscaler_ready_replicas{{{NS}, {MODEL}}}", "{{model}} ready"),
            Query(
                f"max by (model) (bazaar_gateway_ready_endpoints{{{GATEWAY}}})",
                "{{model}} ready endpoints",
            ),
        ),
    ),
    Panel(
        "Scaling decisions (5 min)",
        "short",
        "Decisions that changed the replica count, by kind, over the last 5 minutes (whole "
        "decisions: increase() extrapolates); the reasons are in the autoscaler's log.",
        (
            Query(
                "round(sum by (model, kind) (increase(bazaar_autoscaler_decisions_total"
                f'{{{NS}, {MODEL}, kind!="hold"}}[5m])))',
                "{{model}} {{kind}}",
            ),
        ),
    ),
    Panel(
        "Busy ratio",
        "percentunit",
        "Fraction of wall time the runtime executed batches (CPU and GPU alike).",
        (
            Query(
                f"avg by (model) (bazaar_model_busy_ratio{{{NS}, {MODEL}}})",
                "{{model}} mean over pods",
            ),
            Query(
                f"bazaar_autoscaler_busy_ratio{{{NS}, {MODEL}}}",
                "{{model}} as the autoscaler saw it",
            ),
        ),
    ),
    Panel(
        "GPU utilisation",
        "percentunit",
        "Absent without a GPU: the series are missing, never zero.",
        (
            Query(
                f"avg by (pod, gpu) (bazaar_gpu_utilization_ratio{{{NS}}})",
                "{{pod}} GPU {{gpu}} (NVML)",
            ),
            Query(f"avg by (pod) (DCGM_FI_DEV_GPU_UTIL{{{NS}}}) / 100", "{{pod}} (DCGM)"),
            Query(
                f"bazaar_autoscaler_gpu_utilization_ratio{{{NS}, {MODEL}}}",
                "{{model}} as the autoscaler saw it",
            ),
        ),
        needs_gpu=True,
    ),
    Panel(
        "Process CPU (cores)",
        "short",
        "CPU seconds per second of every bazaar process: gateways, autoscaler, pods (and, "
        "behind bazaar serve, each worker).",
        (
            Query(
                f"sum by (job, instance, worker) (rate(process_cpu_seconds_total{{{NS}}}{RATE}))",
                "{{job}} {{instance}} {{worker}}",
            ),
        ),
    ),
    Panel(
        "Process memory (RSS)",
        "bytes",
        "Resident memory of every bazaar process.",
        (
            Query(
                f"sum by (job, instance, worker) (process_resident_memory_bytes{{{NS}}})",
                "{{job}} {{instance}} {{worker}}",
            ),
        ),
    ),
)


def _variable(name: str, label: str, query: str, *, many: bool) -> dict[str, object]:
    variable: dict[str, object] = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name},
        "definition": query,
        "refresh": 2,
        "includeAll": many,
        "multi": many,
        "current": {},
        "hide": 0,
    }
    if many:
        variable["allValue"] = ".*"
    return variable


def _panel(number: int, panel: Panel, x: int, y: int) -> dict[str, object]:
    source = {"type": "prometheus", "uid": "${datasource}"}
    return {
        "id": number,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": source,
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": 8},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        # The legend beside the graph, as a table: it never covers a line.
        "options": {
            "legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull"]},
            "tooltip": {"mode": "multi"},
        },
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": source,
                "expr": q.expr,
                "legendFormat": q.legend,
            }
            for i, q in enumerate(panel.queries)
        ],
    }


def dashboard() -> dict[str, object]:
    panels = []
    x = y = 0
    for number, panel in enumerate(PANELS, start=1):
        if x + panel.width > 24:
            x, y = 0, y + 8
        panels.append(_panel(number, panel, x, y))
        x += panel.width
    return {
        "title": "bazaar",
        "uid": "bazaar-overview",
        "description": "Gateway traffic, errors and latency, batches, the pods' load, the "
        "autoscaler's decisions and every process's CPU and memory.",
        "tags": ["bazaar", "inference"],
        "schemaVersion": 39,
        "version": 2,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                _variable(
                    "namespace",
                    "Namespace",
                    "label_values(bazaar_gateway_requests_total, namespace)",
                    many=False,
                ),
                _variable(
                    "model",
                    "Model",
                    f"label_values(bazaar_gateway_requests_total{{{NS}}}, model)",
                    many=True,
                ),
                _variable(
                    "instance",
                    "Gateway",
                    f"label_values(bazaar_gateway_requests_total{{{NS}}}, instance)",
                    many=True,
                ),
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=1) + "\n"


if __name__ == "__main__":
    DASHBOARD.write_text(render())
