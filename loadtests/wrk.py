"""Closed-loop load with wrk, pinned to its own core, and the parsing of what it prints.

``run_wrk`` runs ``taskset -c CORE wrk -t1 -cN -dDs --latency -s SCRIPT URL`` with the body
file named in the environment (see ``loadtests/wrk/*.lua``) and reads back requests per
second, p50 and p99 latency and the error counts. A point with any non-2xx answer or socket
error is invalid: ``parse_wrk`` raises ``BenchError`` rather than report it.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = Path(__file__).parent / "wrk"

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_PERCENTILE = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_TOTAL = re.compile(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.M)
_NON_2XX = re.compile(r"^\s+Non-2xx or 3xx responses:\s+(\d+)", re.M)
_SOCKET = re.compile(
    r"^\s+Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.M
)


class BenchError(RuntimeError):
    """The benchmark cannot give a valid number (errors under load, a server that won't start)."""


@dataclass(frozen=True, slots=True)
class Body:
    """A request body on disk and how to send it."""

    path: Path
    header_length: int | None
    """The JSON header's length for a binary-tensor body; None for a JSON body."""

    @property
    def script(self) -> Path:
        return SCRIPTS / ("json.lua" if self.header_length is None else "binary.lua")


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float


def run_wrk(url: str, body: Body, connections: int, duration_s: float, core: int) -> WrkResult:
    """One closed-loop point; ``BenchError`` if wrk fails or saw any error."""
    env = {**os.environ, "BENCH_BODY": str(body.path)}
    if body.header_length is not None:
        env["BENCH_HEADER_LENGTH"] = str(body.header_length)
    command = [
        "taskset", "-c", str(core),
        "wrk", "-t1", f"-c{connections}", f"-d{duration_s:g}s", "--latency",
        "-s", str(body.script), url,
    ]  # fmt: skip
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=duration_s + 60, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()}")
    return parse_wrk(done.stdout)


def parse_wrk(output: str) -> WrkResult:
    """The numbers of one ``wrk --latency`` run; ``BenchError`` on errors or missing lines."""
    non_2xx = _NON_2XX.search(output)
    if non_2xx is not None and int(non_2xx.group(1)):
        raise BenchError(f"{non_2xx.group(1)} non-2xx responses: the point is invalid\n{output}")
    socket = _SOCKET.search(output)
    if socket is not None and any(int(count) for count in socket.groups()):
        raise BenchError(f"socket errors: the point is invalid\n{output}")
    rate = _RATE.search(output)
    total = _TOTAL.search(output)
    percentiles = {
        match.group(1): _ms(match.group(2), match.group(3))
        for match in _PERCENTILE.finditer(output)
    }
    if rate is None or total is None or set(percentiles) != {"50", "99"}:
        raise BenchError(f"cannot parse wrk's output:\n{output}")
    return WrkResult(
        requests=int(total.group(1)),
        rps=float(rate.group(1)),
        p50_ms=percentiles["50"],
        p99_ms=percentiles["99"],
    )


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]
