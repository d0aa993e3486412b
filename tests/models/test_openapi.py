"""The pod's ``/openapi.json``, from a real ``bazaar model-server`` process."""

from __future__ import annotations

import httpx
import schemathesis


def test_the_pod_describes_its_routes_and_models(model_server: str) -> None:
    document = httpx.get(f"{model_server}/openapi.json", timeout=10).json()
    schemathesis.openapi.from_dict(document).validate()
    paths = document["paths"]
    for model in ("digits", "mlp", "mlp_wide"):
        for path in ("", "/ready", "/config", "/infer"):
            assert f"/v2/models/{model}{path}" in paths
            assert f"/v2/models/{model}/versions/1{path}" in paths
    assert "/v2/models/{model}/config" in paths
    # Model control is off: its routes are not served, so not listed.
    assert not any(path.startswith("/v2/repository/models/") for path in paths)
