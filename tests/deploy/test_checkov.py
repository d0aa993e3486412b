"""checkov on everything deploy/ renders: no failed check, and every skip justified.

checkov lives in its own venv (tests/deploy/checkov.sh, run by make test before pytest):
its pinned dependencies conflict with the project's. Image digests (CKV_K8S_43) are skipped
on the command line: the manifests name the release tag, and deploy/README.md says why and
how to pin a digest; the other skips are annotations on the objects, each with its reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKOV = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    / "bazaar"
    / "checkov-3.3.30"
    / "bin"
    / "checkov"
)
SKIPPED_ON_THE_COMMAND_LINE = ["CKV_K8S_43"]
COMPONENTS = sorted(p.name for p in (ROOT / "deploy" / "components").iterdir() if p.is_dir())


def render(target: Path, out: Path) -> None:
    done = subprocess.run(
        ["kubectl", "kustomize", str(target)], capture_output=True, text=True, check=True
    )
    out.write_text(done.stdout)


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The overlays (the versions example among them), the load test, and the CPU overlay
    with each component."""
    out = tmp_path_factory.mktemp("rendered")
    for name in ("overlays/cpu", "overlays/gpu", "overlays/versions", "locust"):
        render(ROOT / "deploy" / name, out / f"{name.replace('/', '-')}.yaml")
    for component in COMPONENTS:
        kustomization = tmp_path_factory.mktemp(component)
        deploy = os.path.relpath(ROOT / "deploy", kustomization)  # kustomize wants relative
        (kustomization / "kustomization.yaml").write_text(
            f"resources: [{deploy}/overlays/cpu]\ncomponents: [{deploy}/components/{component}]\n"
        )
        render(kustomization, out / f"cpu+{component}.yaml")
    return out


def test_checkov_finds_no_failed_check(renders: Path) -> None:
    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV} is missing: run tests/deploy/checkov.sh (make test does)")
    command = [str(CHECKOV), "-d", str(renders), "--framework", "kubernetes", "--quiet"]
    command += ["--output", "json", "--skip-check", ",".join(SKIPPED_ON_THE_COMMAND_LINE)]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
    )
    report = json.loads(done.stdout)
    summary = report["summary"]
    failed = [
        f"{check['check_id']} {check['resource']} in {check['file_path']}"
        for check in report["results"]["failed_checks"]
    ]
    assert failed == [], failed
    assert summary["parsing_errors"] == 0
    assert summary["resource_count"] > 50  # every render was read
    assert summary["passed"] > 700


def test_every_skip_is_justified_in_the_deploy_readme(renders: Path) -> None:
    readme = (ROOT / "deploy" / "README.md").read_text()
    skipped = set(SKIPPED_ON_THE_COMMAND_LINE)
    for path in renders.iterdir():
        skipped |= set(re.findall(r"checkov\.io/skip\d+: (CKV_[A-Z0-9_]+)=", path.read_text()))
    assert skipped
    for check in sorted(skipped):
        assert check in readme, f"{check} is skipped but deploy/README.md does not say why"
