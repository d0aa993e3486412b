"""Paging models under a memory budget: what a model costs, and which models make room.

A pod started with a memory budget serves more models than it holds at once (``ModelStore``
does the paging; this module holds its two decisions, pure where they can be).

**A model's footprint** is what the C allocator holds for it once loaded: the growth of
glibc's in-use bytes (``mallinfo2``: ``uordblks``, small chunks, plus ``hblkhd``, mmapped
ones) across building its sessions and warming them up, where ONNX Runtime keeps its
weights, graph and arenas. The process's RSS growth is the wrong measure both ways: the
first load pays for ONNX Runtime's one-time allocations (measured: 9.9 MB of RSS for the
4 KB digits classifier, whose sessions hold 1.2 MB), and a load after an eviction reuses
the freed pages and shows almost nothing (0.15 MB). ONNX Runtime's Python API reports no
per-session memory. The first load in a process carries those one-time allocations too
(1.4 MB), so the first model's footprint is overstated until its next load. Loads are
serialised while paging, so one load's growth is its own,
give or take the requests computing meanwhile (their tensors are freed again by the time
the load ends, or held briefly). Where ``mallinfo2`` is missing (not glibc, or glibc older
than 2.33) the footprint is the model files' size, a lower bound.

**Which models make room**: the least recently used loaded models, oldest first, that have
no work in flight, until the loaded footprints plus the newcomer's fit the budget. None
when even evicting every idle model would not do: the newcomer then waits for work in
flight to end, never for a model with work in flight to go.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Container, Iterable
from typing import Any


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo2() -> Any | None:
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    function = getattr(ctypes.CDLL(path), "mallinfo2", None)
    if function is not None:
        function.restype = _MallInfo2
    return function


_MALLINFO2 = _mallinfo2()


def allocated_bytes() -> int | None:
    """Bytes the C allocator has handed out and not had back; None without ``mallinfo2``."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


def choose_victims(
    loaded: Iterable[tuple[str, int]], busy: Container[str], needed: int, budget: int
) -> list[str] | None:
    """The models to evict so that ``needed`` more bytes fit ``budget``.

    ``loaded``: every loaded model and its footprint, least recently used first; ``busy``:
    those with work in flight, never chosen. Returns the fewest least recently used idle
    models that make room (``[]`` when it fits already), or None when evicting every idle
    model would not.
    """
    models = list(loaded)
    excess = sum(footprint for _, footprint in models) + needed - budget
    victims = []
    for name, footprint in models:
        if excess <= 0:
            break
        if name not in busy:
            victims.append(name)
            excess -= footprint
    return victims if excess <= 0 else None
