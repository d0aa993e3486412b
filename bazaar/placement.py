"""Which models share a ``bazaar serve`` worker.

One process per model costs about 90 MB of interpreter, ONNX Runtime and server before the
model itself (measured: 20 digits classifiers of 4 KB each took 1.8 GB as 20 workers), so
small models share workers. ``place`` packs them first-fit decreasing by their estimated
footprint into workers of at most ``worker_bytes`` each: the largest model goes first, into
the first worker with room, or a new one; a model larger than ``worker_bytes`` gets a
worker of its own. Every model lands in exactly one worker.

Placement by load follows at run time: a model of a shared group whose runtime is busy for
``BUSY_ALONE_RATIO`` of its workers' time or more (``busy_alone``) is moved to workers of its
own (``bazaar.local``), so a busy model neither crowds out the idle ones it shares with nor
is held back by them; the group keeps at least one model.

The estimate is read from the repository without loading anything: the files of the
versions the config serves, plus ``SESSION_BYTES`` for what ONNX Runtime holds per session
beyond the weights (measured with ``models.paging``'s allocator count: 1.2 MB for the
digits classifier, whose file is 4 KB). What a model costs once loaded is on each worker's
``/metrics`` (``bazaar_model_memory_bytes``).
"""

from __future__ import annotations

from collections.abc import Mapping

from models.repository import ModelRepository
from protocol.errors import BazaarError

BUSY_ALONE_RATIO = 0.5
"""A shared model busy for this much of its workers' time (or more) gets workers of its own."""
SESSION_BYTES = 1_200_000
"""What a loaded model version costs beyond its file: session, graph, arenas, warm-up."""


def estimated_bytes(repository: ModelRepository, name: str) -> int:
    """``name``'s footprint once loaded, estimated from its files; a model that cannot be
    read counts as one session (its worker will report why it does not load)."""
    try:
        config = repository.load_config(name)
        files = repository.versions(name, config)
    except BazaarError:
        return SESSION_BYTES
    return sum(SESSION_BYTES + version.path.stat().st_size for version in files)


def place(sizes: Mapping[str, int], worker_bytes: int) -> list[tuple[str, ...]]:
    """Workers, each the models it serves, by first-fit decreasing (see the module)."""
    workers: list[list[str]] = []
    room: list[int] = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        size = sizes[name]
        for index, left in enumerate(room):
            if size <= left:
                workers[index].append(name)
                room[index] -= size
                break
        else:
            workers.append([name])
            room.append(worker_bytes - size)
    return [tuple(sorted(models)) for models in workers]


def busy_alone(
    models: tuple[str, ...], busy: Mapping[str, float], threshold: float = BUSY_ALONE_RATIO
) -> list[str]:
    """The models of one shared group to move to workers of their own: those whose busy
    ratio in the group's workers is at least ``threshold``, busiest first, leaving the group
    at least one model. A model without a reading stays."""
    busiest = sorted(
        (model for model in models if busy.get(model, 0.0) >= threshold),
        key=lambda model: (-busy[model], model),
    )
    return busiest[: len(models) - 1]
