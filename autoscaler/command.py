"""``bazaar autoscaler``: the Kubernetes control loop as a process.

startup → run → shutdown:

1. startup: the Kubernetes client (in-cluster configuration inside a pod, else the
   kubeconfig), the metrics registry and its HTTP endpoint, one aiohttp session shared by
   the signal sources;
2. run: one tick every ``--interval-s`` until SIGINT or SIGTERM;
3. shutdown: the loop is cancelled between or within ticks (nothing it holds needs
   finishing: a scale patch either reached the API server or will be re-decided by the
   next autoscaler), then the session, the metrics endpoint and the API client close.

Like every subcommand, it imports its dependencies when it runs, not when ``bazaar`` starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from autoscaler.kubernetes import KubernetesScaler
    from autoscaler.metrics import AutoscalerMetrics

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from autoscaler.sources import DCGM_QUERY

    parser = subparsers.add_parser(
        "autoscaler", help="scale the model Deployments of a namespace (Kubernetes)"
    )
    parser.add_argument("--namespace", required=True, help="where the model Deployments are")
    parser.add_argument(
        "--gateway",
        action="append",
        dest="gateways",
        required=True,
        metavar="URL",
        help="a gateway's base URL (repeatable); a host name with several addresses "
        "(a headless Service) counts as one gateway per address",
    )
    parser.add_argument(
        "--prometheus", metavar="URL", help="a Prometheus server for DCGM's GPU utilisation"
    )
    parser.add_argument(
        "--prometheus-query",
        default=DCGM_QUERY,
        metavar="PROMQL",
        help="GPU utilisation of a model's pods as 0..1; {model} is replaced by the "
        "model's name (default: %(default)s)",
    )
    parser.add_argument(
        "--interval-s",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="time between ticks (default %(default)s)",
    )
    parser.add_argument("--metrics-host", default="127.0.0.1", help="default %(default)s")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=8002,
        help="the autoscaler's own /metrics (default %(default)s)",
    )
    parser.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="default: the in-cluster configuration, else ~/.kube/config",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvloop
    from prometheus_client import CollectorRegistry, start_http_server

    from autoscaler.kubernetes import KubernetesScaler, connect
    from autoscaler.metrics import AutoscalerMetrics
    from gateway.errors import ConfigError

    try:
        scaler = KubernetesScaler(args.namespace, api_client=connect(args.kubeconfig))
    except ConfigError as exc:
        log.error("cannot reach Kubernetes: %s", exc)
        return 2
    try:
        metrics = AutoscalerMetrics(CollectorRegistry())
        server, _ = start_http_server(
            args.metrics_port, addr=args.metrics_host, registry=metrics.registry
        )
        log.info(
            "autoscaler for namespace %s; metrics on http://%s:%d/metrics",
            args.namespace,
            args.metrics_host,
            args.metrics_port,
        )
        try:
            uvloop.run(_serve(args, scaler, metrics))
        finally:
            server.shutdown()
            server.server_close()
    finally:
        scaler.close()
    return 0


async def _serve(
    args: argparse.Namespace, scaler: KubernetesScaler, metrics: AutoscalerMetrics
) -> None:
    import aiohttp

    from autoscaler.loop import Autoscaler
    from autoscaler.sources import GatewayStats, PodMetrics, PrometheusQuery, Signals

    async with aiohttp.ClientSession() as session:
        gpu = None
        if args.prometheus:
            gpu = PrometheusQuery(args.prometheus, args.prometheus_query, session=session)
        signals = Signals(
            GatewayStats(args.gateways, session=session), PodMetrics(session=session), gpu
        )
        autoscaler = Autoscaler(scaler, signals, metrics, interval_s=args.interval_s)
        loop_task = asyncio.create_task(autoscaler.run())
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, loop_task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
        log.info("autoscaler stopped")
