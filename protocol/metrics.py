"""What every bazaar process exports whatever it does: one registry per process to start from.

Each process (gateway, pod, autoscaler) declares its own metrics on a ``CollectorRegistry``
it owns, never on prometheus-client's global one, so tests can build as many as they like.
``process_registry`` makes that registry with the standard collectors Prometheus users look
for on every target (``process_*``: CPU, memory, file descriptors, start time; ``python_*``:
the interpreter and its garbage collector) and ``bazaar_build_info``, always 1, whose labels
say what runs (version, Python, component), so a dashboard can join on it and a rollout
shows as two versions at once.

It also turns off the ``_created`` series prometheus-client adds to every counter and
histogram: in the text format they are one more series per child, holding a timestamp no
query here uses (Prometheus detects counter resets without it). The switch is global to the
process and read at scrape time, so setting it when the process builds its registry, before
anything is scraped, covers every metric the process has.
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from protocol import __version__

COMPONENTS = ("gateway", "pod", "autoscaler")
"""The ``component`` label of ``bazaar_build_info``: which of bazaar's processes this is."""


def process_registry(component: str) -> CollectorRegistry:
    """A new registry for one process's metrics, with the process collectors and build info."""
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    Gauge(
        "bazaar_build_info",
        "Always 1; the labels say which bazaar runs: its version, the Python version and "
        "which process this is (gateway, pod, autoscaler).",
        ["version", "python", "component"],
        registry=registry,
    ).labels(__version__, platform.python_version(), component).set(1)
    return registry


OUTCOMES = (
    "success",
    "client_error",
    "rate_limited",
    "shed",
    "expired",
    "server_error",
    "cancelled",
)
"""The ``outcome`` label of the gateway's and the pods' request counters, one set for both.

Named for what happened rather than the status, so each ratio an operator alerts on is one
value over the sum: ``shed`` (503: refused for capacity, or no ready endpoint), ``expired``
(504: the deadline passed before an answer), ``rate_limited`` (429: the tenant's quota, the
caller's doing and not a capacity signal), ``server_error`` (other 5xx), ``client_error``
(other 4xx) and ``cancelled`` (the caller went away first; nothing was answered)."""

CANCELLED = 0
"""The status of a request whose caller went away before its answer (no answer is sent)."""


def outcome_of(status: int) -> str:
    """The ``outcome`` of a request answered ``status`` (``CANCELLED``: never answered)."""
    if status == CANCELLED:
        return "cancelled"
    if 200 <= status < 300:
        return "success"
    if status == 429:
        return "rate_limited"
    if status == 503:
        return "shed"
    if status == 504:
        return "expired"
    return "client_error" if status < 500 else "server_error"
