"""The ``bazaar`` command: one entry point, a subcommand per process or tool.

Building the parser imports the standard library only (each package's parser module is
argparse and nothing else); a subcommand imports what it runs (ONNX Runtime, the Kubernetes
client, Locust, numpy, matplotlib) when it runs, so ``bazaar --help`` and every command
start quickly.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import secrets
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoscaler.command import add_parser as add_autoscaler_parser
from autoscaler.simulation.command import add_parser as add_simulate_parser
from bazaar.replay import add_parser as add_replay_parser
from bazaar.trace_load import add_trace_options
from loadtests.command import add_bench_parser, add_loadtest_parser
from protocol import __version__, logs
from protocol.arguments import (
    non_negative_float,
    port,
    port_or_off,
    positive_float,
    positive_int,
)
from protocol.auth import HEALTH, INFER, METRICS, OPEN_BY_DEFAULT, STATS
from protocol.errors import ConfigError
from protocol.limits import EdgeLimits
from protocol.support import missing_extra

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.rollout_peers import RolloutPeers
    from gateway.rollout_record import ServiceRolloutRecord
    from protocol.auth import KeyFile
    from protocol.tls import ServerTls

DEMO_REPOSITORY = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bazaar" / "demo"
"""Where ``bazaar serve`` builds the demo repository when it is given none."""

log = logging.getLogger("bazaar")

# GatewayConfig's defaults, repeated here so that building the parser imports nothing of the
# gateway's; a test holds the two equal.
MAX_BATCHES_PER_ENDPOINT = 2
MAX_QUEUE_TIME_S = 30.0
DRAIN_TIMEOUT_S = 95.0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        log.error("%s", exc)  # a file or option named on the command line, and what is wrong
        return 2


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="bazaar",
        description="bazaar: an inference serving gateway for ONNX models "
        "(Open Inference Protocol v2).",
    )
    root.add_argument("--version", action="version", version=f"bazaar {__version__}")
    root.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    root.add_argument(
        "--log-format",
        default="text",
        choices=logs.FORMATS,
        help="text, or one JSON object a line (default %(default)s)",
    )
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    server = commands.add_parser("model-server", help="serve a model repository (one pod)")
    server.add_argument("--model-repository", type=Path, required=True, metavar="DIR")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument(
        "--port", type=port, default=8000, help="the v2 data plane: metadata, inference (8000)"
    )
    server.add_argument(
        "--control-port",
        type=port,
        metavar="PORT",
        help="serve /metrics and the repository routes on this port only, and the data plane "
        "only on --port (for a NetworkPolicy; default: everything on --port)",
    )
    server.add_argument(
        "--grpc-port",
        type=port_or_off,
        default=0,
        metavar="PORT",
        help="also serve the data plane over gRPC (Triton's inference.GRPCInferenceService: "
        "health, metadata, inference) on this port; deploy/ uses Triton's 8001 (default: "
        "no gRPC; the gateway calls pods over HTTP)",
    )
    server.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="load only this model (repeatable; NAME@VERSION: only that version of it; "
        "default: every model in the repository)",
    )
    server.add_argument(
        "--enable-model-control",
        action="store_true",
        help="serve the repository's load and unload routes (off: they change what the pod serves)",
    )
    server.add_argument(
        "--control-token-file",
        type=Path,
        metavar="FILE",
        help="with --enable-model-control: load and unload answer only callers presenting "
        "the token this file holds (Authorization: Bearer; at least 32 characters; re-read "
        "when it changes); required unless --host is a loopback address",
    )
    server.add_argument(
        "--max-override-batch-size",
        type=positive_int,
        default=1024,
        metavar="N",
        help="largest max_batch_size a load request's config may set (default %(default)s)",
    )
    server.add_argument(
        "--max-override-threads",
        type=positive_int,
        metavar="N",
        help="largest intra_op_threads and inter_op_threads a load request's config may set "
        "(default: the CPUs this process may use)",
    )
    server.add_argument(
        "--max-override-instances",
        type=positive_int,
        default=8,
        metavar="N",
        help="largest instances a load request's config may set (default %(default)s)",
    )
    server.add_argument(
        "--max-models",
        type=positive_int,
        default=64,
        metavar="N",
        help="models the pod keeps in its table (loaded, failed or unloaded); further API "
        "loads are refused (default %(default)s)",
    )
    server.add_argument(
        "--memory-budget",
        type=positive_int,
        metavar="BYTES",
        help="page models in on their first request and evict the least recently used idle "
        "ones to keep the loaded models' footprints under this (default: load every model "
        "at start-up and keep it)",
    )
    server.add_argument(
        "--device",
        choices=["cpu", "cuda", "auto"],
        help="compute every model on this device, whatever its config says (a pod that "
        "holds a GPU says cuda: it then fails to load rather than compute on the CPU)",
    )
    _access_log_option(server)
    _tracing_option(server)
    _edge_options(server)
    server.set_defaults(run=_model_server)

    serve = commands.add_parser(
        "serve", help="the whole system on this machine: gateway and model workers"
    )
    serve.add_argument(
        "--model-repository",
        type=Path,
        metavar="DIR",
        help=f"default: the demo repository, built in {DEMO_REPOSITORY} when missing",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=port, default=8000, help="HTTP (default %(default)s)")
    serve.add_argument(
        "--grpc-port",
        type=port_or_off,
        default=8001,
        metavar="PORT",
        help="gRPC, Triton's inference.GRPCInferenceService (default %(default)s, Triton's; "
        "0: no gRPC)",
    )
    serve.add_argument(
        "--workers-per-model",
        type=positive_int,
        default=1,
        metavar="N",
        help="workers each model starts with, and the fewest it keeps unless "
        "--scale-to-zero-after (default %(default)s)",
    )
    serve.add_argument(
        "--max-workers-per-model",
        type=positive_int,
        metavar="N",
        help="the most the autoscaler may start (default: the number of CPUs)",
    )
    serve.add_argument(
        "--scale-down-window",
        type=non_negative_float,
        default=120.0,
        metavar="SECONDS",
        help="workers are removed only when not needed for this long (default %(default)s)",
    )
    serve.add_argument(
        "--scale-to-zero-after",
        type=positive_float,
        metavar="SECONDS",
        help="stop every worker of a model idle this long; its next request is held until "
        "a worker is back (default: never)",
    )
    serve.add_argument(
        "--no-autoscale", action="store_true", help="keep --workers-per-model workers per model"
    )
    serve.add_argument(
        "--worker-memory",
        type=positive_int,
        metavar="BYTES",
        help="small models share workers: packed by estimated footprint into workers of at "
        "most this much each; a group's workers are autoscaled on its models' demand summed "
        "(default: one worker per model)",
    )
    serve.add_argument(
        "--memory-budget",
        type=positive_int,
        metavar="BYTES",
        help="each worker pages its models within this much (model-server --memory-budget): "
        "with a larger --worker-memory, a worker serves more models than it holds at once "
        "(default: every worker holds all its models)",
    )
    serve.add_argument(
        "--hop",
        choices=["http", "grpc"],
        default="http",
        help="how the gateway sends batches to the workers: binary HTTP or gRPC (each worker "
        "serves it on a second port) (default %(default)s, the faster: BENCHMARKS.md)",
    )
    _gateway_options(serve)
    serve.set_defaults(run=_serve)

    gateway = commands.add_parser(
        "gateway", help="the gateway in front of listed or discovered endpoints"
    )
    source = gateway.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--endpoints",
        type=Path,
        metavar="FILE",
        help="YAML: models: {name: [http://host:port, ...]}",
    )
    source.add_argument(
        "--kubernetes-namespace",
        metavar="NS",
        help="discover the ready pods of the Services labelled bazaar.dev/model in NS "
        "through their EndpointSlices",
    )
    gateway.add_argument(
        "--hop",
        choices=["http", "grpc"],
        default="http",
        help="with --kubernetes-namespace: how batches reach the pods, binary HTTP or gRPC to "
        "the port named grpc of their EndpointSlices (default %(default)s, the faster: "
        "BENCHMARKS.md); an endpoints file names a gRPC address per endpoint instead",
    )
    gateway.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="with --kubernetes-namespace: the kubeconfig to use (default: in-cluster, "
        "else ~/.kube/config)",
    )
    gateway.add_argument(
        "--leader-election-id",
        metavar="ID",
        help="with --kubernetes-namespace: keep rollouts' progress in the model Services' "
        "bazaar.dev/rollout annotation, decided by the holder of the Lease "
        "bazaar-gateway-rollouts, as ID (the pod's name); default: each gateway decides "
        "alone and a restart starts a rollout again",
    )
    gateway.add_argument(
        "--rollout-peers",
        action="append",
        metavar="URL",
        help="with --leader-election-id: the gateways whose /stats samples the deciding one "
        "adds to its own (repeatable; a host name with several addresses, a headless "
        "Service, counts as one gateway per address); default: it judges on its own",
    )
    gateway.add_argument(
        "--rollout-peers-token-file",
        type=Path,
        metavar="FILE",
        help="with --rollout-peers, for gateways started with --api-keys: the file holds a "
        "token whose key has the stats scope (read at start)",
    )
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=port, default=8000, help="HTTP (default %(default)s)")
    gateway.add_argument(
        "--grpc-port",
        type=port_or_off,
        default=8001,
        metavar="PORT",
        help="gRPC, Triton's inference.GRPCInferenceService (default %(default)s, Triton's; "
        "0: no gRPC)",
    )
    _gateway_options(gateway)
    _tls_options(gateway)
    gateway.set_defaults(run=_gateway)

    add_autoscaler_parser(commands)
    add_simulate_parser(commands)
    add_replay_parser(commands)
    add_trace_options(add_loadtest_parser(commands))
    add_bench_parser(commands)

    models = commands.add_parser("models", help="model repository tools")
    models_commands = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    build = models_commands.add_parser("build-demo", help="build the demo repository offline")
    build.add_argument("directory", type=Path, metavar="DIR")
    build.add_argument(
        "--model-version",
        type=positive_int,
        default=1,
        metavar="N",
        help="write the models as this version: another than 1 is a candidate that disagrees "
        "with version 1 (digits on some rows, the MLPs on most), for trying canaries, shadows "
        "and rollouts (default %(default)s)",
    )
    build.set_defaults(run=_build_demo)
    fetch = models_commands.add_parser(
        "fetch",
        help="download a model repository archive (.tar.gz), check its SHA-256, unpack it",
    )
    fetch.add_argument("url", metavar="URL")
    fetch.add_argument("directory", type=Path, metavar="DIR")
    fetch.add_argument("--sha256", required=True, metavar="HEX", help="the archive's digest")
    fetch.set_defaults(run=_fetch)
    return root


def _gateway_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-batches-per-endpoint",
        type=positive_int,
        default=MAX_BATCHES_PER_ENDPOINT,
        metavar="N",
        help="batches in flight per endpoint (default %(default)s)",
    )
    parser.add_argument(
        "--max-queue-time",
        type=positive_float,
        default=MAX_QUEUE_TIME_S,
        metavar="SECONDS",
        help="longest any request waits in the gateway's queue (default %(default)s)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=DRAIN_TIMEOUT_S,
        metavar="SECONDS",
        help="on SIGTERM, the longest to wait for requests in flight (default %(default)s)",
    )
    parser.add_argument(
        "--tenants",
        type=Path,
        metavar="FILE",
        help="each tenant's request rate, rows in flight and queue weight (YAML; "
        "see gateway/tenants.py); default: no limits",
    )
    _access_options(parser)
    _access_log_option(parser)
    _tracing_option(parser)
    _edge_options(parser)


def _access_options(parser: argparse.ArgumentParser) -> None:
    """Who may call what (``protocol.auth``, SECURITY.md)."""
    access = parser.add_argument_group("authentication")
    access.add_argument(
        "--api-keys",
        type=Path,
        metavar="FILE",
        help="a JSON file of hashed API keys, each with a tenant and scopes; re-read when it "
        "changes. Every route outside --open-scopes then needs a key with its scope. "
        "Default: no authentication, anyone who reaches the port may call every route",
    )
    access.add_argument(
        "--open-scopes",
        type=_scope_list,
        metavar="SCOPES",
        help=f"with --api-keys: the scopes served without a key, comma-separated, of "
        f"{HEALTH} (/v2, /v2/health/*), {INFER} (inference, models, repository index), "
        f"{STATS}, {METRICS}; '' for none (default {','.join(sorted(OPEN_BY_DEFAULT))})",
    )


def _scope_list(text: str) -> frozenset[str]:
    scopes = frozenset(filter(None, (s.strip() for s in text.split(","))))
    unknown = scopes - {HEALTH, INFER, STATS, METRICS}
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown scope {', '.join(sorted(unknown))}: the scopes are "
            f"{HEALTH}, {INFER}, {STATS}, {METRICS}"
        )
    return scopes


def _tls_options(parser: argparse.ArgumentParser) -> None:
    """HTTPS (``protocol.tls``), with client certificates if asked."""
    tls = parser.add_argument_group("TLS")
    tls.add_argument(
        "--ssl-certfile",
        type=Path,
        metavar="FILE",
        help="serve HTTPS with this certificate chain, PEM (default: plain HTTP)",
    )
    tls.add_argument(
        "--ssl-keyfile",
        type=Path,
        metavar="FILE",
        help="its private key, PEM, unencrypted (default: in --ssl-certfile)",
    )
    tls.add_argument(
        "--ssl-ca-certs",
        type=Path,
        metavar="FILE",
        help="the CA certificates, PEM, that client certificates must chain to (with "
        "--ssl-client-cert)",
    )
    tls.add_argument(
        "--ssl-client-cert",
        choices=["none", "optional", "required"],
        default="none",
        help="client certificates: required refuses a client without one signed by "
        "--ssl-ca-certs, optional checks one if sent (default %(default)s)",
    )


EDGE = EdgeLimits()


def _access_log_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="log every request (uvicorn's access log; off: it costs the hot path)",
    )


def _tracing_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="send OpenTelemetry traces over OTLP/HTTP to URL, e.g. http://collector:4318 "
        "(protocol/tracing.py); default: $OTEL_EXPORTER_OTLP_ENDPOINT, else no tracing",
    )


def _trace(service: str, args: argparse.Namespace) -> None:
    from protocol import tracing

    if tracing.configure(service, args.otlp_endpoint):
        log.info("tracing to %s", args.otlp_endpoint or "the OTEL_EXPORTER_OTLP_* endpoint")


def _edge_options(parser: argparse.ArgumentParser) -> None:
    """What a client may send and how slowly (``protocol.limits``); beyond, a JSON error."""
    edge = parser.add_argument_group("client limits")
    for flag, kind, metavar, default, text in [
        (
            "--max-header-bytes",
            positive_int,
            "BYTES",
            EDGE.max_header_bytes,
            "request line and headers together (431 beyond)",
        ),
        (
            "--max-headers",
            positive_int,
            "N",
            EDGE.max_headers,
            "header fields in a request (431 beyond)",
        ),
        (
            "--max-url-bytes",
            positive_int,
            "BYTES",
            EDGE.max_url_bytes,
            "request target, path and query (414 beyond)",
        ),
        (
            "--max-body-bytes",
            positive_int,
            "BYTES",
            EDGE.max_body_bytes,
            "request body on every route but inference (413 beyond)",
        ),
        (
            "--max-infer-body-bytes",
            positive_int,
            "BYTES",
            EDGE.max_infer_body_bytes,
            "inference request body, read into memory whole (413 beyond)",
        ),
        (
            "--header-timeout",
            positive_float,
            "SECONDS",
            EDGE.header_timeout_s,
            "from a request's first byte, the longest its headers may take (408 beyond)",
        ),
        (
            "--body-timeout",
            positive_float,
            "SECONDS",
            EDGE.body_timeout_s,
            "the longest a body may take, plus one second per --body-min-rate bytes (408 beyond)",
        ),
        (
            "--body-min-rate",
            positive_int,
            "BYTES_PER_S",
            EDGE.body_min_rate,
            "the pace a body must keep past --body-timeout",
        ),
        (
            "--keep-alive-timeout",
            positive_float,
            "SECONDS",
            EDGE.keep_alive_timeout_s,
            "an idle connection (new, or between requests) is closed after this",
        ),
        (
            "--max-connections",
            positive_int,
            "N",
            EDGE.max_connections,
            "open connections; at the cap a new one closes the longest idle",
        ),
        (
            "--oversize-answer-delay",
            non_negative_float,
            "SECONDS",
            EDGE.oversize_answer_delay_s,
            "how long the answer to an oversized request (413, 414, 431) waits, unread; "
            "0 answers at once",
        ),
        (
            "--max-concurrent-requests",
            positive_int,
            "N",
            EDGE.max_concurrent_requests,
            "requests in progress (503 with Retry-After beyond)",
        ),
    ]:
        edge.add_argument(
            flag, type=kind, default=default, metavar=metavar, help=f"{text} (default %(default)s)"
        )


def _edge_limits(args: argparse.Namespace) -> EdgeLimits:
    return EdgeLimits(
        max_header_bytes=args.max_header_bytes,
        max_headers=args.max_headers,
        max_url_bytes=args.max_url_bytes,
        max_body_bytes=args.max_body_bytes,
        max_infer_body_bytes=args.max_infer_body_bytes,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        body_min_rate=args.body_min_rate,
        keep_alive_timeout_s=args.keep_alive_timeout,
        max_connections=args.max_connections,
        oversize_answer_delay_s=args.oversize_answer_delay,
        max_concurrent_requests=args.max_concurrent_requests,
    )


def _serve(args: argparse.Namespace) -> int:
    from autoscaler.policy import ScaleConfig

    autoscale = None
    if not args.no_autoscale:
        most = args.max_workers_per_model or max(args.workers_per_model, os.cpu_count() or 1)
        autoscale = ScaleConfig(
            min_replicas=0 if args.scale_to_zero_after is not None else args.workers_per_model,
            max_replicas=most,
            scale_down_window_s=args.scale_down_window,
            scale_to_zero_after_s=args.scale_to_zero_after,
        )
    # The local autoscaler reads the gateway's /stats: with keys on, it holds a key of its
    # own, made here and kept in memory.
    stats_token = secrets.token_hex(32) if args.api_keys and autoscale is not None else None
    keys = _key_file(args, stats_token)
    repository = args.model_repository or _demo_repository()
    if repository is None:
        return 2
    if args.otlp_endpoint is not None:
        # The workers trace to it too: they read the standard variable, inherited.
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = args.otlp_endpoint
    _trace("bazaar-gateway", args)
    from bazaar.local import LocalWorkers
    from bazaar.worker_metrics import worker_metrics_route
    from gateway.server import run

    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    source = LocalWorkers(
        repository,
        f"http://{host}:{args.port}",
        workers=args.workers_per_model,
        autoscale=autoscale,
        log_level=args.log_level,
        gateway_token=stats_token,
        worker_bytes=args.worker_memory,
        grpc_hop=args.hop == "grpc",
        memory_budget=args.memory_budget,
    )
    main = run(
        source,
        args.host,
        args.port,
        _gateway_config(args),
        args.log_level,
        access_log=args.access_log,
        keys=keys,
        open_scopes=_open_scopes(args),
        grpc_port=args.grpc_port or None,
        extra_routes=[worker_metrics_route(source.worker_urls)],
        grpc_targets=source.grpc_target if args.hop == "grpc" else None,
    )
    _run_async(main)
    return 0


def _gateway(args: argparse.Namespace) -> int:
    keys = _key_file(args)  # before the heavier imports: a mistake is told at once
    tls = _server_tls(args)
    _trace("bazaar-gateway", args)
    from gateway.discovery import EndpointSlices, StaticEndpoints
    from gateway.server import run

    source: StaticEndpoints | EndpointSlices
    config = _gateway_config(args)
    record = None
    peers: RolloutPeers | None = None
    if args.rollout_peers is not None:
        if args.leader_election_id is None:
            log.error("--rollout-peers goes with --leader-election-id")
            return 2
        peers = _rollout_peers(args)
        if peers is None:
            return 2
    if args.endpoints is not None:
        if args.kubeconfig is not None or args.leader_election_id is not None:
            log.error("--kubeconfig and --leader-election-id go with --kubernetes-namespace")
            return 2
        if args.hop != "http":
            log.error(
                "--hop goes with --kubernetes-namespace: an endpoints file gives an "
                "endpoint's gRPC address (grpc:) where its batches go over gRPC"
            )
            return 2
        source = StaticEndpoints(args.endpoints)
        config = dataclasses.replace(config, models=source.settings)
        slices_over_http = False
    else:
        from cluster.api import Cluster, connect

        client = connect(args.kubeconfig)
        cluster = Cluster(
            args.kubernetes_namespace, "gateway", logging.getLogger("gateway.discovery"), client
        )
        source = EndpointSlices(cluster)
        slices_over_http = args.hop == "http"
        if args.leader_election_id is not None:
            record = _rollout_record(args)
    main = run(
        source,
        args.host,
        args.port,
        config,
        args.log_level,
        access_log=args.access_log,
        keys=keys,
        open_scopes=_open_scopes(args),
        tls=tls,
        grpc_port=args.grpc_port or None,
        grpc_targets=None if slices_over_http else source.grpc_target,
        rollout_record=record,
        rollout_peers=peers,
    )
    _run_async(main)
    return 0


def _rollout_record(args: argparse.Namespace) -> ServiceRolloutRecord:
    """The gateway's share in deciding rollouts, on a client of its own (its record closes it)."""
    from cluster.api import Cluster, connect
    from cluster.lease import LeaderElection
    from gateway.rollout_record import LEASE_NAME, ServiceRolloutRecord

    logger = logging.getLogger("gateway.rollout_record")
    cluster = Cluster(args.kubernetes_namespace, "gateway", logger, connect(args.kubeconfig))
    election = LeaderElection(cluster, LEASE_NAME, args.leader_election_id)
    return ServiceRolloutRecord(cluster, election)


def _rollout_peers(args: argparse.Namespace) -> RolloutPeers | None:
    """The gateways whose samples the deciding one sums, read with
    ``--rollout-peers-token-file``'s token if given; None (said why) when it cannot be read."""
    from gateway.rollout_peers import RolloutPeers
    from protocol.auth import bearer, parse_token
    from protocol.errors import ConfigError

    headers: dict[str, str] = {}
    if args.rollout_peers_token_file is not None:
        where = str(args.rollout_peers_token_file)
        try:
            headers = bearer(
                parse_token(args.rollout_peers_token_file.read_bytes(), where).decode()
            )
        except OSError as exc:
            log.error("%s: cannot read: %s", where, exc.strerror)
            return None
        except ConfigError as exc:
            log.error("%s", exc)
            return None
    return RolloutPeers(args.rollout_peers, headers)


def _key_file(args: argparse.Namespace, stats_token: str | None = None) -> KeyFile | None:
    """``--api-keys`` loaded (``ConfigError`` if it cannot be), plus a key for the stats
    scope with ``stats_token``; None without keys, said loudly off loopback."""
    from protocol.auth import ApiKey, KeyFile, parse_keys_file, token_digest

    if args.api_keys is None:
        if args.open_scopes is not None:
            raise ConfigError("--open-scopes", None, "goes with --api-keys")
        if not _loopback(args.host):
            log.warning("no --api-keys: anyone who can reach %s may call every route", args.host)
        return None
    fixed = {}
    if stats_token is not None:
        fixed[token_digest(stats_token.encode())] = ApiKey("bazaar-serve", frozenset({STATS}))
    return KeyFile(args.api_keys, parse_keys_file, fixed=fixed)


def _open_scopes(args: argparse.Namespace) -> frozenset[str]:
    return OPEN_BY_DEFAULT if args.open_scopes is None else args.open_scopes


def _server_tls(args: argparse.Namespace) -> ServerTls | None:
    from protocol.tls import ServerTls

    if args.ssl_certfile is None:
        if args.ssl_keyfile or args.ssl_ca_certs or args.ssl_client_cert != "none":
            raise ConfigError(
                "TLS",
                None,
                "--ssl-keyfile, --ssl-ca-certs and --ssl-client-cert go with --ssl-certfile",
            )
        return None
    return ServerTls(args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certs, args.ssl_client_cert)


def _loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _gateway_config(args: argparse.Namespace) -> GatewayConfig:
    from gateway.config import GatewayConfig
    from gateway.tenants import TenantPolicies, load_tenants

    return GatewayConfig(
        max_batches_per_endpoint=args.max_batches_per_endpoint,
        max_queue_time_s=args.max_queue_time,
        drain_timeout_s=args.drain_timeout,
        tenants=load_tenants(args.tenants) if args.tenants else TenantPolicies(),
        edge=_edge_limits(args),
    )


DEMO_EXTRA = ("sklearn", "skl2onnx", "onnx")
"""What ``bazaar models build-demo`` imports beyond serving: the ``demo`` extra."""


def _demo_repository() -> Path | None:
    """The demo repository, built once; a marker written last tells a finished build. None
    (said why) when it must be built and the demo extra is not installed."""
    marker = DEMO_REPOSITORY / ".complete"
    if not marker.exists() and (problem := missing_extra("bazaar serve", "demo", DEMO_EXTRA)):
        log.error("%s; or give --model-repository", problem)
        return None
    from models.demo import build_demo_repository

    if not marker.exists():
        log.info("building the demo repository in %s", DEMO_REPOSITORY)
        build_demo_repository(DEMO_REPOSITORY)
        marker.touch()
    return DEMO_REPOSITORY


def _run_async(main: Coroutine[Any, Any, None]) -> None:
    import uvloop

    _freeze_startup_objects()
    uvloop.run(main)


def _freeze_startup_objects() -> None:
    """Move everything imported so far out of the collector's sight.

    Without it, every full collection walks the hundreds of thousands of objects that numpy,
    ONNX Runtime and the web stack leave behind: measured at 50 to 240 ms pauses under
    load, which set the gateway's p99.
    """
    import gc

    gc.collect()
    gc.freeze()


def _pinned_models(models: list[str] | None) -> tuple[list[str] | None, dict[str, int]]:
    """``--model``'s names, and the version of each given as ``NAME@VERSION``."""
    if models is None:
        return None, {}
    names, pinned = [], {}
    for model in models:
        name, at, version = model.partition("@")
        if at:
            if not version.isdigit() or int(version) < 1:
                raise ConfigError("--model", model, "expected NAME or NAME@VERSION, VERSION >= 1")
            pinned[name] = int(version)
        names.append(name)
    return names, pinned


def _model_server(args: argparse.Namespace) -> int:
    control_keys = _control_keys(args)  # before the heavier imports: a mistake is told at once
    _trace("bazaar-model-server", args)

    import socket

    import uvicorn

    from models.limits import ModelLimits, cpu_count
    from models.repository import ModelRepository
    from models.server import GrpcListener, create_app
    from models.store import ModelStore
    from protocol.edge import uvicorn_options
    from protocol.metrics import process_registry

    names, pinned = _pinned_models(args.models)
    repository = ModelRepository(args.model_repository, pinned)
    limits = ModelLimits(
        max_batch_size=args.max_override_batch_size,
        max_threads=args.max_override_threads or cpu_count(),
        max_instances=args.max_override_instances,
        max_models=args.max_models,
    )
    store = ModelStore(repository, names, args.device, limits, args.memory_budget)
    edge = _edge_limits(args)
    grpc = GrpcListener(args.host, args.grpc_port, edge) if args.grpc_port else None
    app = create_app(
        store,
        process_registry("pod"),
        args.control_port,
        args.enable_model_control,
        control_keys,
        grpc,
        edge.max_infer_body_bytes,
    )
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    ports = [args.port] if args.control_port is None else [args.port, args.control_port]
    sockets = [socket.create_server((args.host, port), family=family) for port in ports]
    log.info(
        "model server for %s on %s",
        repository.root,
        " and ".join(f"http://{args.host}:{port}" for port in ports),
    )
    _freeze_startup_objects()
    # SIGTERM: uvicorn stops accepting and finishes the batches in flight (a pod call lasts
    # at most the gateway's call timeout, 60 s), then the process exits.
    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        log_config=None,
        access_log=args.access_log,
        timeout_graceful_shutdown=60,
        **uvicorn_options(edge),
    )
    uvicorn.Server(config).run(sockets=sockets)
    return 0


def _control_keys(args: argparse.Namespace) -> KeyFile | None:
    """The control token's key file; none where model control is off, or on loopback only
    and no token was given (``ConfigError`` off loopback: anyone could load and unload)."""
    from protocol.auth import CONTROL, KeyFile, parse_token_file

    if not args.enable_model_control:
        if args.control_token_file is not None:
            raise ConfigError("--control-token-file", None, "goes with --enable-model-control")
        return None
    if args.control_token_file is None:
        if not _loopback(args.host):
            raise ConfigError(
                "--enable-model-control",
                None,
                f"on {args.host}, not a loopback address, needs --control-token-file: without "
                "it anyone who reaches the port may load and unload models",
            )
        return None
    return KeyFile(args.control_token_file, parse_token_file(CONTROL, "control"))


def _fetch(args: argparse.Namespace) -> int:
    from models.fetch import fetch_repository

    try:
        fetch_repository(args.url, args.sha256, args.directory)
    except ConfigError as exc:
        log.error("%s", exc)
        return 1
    print(f"fetched {args.url} into {args.directory}")
    return 0


def _build_demo(args: argparse.Namespace) -> int:
    if problem := missing_extra("bazaar models build-demo", "demo", DEMO_EXTRA):
        log.error("%s", problem)
        return 2
    from models.demo import build_demo_repository

    names = build_demo_repository(args.directory, args.model_version)
    built = f"{', '.join(names)} (version {args.model_version})"
    print(f"built demo repository {args.directory}: {built}")
    return 0
