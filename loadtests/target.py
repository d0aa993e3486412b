"""The v2 server under test, asked over plain HTTP: which models it serves ready, and each
one's inputs. Only the standard library, as ``loadtests.payloads`` (the locustfile imports
this module inside Locust's workers)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from loadtests.payloads import ModelSpec


class TargetError(Exception):
    """The server did not say what the load test needs; the message says what to do."""


def ready_models(host: str) -> list[str]:
    """The names ``POST /v2/repository/index`` lists as ready, sorted."""
    request = urllib.request.Request(
        f"{host.rstrip('/')}/v2/repository/index",
        data=b'{"ready": true}',
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            entries = json.loads(answer.read())
        names = [str(entry["name"]) for entry in entries if entry.get("state", "READY") == "READY"]
    except (urllib.error.URLError, OSError, ValueError, TypeError, KeyError) as exc:
        raise TargetError(f"cannot list the models of {host} ({exc})") from None
    if not names:
        raise TargetError(f"{host} has no ready model")
    return sorted(set(names))


def fetch_spec(host: str, model: str) -> ModelSpec:
    """``model``'s inputs, from ``GET /v2/models/{model}``."""
    with urllib.request.urlopen(f"{host.rstrip('/')}/v2/models/{model}", timeout=10) as answer:
        return ModelSpec.from_metadata(json.loads(answer.read()))
