"""The gateway's own settings, and how a model's batching policy is read from its pod."""

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


def batch_policy(config: Mapping[str, Any], gateway: GatewayConfig) -> BatchPolicy:
    """A model's ``BatchPolicy`` from its pod's ``GET /v2/models/{m}/config``.

    Reads bazaar's config (``dynamic_batching.max_queue_delay_ms`` ...) and Triton's
    (``preferred_batch_size``, ``max_queue_delay_microseconds``), so the gateway can front
    either. Absent knobs take the defaults: work-conserving, one priority level.
    """
    batching = config.get("dynamic_batching") or {}
    max_batch_size = int(config.get("max_batch_size", 0))
    if "max_queue_delay_ms" in batching:
        delay_s = float(batching["max_queue_delay_ms"]) / 1000
    else:
        delay_s = float(batching.get("max_queue_delay_microseconds", 0)) / 1_000_000
    preferred = batching.get("preferred_batch_sizes", batching.get("preferred_batch_size", []))
    default_timeout_ms = float(batching.get("default_timeout_ms", 0))
    levels = int(batching.get("priority_levels", 0)) or 1
    return BatchPolicy(
        max_batch_size=max_batch_size,
        max_queue_delay_s=delay_s,
        preferred_batch_sizes=tuple(sorted(int(p) for p in preferred if int(p) <= max_batch_size)),
        max_queue_size=int(batching.get("max_queue_size", 0)) or DEFAULT_MAX_QUEUE_SIZE,
        default_timeout_s=default_timeout_ms / 1000 if default_timeout_ms else None,
        priority_levels=levels,
        default_priority_level=int(batching.get("default_priority_level", 0)) or (levels + 1) // 2,
        max_queue_time_s=gateway.max_queue_time_s,
    )


def load_static_endpoints(path: Path) -> dict[str, list[str]]:
    """The static endpoint file: ``models: {name: [url, ...]}``."""
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
    endpoints: dict[str, list[str]] = {}
    for model, urls in data["models"].items():
        key = f"models.{model}"
        if not isinstance(urls, list) or not urls:
            raise ConfigError(where, key, f"must be a non-empty list of URLs, got {urls!r}")
        for url in urls:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ConfigError(where, key, f"{url!r} is not an http(s) URL")
        endpoints[str(model)] = [url.rstrip("/") for url in urls]
    return endpoints
