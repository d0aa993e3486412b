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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from models.config import Device, ModelConfig
from models.limits import ModelLimits, ModelTableFull
from models.repository import ModelRepository, check_name
from models.runtime import ModelRuntime
from protocol.errors import BazaarError, ModelNotFound, ModelNotReady

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadedModel:
    config: ModelConfig
    versions: dict[int, ModelRuntime]
    """Loaded versions; the highest is the default."""

    @property
    def default(self) -> ModelRuntime:
        return self.versions[max(self.versions)]


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

    async def load_all(self) -> None:
        """Load the start-up models; failures are recorded, not raised."""
        names = self.names if self.names is not None else self.repository.model_names()
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
            old = self.models.get(name)
            self.models[name] = loaded
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

    def is_ready(self, name: str, version: str | None = None) -> bool:
        """``name`` (at ``version``) serves now; ``ModelNotFound`` if the pod has no such
        model or version."""
        try:
            self.get(name, version)
        except ModelNotReady:
            return False
        return True

    def ready(self) -> bool:
        """Start-up began and every start-up model not unloaded since is loaded."""
        return self._started and all(name in self.models for name in self._required)

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
        try:
            for files in self.repository.versions(name, config):
                versions[files.version] = ModelRuntime(
                    name, files.version, files.path, config, labels
                )
        except BaseException:
            for runtime in versions.values():
                runtime.close()
            raise
        return LoadedModel(config, versions)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, BazaarError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"
