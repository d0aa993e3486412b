"""The run's own HTML page, beside Locust's ``report.html``: the verdict first.

Locust's report shows its charts and tables but not the SLO, the verdict or the tally's
accounting; this page shows those, from ``summary.json``'s content, with the plot inline so
the one file can be mailed or attached to a ticket. A pure function of the summary.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from html import escape
from typing import Any

_STYLE = (
    "body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:.3em .7em;text-align:left}"
    ".PASS{color:#070}.FAIL{color:#b00}img{max-width:100%}"
)


def verdict_page(summary: Mapping[str, Any], plot_png: bytes | None) -> str:
    """HTML for one run; ``plot_png`` is embedded when given."""
    verdict = "MET" if summary["passed"] else "MISSED"
    slo = summary["slo"]
    requests = summary["requests"]
    outcomes = [name for name in requests if name not in ("due", "sent")]
    title = f"{summary['scenario']} against {summary['host']}: SLO {verdict}"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1 class='{'PASS' if summary['passed'] else 'FAIL'}'>{escape(title)}</h1>",
        f"<p>{escape(_offered(summary))}; SLO: p99 of successes &le; {slo['p99_ms']:g} ms, "
        f"error rate &le; {slo['max_error_rate']:.2%}.</p>",
        _table(
            ("check", "measured", "required", "verdict"),
            [
                (c["name"], c["measured"], c["required"], "PASS" if c["passed"] else "FAIL")
                for c in summary["checks"]
            ],
        ),
        "<h2>Latency of successes</h2>",
        _table(
            ("p50", "p90", "p99", "max"),
            [tuple(_ms(summary["latency_ms"][k]) for k in ("p50", "p90", "p99", "max"))],
        ),
        "<h2>Requests</h2>",
        f"<p>{requests['due']} due, {requests['sent']} sent.</p>",
        _table(
            ("model", *outcomes),
            [("all", *(str(requests[o]) for o in outcomes))]
            + [
                (model, *(str(counts.get(o, 0)) for o in outcomes))
                for model, counts in sorted(summary["by_model"].items())
            ],
        ),
        f"<p>{summary['throughput_rps']:g} successes/s over {summary['elapsed_s']:g} s.</p>",
    ]
    if summary["gateway"] is not None:
        parts.append(f"<p>The gateway counted {summary['gateway']['total']} requests.</p>")
    if plot_png is not None:
        encoded = base64.b64encode(plot_png).decode()
        parts.append(f"<img alt='the run over time' src='data:image/png;base64,{encoded}'>")
    parts.append(
        "<p>Locust's own report (charts of every request name): "
        f"<a href='{escape(summary['files']['html'])}'>{escape(summary['files']['html'])}</a>"
        "</p></body></html>"
    )
    return "\n".join(parts)


def _offered(summary: Mapping[str, Any]) -> str:
    if "offered_per_s" in summary:
        due = summary["offered_per_s"]
        return (
            f"a schedule of {sum(due)} requests over {len(due)} s (peak {max(due, default=0)} "
            f"req/s) on {summary['model_mix']}"
        )
    if summary["arrival_rate"] is not None:
        return (
            f"{summary['arrival_rate']:g} req/s for {summary['duration_s']:g} s "
            f"on {summary['model_mix']}"
        )
    return (
        f"up to {summary['users']} users for {summary['duration_s']:g} s on {summary['model_mix']}"
    )


def _ms(value: float | None) -> str:
    return "none" if value is None else f"{value:g} ms"


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(text: str) -> str:
    verdict = f" class='{text}'" if text in ("PASS", "FAIL") else ""
    return f"<td{verdict}>{escape(text)}</td>"
