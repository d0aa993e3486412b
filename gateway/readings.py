"""What an endpoint serves of a model, and what the readings of all its endpoints mean.

``read_model`` reads one endpoint: the versions it serves (the ``versions`` of ``GET
/v2/models/{m}``; at most ``MAX_VERSIONS``), and for each its metadata (``GET
/v2/models/{m}/versions/{v}``) and batching config (``.../config``, a Triton extension; a
server without it, MLServer or KServe, is taken at its metadata's word,
``parameters.max_batch_size`` or 0), with what the endpoints file says of the model on top
(``GatewayConfig.models``), and the traffic policy its config holds. A pod that names one
version is read at the unversioned paths, which describe it.

The catalog re-reads every endpoint periodically: that works against any v2 server, sees a
change in either direction (a limit raised as well as lowered) with or without traffic, and
needs nothing the data port does not already serve; a pod's repository index would need the
control port, which the gateway may not reach, and a 400 from a pod only arrives after a
batch has failed. ``reconcile_versions`` decides, a pure function of the readings, version by
version (``reconcile``):

* An endpoint that answers that it does not serve the version leaves the version's pool (its
  requests go to the others, or wait in the queue while there are none) and rejoins when it
  serves it again, fresh: it is not ejected, which would fail batches until a probe. A
  version a pod starts serving is served from then on.
* An endpoint whose version has other tensors than the gateway validates against leaves the
  pool too (its batches would fail); when no endpoint serves the gateway's tensors any more
  (the version was reloaded from another file), the gateway takes the new ones.
* ``max_batch_size`` is the smallest among the version's serving endpoints, so every batch
  fits every pod; the dispatcher forms batches with it from then on.
* An endpoint that could not be read keeps its places; ejection is the router's business.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.client import HttpModelClient
from gateway.config import GatewayConfig, ModelSettings, batch_policy
from gateway.dispatcher import BatchPolicy
from protocol.errors import UpstreamError
from protocol.schema import ModelMetadata
from protocol.traffic import TrafficPolicy, parse_traffic, version_order

MAX_VERSIONS = 16
"""The most versions of one model a pod may name: each is read, queued and batched apart."""


@dataclasses.dataclass(frozen=True, slots=True)
class Reading:
    """What one endpoint serves of a model version."""

    metadata: ModelMetadata
    policy: BatchPolicy
    passthrough: bool = False
    """Requests cannot be validated (the metadata lacks inputs or outputs) or must not be
    (the endpoints file says ``validate: false``): they pass through as sent."""
    traffic: TrafficPolicy | None = None
    """The traffic policy of the model's config (``protocol.traffic``), if it has one."""


def model_path(model: str, version: str) -> str:
    """Where pods serve ``model`` at ``version``, under ``/v2/models/``: a named version by
    its own path, so that a pod serving several runs the one the batch is for."""
    return f"{model}/versions/{version}" if version else model


async def read_model(
    client: HttpModelClient,
    url: str,
    model: str,
    settings: ModelSettings,
    config: GatewayConfig,
) -> dict[str, Reading]:
    """What ``url`` serves of ``model``, by version, as the gateway will treat it (see the
    module's docstring); raises whatever went wrong (``UpstreamError``, or a ``ValueError``
    & co. from a body that is not metadata)."""
    metadata_json = await _get_object(client, url, f"/v2/models/{model}")
    versions = metadata_json.get("versions") or []
    if not isinstance(versions, list) or len(versions) > MAX_VERSIONS:
        raise UpstreamError(
            f"GET {url}/v2/models/{model} names versions {versions!r:.200}: "
            f"expected a list of at most {MAX_VERSIONS}"
        )
    if len(versions) <= 1:
        reading = await _read_version(client, url, model, "", metadata_json, settings, config)
        return {reading.metadata.version: reading}
    names = [str(version) for version in versions]
    metadata = await asyncio.gather(
        *(_get_object(client, url, f"/v2/models/{model_path(model, v)}") for v in names)
    )
    readings = await asyncio.gather(
        *(
            _read_version(client, url, model, version, version_json, settings, config)
            for version, version_json in zip(names, metadata, strict=True)
        )
    )
    return dict(zip(names, readings, strict=True))


async def _read_version(
    client: HttpModelClient,
    url: str,
    model: str,
    version: str,
    metadata_json: dict[str, Any],
    settings: ModelSettings,
    config: GatewayConfig,
) -> Reading:
    """One version's reading from its metadata and config (``version`` "": the pod names at
    most one, described by the unversioned paths)."""
    path = f"/v2/models/{model_path(model, version)}"
    config_json = await client.get_json(url, f"{path}/config", optional=True)
    if config_json is None:  # no config route: the metadata's word
        parameters = metadata_json.get("parameters") or {}
        config_json = {"max_batch_size": parameters.get("max_batch_size", 0)}
    elif not isinstance(config_json, dict):
        raise UpstreamError(f"GET {url}{path}/config answered {config_json!r:.200}")
    if settings.max_batch_size is not None:
        config_json = {**config_json, "max_batch_size": settings.max_batch_size}
    policy = batch_policy(config_json, config)
    metadata = ModelMetadata.from_json(
        {
            **metadata_json,
            "inputs": metadata_json.get("inputs") or [],
            "outputs": metadata_json.get("outputs") or [],
            "parameters": {"max_batch_size": policy.max_batch_size},
        },
        version or None,
    )
    labels = config_json.get("labels")
    if isinstance(labels, list) and all(isinstance(label, str) for label in labels):
        # A bazaar pod's: the classification extension answers with them here.
        metadata = dataclasses.replace(metadata, labels=tuple(labels))
    traffic = config_json.get("traffic")
    if traffic is not None:
        traffic = parse_traffic(traffic, f"{url}{path}/config")
    if settings.validate and metadata.inputs and metadata.outputs:
        return Reading(metadata, policy, traffic=traffic)
    return Reading(
        dataclasses.replace(metadata, max_batch_size=0),
        dataclasses.replace(policy, max_batch_size=0, preferred_batch_sizes=()),
        passthrough=True,
        traffic=traffic,
    )


async def _get_object(client: HttpModelClient, url: str, path: str) -> dict[str, Any]:
    answer = await client.get_json(url, path)
    if not isinstance(answer, dict):
        raise UpstreamError(f"GET {url}{path} answered {answer!r:.200}")
    return answer


NOT_SERVING = "not serving"
"""An endpoint answered that it does not serve the model (not ready, not found), or read,
that it does not serve the version."""
UNREAD = "unread"
"""An endpoint said it serves the model but its metadata could not be read."""

EndpointReading = Reading | str
"""What one endpoint serves of one version."""
EndpointReadings = Mapping[str, Reading] | str
"""What one endpoint serves of a model: a reading per version, or why there is none."""


@dataclasses.dataclass(frozen=True, slots=True)
class Reconciled:
    urls: list[str]
    """The endpoints that take the version's batches."""
    metadata: ModelMetadata
    max_batch_size: int


def reconcile(
    current: ModelMetadata, readings: Mapping[str, EndpointReading], pooled: Sequence[str]
) -> Reconciled:
    """The endpoints to use and the metadata to validate with, for one version, from each
    endpoint's reading of it.

    ``pooled``: the endpoints in use now (an ``UNREAD`` one keeps its membership).
    """
    read = {url: r for url, r in readings.items() if isinstance(r, Reading)}
    chosen = current
    if read and not any(_same_model(r.metadata, current) for r in read.values()):
        chosen = next(iter(read.values())).metadata  # every pod serves other tensors now
    compatible = [url for url, r in read.items() if _same_model(r.metadata, chosen)]
    urls = [
        url for url, r in readings.items() if url in compatible or (r == UNREAD and url in pooled)
    ]
    sizes = [read[url].policy.max_batch_size for url in compatible]
    max_batch_size = min(sizes) if sizes else chosen.max_batch_size
    metadata = dataclasses.replace(chosen, max_batch_size=max_batch_size)
    return Reconciled(urls, metadata, max_batch_size)


def reconcile_versions(
    served: Mapping[str, ModelMetadata],
    readings: Mapping[str, EndpointReadings],
    pooled: Mapping[str, Sequence[str]],
) -> dict[str, Reconciled]:
    """``reconcile`` for every version served or read, by version: ``served`` holds the
    metadata the gateway validates each served version with, ``pooled`` each one's endpoints
    in use now."""
    found: dict[str, ModelMetadata] = {}
    for endpoint_readings in readings.values():
        if not isinstance(endpoint_readings, str):
            for version, reading in endpoint_readings.items():
                found.setdefault(version, reading.metadata)
    results = {}
    for version in sorted(served.keys() | found.keys(), key=version_order):
        of_version: dict[str, EndpointReading] = {
            url: of_url if isinstance(of_url, str) else of_url.get(version, NOT_SERVING)
            for url, of_url in readings.items()
        }
        current = served.get(version) or found[version]
        results[version] = reconcile(current, of_version, pooled.get(version, []))
    return results


def default_version(pooled: Mapping[str, Sequence[str]]) -> str:
    """The version unversioned requests go to: the highest with endpoints, or the highest."""
    versions = sorted(pooled, key=version_order)
    with_endpoints = [version for version in versions if pooled[version]]
    return (with_endpoints or versions)[-1]


def _same_model(a: ModelMetadata, b: ModelMetadata) -> bool:
    return (a.version, a.inputs, a.outputs) == (b.version, b.inputs, b.outputs)


def config_traffic(read: Sequence[Mapping[str, Reading]]) -> TrafficPolicy | None:
    """The traffic policy of the model's config, as the highest version read says (its
    config is the newest)."""
    highest = max((v for r in read for v in r), key=version_order)
    return next(r[highest].traffic for r in read if highest in r)


def reading_of(readings: Mapping[str, EndpointReadings], version: str) -> Reading:
    """The first endpoint's reading of ``version`` (a version newly served)."""
    return next(r[version] for r in readings.values() if not isinstance(r, str) and version in r)
