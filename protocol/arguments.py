"""argparse types that refuse a bad number when the command starts, not at its first use.

argparse prints the message with the option's name (``argument --max-queue-time: must be a
number > 0, got '0'``) and exits 2. A zero or negative timeout, count or size is refused
everywhere: each would otherwise start a process that fails every request (a zero queue
time answered every request 504).
"""

from __future__ import annotations

import argparse
import math
from typing import TypeVar

Number = TypeVar("Number", int, float)


def positive_int(text: str) -> int:
    """An integer > 0."""
    value = _number(int, text, "an integer > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be an integer > 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _number(float, text, "a number > 0")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _number(float, text, "a number >= 0")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def port(text: str) -> int:
    """A TCP port, 1 to 65535."""
    value = _number(int, text, "a port number, 1 to 65535")
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number, 1 to 65535, got {text!r}")
    return value


def port_or_off(text: str) -> int:
    """A TCP port, 1 to 65535, or 0 for none."""
    value = _number(int, text, "a port number, 1 to 65535, or 0 for none")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            f"must be a port number, 1 to 65535, or 0 for none, got {text!r}"
        )
    return value


def _number(kind: type[Number], text: str, what: str) -> Number:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value
