"""The names the benchmark knows: its built-in traces and its policies.

Standard library only (plain tuples), so that the command can offer them in ``--help`` without
importing numpy; :mod:`.traces` and :mod:`.benchmark` hold what each name means.
"""

from __future__ import annotations

TRACES = (
    "step",
    "diurnal",
    "bursty",
    "flash",
    "sparse",
    "heavy-tail",
    "ramp",
    "drop",
    "weekly",
)
"""Built-in traces, in the order the benchmark runs them."""

POLICIES = ("bazaar", "bazaar-keda", "hpa", "keda", "kpa", "ray", "static-peak", "oracle")
"""bazaar's policy (on its own, and through KEDA's external scaler), the baselines and the two
references, in the order of the table."""
