"""``bazaar autoscaler``: the Kubernetes control loop as a process.

startup → run → shutdown:

1. startup: the Kubernetes client (in-cluster configuration inside a pod, else the
   kubeconfig), the metrics registry and its HTTP endpoint (``/metrics``, and ``/stats``
   with each model's last decision in words), one aiohttp session shared by the signal
   sources but the gateways', which has its own to carry ``--gateway-token-file``'s token;
2. run: one tick every ``--interval-s`` until SIGINT or SIGTERM;
3. shutdown: the loop is cancelled between or within ticks (nothing it holds needs
   finishing: a scale patch either reached the API server or will be re-decided by the
   next autoscaler), then the HTTP endpoint, the session and the API client close.

With ``--keda`` it patches nothing: it serves KEDA's external scaler API on ``--keda-port``
(same host as the metrics), answering with each model's decision, and KEDA's HPA scales
(:mod:`autoscaler.keda.service`). No leader is elected then: every replica answers.

Like every subcommand, it imports its dependencies when it runs, not when ``bazaar`` starts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from autoscaler.deployments import KubernetesScaler
    from autoscaler.metrics import AutoscalerMetrics

log = logging.getLogger(__name__)

LEASE_NAME = "bazaar-autoscaler"
STUCK_AFTER_S = 30.0
"""A loop that has not ticked for this long (or ten intervals, if longer) is stuck."""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        "--gateway-token-file",
        type=Path,
        metavar="FILE",
        help="for gateways started with --api-keys: the file holds a token whose key has "
        "the stats scope (read at start)",
    )
    parser.add_argument(
        "--prometheus", metavar="URL", help="a Prometheus server for DCGM's GPU utilisation"
    )
    parser.add_argument(
        "--prometheus-query",
        metavar="PROMQL",
        help="GPU utilisation of a model's pods as 0..1; {model} is replaced by the "
        "model's name (default: DCGM_FI_DEV_GPU_UTIL of the model's pods, averaged)",
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
        help="the autoscaler's own /metrics, /stats and /healthz (default %(default)s)",
    )
    parser.add_argument(
        "--leader-election-id",
        metavar="ID",
        help="take part in leader election on the Lease bazaar-autoscaler as ID (the pod's "
        "name), so that of several replicas one scales; default: no election",
    )
    parser.add_argument(
        "--keda",
        action="store_true",
        help="do not scale: serve KEDA's external scaler gRPC API with each model's desired "
        "replicas, for ScaledObjects to scale on (deploy/components/keda); --leader-election-id "
        "is then unused, since every replica answers",
    )
    parser.add_argument(
        "--keda-port",
        type=int,
        default=8003,
        help="with --keda: the external scaler's port, on --metrics-host (default %(default)s)",
    )
    parser.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="default: the in-cluster configuration, else ~/.kube/config",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvloop

    from autoscaler.deployments import KubernetesScaler
    from cluster.api import Cluster, connect
    from cluster.lease import LeaderElection
    from protocol.auth import bearer, parse_token
    from protocol.errors import ConfigError

    gateway_headers: dict[str, str] = {}
    if args.gateway_token_file is not None:
        where = str(args.gateway_token_file)
        try:
            token = parse_token(args.gateway_token_file.read_bytes(), where)
        except OSError as exc:
            log.error("%s: cannot read: %s", where, exc.strerror)
            return 2
        except ConfigError as exc:
            log.error("%s", exc)
            return 2
        gateway_headers = bearer(token.decode())
    try:
        client = connect(args.kubeconfig)
    except ConfigError as exc:
        log.error("cannot reach Kubernetes: %s", exc)
        return 2
    cluster = Cluster(
        args.namespace, "autoscaler", logging.getLogger("autoscaler.deployments"), client
    )
    election = None
    if args.leader_election_id and not args.keda:
        election = LeaderElection(cluster, LEASE_NAME, args.leader_election_id)
    scaler = KubernetesScaler(cluster, election=election)
    try:
        uvloop.run(_serve(args, scaler, gateway_headers))
    finally:
        scaler.close()
    return 0


async def _serve(
    args: argparse.Namespace, scaler: KubernetesScaler, gateway_headers: dict[str, str]
) -> None:
    import aiohttp
    import uvicorn

    from autoscaler.loop import Autoscaler, Scaler
    from autoscaler.metrics import AutoscalerMetrics
    from autoscaler.sources import DCGM_QUERY, GatewayStats, PodMetrics, PrometheusQuery, Signals
    from protocol.metrics import process_registry
    from protocol.server import ManagedServer
    from protocol.support import cancel_and_wait

    metrics = AutoscalerMetrics(process_registry("autoscaler"))
    stuck_after_s = max(STUCK_AFTER_S, 10 * args.interval_s)
    server = ManagedServer(
        uvicorn.Config(
            _app(metrics, lambda: time.monotonic() - scaler.listed_at < stuck_after_s),
            host=args.metrics_host,
            port=args.metrics_port,
            log_level="warning",
            log_config=None,
            access_log=False,
            lifespan="off",
        )
    )
    async with (
        aiohttp.ClientSession() as session,
        aiohttp.ClientSession(headers=gateway_headers) as gateway_session,
    ):
        gpu = None
        if args.prometheus:
            query = args.prometheus_query or DCGM_QUERY
            gpu = PrometheusQuery(args.prometheus, query, session=session)
        signals = Signals(
            GatewayStats(args.gateways, session=gateway_session), PodMetrics(session=session), gpu
        )
        loop_scaler: Scaler = scaler
        keda = publish = None
        if args.keda:
            from autoscaler.keda.service import Answers, KedaScaler, keda_server

            answers = Answers(args.namespace)
            keda, keda_port = keda_server(answers, args.metrics_host, args.keda_port)
            await keda.start()
            loop_scaler, publish = KedaScaler(scaler, answers), answers.publish
            log.info("KEDA external scaler on %s:%d", args.metrics_host, keda_port)
        autoscaler = Autoscaler(
            loop_scaler, signals, metrics, interval_s=args.interval_s, publish=publish
        )
        loop_task = asyncio.create_task(autoscaler.run())
        election = scaler.election
        election_task = asyncio.create_task(election.run()) if election else None
        http_task = asyncio.create_task(server.serve())
        stopped = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, stopped.set)
        log.info(
            "autoscaler for namespace %s; /metrics and /stats on http://%s:%d",
            args.namespace,
            args.metrics_host,
            args.metrics_port,
        )
        await stopped.wait()
        await cancel_and_wait(loop_task, election_task)
        if election is not None:
            await election.release()  # the next leader need not wait the Lease out
        if keda is not None:
            await keda.stop(grace=1.0)  # KEDA's streams end; its operator reconnects
        server.stop()
        await http_task
        log.info("autoscaler stopped")


def _app(metrics: AutoscalerMetrics, ticking: Callable[[], bool]) -> ASGIApp:
    """``/metrics`` for Prometheus; ``/stats``: each model's last decision, its reason in
    words (the metric carries only the reason's code); ``/healthz``: 503 once the loop has
    not ticked for a while (``ticking``), so Kubernetes restarts a stuck autoscaler."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from protocol.responses import json_response

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def stats(request: Request) -> Response:
        return json_response({"models": metrics.stats()})

    async def healthz(request: Request) -> Response:
        ok = ticking()
        return json_response({"ticking": ok}, 200 if ok else 503)

    routes = [Route("/metrics", prometheus), Route("/stats", stats), Route("/healthz", healthz)]
    return Starlette(routes=routes)
