"""The models a pod has loaded, and their states.

Loading reads the repository (config, versions), builds one ``ModelRuntime`` per selected
version in a worker thread (ORT session creation and warm-up take from milliseconds to
seconds and must not stall requests to other models), then swaps the model in whole: a
reload never serves a mix of old and new versions. A failed reload keeps the old versions
serving.

The pod is ready when every start-up model (``names``, or the whole repository) is loaded,
as Kubernetes asked of it; one that fails at start-up keeps it unready, with its error as
the index ``reason``. Loads over the repository API change nothing else (Triton's explicit
model control): a failed one is reported in the index (UNAVAILABLE with its reason) and
answered 4xx, and unloading a start-up model means the pod no longer has to serve it.

The model table is bounded, because names arrive over the API: a name is checked (length,
characters) and must be a directory of the repository before anything is recorded, so a
bogus name leaves nothing behind; entries for models deleted from the repository are
dropped; and at most ``limits.max_models`` entries are kept, an API load of a new model
evicting an unloaded or failed entry first. Config overrides from a load request are
bounded by ``limits`` (``models.limits``).

Loads and unloads of one model are serialised by a per-model lock, which exists only while
an operation holds or awaits it; requests in flight on a replaced runtime finish on it (it
is closed once they have).

**Paging** (with ``memory_budget_bytes``): the pod serves more models than it holds. At
start-up every model is loaded once, in turn, to read its metadata and measure its footprint
(``models.paging``), least recently used ones evicted as the budget requires; the pod is
ready when each has been in once, and a model larger than the whole budget keeps it unready
with that as its reason. From then on a request for an evicted model is held (``serving``)
while one pager task loads it, bounded by the request's deadline (504 past it; the load
goes on for the next request), after evicting the least recently used models without work
in flight until the footprints fit; with too little idle room it waits for work in flight
to end. A request pins its model from before the page-in to its answer, so a model with
work in flight is never evicted. Page-ins are serialised: each measures its own load and
sees the room the last one left. Metadata and config of an evicted model are answered
from what its last load read (``view``), so the gateway learns and validates without
paging it in. The budget bounds the models' footprints, not the process: the interpreter,
ONNX Runtime and the server (about 90 MB) come on top.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from models.config import Device, ModelConfig
from models.limits import ModelLimits, ModelTableFull
from models.paging import allocated_bytes, choose_victims
from models.repository import ModelRepository, check_name
from models.runtime import ModelRuntime
from protocol.errors import BazaarError, DeadlineExceeded, ModelNotFound, ModelNotReady
from protocol.schema import ModelMetadata

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadedModel:
    config: ModelConfig
    versions: dict[int, ModelRuntime]
    """Loaded versions; the highest is the default."""
    footprint_bytes: int = 0
    """What loading it took from the C allocator (``models.paging``)."""

    @property
    def default(self) -> ModelRuntime:
        return self.versions[max(self.versions)]


class ModelView(Protocol):
    """What a model version's metadata and config routes read; a ``ModelRuntime`` is one."""

    @property
    def config(self) -> ModelConfig: ...

    @property
    def metadata(self) -> ModelMetadata: ...


@dataclass(frozen=True, slots=True)
class ReadModel:
    """A version's config and metadata as its last load read them, kept after eviction."""

    config: ModelConfig
    metadata: ModelMetadata


@dataclass(slots=True)
class PagingCounts:
    """One model's loads and evictions since the pod started (``/metrics``)."""

    loads: int = 0
    load_seconds: float = 0.0
    evictions: int = 0
    eviction_seconds: float = 0.0


@dataclass(slots=True)
class ModelState:
    state: str
    """READY, LOADING, UNAVAILABLE (failed or unloaded), as in Triton's repository index."""
    reason: str = ""


class ModelStore:
    def __init__(
        self,
        repository: ModelRepository,
        names: list[str] | None = None,
        device: Device | None = None,
        limits: ModelLimits | None = None,
        memory_budget_bytes: int | None = None,
    ) -> None:
        self.repository = repository
        self.names = names  # loaded at start-up; None = every model in the repository
        self.device = device
        """Overrides every model's configured device (the pod's hardware decides)."""
        self.limits = limits if limits is not None else ModelLimits()
        self.models: dict[str, LoadedModel] = {}
        self.states: dict[str, ModelState] = {}
        self._required: set[str] = set()
        """Start-up models not unloaded since: readiness waits for them."""
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        """Per model with an operation in flight: its lock and how many hold or await it."""
        self._started = False
        self.memory_budget_bytes = memory_budget_bytes
        """With a budget, models page in and out (see the module); None: all stay loaded."""
        self.counts: dict[str, PagingCounts] = {}
        self._last_used: dict[str, None] = {}
        """The loaded models, least recently used first."""
        self._read: dict[str, dict[int, ReadModel]] = {}
        """Paging: per model that has been in, its versions as last read."""
        self._footprints: dict[str, int] = {}
        """Paging: each model's footprint at its last load."""
        self._pins: dict[str, int] = {}
        """Requests in flight (or waiting for a page-in) per model: never evicted."""
        self._page_ins: dict[str, asyncio.Future[None]] = {}
        self._requests: asyncio.Queue[str] | None = None
        self._released: asyncio.Event | None = None

    async def load_all(self) -> None:
        """Load the start-up models; failures are recorded, not raised. Paging, it goes on
        to page models in for requests until cancelled."""
        names = self.names if self.names is not None else self.repository.model_names()
        if self.memory_budget_bytes is not None:
            await self._page(names, self.memory_budget_bytes)
            return
        for name in names:
            self.states[name] = ModelState("LOADING")
        self._required = set(names)
        self._started = True
        results = await asyncio.gather(*(self.load(n) for n in names), return_exceptions=True)
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                log.error("model %s failed to load: %s", name, result)
                if self.states[name].state == "LOADING":  # refused before loading began
                    self.states[name] = ModelState("UNAVAILABLE", _reason(result))

    async def load(self, name: str, overrides: Mapping[str, Any] | None = None) -> None:
        """Load or reload ``name``; raises the load error (ConfigError, ModelNotFound, ...).

        An invalid name or one not in the repository is refused before anything is
        recorded; ``ModelTableFull`` when the table has no room for a new entry.
        """
        self.repository.model_dir(name)
        self._admit(name)
        async with self._exclusive(name):
            self.states[name] = ModelState("LOADING")
            started = time.perf_counter()
            try:
                loaded = await asyncio.to_thread(self._build, name, overrides)
            except Exception as exc:
                if name in self.models:  # as Triton does, the loaded versions keep serving
                    self.states[name] = ModelState("READY", f"reload failed: {_reason(exc)}")
                elif isinstance(exc, ModelNotFound) and name not in self._required:
                    del self.states[name]  # deleted from the repository meanwhile
                else:
                    self.states[name] = ModelState("UNAVAILABLE", _reason(exc))
                raise
            counts = self.counts.setdefault(name, PagingCounts())
            counts.loads += 1
            counts.load_seconds += time.perf_counter() - started
            old = self.models.get(name)
            self.models[name] = loaded
            self._used(name)
            if self.memory_budget_bytes is not None:
                self._read[name] = {
                    version: ReadModel(runtime.config, runtime.metadata)
                    for version, runtime in loaded.versions.items()
                }
            self.states[name] = ModelState("READY")
        if old is not None:
            for runtime in old.versions.values():
                await asyncio.to_thread(runtime.close)

    async def unload(self, name: str) -> None:
        """Unload ``name``; ``ModelNotFound`` unless it is loaded or in the repository."""
        check_name(name, "unload request")
        if name not in self.models and name not in self.states:
            self.repository.model_dir(name)  # 404 for a model the pod never heard of
            return  # nothing loaded, nothing to record
        async with self._exclusive(name):
            old = self.models.pop(name, None)
            self._last_used.pop(name, None)
            self._read.pop(name, None)  # no longer served: not paged in again
            self.states[name] = ModelState("UNAVAILABLE", "unloaded")
            self._required.discard(name)
        if old is not None:
            for runtime in old.versions.values():
                await asyncio.to_thread(runtime.close)

    def get(self, name: str, version: str | None = None) -> ModelRuntime:
        loaded = self.models.get(name)
        if loaded is None:
            state = self.states.get(name)
            if state is None:
                raise ModelNotFound(name)
            detail = (
                f"{state.state.lower()}: {state.reason}" if state.reason else state.state.lower()
            )
            raise ModelNotReady(name, detail)
        if version is None or version == "":
            return loaded.default
        try:
            return loaded.versions[int(version)]
        except (ValueError, KeyError):
            raise ModelNotFound(name, version) from None

    def view(self, name: str, version: str | None = None) -> ModelView:
        """What the metadata and config routes read: the loaded runtime, or paging, what
        the last load of an evicted model read; raises as ``get`` otherwise."""
        read = self._read.get(name)
        if name in self.models or read is None:
            return self.get(name, version)
        if version is None or version == "":
            return read[max(read)]
        try:
            return read[int(version)]
        except (ValueError, KeyError):
            raise ModelNotFound(name, version) from None

    def versions(self, name: str) -> list[int]:
        """The versions ``view`` answers for, ascending."""
        loaded = self.models.get(name)
        return sorted(loaded.versions if loaded is not None else self._read.get(name, {}))

    def is_ready(self, name: str, version: str | None = None) -> bool:
        """``name`` (at ``version``) serves now, paged in if need be; ``ModelNotFound`` if the
        pod has no such model or version."""
        try:
            self.view(name, version)
        except ModelNotReady:
            return False
        return True

    def holds(self, name: str) -> bool:
        """``name`` is loaded now: a request for it computes without waiting for a page-in."""
        return name in self.models

    def ready(self) -> bool:
        """Start-up began and every start-up model not unloaded since is loaded (paging:
        has been in once, so it can be paged in again)."""
        return self._started and all(
            name in self.models or name in self._read for name in self._required
        )

    @contextlib.asynccontextmanager
    async def serving(
        self, name: str, version: str | None, deadline: float | None
    ) -> AsyncIterator[ModelRuntime]:
        """The runtime to compute on, pinned (never evicted) until the block ends; paging,
        an evicted model is paged in first, by ``deadline`` (the loop's clock) or
        ``DeadlineExceeded``."""
        self._pins[name] = self._pins.get(name, 0) + 1
        try:
            if name not in self.models and name in self._read:
                await self._paged_in(name, deadline)
            runtime = self.get(name, version)
            if name in self._last_used:
                self._used(name)
            yield runtime
        finally:
            self._pins[name] -= 1
            if not self._pins[name]:
                del self._pins[name]
                if self._released is not None:
                    self._released.set()

    def memory_used_bytes(self) -> int:
        """The loaded models' footprints together."""
        return sum(loaded.footprint_bytes for loaded in self.models.values())

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        on_disk = set(self.repository.model_names())
        for name in [n for n in self.states if n not in on_disk]:
            if self._evictable(name) and name not in self._required:
                del self.states[name]  # deleted from the repository
        entries = []
        for name in sorted(on_disk | set(self.states)):
            state = self.states.get(name, ModelState("UNAVAILABLE", "not loaded"))
            loaded = self.models.get(name)
            if ready_only and loaded is None:
                continue
            versions = sorted(loaded.versions) if loaded else [None]
            for version in versions:
                entry = {"name": name, "state": state.state, "reason": state.reason}
                if version is not None:
                    entry["version"] = str(version)
                entries.append(entry)
        return entries

    def close(self) -> None:
        for loaded in self.models.values():
            for runtime in loaded.versions.values():
                runtime.close()
        self.models.clear()
        self._last_used.clear()

    def _used(self, name: str) -> None:
        self._last_used.pop(name, None)
        self._last_used[name] = None

    async def _paged_in(self, name: str, deadline: float | None) -> None:
        """Wait until the pager has loaded ``name``, asking it to if nobody has."""
        future = self._page_ins.get(name)
        if future is None:
            if self._requests is None:
                raise ModelNotReady(name, "loading")  # the pager has not started yet
            future = asyncio.get_running_loop().create_future()
            future.add_done_callback(_retrieved)
            self._page_ins[name] = future
            self._requests.put_nowait(name)
        try:
            async with asyncio.timeout_at(deadline):
                # Shielded: the load goes on when this request gives up, for the next one.
                await asyncio.shield(future)
        except TimeoutError:
            raise DeadlineExceeded(
                f"model '{name}': the request's timeout passed while the model was loading"
            ) from None

    async def _page(self, names: list[str], budget: int) -> None:
        """Load every model once, then page models in for requests until cancelled."""
        self._requests = asyncio.Queue()
        self._released = asyncio.Event()
        for name in names:
            self.states[name] = ModelState("LOADING")
        self._required = set(names)
        for name in names:
            try:
                await self._page_in(name, budget)
            except Exception as exc:
                log.error("model %s failed to load: %s", name, exc)
        self._started = True
        try:
            while True:
                name = await self._requests.get()
                try:
                    await self._page_in(name, budget)
                except Exception as exc:
                    self._page_ins.pop(name).set_exception(ModelNotReady(name, _reason(exc)))
                else:
                    self._page_ins.pop(name).set_result(None)
        finally:
            for name, future in self._page_ins.items():
                future.set_exception(ModelNotReady(name, "not loaded: the pod is stopping"))

    async def _page_in(self, name: str, budget: int) -> None:
        """Make room for ``name`` (waiting for work in flight to end if it must), load it,
        and evict again if it took more than its last footprint said."""
        if name in self.models:
            return
        needed = self._footprints.get(name) or self._footprint(name)
        if needed > budget:  # no eviction could make room: waiting for one would hang
            self._too_large(name, needed, budget)
        while (victims := choose_victims(self._lru(), self._pins, needed, budget)) is None:
            assert self._released is not None
            self._released.clear()
            await self._released.wait()
        await self._evict(victims)
        await self.load(name)
        footprint = self.models[name].footprint_bytes
        self._footprints[name] = footprint
        if footprint > budget:
            await self._evict([name])
            self._too_large(name, footprint, budget)
        others = [(n, f) for n, f in self._lru() if n != name]
        await self._evict(choose_victims(others, self._pins, footprint, budget) or [])

    def _too_large(self, name: str, footprint: int, budget: int) -> None:
        """Record and raise that ``name`` cannot fit the budget even alone; it is not paged
        in again."""
        reason = f"needs {footprint} bytes, over the pod's memory budget of {budget}"
        self.states[name] = ModelState("UNAVAILABLE", reason)
        self._read.pop(name, None)
        raise ModelNotReady(name, reason)

    def _lru(self) -> list[tuple[str, int]]:
        return [(name, self.models[name].footprint_bytes) for name in self._last_used]

    async def _evict(self, names: list[str]) -> None:
        """Evict ``names``: all leave the table at once (no request can pin one meanwhile),
        then their runtimes close."""
        evicted = []
        for name in names:
            evicted.append((name, self.models.pop(name)))
            del self._last_used[name]
            self.states[name] = ModelState("UNAVAILABLE", "evicted: loads on its next request")
        for name, loaded in evicted:
            started = time.perf_counter()
            for runtime in loaded.versions.values():
                await asyncio.to_thread(runtime.close)
            counts = self.counts.setdefault(name, PagingCounts())
            counts.evictions += 1
            counts.eviction_seconds += time.perf_counter() - started
            log.info("evicted %s (%d bytes)", name, loaded.footprint_bytes)

    def _footprint(self, name: str) -> int:
        """A model not loaded yet: its files' size, a lower bound of its footprint."""
        try:
            config = self.repository.load_config(name)
            return sum(f.path.stat().st_size for f in self.repository.versions(name, config))
        except (BazaarError, OSError):
            return 0  # its load will fail and say why

    def _admit(self, name: str) -> None:
        """Make room for an entry for ``name``, evicting the oldest unloaded or failed one."""
        if name in self.states:
            return
        if len(self.states) >= self.limits.max_models:
            evictable = [n for n in self.states if self._evictable(n) and n not in self._required]
            if not evictable:
                raise ModelTableFull(name, self.limits.max_models)
            del self.states[evictable[0]]
        self.states[name] = ModelState("LOADING")  # holds the room until the lock is ours

    def _evictable(self, name: str) -> bool:
        return name not in self.models and name not in self._locks

    @contextlib.asynccontextmanager
    async def _exclusive(self, name: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)

    def _build(self, name: str, overrides: Mapping[str, Any] | None) -> LoadedModel:
        config = self.repository.load_config(name, overrides)
        if overrides is not None:
            self.limits.check_override(config, f"load request for model '{name}'")
        if self.device is not None:
            config = dataclasses.replace(config, device=self.device)
        labels = self.repository.labels(name)
        versions = {}
        # Garbage first: freed by a collection during the load, it would count against it.
        gc.collect()
        before = allocated_bytes()
        try:
            files = self.repository.versions(name, config)
            for version in files:
                versions[version.version] = ModelRuntime(
                    name, version.version, version.path, config, labels
                )
        except BaseException:
            for runtime in versions.values():
                runtime.close()
            raise
        after = allocated_bytes()
        on_disk = sum(version.path.stat().st_size for version in files)
        grown = 0 if before is None or after is None else after - before
        return LoadedModel(config, versions, max(grown, on_disk))


def _retrieved(future: asyncio.Future[None]) -> None:
    """Marks a page-in's failure as seen: the requests that waited for it may all have left."""
    if not future.cancelled():
        future.exception()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, BazaarError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"
