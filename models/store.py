"""The models a pod has loaded, and their states.

Loading reads the repository (config, versions), builds one ``ModelRuntime`` per selected
version in a worker thread (ORT session creation and warm-up take from milliseconds to
seconds and must not stall requests to other models), then swaps the model in whole: a
reload never serves a mix of old and new versions. A model whose load fails keeps its
error as the index ``reason`` and makes the server not ready, as Triton does; an
explicitly unloaded model does not, and a failed reload keeps the old versions serving.

Loads and unloads of one model are serialised by a per-model lock; requests in flight on a
replaced runtime finish on it (it is closed once they have).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from models.config import Device, ModelConfig
from models.repository import ModelRepository
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
    failed: bool = False


class ModelStore:
    def __init__(
        self,
        repository: ModelRepository,
        names: list[str] | None = None,
        device: Device | None = None,
    ) -> None:
        self.repository = repository
        self.names = names  # loaded at start-up; None = every model in the repository
        self.device = device
        """Overrides every model's configured device (the pod's hardware decides)."""
        self.models: dict[str, LoadedModel] = {}
        self.states: dict[str, ModelState] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._started = False

    async def load_all(self) -> None:
        """Load the start-up models; failures are recorded, not raised."""
        names = self.names if self.names is not None else self.repository.model_names()
        for name in names:
            self.states[name] = ModelState("LOADING")
        self._started = True
        results = await asyncio.gather(*(self.load(n) for n in names), return_exceptions=True)
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                log.error("model %s failed to load: %s", name, result)

    async def load(self, name: str, overrides: Mapping[str, Any] | None = None) -> None:
        """Load or reload ``name``; raises the load error (ConfigError, ModelNotFound)."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            self.states[name] = ModelState("LOADING")
            try:
                loaded = await asyncio.to_thread(self._build, name, overrides)
            except BazaarError as exc:
                # As Triton does, a failed reload leaves the loaded versions serving.
                if name in self.models:
                    self.states[name] = ModelState("READY", f"reload failed: {exc.message}")
                else:
                    self.states[name] = ModelState("UNAVAILABLE", exc.message, failed=True)
                raise
            old = self.models.get(name)
            self.models[name] = loaded
            self.states[name] = ModelState("READY")
        if old is not None:
            for runtime in old.versions.values():
                await asyncio.to_thread(runtime.close)

    async def unload(self, name: str) -> None:
        if name not in self.models and name not in self.repository.model_names():
            raise ModelNotFound(name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            old = self.models.pop(name, None)
            self.states[name] = ModelState("UNAVAILABLE", "unloaded")
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
        """Start-up began, no model is loading and none failed; unloaded ones do not count."""
        return self._started and not any(
            s.failed or s.state == "LOADING" for s in self.states.values()
        )

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        entries = []
        for name in sorted(set(self.repository.model_names()) | set(self.states)):
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

    def _build(self, name: str, overrides: Mapping[str, Any] | None) -> LoadedModel:
        config = self.repository.load_config(name, overrides)
        if self.device is not None:
            config = dataclasses.replace(config, device=self.device)
        versions = {}
        try:
            for files in self.repository.versions(name, config):
                versions[files.version] = ModelRuntime(name, files.version, files.path, config)
        except BaseException:
            for runtime in versions.values():
                runtime.close()
            raise
        return LoadedModel(config, versions)
