"""uvicorn's server for processes that own their signals.

uvicorn installs its own SIGINT/SIGTERM handlers while it serves and re-raises a caught
SIGTERM once it has drained, which would end the process before its own shutdown step
(stopping workers, closing clients, releasing a lease) has run. ``ManagedServer`` leaves the
signals to the process, which calls ``stop`` from its handlers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import uvicorn


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
