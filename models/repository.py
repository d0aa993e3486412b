"""The model repository on disk, laid out as Triton's::

    <root>/<model>/config.yaml           optional; see ``models.config``
    <root>/<model>/labels.txt            optional; class labels, one a line, for the
                                         classification extension (Triton's label_filename)
    <root>/<model>/<version>/model.onnx  version: a positive integer without leading zeros

Model names arrive in URLs and load requests, so ``model_dir`` is the one way from a name to a
path: it checks the name's length and characters before touching the disk, and that the
directory, symlinks resolved, stays under the root. Other entries of a model directory
(``0``, ``v2``, ``README``, hidden files) are not versions and are ignored, so a model
directory may hold notes or samples.

A repository may pin a model to one of its versions (``pinned``; ``bazaar model-server
--model NAME@VERSION``): its config's ``version_policy`` is then that version alone, so a
worker of one version serves it whatever the config selects (``bazaar serve`` runs one set
of workers per version, as Kubernetes runs one Deployment per version).

Nothing is cached: every call reads the disk, so a version copied in is seen by the next load.
A selected version whose ``model.onnx`` is missing is an error rather than skipped, so a
half-copied version fails loudly instead of silently serving an older one. Whether the file
is a valid ONNX model is the runtime's concern.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.config import ModelConfig, VersionPolicy, load_config, parse_config
from protocol.errors import ConfigError, ModelNotFound

MODEL_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
"""Characters allowed in a model name; names starting with '.' are refused as well. Use
``fullmatch``: ``$`` alone also matches before a trailing newline."""

MAX_NAME_LENGTH = 255
"""Longest model name: a name is one directory name, and no file system we run on (ext4, xfs,
overlayfs) holds a longer one (NAME_MAX), so a longer name cannot be in the repository.
Names are ASCII, so characters are bytes."""

_VERSION = re.compile(r"^[1-9][0-9]*$")

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
MAX_LABELS_BYTES = 16 * 1024 * 1024
"""The largest labels file read (16 MiB): its labels are held and sent in the config."""


@dataclass(frozen=True, slots=True)
class ModelVersionFiles:
    """Where one version of a model lives."""

    name: str
    """The model's name."""
    version: int
    """The version, >= 1."""
    path: Path
    """The version's ``model.onnx``, symlinks resolved; inside the repository root."""


def check_name(name: str, where: str) -> None:
    """``ConfigError`` (400) unless ``name`` could name a model directory; reads no disk."""
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(
            where, None, f"invalid model name: {len(name)} characters, over {MAX_NAME_LENGTH}"
        )
    if not MODEL_NAME.fullmatch(name) or name.startswith("."):
        raise ConfigError(
            where,
            None,
            f"invalid model name {name!r}: use letters, digits, '_', '.' and '-',"
            " not starting with '.'",
        )


class ModelRepository:
    """A directory of models; see the module docstring for the layout."""

    root: Path
    """The repository directory, absolute with symlinks resolved."""

    def __init__(self, root: Path, pinned: Mapping[str, int] | None = None) -> None:
        if not root.is_dir():
            raise ConfigError(str(root), None, "the model repository is not a directory")
        self.root = root.resolve()
        self.pinned = dict(pinned or {})
        """Per model pinned to one version, that version: the only one served."""

    def model_names(self) -> list[str]:
        """Every non-hidden directory under the root, sorted; ``model_dir`` judges the names."""
        return sorted(
            path.name
            for path in self.root.iterdir()
            if path.is_dir() and not path.name.startswith(".")
        )

    def model_dir(self, name: str) -> Path:
        """The directory of model ``name``, symlinks resolved.

        Raises ``ConfigError`` for an invalid name or a directory outside the root, and
        ``ModelNotFound`` when there is no such directory.
        """
        check_name(name, str(self.root))
        path = self.root / name
        if not path.is_dir():
            raise ModelNotFound(name)
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise ConfigError(str(path), None, f"resolves to {resolved}, outside the repository")
        return resolved

    def load_config(self, name: str, overrides: Mapping[str, Any] | None = None) -> ModelConfig:
        """The model's ``config.yaml``, or ``overrides`` (a whole config from a load request,
        replacing the file)."""
        model_dir = self.model_dir(name)
        if overrides is None:
            config = load_config(model_dir / CONFIG_FILE)
        else:
            config = parse_config(overrides, f"load request for model '{name}'")
        version = self.pinned.get(name)
        if version is None:
            return config
        return dataclasses.replace(
            config, version_policy=VersionPolicy("specific", versions=(version,))
        )

    def labels(self, name: str) -> tuple[str, ...]:
        """The model's class labels by index (line ``i`` of ``labels.txt``); none without it."""
        path = self.model_dir(name) / LABELS_FILE
        if not path.is_file():
            return ()
        if path.stat().st_size > MAX_LABELS_BYTES:
            raise ConfigError(str(path), None, f"larger than {MAX_LABELS_BYTES} bytes")
        return tuple(path.read_text(encoding="utf-8").splitlines())

    def versions(self, name: str, config: ModelConfig) -> list[ModelVersionFiles]:
        """The versions ``config.version_policy`` selects, ascending.

        Raises ``ConfigError`` when there are no versions, when a specific version is not on
        disk, or when a selected version has no ``model.onnx`` inside the root.
        """
        model_dir = self.model_dir(name)
        on_disk = sorted(
            int(path.name)
            for path in model_dir.iterdir()
            if path.is_dir() and _VERSION.fullmatch(path.name)
        )
        if not on_disk:
            raise ConfigError(
                str(model_dir),
                None,
                f"no versions: expected <version>/{MODEL_FILE} with a positive integer version",
            )
        missing = [v for v in config.version_policy.versions if v not in on_disk]
        if missing:
            raise ConfigError(
                str(model_dir),
                "version_policy.specific",
                f"version {', '.join(map(str, missing))} not found;"
                f" versions on disk: {', '.join(map(str, on_disk))}",
            )
        return [
            self._version_files(name, model_dir, version)
            for version in config.version_policy.select(on_disk)
        ]

    def _version_files(self, name: str, model_dir: Path, version: int) -> ModelVersionFiles:
        path = model_dir / str(version) / MODEL_FILE
        if not path.exists():
            raise ConfigError(str(path.parent), None, f"version {version} has no {MODEL_FILE}")
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise ConfigError(str(path), None, f"resolves to {resolved}, outside the repository")
        if not resolved.is_file():
            raise ConfigError(str(path), None, "is not a file")
        return ModelVersionFiles(name, version, resolved)
