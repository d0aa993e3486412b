"""Servers under test as pinned subprocesses that never outlive the benchmark.

``PinnedServer`` starts a command under ``taskset -c CORE`` (its children, such as the
workers of ``bazaar serve``, inherit the affinity) in a session of its own, polls a readiness
URL until it answers 200 or a deadline passes, and on exit sends SIGTERM, waits, then kills
whatever is left of its process group, so a crashed or hung server leaves nothing behind.
Output goes to a log file next to the results, where a failed start can be read.

Memory is read from ``/proc``: ``reset_peak_rss`` sets a process's high-water mark back to
its current RSS (``/proc/PID/clear_refs``, Linux 4.0 on), so that ``peak_rss_bytes`` after a
measured interval is the most it held during that interval, however briefly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from loadtests.wrk import BenchError

TERMINATE_GRACE_S = 15.0


def http_get(url: str, timeout_s: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return bytes(response.read())


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (``bazaar serve``'s workers)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_bytes(pid: int) -> int:
    """The most memory ``pid`` has held resident since it started or since
    ``reset_peak_rss``."""
    return _status_kib(pid, "VmHWM") * 1024


def cpu_seconds(pid: int) -> float:
    """The CPU time ``pid`` has used so far, user and system."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class CoreTimes:
    """What one core has spent its time on so far, in seconds (``/proc/stat``)."""

    busy: float
    """Running anything: processes, the kernel, interrupts (on loopback, the kernel's work for
    both ends of a connection lands on whichever core sends)."""
    steal: float
    """Taken by the hypervisor: on a virtual machine, time in which nothing on the core ran."""


def core_times(core: int) -> CoreTimes:
    prefix = f"cpu{core} "
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(prefix):
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, line.split()[1:9])
            tick = os.sysconf("SC_CLK_TCK")
            return CoreTimes((user + nice + system + irq + softirq) / tick, steal / tick)
    raise BenchError(f"/proc/stat has no cpu{core}")


def open_fds(pid: int) -> int:
    """The file descriptors ``pid`` holds open (its sockets among them)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    return _status_kib(pid, "VmRSS") * 1024


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {field}")


class PinnedServer:
    """A server process pinned to one core; a context manager that always stops it."""

    def __init__(
        self, name: str, command: list[str], core: int, ready_url: str, log_dir: Path
    ) -> None:
        self.name = name
        self.command = ["taskset", "-c", str(core), *command]
        self.ready_url = ready_url
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, deadline_s: float) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        give_up = time.monotonic() + deadline_s
        while time.monotonic() < give_up:
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.process.returncode}; see {self.log_path}"
                )
            with contextlib.suppress(urllib.error.URLError, OSError):
                http_get(self.ready_url, timeout_s=1.0)
                return
            time.sleep(0.1)
        raise BenchError(f"{self.name} not ready within {deadline_s:g} s; see {self.log_path}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is None:
            return
        # SIGTERM to the leader alone: bazaar serve drains, then retires its own workers.
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(TERMINATE_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Whatever is left of the session (a worker that missed the news) is killed.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def __enter__(self) -> PinnedServer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()
