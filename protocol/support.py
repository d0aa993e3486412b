"""What every process of ours does the same way, written once (standard library only, so the
command line can use it without importing a web stack).

- ``free_port``: a port for a child server or a test server.
- ``missing_extra``: a command whose optional dependencies are not installed says which
  extra brings them, instead of a traceback (the serving image has none of them).
- ``cancel_and_wait``: stop background tasks and wait until they have ended, so nothing they
  hold outlives the stop (a socket, a child process, a thread's call).
- ``ProblemLog``: a failure that repeats every tick (an unreachable gateway, a refused RBAC
  permission, a bad annotation) is logged once when it starts, and once when it clears
  where that is news, never once per tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import socket
from collections.abc import Hashable, Mapping
from typing import Any, TypeVar

Key = TypeVar("Key", bound=Hashable)


def missing_extra(command: str, extra: str, modules: tuple[str, ...]) -> str | None:
    """Why ``command`` cannot run, if one of ``modules`` (of the ``extra``) is missing."""
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return (
        f"{command} needs the {extra} extra: pip install 'bazaar[{extra}]' "
        f"(missing: {', '.join(missing)})"
    )


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
