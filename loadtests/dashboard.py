"""Draw deploy/grafana-dashboard.json from a Prometheus, laid out as Grafana lays it out.

No Grafana package exists for this machine (Debian ships none, nor PyPI), so README's
dashboard picture is drawn here: each panel's queries, as Grafana would send them (the
namespace chosen, every model and gateway, ``$__rate_interval`` at four scrape intervals),
over the last minutes through Prometheus's range API, one line per series named by the
panel's legend format, at the panel's place in the 24-column grid::

    python -m loadtests.dashboard --prometheus http://127.0.0.1:9090 --minutes 5 \\
        --out docs/dashboard.png
"""

from __future__ import annotations

import argparse
import json
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.gridspec import GridSpec

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana-dashboard.json"
"""In a checkout; an installed package has no deploy/, so name the file with --dashboard."""
UNITS = {"s": "seconds", "reqps": "requests/s", "percentunit": "ratio", "bytes": "bytes"}


def grafana_query(expr: str, namespace: str, rate_interval: str) -> str:
    """``expr`` as Grafana sends it with ``namespace`` chosen and every model and gateway."""
    return (
        expr.replace("$namespace", namespace)
        .replace("$model", ".*")
        .replace("$instance", ".*")
        .replace("$__rate_interval", rate_interval)
    )


def query_range(prometheus: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    step = max(1.0, (end - start) / 300)
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as r:
        answer = json.loads(r.read())
    if answer["status"] != "success":
        raise RuntimeError(f"{expr}: {answer}")
    return list(answer["data"]["result"])


def legend(form: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), form).strip()


def draw(
    prometheus: str, namespace: str, minutes: float, rate_interval: str, dashboard: dict[str, Any]
) -> Figure:
    end = time.time()
    start = end - minutes * 60
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    figure = Figure(figsize=(24, rows * 0.62), layout="constrained")
    figure.suptitle(f"{dashboard['title']}: namespace {namespace}, last {minutes:g} minutes")
    grid = GridSpec(rows, 24, figure=figure)
    for panel in panels:
        place = panel["gridPos"]
        axis: Axes = figure.add_subplot(
            grid[place["y"] : place["y"] + place["h"], place["x"] : place["x"] + place["w"]]
        )
        axis.set_title(panel["title"], fontsize="medium", loc="left")
        unit = panel["fieldConfig"]["defaults"]["unit"]
        axis.set_ylabel(UNITS.get(unit, ""), fontsize="small")
        drawn = 0
        for target in panel["targets"]:
            expr = grafana_query(target["expr"], namespace, rate_interval)
            for series in query_range(prometheus, expr, start, end):
                times = [float(t) - end for t, _ in series["values"]]
                values = [float(v) for _, v in series["values"]]
                axis.plot(times, values, label=legend(target["legendFormat"], series["metric"]))
                drawn += 1
        if drawn:
            axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="x-small")
        else:
            axis.text(0.5, 0.5, "no data", transform=axis.transAxes, ha="center", color="grey")
        axis.set_xlim(start - end, 0)
        axis.tick_params(labelsize="x-small")
    return figure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.dashboard", description=__doc__)
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--namespace", default="bazaar")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes")
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    parser.add_argument(
        "--dashboard",
        type=Path,
        default=DASHBOARD,
        help="the dashboard JSON (default: deploy/grafana-dashboard.json of this checkout)",
    )
    args = parser.parse_args(argv)
    if not args.dashboard.is_file():
        parser.error(f"no dashboard at {args.dashboard}: name deploy/grafana-dashboard.json")
    dashboard = json.loads(args.dashboard.read_text())
    figure = draw(args.prometheus, args.namespace, args.minutes, args.rate_interval, dashboard)
    figure.savefig(args.out, dpi=60)
    print(f"dashboard: {args.out}")


if __name__ == "__main__":
    main()
