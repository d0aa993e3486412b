"""How every process of ours logs: plain text for people, or one JSON object a line for a log
pipeline (``--log-format json``). Standard library only.

uvicorn's servers are started with ``log_config=None``, so its loggers (``uvicorn.error``,
and ``uvicorn.access`` when ``--access-log`` is on) go through the same root handler and
format as ours. The format is process-wide, like logging's own configuration; a process
that starts others (``bazaar serve``'s workers) passes it on (``configured_format``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

_configured = "text"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, UTC), level, logger, message, and the
    exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        seconds = int(record.created)
        milliseconds = int((record.created - seconds) * 1000)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        return f"{stamp}.{milliseconds:03d}Z"


def configure(level: str, log_format: str) -> None:
    """Log at ``level`` to stderr in ``log_format`` (one of ``FORMATS``)."""
    global _configured
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=level.upper(), handlers=[handler])
    _configured = log_format


def configured_format() -> str:
    """The format this process logs in, for the processes it starts."""
    return _configured
