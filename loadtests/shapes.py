"""The load scenarios, as pure functions of elapsed time.

Closed-loop scenarios say how many users run at each moment; each user sends its next request
when the last one is answered, so a slow server slows the offered load down with it (and
hides queueing). The open-loop scenarios say when requests arrive, whatever the server does:
``open`` at a constant rate, ``trace`` at the due times of a schedule (a workload trace's
arrivals, from ``bazaar loadtest --trace``); their users only keep the schedule (see
``loadtests/locustfile.py``).

``users_at`` is what the locustfile's load shape returns every second; the scenario ends (None)
when its duration is over. Stdlib only, for the same reason as ``loadtests.payloads``.
"""

from __future__ import annotations

import math

SCENARIOS = {
    "steady": "the peak number of users for the whole run",
    "ramp": "users grow linearly from 1 to the peak over the run",
    "spike": "a fifth of the peak, the full peak for the middle fifth of the run, then back",
    "step": "the peak in five equal steps, each a fifth of the run (watch the autoscaler)",
    "open": "open loop: a constant arrival rate, sent on schedule whatever the latency",
    "trace": "open loop: each request at its due time in --schedule (bazaar loadtest --trace)",
}
OPEN_LOOP = "open"
TRACE = "trace"
STEPS = 5


def users_at(scenario: str, elapsed_s: float, duration_s: float, peak_users: int) -> int | None:
    """Users that should run ``elapsed_s`` into a ``scenario``; None once it is over.

    For the open-loop scenarios these are the schedule keepers, which share the arrivals.
    """
    if elapsed_s >= duration_s:
        return None
    progress = elapsed_s / duration_s
    if scenario in ("steady", OPEN_LOOP, TRACE):
        return peak_users
    if scenario == "ramp":
        return max(1, math.ceil(peak_users * progress))
    if scenario == "spike":
        base = max(1, peak_users // 5)
        return peak_users if 0.4 <= progress < 0.6 else base
    if scenario == "step":
        step = min(STEPS, int(progress * STEPS) + 1)
        return max(1, math.ceil(peak_users * step / STEPS))
    raise ValueError(f"unknown scenario '{scenario}', expected one of {', '.join(SCENARIOS)}")
