"""The architecture holds: the import contracts, and a command line that imports nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_contracts_are_kept() -> None:
    """The layers and seams of pyproject's [tool.importlinter] (docs/architecture.md)."""
    linter = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(linter), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


HEAVY = [
    "numpy", "prometheus_client", "aiohttp", "onnxruntime", "kubernetes", "matplotlib",
    "uvicorn", "starlette",
]  # fmt: skip


def test_bazaar_help_imports_nothing_heavy() -> None:
    probe = (
        "import contextlib, io, json, sys\n"
        "from bazaar.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout) == []
