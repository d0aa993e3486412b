"""Local model-server workers for ``bazaar serve``: the endpoint source without Kubernetes.

``WorkerSupervisor`` runs ``bazaar model-server --model NAME`` child processes, each on a free
loopback port, and tells the gateway through its listener which of them are ready. A worker
serves one model, or a group of them (``scale(name, n, models)``, ``bazaar.placement``), or
one version of a model (``NAME@VERSION``: its own workers, as a version has its own
Deployment in Kubernetes). Each model is told the ready workers of every group that serves
it (any version), so the gateway sends a model's batches only to workers that hold it and
learns from them which version each serves. Each worker is kept by one task that loops:
start the process, poll ``/v2/health/ready`` every 50 ms until it answers 200 (the worker
joins the endpoints), then wait for the process to exit. With ``grpc_hop`` each worker also
serves gRPC on a second free port, which ``grpc_target`` tells the gateway's gRPC hop
(``gateway.grpc_client``); a restart takes new ports for both. With ``memory_budget_bytes``
each worker pages its models within that budget (``model-server --memory-budget``,
``models.store``): a worker can serve more models than it holds.

Under failure:

* A worker that exits unexpectedly leaves the endpoints at once (the listener hears of it),
  is logged with its exit code and is started again after a backoff that doubles from
  ``min_restart_delay_s`` to ``max_restart_delay_s`` and goes back to the minimum once a
  worker has stayed up for a minute. A restart takes a new port, so a worker that lost the
  race for its port (it is picked by binding port 0, then released) simply tries another.
* A worker not ready within ``startup_timeout_s`` (a model that fails to load keeps the
  server not ready for good) is killed and restarted the same way.
* Scaling down retires the newest workers: they leave the endpoints first, so the gateway
  sends them no new batches, then get SIGTERM (uvicorn finishes requests in flight) and
  SIGKILL after ``TERMINATE_GRACE_S``. A retired worker is never restarted.
* ``stop`` retires every worker and waits until all have exited; nothing restarts after it.
  On Linux the workers also get SIGTERM if ``bazaar serve`` itself dies (PR_SET_PDEATHSIG),
  so a crashed gateway leaves no orphans.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from gateway.catalog import EndpointListener
from protocol import logs
from protocol.support import free_port

log = logging.getLogger(__name__)


READY_POLL_S = 0.05
READY_PROBE_TIMEOUT_S = 1.0
STABLE_AFTER_S = 60.0
"""A worker up this long counts as healthy: the next restart waits the minimum again."""
TERMINATE_GRACE_S = 10.0
"""How long a worker may take to finish its requests after SIGTERM before SIGKILL."""

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: ask the kernel for SIGTERM when we die.

    The signal follows the death of the forking *thread*; asyncio forks from the event loop's
    thread, which lives as long as ``bazaar serve`` does.
    """
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


if sys.platform == "linux":
    # Loaded here, not in the child: after fork only the prctl call itself should run.
    _libc = ctypes.CDLL(None)
    _PREEXEC: Callable[[], None] | None = _die_with_parent
else:
    _PREEXEC = None


@dataclass(slots=True, eq=False)
class _Worker:
    model: str
    """The model, or the name of the group of models, it serves."""
    models: tuple[str, ...]
    number: int
    """Counts up per model, for logs; a restarted worker keeps its number."""
    url: str = ""
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class WorkerSupervisor:
    """Keeps the desired number of local model-server workers per model (see the module)."""

    def __init__(
        self,
        repository: Path,
        listener: EndpointListener,
        *,
        host: str = "127.0.0.1",
        log_level: str = "info",
        min_restart_delay_s: float = 0.5,
        max_restart_delay_s: float = 30.0,
        startup_timeout_s: float = 120.0,
        grpc_hop: bool = False,
        memory_budget_bytes: int | None = None,
    ) -> None:
        self._repository = repository
        self._memory_budget = (
            () if memory_budget_bytes is None else ("--memory-budget", str(memory_budget_bytes))
        )
        self._grpc_hop = grpc_hop
        self._listener = listener
        self._host = host
        self._log_level = log_level
        self._min_restart_delay_s = min_restart_delay_s
        self._max_restart_delay_s = max_restart_delay_s
        self._startup_timeout_s = startup_timeout_s
        self._workers: dict[str, list[_Worker]] = {}
        """The desired workers of each model, oldest first."""
        self._retiring: set[asyncio.Task[None]] = set()
        self._numbers: dict[str, int] = {}
        self._groups: dict[str, tuple[str, ...]] = {}
        """The models each group's workers serve, where not just the one it is named after."""
        self._stopped = False
        self._grpc_targets: dict[str, str] = {}
        """With ``grpc_hop``, each running worker's URL -> its gRPC ``host:port``."""

    async def scale(self, model: str, workers: int, models: tuple[str, ...] = ()) -> None:
        """Start or retire workers until ``model`` has ``workers``; does not await readiness.

        With ``models``, ``model`` names a group whose workers serve those models (the
        group's first call says which; later ones may leave them out)."""
        if models:
            self._groups[model] = models
        if workers < 0:
            raise ValueError(f"worker count must be >= 0, got {workers}")
        if self._stopped:
            raise RuntimeError("the worker supervisor is stopped")
        current = self._workers.setdefault(model, [])
        while len(current) < workers:
            number = self._numbers.get(model, 0) + 1
            self._numbers[model] = number
            worker = _Worker(model, self._groups.get(model, (model,)), number)
            worker.task = asyncio.create_task(self._keep(worker), name=f"{model} worker {number}")
            current.append(worker)
        if len(current) > workers:
            surplus = current[workers:]
            del current[workers:]
            self._retire(model, surplus)

    def workers(self, model: str) -> int:
        """The desired worker count of ``model`` (ready or not)."""
        return len(self._workers.get(model, []))

    def worker_urls(self) -> dict[str, str]:
        """``MODEL/N`` -> URL of every running worker, N its place among its model's workers
        (1: the oldest; a restart keeps the place, scaling down retires the last)."""
        return {
            f"{model}/{place}": worker.url
            for model, workers in sorted(self._workers.items())
            for place, worker in enumerate(workers, 1)
            if worker.process is not None and worker.process.returncode is None
        }

    def endpoints(self, model: str) -> list[str]:
        """URLs of ``model``'s ready workers, oldest worker first."""
        return [w.url for w in self._workers.get(model, []) if w.ready]

    def grpc_target(self, url: str) -> str | None:
        """The gRPC ``host:port`` of the worker at ``url`` (``gateway.grpc_client``), or
        None: ``grpc_hop`` is off, or ``url`` is no longer one of its workers."""
        return self._grpc_targets.get(url)

    async def stop(self) -> None:
        """Retire every worker and wait until all have exited (SIGKILL after the grace)."""
        self._stopped = True
        for model, workers in self._workers.items():
            self._retire(model, workers[:])
            workers.clear()
        # The tasks end cancelled; return_exceptions keeps that from cancelling stop() itself.
        await asyncio.gather(*self._retiring, return_exceptions=True)

    def _retire(self, model: str, workers: list[_Worker]) -> None:
        # Out of the endpoints before SIGTERM, so the gateway stops sending batches first.
        was_ready = any(w.ready for w in workers)
        for worker in workers:
            worker.ready = False
        if was_ready:
            self._notify(model)
        for worker in reversed(workers):
            assert worker.task is not None
            # Cancelled once only: a second cancel would cut the task's SIGTERM grace short.
            worker.task.cancel()
            self._retiring.add(worker.task)
            worker.task.add_done_callback(self._retiring.discard)

    async def _keep(self, worker: _Worker) -> None:
        """Run ``worker`` until cancelled, restarting it with backoff; stop it when cancelled."""
        loop = asyncio.get_running_loop()
        delay = self._min_restart_delay_s
        try:
            while True:
                started = loop.time()
                try:
                    await self._start(worker)
                except OSError as exc:
                    # Transient, such as running out of file descriptors: retry like a crash.
                    reason = f"could not start: {exc}"
                else:
                    reason = await self._watch(worker)
                if worker.ready:
                    worker.ready = False
                    self._notify(worker.model)
                if loop.time() - started >= STABLE_AFTER_S:
                    delay = self._min_restart_delay_s
                log.warning(
                    "%s worker %d on %s %s; restarting in %.2f s",
                    worker.model,
                    worker.number,
                    worker.url,
                    reason,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_restart_delay_s)
        finally:
            if worker.process is not None:
                await _terminate(worker.process)
            self._grpc_targets.pop(worker.url, None)

    async def _start(self, worker: _Worker) -> None:
        port = free_port(self._host)  # lost before it binds: it exits and restarts
        self._grpc_targets.pop(worker.url, None)
        worker.url = f"http://{self._host}:{port}"
        grpc_port: tuple[str, ...] = ()
        if self._grpc_hop:
            target = self._grpc_targets[worker.url] = f"{self._host}:{free_port(self._host)}"
            grpc_port = ("--grpc-port", target.rpartition(":")[2])
        # If this await is cancelled, asyncio kills the half-started child itself.
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bazaar",
            "--log-level",
            self._log_level,
            "--log-format",
            logs.configured_format(),
            "model-server",
            "--model-repository",
            str(self._repository),
            *(arg for name in worker.models for arg in ("--model", name)),
            "--host",
            self._host,
            "--port",
            str(port),
            *grpc_port,
            *self._memory_budget,
            preexec_fn=_PREEXEC,
            # Out of the terminal's process group: Ctrl-C reaches the gateway only, which
            # drains through the workers before it stops them.
            start_new_session=True,
        )
        log.info(
            "started %s worker %d on %s (pid %d)",
            worker.model,
            worker.number,
            worker.url,
            worker.process.pid,
        )

    async def _watch(self, worker: _Worker) -> str:
        """Wait until the worker is ready, then until it exits; return why it must restart."""
        process = worker.process
        assert process is not None
        try:
            async with asyncio.timeout(self._startup_timeout_s):
                await _until_ready(worker.url, process)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):  # it may exit meanwhile
                process.kill()
            await process.wait()
            return f"was not ready after {self._startup_timeout_s:g} s"
        if process.returncode is not None:
            return f"exited with code {process.returncode} before it was ready"
        worker.ready = True
        log.info("%s worker %d on %s is ready", worker.model, worker.number, worker.url)
        self._notify(worker.model)
        return f"exited with code {await process.wait()}"

    def _notify(self, group: str) -> None:
        for served in self._groups.get(group, (group,)):
            model = served.partition("@")[0]
            try:
                self._listener(model, self._serving(model))
            except Exception:
                # A faulty listener must not end supervision (and leave its worker unwatched).
                log.exception("endpoint listener failed for %s", model)

    def _serving(self, model: str) -> list[str]:
        """URLs of the ready workers of every group serving ``model`` (or a version of it)."""
        return [
            worker.url
            for group, workers in self._workers.items()
            if any(s.partition("@")[0] == model for s in self._groups.get(group, (group,)))
            for worker in workers
            if worker.ready
        ]


async def _until_ready(url: str, process: asyncio.subprocess.Process) -> None:
    """Poll the worker's readiness until it answers 200 or the process exits."""
    timeout = aiohttp.ClientTimeout(total=READY_PROBE_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while process.returncode is None:
            try:
                async with session.get(f"{url}/v2/health/ready") as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass  # not listening yet
            await asyncio.sleep(READY_POLL_S)


async def _terminate(process: asyncio.subprocess.Process) -> None:
    """SIGTERM, wait up to the grace period, then SIGKILL; returns once it has exited."""
    if process.returncode is None:
        # It may exit between the check and the signal.
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            async with asyncio.timeout(TERMINATE_GRACE_S):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    await process.wait()
