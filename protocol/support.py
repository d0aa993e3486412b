"""What every long-running process of ours does the same way, written once.

- ``ManagedServer``: uvicorn's server without its own signal handling, which the process
  owns. uvicorn re-raises a caught SIGTERM once it has drained, which would end the process
  before its shutdown step (stopping workers, closing clients) has run.
- ``free_port``: a port for a child server or a test server.
- ``cancel_and_wait``: stop background tasks and wait until they have ended, so nothing they
  hold outlives the stop (a socket, a child process, a thread's call).
- ``ProblemLog``: a failure that repeats every tick (an unreachable gateway, a refused RBAC
  permission, a bad annotation) is logged once when it starts, and once when it clears
  where that is news, never once per tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Hashable, Iterator, Mapping
from typing import Any, TypeVar

import uvicorn

Key = TypeVar("Key", bound=Hashable)


class ManagedServer(uvicorn.Server):
    """uvicorn's server; the process calls ``stop`` from its own signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def stop(self) -> None:
        """First call: drain and stop. A second one: stop without waiting."""
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (bound to 0, then released: whoever binds it next may lose
    it to another process, and must cope)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel every task (None is skipped) and wait until each has ended."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    for task in running:
        with contextlib.suppress(asyncio.CancelledError):
            await task


class ProblemLog:
    """Each problem, by key, logged once while it lasts."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING) -> None:
        self.logger = logger
        self.level = level
        self._current: set[Hashable] = set()

    def failing(self, key: Hashable, message: str) -> None:
        """``key`` fails now: ``message`` is logged if it was not failing already."""
        if key not in self._current:
            self._current.add(key)
            self.logger.log(self.level, "%s", message)

    def ok(self, key: Hashable, recovered: str | None = None) -> None:
        """``key`` works now; ``recovered`` is logged (INFO) if it was failing."""
        if key in self._current:
            self._current.discard(key)
            if recovered is not None:
                self.logger.info("%s", recovered)

    def only(self, problems: Mapping[Key, str]) -> None:
        """The whole set of current problems: new ones are logged, gone ones forgotten."""
        for key in self._current - problems.keys():
            self.ok(key)
        for key, message in sorted(problems.items(), key=lambda item: item[1]):
            self.failing(key, message)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._current
