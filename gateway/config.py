"""The gateway's own settings, how a model's batching policy is read from its pod, and the
static endpoints file.

The endpoints file (``bazaar gateway --endpoints FILE``) lists each model's endpoints, any
v2 servers; a model may also say how the gateway treats it::

    models:
      digits: [http://10.0.0.5:8000, http://10.0.0.6:8000]   # a list of URLs, or:
      sentiment:
        endpoints: [http://10.0.0.7:8080]
        max_batch_size: 8     # rows per batch, instead of what the upstream says
        validate: false       # pass requests through as sent, unbatched
      fraud:
        endpoints:            # an endpoint with its gRPC address gets batches over gRPC
          - {url: http://10.0.0.8:8000, grpc: 10.0.0.8:9000}
          - http://10.0.0.9:8000
        traffic:              # shares of unversioned requests (protocol.traffic)
          weights: {"1": 90, "2": 10}
          sticky_header: x-user-id

``max_batch_size`` is for upstreams that do not say theirs (MLServer has no ``/config``):
without it the gateway takes the upstream's config, else its metadata's
``parameters.max_batch_size``, else 0 (one request per call). ``validate: false`` is for
upstreams whose metadata does not describe their tensors truthfully: the gateway forwards
each request's body as sent (``gateway.passthrough``), as it does for a model whose
metadata declares no tensors; such a model never batches, so it takes no ``max_batch_size``.
An endpoint given as ``{url, grpc}`` is sent its batches over gRPC at ``grpc`` (``host:port``,
its ``bazaar model-server --grpc-port``: ``gateway.grpc_client``), everything else over HTTP
at ``url``; a plain URL is sent everything over binary HTTP. ``traffic`` replaces the
traffic policy of the model's own config; the gateway re-reads the file when it changes
(``gateway.discovery.StaticEndpoints``), and a new policy or new endpoints apply at once,
without a restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.dispatcher import DEFAULT_MAX_QUEUE_SIZE, BatchPolicy
from gateway.tenants import TenantPolicies
from protocol.errors import ConfigError
from protocol.limits import EdgeLimits
from protocol.traffic import TrafficPolicy, parse_traffic


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """What the endpoints file says of one model beyond its endpoints."""

    validate: bool = True
    """False: requests pass through to an endpoint as sent, unvalidated and unbatched."""
    max_batch_size: int | None = None
    """Rows per batch; None = the upstream's (its config's, else its metadata's, else 0)."""


DEFAULT_MODEL_SETTINGS = ModelSettings()


@dataclass(frozen=True, slots=True)
class StaticModel:
    """One model of the endpoints file."""

    endpoints: list[str]
    settings: ModelSettings
    traffic: TrafficPolicy | None = None
    """Its traffic policy, replacing its config's; None: the config's applies."""
    grpc_targets: dict[str, str] = field(default_factory=dict)
    """Endpoint URL -> the gRPC ``host:port`` its batches go to, for those that have one."""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    max_batches_per_endpoint: int = 2
    """Batches in flight per endpoint: 2 keeps a pod busy while the next batch travels."""
    call_timeout_s: float = 60.0
    """Longest wait for a pod's answer to one batch before it counts as failed."""
    max_queue_time_s: float = 30.0
    """No request waits in the queue longer than this, whatever its timeout (then 504)."""
    drain_timeout_s: float = 95.0
    """On SIGTERM, the longest the gateway waits for the requests in flight before it stops:
    a request lives at most the queue time and a pod call (90 s by default). Kubernetes'
    terminationGracePeriodSeconds must exceed it, plus the preStop wait."""
    tenants: TenantPolicies = field(default_factory=TenantPolicies)
    """Each tenant's request rate, rows in flight and queue weight (``gateway.tenants``)."""
    edge: EdgeLimits = field(default_factory=EdgeLimits)
    """What a client may send and how slowly: header, URL and body sizes, read and idle
    timeouts, the connection and concurrent request caps (``protocol.limits``)."""
    models: Mapping[str, ModelSettings] = field(default_factory=dict)
    """Per model, what the endpoints file says of it (``ModelSettings``); default for others."""


def batch_policy(config: Mapping[str, Any], gateway: GatewayConfig) -> BatchPolicy:
    """A model's ``BatchPolicy`` from its pod's ``GET /v2/models/{m}/config``.

    Reads bazaar's config (``dynamic_batching.max_queue_delay_ms`` ...) and Triton's
    (``preferred_batch_size``, ``max_queue_delay_microseconds``, ``default_queue_policy``),
    so the gateway can front either, or another gateway (``protocol.modelconfig``). Absent
    knobs take the defaults: work-conserving, one priority level.
    """
    batching = config.get("dynamic_batching") or {}
    max_batch_size = int(config.get("max_batch_size", 0))
    if "max_queue_delay_ms" in batching:
        delay_s = float(batching["max_queue_delay_ms"]) / 1000
    else:
        delay_s = float(batching.get("max_queue_delay_microseconds", 0)) / 1_000_000
    preferred = batching.get("preferred_batch_sizes", batching.get("preferred_batch_size", []))
    queue_policy = batching.get("default_queue_policy") or {}  # Triton's (and a gateway's)
    default_timeout_ms = float(
        batching.get(
            "default_timeout_ms", float(queue_policy.get("default_timeout_microseconds", 0)) / 1000
        )
    )
    max_queue_size = int(batching.get("max_queue_size", queue_policy.get("max_queue_size", 0)))
    levels = int(batching.get("priority_levels", 0)) or 1
    return BatchPolicy(
        max_batch_size=max_batch_size,
        max_queue_delay_s=delay_s,
        preferred_batch_sizes=tuple(sorted(int(p) for p in preferred if int(p) <= max_batch_size)),
        max_queue_size=max_queue_size or DEFAULT_MAX_QUEUE_SIZE,
        default_timeout_s=default_timeout_ms / 1000 if default_timeout_ms else None,
        priority_levels=levels,
        default_priority_level=int(batching.get("default_priority_level", 0)) or (levels + 1) // 2,
        max_queue_time_s=gateway.max_queue_time_s,
        max_batch_bytes=gateway.edge.max_infer_body_bytes,
    )


def load_static_endpoints(path: Path) -> dict[str, StaticModel]:
    """The static endpoints file (see the module's docstring); ``ConfigError`` naming the
    model and key on any fault."""
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(where, None, f"cannot read: {exc}") from None
    if (
        not isinstance(data, dict)
        or set(data) != {"models"}
        or not isinstance(data["models"], dict)
    ):
        raise ConfigError(where, None, "must be a mapping with one key, 'models'")
    return {
        str(model): _static_model(where, f"models.{model}", entry)
        for model, entry in data["models"].items()
    }


def _static_model(where: str, key: str, entry: object) -> StaticModel:
    if isinstance(entry, list):
        urls, grpc_targets = _endpoints(where, key, entry)
        return StaticModel(urls, DEFAULT_MODEL_SETTINGS, grpc_targets=grpc_targets)
    if not isinstance(entry, dict):
        raise ConfigError(
            where,
            key,
            f"must be a list of URLs or a mapping with 'endpoints', got {entry!r}",
        )
    unknown = set(entry) - {"endpoints", "max_batch_size", "validate", "traffic"}
    if unknown:
        raise ConfigError(
            where,
            key,
            f"unknown key(s) {', '.join(sorted(map(str, unknown)))}: "
            "expected endpoints, max_batch_size, validate, traffic",
        )
    if "endpoints" not in entry:
        raise ConfigError(where, key, "has no 'endpoints'")
    validate = entry.get("validate", True)
    if not isinstance(validate, bool):
        raise ConfigError(where, f"{key}.validate", f"must be true or false, got {validate!r}")
    max_batch_size = entry.get("max_batch_size")
    if max_batch_size is not None and (
        not isinstance(max_batch_size, int)
        or isinstance(max_batch_size, bool)
        or max_batch_size < 0
    ):
        raise ConfigError(
            where, f"{key}.max_batch_size", f"must be an integer >= 0, got {max_batch_size!r}"
        )
    if not validate and max_batch_size:
        raise ConfigError(
            where,
            f"{key}.max_batch_size",
            "an unvalidated model (validate: false) is passed through unbatched; "
            "batching needs its tensors validated",
        )
    urls, grpc_targets = _endpoints(where, f"{key}.endpoints", entry["endpoints"])
    traffic = None
    if "traffic" in entry:
        traffic = parse_traffic(entry["traffic"], where, f"{key}.traffic")
    return StaticModel(urls, ModelSettings(validate, max_batch_size), traffic, grpc_targets)


def _endpoints(where: str, key: str, items: object) -> tuple[list[str], dict[str, str]]:
    """The URLs of a model's endpoints, and the gRPC address of those that give one."""
    if not isinstance(items, list) or not items:
        raise ConfigError(where, key, f"must be a non-empty list of URLs, got {items!r}")
    urls: list[str] = []
    grpc_targets: dict[str, str] = {}
    for item in items:
        grpc_target = None
        if isinstance(item, dict):
            if set(item) != {"url", "grpc"}:
                raise ConfigError(where, key, f"{item!r}: an endpoint mapping has url and grpc")
            item, grpc_target = item["url"], item["grpc"]
            host, _, port = str(grpc_target).rpartition(":")
            if not isinstance(grpc_target, str) or not host or not port.isdigit():
                raise ConfigError(where, key, f"grpc {grpc_target!r} is not a host:port")
        if not isinstance(item, str) or not item.startswith(("http://", "https://")):
            raise ConfigError(where, key, f"{item!r} is not an http(s) URL")
        urls.append(item.rstrip("/"))
        if grpc_target is not None:
            grpc_targets[urls[-1]] = grpc_target
    return urls, grpc_targets
