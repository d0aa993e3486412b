"""A model repository downloaded into a pod: ``bazaar models fetch URL --sha256 HEX DIR``.

For an init container: the archive (``.tar.gz`` or ``.tar``, a model repository at its root)
is streamed over HTTP(S) into a temporary file next to ``DIR`` while its SHA-256 is computed;
nothing is unpacked unless the digest matches the one given, so a truncated or tampered
download never becomes a model. Unpacking uses tarfile's ``data`` filter: members that are
absolute, climb out with ``..``, are links pointing outside, devices or set-uid files are
refused, and the whole extraction fails with them. The repository appears in ``DIR`` only
once complete (it is extracted beside it, then renamed), so a pod restarted mid-download
starts again cleanly instead of serving half a model.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from protocol.errors import ConfigError

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0
"""Per read: a server that stops sending for this long fails the download."""


def fetch_repository(url: str, sha256: str, directory: Path) -> Path:
    """Download ``url``, check its SHA-256, unpack it as ``directory``; returns ``directory``.

    ``ConfigError`` names the URL and the problem (unreachable, wrong digest, unsafe member).
    """
    expected = sha256.lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise ConfigError("--sha256", None, f"must be 64 hex digits, got {sha256!r}")
    if not url.startswith(("https://", "http://")):
        raise ConfigError(url, None, "only http(s) URLs can be fetched")
    if directory.exists() and any(directory.iterdir()):
        raise ConfigError(str(directory), None, "exists and is not empty")
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".fetch-") as scratch:
        archive = Path(scratch) / "archive"
        digest = _download(url, archive)
        if digest != expected:
            raise ConfigError(url, None, f"SHA-256 is {digest}, expected {expected}")
        unpacked = Path(scratch) / "repository"
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(unpacked, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise ConfigError(url, None, f"cannot unpack the archive: {exc}") from None
        if directory.exists():
            directory.rmdir()
        os.replace(unpacked, directory)
    return directory


def _download(url: str, path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, path.open("wb") as out:
            while chunk := response.read(CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError(url, None, f"cannot download: {exc}") from None
    return digest.hexdigest()
