"""Tenants: who a request is from, how much each may use, and each one's share of a queue.

A tenant is the name an API key maps to (``protocol.auth``); without authentication every
request is from the anonymous tenant. Each tenant has, from the tenants file
(``--tenants``), or the file's ``default`` for one it does not list:

- a request rate, a token bucket (``requests_per_second`` refilled, up to ``burst`` held),
  checked before the body is decoded: past it, 429 with ``Retry-After`` the time until the
  next token;
- a cap on concurrent rows, the rows of its requests admitted and not yet answered, across
  every model: checked before the body is decoded against the rows it already has in flight,
  and after, with the request's own (429);
- a weight, its share of each model's queue when tenants compete for it: the dispatcher
  queues fairly between tenants within a priority level (``gateway.dispatcher``).

0 means no limit, and no file means none at all, so a gateway without tenants pays a dict
lookup per request for them. Quotas hold per gateway process: N replicas admit N times a
tenant's rate, as every local limiter does (a global one needs shared state).

The file (YAML)::

    default:                      # tenants not listed, and the anonymous one
      requests_per_second: 0
    tenants:
      team-a: {requests_per_second: 200, burst: 400, max_concurrent_rows: 2048, weight: 2}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from protocol.errors import ConfigError, QuotaExceeded

ANONYMOUS = "anonymous"
"""The tenant of requests that carry no identity (authentication off)."""


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    requests_per_second: float = 0.0
    """Sustained request rate (0: no limit)."""
    burst: float = 0.0
    """Requests that may arrive at once above the rate (0: one second's worth, at least 1)."""
    max_concurrent_rows: int = 0
    """Rows admitted and not yet answered, across models (0: no limit)."""
    weight: float = 1.0
    """Share of a queue against other tenants' (> 0)."""

    def __post_init__(self) -> None:
        for name in ("requests_per_second", "burst", "max_concurrent_rows"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError("tenant policy", name, f"must be a number >= 0, got {value!r}")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError("tenant policy", "weight", f"must be > 0, got {self.weight!r}")


@dataclass(slots=True, eq=False)
class Tenant:
    """One tenant's policy and what it is using now."""

    name: str
    policy: TenantPolicy
    tokens: float = 0.0
    refilled: float | None = None
    rows_in_flight: int = 0

    def __post_init__(self) -> None:
        self.tokens = self._burst()

    def admit(self, now: float) -> None:
        """Take a request's token and check its rows in flight; ``QuotaExceeded`` if not."""
        policy = self.policy
        if policy.max_concurrent_rows and self.rows_in_flight >= policy.max_concurrent_rows:
            raise QuotaExceeded(
                f"tenant '{self.name}' has {self.rows_in_flight} rows in flight, its limit "
                f"(max_concurrent_rows {policy.max_concurrent_rows})",
                "rows",
                1.0,
            )
        rate = policy.requests_per_second
        if not rate:
            return
        if self.refilled is not None:
            self.tokens = min(self._burst(), self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        if self.tokens < 1 - 1e-9:  # a whole token, up to the clock's rounding
            raise QuotaExceeded(
                f"tenant '{self.name}' is over its request rate of {rate:g}/s",
                "rate",
                max(0.0, 1 - self.tokens) / rate,
            )
        self.tokens -= 1

    def take_rows(self, rows: int) -> None:
        """Count a decoded request's rows in flight; ``QuotaExceeded`` if they do not fit."""
        limit = self.policy.max_concurrent_rows
        if limit and self.rows_in_flight + rows > limit:
            raise QuotaExceeded(
                f"tenant '{self.name}' has {self.rows_in_flight} rows in flight; {rows} more "
                f"would pass its limit (max_concurrent_rows {limit})",
                "rows",
                1.0,
            )
        self.rows_in_flight += rows

    def release_rows(self, rows: int) -> None:
        self.rows_in_flight -= rows

    def _burst(self) -> float:
        policy = self.policy
        return policy.burst or max(1.0, policy.requests_per_second)


@dataclass(frozen=True, slots=True)
class TenantPolicies:
    """Every tenant's policy: the file's (``load_tenants``), or no limits at all."""

    default: TenantPolicy = field(default_factory=TenantPolicy)
    tenants: Mapping[str, TenantPolicy] = field(default_factory=dict)


class Tenants:
    """The tenants a gateway has seen, each made on its first request."""

    def __init__(self, policies: TenantPolicies) -> None:
        self.policies = policies
        self._tenants: dict[str | None, Tenant] = {}

    def get(self, name: str | None) -> Tenant:
        """The tenant named by a request's credentials (None: anonymous)."""
        tenant = self._tenants.get(name)
        if tenant is None:
            shown = name or ANONYMOUS
            policies = self.policies
            tenant = Tenant(shown, policies.tenants.get(shown, policies.default))
            self._tenants[name] = tenant
        return tenant


ANONYMOUS_TENANT = Tenant(ANONYMOUS, TenantPolicy())
"""The tenant of a request submitted without one (the dispatcher's tests and tools)."""


def load_tenants(path: Path) -> TenantPolicies:
    """The tenants file (see the module's docstring); ``ConfigError`` names what is wrong."""
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(where, None, f"cannot read: {exc}") from None
    if not isinstance(data, dict) or not set(data) <= {"default", "tenants"}:
        raise ConfigError(where, None, "must be a mapping with the keys 'default' and 'tenants'")
    tenants = data.get("tenants") or {}
    if not isinstance(tenants, dict):
        raise ConfigError(where, "tenants", "must be a mapping of tenant name to policy")
    return TenantPolicies(
        default=_policy(where, "default", data.get("default") or {}),
        tenants={str(name): _policy(where, f"tenants.{name}", p) for name, p in tenants.items()},
    )


def _policy(where: str, key: str, data: Any) -> TenantPolicy:
    known = {f.name for f in fields(TenantPolicy)}
    if not isinstance(data, dict) or not set(data) <= known:
        raise ConfigError(where, key, f"must be a mapping with keys among {sorted(known)}")
    try:
        numbers = {name: float(value) for name, value in data.items()}
        rows = numbers.pop("max_concurrent_rows", 0.0)
        if rows != int(rows):
            raise ValueError(f"max_concurrent_rows must be a whole number, got {rows:g}")
        return TenantPolicy(**numbers, max_concurrent_rows=int(rows))
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(where, key, f"must hold numbers: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(where, f"{key}.{exc.key}", str(exc).rsplit(": ", 1)[-1]) from None
