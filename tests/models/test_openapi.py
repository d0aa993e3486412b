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
    # Model control is off: load and unload answer 400 saying so, as documented.
    assert "400" in paths["/v2/repository/models/{model}/load"]["post"]["responses"]
    refused = httpx.post(f"{model_server}/v2/repository/models/mlp/load", timeout=10)
    assert refused.status_code == 400
    assert "model control is off" in refused.json()["error"]
