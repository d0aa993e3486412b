"""``bazaar serve --api-keys``: the gateway asks callers for keys, and its own autoscaler,
which reads the gateway's ``/stats`` over HTTP, still gets its signals."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx

from protocol.auth import INFER, METRICS
from tests.protocol.test_auth import key_entry, new_token, write_keys
from tests.support import bazaar_process, free_port, wait_until


def test_the_local_autoscaler_reads_stats_with_a_key_of_its_own(
    demo_repository: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(demo_repository / "digits", repository / "digits")
    token = new_token()
    write_keys(tmp_path / "keys.json", key_entry(token, "ops", INFER, METRICS))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--model-repository", str(repository), "--port", str(port)]
    args += ["--api-keys", str(tmp_path / "keys.json")]
    log = tmp_path / "serve.log"
    headers = {"Authorization": f"Bearer {token}"}

    def metrics() -> str:
        return httpx.get(f"{url}/metrics", headers=headers, timeout=5).text

    with bazaar_process(args, log, f"{url}/v2/health/ready"):
        assert httpx.get(f"{url}/stats", timeout=5).status_code == 401
        wait_until(
            lambda: 'bazaar_autoscaler_queued_rows{model="digits"}' in metrics(),
            60,
            "the autoscaler's queue signal, read from /stats",
        )
    assert "does not answer" not in log.read_text()
