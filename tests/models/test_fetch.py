"""``bazaar models fetch``: a model repository archive over real HTTP, checked, unpacked safely."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from models.fetch import fetch_repository
from models.repository import ModelRepository
from protocol.errors import ConfigError


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served over HTTP on loopback, and its base URL."""
    root = tmp_path / "served"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def archive(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


def test_a_repository_archive_is_fetched_checked_and_served(
    files: tuple[Path, str], demo_repository: Path, tmp_path: Path
) -> None:
    root, base = files
    model = (demo_repository / "digits" / "1" / "model.onnx").read_bytes()
    data = archive({"digits/1/model.onnx": model, "digits/config.yaml": b"max_batch_size: 8\n"})
    (root / "models.tar.gz").write_bytes(data)
    target = tmp_path / "models"
    digest = hashlib.sha256(data).hexdigest()
    command = ["models", "fetch", f"{base}/models.tar.gz", str(target), "--sha256", digest]
    done = subprocess.run(
        [sys.executable, "-m", "bazaar", *command],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert ModelRepository(target).model_names() == ["digits"]
    assert (target / "digits" / "1" / "model.onnx").read_bytes() == model


def test_a_wrong_digest_unpacks_nothing(files: tuple[Path, str], tmp_path: Path) -> None:
    root, base = files
    (root / "models.tar.gz").write_bytes(archive({"m/1/model.onnx": b"x"}))
    target = tmp_path / "models"
    with pytest.raises(ConfigError, match=r"SHA-256 is [0-9a-f]{64}, expected 0{64}"):
        fetch_repository(f"{base}/models.tar.gz", "0" * 64, target)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fetch-")] == []


@pytest.mark.parametrize(
    ("members", "links"),
    [
        ({"../escape/model.onnx": b"x"}, None),
        ({}, {"m/escape": "../../../outside"}),
        ({}, {"m/1/model.onnx": "/etc/passwd"}),
    ],
)
def test_unsafe_members_are_refused(
    files: tuple[Path, str],
    tmp_path: Path,
    members: dict[str, bytes],
    links: dict[str, str] | None,
) -> None:
    root, base = files
    data = archive(members, links)
    (root / "bad.tar.gz").write_bytes(data)
    target = tmp_path / "models"
    with pytest.raises(ConfigError, match="cannot unpack"):
        fetch_repository(f"{base}/bad.tar.gz", hashlib.sha256(data).hexdigest(), target)
    assert not target.exists()
    assert not (tmp_path / "escape").exists()


def test_bad_arguments_and_unreachable_urls_are_clear(
    files: tuple[Path, str], tmp_path: Path
) -> None:
    _, base = files
    with pytest.raises(ConfigError, match="64 hex digits"):
        fetch_repository(f"{base}/x", "abc", tmp_path / "a")
    with pytest.raises(ConfigError, match="only http"):
        fetch_repository("file:///etc/passwd", "0" * 64, tmp_path / "b")
    with pytest.raises(ConfigError, match="cannot download: HTTP Error 404"):
        fetch_repository(f"{base}/missing.tar.gz", "0" * 64, tmp_path / "c")
