"""One inference at the gateway, whatever carried it: the steps HTTP and gRPC share.

``GatewayInference.run`` is the hot path's order, which is what keeps an overloaded gateway
serving at capacity: the model's dispatcher (held until one appears for a model without an
endpoint yet, up to the queue time) → the tenant's rate quota → the dispatcher's admission,
knowing only the transport's headers or deadline, so a request that will not fit is refused
before its body is decoded → decode (the transport's own codec, validating against the
model's metadata) → Triton's schedule parameters → the tenant's rows quota → submit → wait →
encode. A caller that leaves cancels the wait, and with it its place in the queue. Every
outcome is counted once, per model, in the metrics and in Triton's statistics (which
``statistics`` answers). A model that cannot be validated (it declares no
tensors) skips decoding: its request goes as sent, one row, through the same quotas and
queue (``gateway.passthrough``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from gateway.catalog import ModelCatalog
from gateway.router import RawRequest, Tensors
from gateway.tenants import Tenants
from protocol import tracing
from protocol.codec import InferenceRequest
from protocol.errors import BazaarError, InvalidRequest, QuotaExceeded
from protocol.fastpath import Headers
from protocol.metrics import CANCELLED, outcome_of
from protocol.modelconfig import triton_config
from protocol.schema import ModelMetadata
from protocol.traffic import version_order

Answer = TypeVar("Answer")
Decode = Callable[[ModelMetadata], tuple[InferenceRequest, float | None]]
"""The request body for a model's metadata, and the transport's own limit on its wait in
seconds (``X-Request-Timeout-Ms``, the gRPC deadline), None when it sets none."""
Forwarded = tuple[RawRequest, Mapping[str, Any], float | None]
"""For a model passed through unvalidated (``gateway.passthrough``): the request as sent, its
``parameters`` as far as they could be read, and the transport's limit on its wait."""


class GatewayInference:
    """The inference steps both transports call; create it with the catalog it serves."""

    def __init__(self, catalog: ModelCatalog) -> None:
        self.catalog = catalog
        self.tenants = Tenants(catalog.config.tenants)
        self._quota_refusals = catalog.metrics.quota_refusals

    async def run(
        self,
        model: str,
        version: str | None,
        tenant_name: str | None,
        admission_timeout_s: float | None,
        decode: Decode,
        encode: Callable[[InferenceRequest, ModelMetadata, Tensors], Answer],
        forward: Callable[[], Forwarded] | None = None,
        headers: Headers | None = None,
    ) -> Answer:
        """Serve one request (see the module docstring); raises ``BazaarError`` to refuse it.

        ``admission_timeout_s`` is what the transport knows of the request's time before its
        body is decoded (None: nothing). ``forward``: how the transport passes a request
        through as sent, to a model that cannot be validated (HTTP; the answer is the
        upstream's, as it sent it). ``headers``: the transport's, where a traffic policy's
        sticky header is looked up for a request that names no version (HTTP).
        """
        tracer = tracing.TRACER
        if tracer is None:
            return await self._run(
                model, version, tenant_name, admission_timeout_s, decode, encode, forward, headers
            )
        attributes = {"bazaar.model": model, "bazaar.version": version or ""}
        with tracing.server_span(tracer, f"infer {model}", attributes) as span:
            if span.is_recording():  # unsampled: no spans under it
                decode = tracing.traced(tracer, "decode", decode)
                encode = tracing.traced(tracer, "encode", encode)
            return await self._run(
                model, version, tenant_name, admission_timeout_s, decode, encode, forward, headers
            )

    async def _run(
        self,
        model: str,
        version: str | None,
        tenant_name: str | None,
        admission_timeout_s: float | None,
        decode: Decode,
        encode: Callable[[InferenceRequest, ModelMetadata, Tensors], Answer],
        forward: Callable[[], Forwarded] | None,
        headers: Headers | None,
    ) -> Answer:
        started = time.perf_counter()
        catalog = self.catalog
        served = await catalog.serving(model, version, catalog.config.max_queue_time_s, headers)
        dispatcher = served.dispatcher
        tenant = self.tenants.get(tenant_name)
        rows = 0
        status = 500
        try:
            tenant.admit(asyncio.get_running_loop().time())
            dispatcher.admit(admission_timeout_s, tenant)
            if served.passthrough:
                if forward is None:
                    raise InvalidRequest(
                        f"model '{model}' declares no tensors: its requests are passed through "
                        "as sent, over HTTP only"
                    )
                raw, parameters, limit_s = forward()
                priority, timeout_s = schedule(parameters, limit_s)
                tenant.take_rows(1)
                rows = 1
                passed = await dispatcher.submit(raw, rows, priority, timeout_s, tenant)
                status = 200
                return cast(Answer, passed)
            metadata = served.metadata
            request, limit_s = decode(metadata)
            priority, timeout_s = schedule(request.parameters, limit_s)
            request_rows = request.rows(metadata.max_batch_size)
            tenant.take_rows(request_rows)
            rows = request_rows
            future = dispatcher.submit(request.inputs, rows, priority, timeout_s, tenant)
            shadow = catalog.shadows.get(model)
            if (
                shadow is not None
                and shadow.candidate is not dispatcher
                and shadow.inputs == metadata.inputs
            ):
                shadow.send(request.inputs, rows, future)
            response = encode(request, metadata, await future)
            status = 200
            return response
        except QuotaExceeded as exc:
            status = exc.status
            self._quota_refusals.labels(tenant.name, exc.quota).inc()
            raise
        except BazaarError as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = CANCELLED
            raise
        finally:
            if rows:
                tenant.release_rows(rows)
            elapsed_s = time.perf_counter() - started
            served.metrics.requests[outcome_of(status)].inc()
            served.metrics.request_seconds.observe(elapsed_s)
            served.metrics.statistics.answered(status == 200, rows, elapsed_s)
            rollout = catalog.rollouts.get(model)
            if rollout is not None:
                rollout.record(served.metadata.version, elapsed_s, status)


def statistics(
    catalog: ModelCatalog, name: str | None, version: str | None
) -> list[dict[str, Any]]:
    """Triton's ``model_stats`` at the gateway: of every version of every model served (no
    ``name``), of every version of ``name``, or of its ``version``; ``BazaarError`` for a
    model or version not served."""
    if name:
        catalog.get(name, version or None)  # not served: its error
        served = catalog.versions[name]
        chosen = (
            [served[version]] if version else [served[v] for v in sorted(served, key=version_order)]
        )
    else:
        chosen = [
            versions[v]
            for _, versions in sorted(catalog.versions.items())
            for v in sorted(versions, key=version_order)
        ]
    return [s.metrics.statistics.to_json(s.metadata.name, s.metadata.version) for s in chosen]


def model_config(catalog: ModelCatalog, name: str, version: str | None) -> dict[str, Any]:
    """Triton's ``ModelConfig`` JSON of what the gateway enforces for ``name``: the tensors
    it validates (none for a model passed through) and the batching its dispatcher does."""
    served = catalog.get(name, version)
    policy = served.dispatcher.policy
    return triton_config(
        served.metadata,
        max_queue_delay_s=policy.max_queue_delay_s,
        preferred_batch_sizes=policy.preferred_batch_sizes,
        max_queue_size=policy.max_queue_size,
        default_timeout_s=policy.default_timeout_s,
        priority_levels=policy.priority_levels,
        default_priority_level=policy.default_priority_level,
    )


def schedule(parameters: Mapping[str, Any], limit_s: float | None) -> tuple[int, float | None]:
    """Triton's schedule parameters: ``priority`` (1 highest, 0 default) and ``timeout`` (µs),
    the timeout shortened to the transport's ``limit_s`` when that is sooner."""
    priority = parameters.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or priority < 0:
        raise InvalidRequest(f"parameter 'priority' must be an integer >= 0, got {priority!r}")
    timeout = parameters.get("timeout")
    timeout_s: float | None = None
    if timeout is not None:
        if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0:
            raise InvalidRequest(
                "parameter 'timeout' must be an integer number of microseconds >= 0, "
                f"got {timeout!r}"
            )
        timeout_s = timeout / 1_000_000 or None
    if limit_s:
        timeout_s = min(timeout_s, limit_s) if timeout_s else limit_s
    return priority, timeout_s
