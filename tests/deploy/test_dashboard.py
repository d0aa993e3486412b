"""The Grafana dashboard: written by deploy/dashboard.py, and every panel's query answered by a
real Prometheus (Debian's package, the one tests/deploy/promtool.sh installs) scraping a real
``bazaar serve`` under load.

Prometheus scrapes the gateway's ``/metrics`` (the gateway's and the local autoscaler's
series) and ``/metrics/workers`` (the workers'), every second, with ``namespace`` added as
the Kubernetes scrape configuration would. Each query is evaluated as Grafana would send it:
the namespace chosen, every model and gateway (``.*``), ``$__rate_interval`` at four scrape
intervals, at a moment while the load ran.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from loadtests.dashboard import draw, grafana_query
from loadtests.dashboard import main as dashboard_main
from tests.support import bazaar_process, free_port, models_ready, wait_until

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
SCRAPE_INTERVAL_S = 1
RATE_INTERVAL = "4s"
LOAD_S = 8.0


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboard", ROOT / "deploy" / "dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def panels() -> list[dict[str, Any]]:
    return list(json.loads(DASHBOARD.read_text())["panels"])


def test_the_dashboard_is_what_its_generator_writes() -> None:
    assert DASHBOARD.read_text() == generator().render(), "run `make grafana-dashboard`"


def test_dashboard_queries_metrics_the_code_exports() -> None:
    exprs = [t["expr"] for panel in panels() for t in panel["targets"]]
    used = {
        re.sub(r"_(bucket|total|count|sum)$", "", name)
        for expr in exprs
        for name in re.findall(r"\bbazaar_\w+", expr)
    }
    source = "\n".join(
        path.read_text()
        for package in ("gateway", "models", "autoscaler")
        for path in (ROOT / package).glob("*.py")
    )
    assert used and {name for name in used if f'"{name}"' not in source} == set()


def test_every_query_is_scoped_to_the_chosen_namespace_and_gateways_to_the_chosen_ones() -> None:
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert variables["namespace"]["definition"] == (
        "label_values(bazaar_gateway_requests_total, namespace)"
    )
    # The model list comes from the gateways, so it fills without an autoscaler.
    assert variables["model"]["definition"] == (
        'label_values(bazaar_gateway_requests_total{namespace="$namespace"}, model)'
    )
    for panel in panels():
        for target in panel["targets"]:
            series = re.findall(r"(\w+)\{([^}]*)\}", target["expr"].replace("{model}", ""))
            assert series, target["expr"]
            for name, selector in series:
                assert 'namespace="$namespace"' in selector, target["expr"]
                if name.startswith("bazaar_gateway_"):
                    assert 'instance=~"$instance"' in selector, target["expr"]


def test_no_two_panels_overlap_and_every_legend_sits_beside_its_graph() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in panels():
        grid = panel["gridPos"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, panel["title"]
        assert grid["x"] + grid["w"] <= 24
        taken |= cells
        assert panel["options"]["legend"]["placement"] == "right", panel["title"]


def test_the_panels_the_issue_found_missing_are_there_and_apart() -> None:
    """Issue 14: the error, shed, expired, batch-size, pod compute, endpoint and process panels;
    requests/s and rows/s on panels of their own; whole scaling decisions."""
    by_title = {panel["title"]: panel for panel in panels()}
    exprs = {title: " ".join(t["expr"] for t in p["targets"]) for title, p in by_title.items()}
    wanted = {
        "Error ratio": 'outcome!="success"',
        "Shed (503) and expired (504) per second": "bazaar_gateway_shed_requests_total",
        "Batch size (rows per batch)": "bazaar_gateway_batch_size",
        "Pod time p50 / p99": "bazaar_model_compute_seconds",
        "Replicas: desired / asked / ready / endpoints": "bazaar_gateway_ready_endpoints",
        "Process CPU (cores)": "process_cpu_seconds_total",
        "Process memory (RSS)": "process_resident_memory_bytes",
    }
    for title, metric in wanted.items():
        assert metric in exprs[title], title
    for title, expr in exprs.items():
        assert not ("requests_total" in expr and "rows_total" in expr), title  # one unit a panel
    assert exprs["Scaling decisions (5 min)"].startswith("round(")


# Against a real Prometheus


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus is missing: run tests/deploy/promtool.sh (make test does)")
    return path


@dataclass
class Load:
    """Requests sent to every model until stopped; ``middle`` is a moment while it ran."""

    stop: threading.Event
    middle: float = 0.0
    answered: int = 0


@pytest.fixture(scope="module")
def serve(
    demo_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, int]]:
    """``bazaar serve`` over digits and mlp; yields its URL and port."""
    root = tmp_path_factory.mktemp("dashboard-repository")
    for model in ("digits", "mlp"):
        shutil.copytree(demo_repository / model, root / model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    args = ["serve", "--model-repository", str(root), "--port", str(port)]
    with bazaar_process(args, log, models_ready(url, ["digits", "mlp"])):
        yield url, port


@pytest.fixture(scope="module")
def prometheus(serve: tuple[str, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus scraping ``serve`` every second; yields its URL."""
    _, serve_port = serve
    work = tmp_path_factory.mktemp("prometheus")
    target = {"targets": [f"127.0.0.1:{serve_port}"], "labels": {"namespace": "bazaar"}}
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s"},
        "scrape_configs": [
            {"job_name": "bazaar-gateway", "static_configs": [target]},
            {
                "job_name": "bazaar-workers",
                "metrics_path": "/metrics/workers",
                "static_configs": [target],
            },
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (work / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: _up_targets(url) == 2, timeout_s=30, what="both targets up")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _up_targets(url: str) -> int:
    try:
        result = query(url, "sum(up)")
    except httpx.HTTPError:
        return 0
    return int(float(result[0]["value"][1])) if result else 0


def query(url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    params = {"query": expr, **({"time": str(at)} if at is not None else {})}
    response = httpx.get(f"{url}/api/v1/query", params=params, timeout=10)
    response.raise_for_status()  # 503 "Service Unavailable" while its storage starts
    answer = response.json()
    assert answer["status"] == "success", (expr, answer)
    return list(answer["data"]["result"])


@pytest.fixture(scope="module")
def loaded(serve: tuple[str, int], prometheus: str) -> Load:
    """``LOAD_S`` seconds of requests to both models, a few of them refused, all scraped."""
    url, _ = serve
    metadata = {m: httpx.get(f"{url}/v2/models/{m}").json() for m in ("digits", "mlp")}
    bodies = {m: _body(spec) for m, spec in metadata.items()}
    load = Load(threading.Event())

    def send() -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            while not load.stop.is_set():
                for model, body in bodies.items():
                    if client.post(f"/v2/models/{model}/infer", json=body).status_code == 200:
                        load.answered += 1
                # A wrong body: the error ratio has something to show.
                client.post("/v2/models/digits/infer", json={"inputs": []})

    senders = [threading.Thread(target=send) for _ in range(4)]
    for sender in senders:
        sender.start()
    started = time.time()
    time.sleep(LOAD_S)  # the load itself runs for this long; nothing is awaited by it
    load.middle = started + LOAD_S * 0.75
    load.stop.set()
    for sender in senders:
        sender.join()
    # Every scrape up to now has landed once Prometheus has one newer than now.
    now = time.time()
    wait_until(
        lambda: _last_scrape(prometheus) > now, timeout_s=10 * SCRAPE_INTERVAL_S, what="a scrape"
    )
    assert load.answered > 0
    return load


def _last_scrape(url: str) -> float:
    result = query(url, "min(timestamp(up))")
    return float(result[0]["value"][1]) if result else 0.0


def _body(metadata: dict[str, Any]) -> dict[str, Any]:
    inputs = []
    for tensor in metadata["inputs"]:
        shape = [1 if d == -1 else d for d in tensor["shape"]]
        count = 1
        for d in shape:
            count *= d
        inputs.append(
            {
                "name": tensor["name"],
                "shape": shape,
                "datatype": tensor["datatype"],
                "data": [0] * count,
            }
        )
    return {"inputs": inputs}


def grafana(expr: str) -> str:
    return grafana_query(expr, "bazaar", RATE_INTERVAL)


@pytest.mark.parametrize("panel", panels(), ids=lambda panel: panel["title"])
def test_each_panel_query_returns_data_from_a_real_run(
    panel: dict[str, Any], prometheus: str, loaded: Load
) -> None:
    needs_gpu = any("gpu" in t["expr"].lower() for t in panel["targets"])
    for target in panel["targets"]:
        result = query(prometheus, grafana(target["expr"]), at=loaded.middle)
        if needs_gpu:
            # No GPU on this machine: its series are absent, never zero.
            assert result == [], target["expr"]
        else:
            assert result, f"{panel['title']}: no data for {grafana(target['expr'])}"


def test_the_variables_list_the_namespace_models_and_gateway(prometheus: str, loaded: Load) -> None:
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    found = {}
    for variable in variables:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["definition"])
        assert match, variable["definition"]
        metric, label = match.groups()
        answer = httpx.get(
            f"{prometheus}/api/v1/label/{label}/values",
            params={"match[]": grafana(metric)},
            timeout=10,
        ).json()
        found[variable["name"]] = answer["data"]
    assert found["namespace"] == ["bazaar"]
    assert set(found["model"]) == {"digits", "mlp"}
    assert len(found["instance"]) == 1


def test_the_dashboard_picture_draws_every_panel_from_prometheus(
    prometheus: str, loaded: Load
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    figure = draw(prometheus, "bazaar", 1.0, RATE_INTERVAL, dashboard)
    by_title = {axis.get_title(loc="left"): axis for axis in figure.axes}
    assert set(by_title) == {panel["title"] for panel in dashboard["panels"]}
    for title, axis in by_title.items():
        if title == "GPU utilisation":
            assert [text.get_text() for text in axis.texts] == ["no data"]
        else:
            assert axis.get_lines(), title


def test_the_picture_tool_says_where_the_dashboard_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An installed package has no deploy/: the tool must say so, not fail reading it.
    with pytest.raises(SystemExit) as exited:
        dashboard_main(["--dashboard", str(tmp_path / "absent.json")])
    assert exited.value.code == 2
    assert "no dashboard at" in capsys.readouterr().err
