"""A model's traffic policy: how the requests that name no version are shared among its
versions::

    traffic:
      weights: {"1": 90, "2": 10}   # version: relative weight (>= 0, one at least > 0)
      sticky_header: x-user-id      # optional: the hash of this header's value picks
      shadow:                       # optional: also send a share of requests to a candidate
        version: "3"                #   whose answers are only compared, never returned
        share: 0.1                  #   of the requests other versions serve, 0..1
        compare: top1               #   top1 (classifiers: same argmax per row) or close
        atol: 1.0e-5                #   close: |candidate - primary| <= atol + rtol * |primary|
        rtol: 1.0e-3
      rollout:                      # optional: move unversioned traffic to a candidate in steps
        version: "2"
        steps: [1, 10, 50, 100]     #   its percent at each step
        step_s: 300                 #   a step lasts at least this long ...
        min_requests: 100           #   ... and until the candidate answered this many
        max_p99_ms: 250             #   bounds on the candidate within the step; any passed:
        max_error_rate: 0.01        #   rolled back to 0 %, the reason logged and exported
        min_agreement: 0.99         #   (with a shadow to the candidate)

The same mapping is read from a model's ``config.yaml`` (the pods serve it in their config),
from the model's entry in the gateway's endpoints file, and as JSON in the model Service's
``bazaar.dev/traffic`` annotation; each replaces the one before it whole, in that order.
``parse_traffic`` validates it once, where it enters, and raises ``ConfigError`` naming the
key and the bad value.

``choose_version`` is the decision, a pure function: a point in [0, 1), from the hash of the
request's sticky key or else a random draw, falls in one version's share of the line
(``Split``). Versions are laid out in ascending order, so a request with a sticky key lands
on one version while the weights stay, and raising a newer version's weight only moves keys
towards it (a rollout never sends a client back and forth). Versions the gateway does not
serve are left out and the others' shares grow to fill the line; a policy that leaves no
version with weight routes nothing (``split_of`` is None: the default version serves).
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from protocol.errors import ConfigError

KEYS = ("weights", "sticky_header", "shadow", "rollout")
ROLLOUT_KEYS = (
    "version",
    "steps",
    "step_s",
    "min_requests",
    "max_p99_ms",
    "max_error_rate",
    "min_agreement",
)
SHADOW_KEYS = ("version", "share", "compare", "atol", "rtol")
COMPARISONS = ("close", "top1")


def version_order(version: str) -> tuple[int, int, str]:
    """Sort key of versions: numbers by value, then other names (a server's own) by text."""
    return (0, int(version), "") if version.isdecimal() else (1, 0, version)


@dataclass(frozen=True, slots=True)
class ShadowPolicy:
    """A candidate version that also gets a share of the requests, only to be compared."""

    version: str
    share: float
    """Of the requests another version serves, the fraction also sent to the candidate."""
    compare: str = "close"
    """``top1``: rows agree when the candidate's largest output is at the primary's (the
    last axis, per output); ``close``: when every element is within ``atol + rtol * |primary|``."""
    atol: float = 1e-5
    rtol: float = 1e-3

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "share": self.share,
            "compare": self.compare,
            "atol": self.atol,
            "rtol": self.rtol,
        }


@dataclass(frozen=True, slots=True)
class RolloutPolicy:
    """Steps of a candidate version's share of unversioned requests, each advanced only while
    the candidate stays within the bounds (``gateway.rollout``)."""

    version: str
    steps: tuple[float, ...]
    """The candidate's percent at each step, ascending, the last 100."""
    step_s: float = 300.0
    min_requests: int = 100
    """Candidate requests a step needs before it is judged: fewer say nothing."""
    max_p99_ms: float | None = None
    max_error_rate: float | None = None
    """Of the candidate's requests in the step, the fraction answered 5xx."""
    min_agreement: float | None = None
    """Of the rows shadowed to the candidate in the step, the fraction that agreed."""

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": self.version,
            "steps": list(self.steps),
            "step_s": self.step_s,
            "min_requests": self.min_requests,
        }
        for key in ("max_p99_ms", "max_error_rate", "min_agreement"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return data


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """How a model's unversioned requests are shared among its versions."""

    weights: tuple[tuple[str, float], ...]
    """(version, relative weight), in version order; no weight below 0, one at least above."""
    sticky_header: str | None = None
    """A header (lower case) whose value's hash picks the version, so a client that sends the
    same value always gets the same version; None, or a request without it: a random draw."""
    shadow: ShadowPolicy | None = None
    rollout: RolloutPolicy | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"weights": dict(self.weights)}
        if self.sticky_header is not None:
            data["sticky_header"] = self.sticky_header
        if self.shadow is not None:
            data["shadow"] = self.shadow.to_json()
        if self.rollout is not None:
            data["rollout"] = self.rollout.to_json()
        return data


def parse_traffic(value: object, where: str, key: str = "traffic") -> TrafficPolicy:
    """``value`` (a parsed mapping) as a policy; ``ConfigError`` at ``where``/``key``."""
    if not isinstance(value, Mapping) or not set(value) <= set(KEYS):
        raise ConfigError(
            where, key, f"must be a mapping with {' and '.join(KEYS)}, got {value!r:.200}"
        )
    weights = value.get("weights")
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError(
            where, f"{key}.weights", f"must map versions to weights, got {weights!r:.200}"
        )
    parsed = []
    for version, weight in weights.items():
        if (
            not isinstance(weight, int | float)
            or isinstance(weight, bool)
            or not 0 <= weight < float("inf")
        ):
            raise ConfigError(
                where, f"{key}.weights.{version}", f"must be a number >= 0, got {weight!r}"
            )
        parsed.append((str(version), float(weight)))
    if not any(weight > 0 for _, weight in parsed):
        raise ConfigError(where, f"{key}.weights", "must give one version a weight above 0")
    header = value.get("sticky_header")
    if header is not None and (not isinstance(header, str) or not header.strip()):
        raise ConfigError(
            where, f"{key}.sticky_header", f"must be a header name, got {header!r:.200}"
        )
    shadow = value.get("shadow")
    rollout = value.get("rollout")
    return TrafficPolicy(
        tuple(sorted(parsed, key=lambda pair: version_order(pair[0]))),
        header.strip().lower() if header is not None else None,
        _shadow(shadow, where, f"{key}.shadow") if shadow is not None else None,
        _rollout(rollout, where, f"{key}.rollout") if rollout is not None else None,
    )


def _rollout(value: object, where: str, key: str) -> RolloutPolicy:
    if not isinstance(value, Mapping) or not set(value) <= set(ROLLOUT_KEYS):
        raise ConfigError(
            where, key, f"must be a mapping of {', '.join(ROLLOUT_KEYS)}, got {value!r:.200}"
        )
    if "version" not in value or isinstance(value["version"], bool | Mapping | list):
        raise ConfigError(where, f"{key}.version", "must name the candidate version")
    steps = value.get("steps")
    if (
        not isinstance(steps, list)
        or not steps
        or not all(_number(step) and 0 < step <= 100 for step in steps)
        or steps != sorted(set(steps))
        or steps[-1] != 100
    ):
        raise ConfigError(
            where,
            f"{key}.steps",
            f"must be ascending percents above 0, the last 100, got {steps!r:.200}",
        )
    bounds: dict[str, float | None] = {}
    for name, upper in (
        ("step_s", None),
        ("max_p99_ms", None),
        ("max_error_rate", 1.0),
        ("min_agreement", 1.0),
    ):
        number = value.get(name)
        if number is not None and (
            not _number(number) or not 0 <= number <= (upper or float("inf"))
        ):
            raise ConfigError(where, f"{key}.{name}", f"must be a number >= 0, got {number!r}")
        bounds[name] = float(number) if number is not None else None
    min_requests = value.get("min_requests", 100)
    if not isinstance(min_requests, int) or isinstance(min_requests, bool) or min_requests < 1:
        raise ConfigError(
            where, f"{key}.min_requests", f"must be an integer >= 1, got {min_requests!r}"
        )
    return RolloutPolicy(
        str(value["version"]),
        tuple(float(step) for step in steps),
        bounds["step_s"] if bounds["step_s"] is not None else 300.0,
        min_requests,
        bounds["max_p99_ms"],
        bounds["max_error_rate"],
        bounds["min_agreement"],
    )


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value < float("inf")


def _shadow(value: object, where: str, key: str) -> ShadowPolicy:
    if not isinstance(value, Mapping) or not set(value) <= set(SHADOW_KEYS):
        raise ConfigError(
            where, key, f"must be a mapping of {', '.join(SHADOW_KEYS)}, got {value!r:.200}"
        )
    if "version" not in value or isinstance(value["version"], bool | Mapping | list):
        raise ConfigError(where, f"{key}.version", "must name the candidate version")
    numbers = {}
    for name, default, upper in (("share", None, 1.0), ("atol", 1e-5, None), ("rtol", 1e-3, None)):
        number = value.get(name, default)
        if (
            not isinstance(number, int | float)
            or isinstance(number, bool)
            or not 0 <= number <= (upper if upper is not None else float("inf"))
            or number == float("inf")
        ):
            bound = f"between 0 and {upper:g}" if upper is not None else ">= 0"
            raise ConfigError(where, f"{key}.{name}", f"must be a number {bound}, got {number!r}")
        numbers[name] = float(number)
    compare = value.get("compare", "close")
    if compare not in COMPARISONS:
        raise ConfigError(
            where, f"{key}.compare", f"must be one of {', '.join(COMPARISONS)}, got {compare!r}"
        )
    return ShadowPolicy(
        str(value["version"]), numbers["share"], compare, numbers["atol"], numbers["rtol"]
    )


@dataclass(frozen=True, slots=True)
class Split:
    """A policy laid out on [0, 1) over the versions served: the hot path's form of it."""

    versions: tuple[str, ...]
    bounds: tuple[float, ...]
    """Where each version's share ends; the last is 1.0."""
    header: bytes | None
    """The sticky header's name, as the transport's headers hold it."""


def split_of(policy: TrafficPolicy, served: Collection[str]) -> Split | None:
    """``policy`` over the versions in ``served``; None when no served version has weight."""
    shares = [(version, weight) for version, weight in policy.weights if version in served]
    total = sum(weight for _, weight in shares)
    if total <= 0:
        return None
    bounds = []
    reached = 0.0
    for _, weight in shares:
        reached += weight
        bounds.append(reached / total)
    bounds[-1] = 1.0
    header = policy.sticky_header.encode() if policy.sticky_header is not None else None
    return Split(tuple(version for version, _ in shares), tuple(bounds), header)


def choose_version(split: Split, key: bytes | None, rng: random.Random) -> str:
    """The version a request goes to: by the hash of its sticky ``key``, else at random."""
    point = _hash_point(key) if key is not None else rng.random()
    return split.versions[bisect.bisect_right(split.bounds, point)]


def _hash_point(key: bytes) -> float:
    """A key's place in [0, 1): the same on every gateway and across restarts."""
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
