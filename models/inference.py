"""One inference at the pod, whatever carried it: the steps HTTP and gRPC share.

``PodInference.run``: the model's metadata → decode (the transport's codec, validating against
the metadata, 400 before the runtime sees anything) → ``parameters.timeout`` (µs, as in
Triton: how long the request may wait for a free instance), shortened to the transport's own
limit (the gRPC deadline) → the model's runtime, paged in first if the pod pages models
(``models.store``), within the same time → the runtime in a worker thread → encode. Past
its time a request is answered 504 and never computed. Every outcome and batch is counted
once, in the metrics and in the version's statistics (Triton's extension,
``protocol.statistics``): a request's time runs from its arrival to its encoded answer, and
its batch's phases are the runtime's. A runtime's statistics go with it when it is evicted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

from models.metrics import PodMetrics
from models.runtime import ModelRuntime
from models.store import ModelStore
from protocol import tracing
from protocol.codec import InferenceRequest
from protocol.errors import BazaarError, DeadlineExceeded, InvalidRequest
from protocol.metrics import outcome_of
from protocol.schema import ModelMetadata
from protocol.tensors import Array

Answer = TypeVar("Answer")


class PodInference:
    """The inference steps both transports call, on one store and its metrics."""

    def __init__(self, store: ModelStore, metrics: PodMetrics) -> None:
        self.store = store
        self.metrics = metrics

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        """The model's v2 metadata JSON; every version it has when none is named."""
        view = self.store.view(name, version)
        versions = [str(v) for v in self.store.versions(name)]
        return view.metadata.to_json(versions if version is None else None)

    def statistics(self, name: str | None, version: str | None) -> list[dict[str, Any]]:
        """Triton's ``model_stats``: of every loaded version of every model (no ``name``), of
        ``name``, or of its ``version``; ``BazaarError`` for one the pod does not serve."""
        store = self.store
        if not name:
            runtimes = [
                runtime
                for _, loaded in sorted(store.models.items())
                for _, runtime in sorted(loaded.versions.items())
            ]
        elif version:
            runtimes = [store.get(name, version)]
        else:
            store.get(name)  # unknown or not loaded: its error
            runtimes = [runtime for _, runtime in sorted(store.models[name].versions.items())]
        return [
            runtime.statistics.to_json(runtime.metadata.name, runtime.metadata.version)
            for runtime in runtimes
        ]

    async def run(
        self,
        model: str,
        version: str | None,
        decode: Callable[[ModelMetadata], InferenceRequest],
        encode: Callable[[InferenceRequest, ModelMetadata, dict[str, Array]], Answer],
        limit_s: float | None = None,
    ) -> Answer:
        """Serve one request (see the module docstring); raises ``BazaarError`` to refuse it."""
        tracer = tracing.TRACER
        if tracer is None:
            return await self._run(model, version, decode, encode, limit_s)
        attributes = {"bazaar.model": model, "bazaar.version": version or ""}
        with tracing.server_span(tracer, f"infer {model}", attributes) as span:
            if span.is_recording():  # unsampled: no spans under it
                decode = tracing.traced(tracer, "decode", decode)
                encode = tracing.traced(tracer, "encode", encode)
            return await self._run(model, version, decode, encode, limit_s)

    async def _run(
        self,
        model: str,
        version: str | None,
        decode: Callable[[ModelMetadata], InferenceRequest],
        encode: Callable[[InferenceRequest, ModelMetadata, dict[str, Array]], Answer],
        limit_s: float | None,
    ) -> Answer:
        arrived = asyncio.get_running_loop().time()
        started = time.perf_counter()  # uvloop's loop.time() counts whole milliseconds
        view = self.store.view(model, version)
        metadata = view.metadata
        # Counted in the loaded runtime's statistics, refusals included; an evicted model's
        # once it is paged in.
        runtime = view if isinstance(view, ModelRuntime) else None
        metrics = self.metrics
        outcome = "server_error"
        rows = 0
        try:
            request = decode(metadata)
            timeout_s = _timeout_s(request.parameters)
            if limit_s is not None:
                timeout_s = min(timeout_s, limit_s) if timeout_s else limit_s
            deadline = None if timeout_s is None else arrived + timeout_s
            names = (
                [o.name for o in request.outputs]
                if request.outputs is not None
                else [spec.name for spec in metadata.outputs]
            )
            rows = request.rows(metadata.max_batch_size)
            try:
                async with self.store.serving(model, version, deadline) as runtime:
                    outputs, execution = await runtime.infer(request.inputs, names, deadline)
            except DeadlineExceeded:
                raise  # dropped before computing: not a batch
            except BaseException:
                metrics.batches.labels(model, "failure").inc()
                raise
            metrics.batches.labels(model, "success").inc()
            metrics.batch_size.labels(model).observe(rows)
            metrics.compute_seconds.labels(model).observe(execution.infer_s)
            runtime.statistics.executed(
                rows,
                1,
                execution.queue_s,
                execution.input_s,
                execution.infer_s,
                execution.output_s,
            )
            if tracing.TRACER is not None and tracing.recording():
                tracing.finished_span(tracing.TRACER, "compute", execution.infer_s)
            response = encode(request, runtime.metadata, outputs)
            outcome = "success"
            return response
        except BazaarError as exc:
            outcome = outcome_of(exc.status)
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"  # the gateway let go of the batch: every caller left
            raise
        finally:
            metrics.requests.labels(model, outcome).inc()
            if runtime is not None:
                elapsed_s = time.perf_counter() - started
                runtime.statistics.answered(outcome == "success", rows, elapsed_s)


def _timeout_s(parameters: dict[str, Any]) -> float | None:
    """``parameters.timeout`` in seconds: Triton's microseconds the request may wait; 0 or
    absent, no limit."""
    timeout = parameters.get("timeout")
    if timeout is None:
        return None
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0:
        raise InvalidRequest(
            f"parameter 'timeout' must be an integer number of microseconds >= 0, got {timeout!r}"
        )
    return timeout / 1_000_000 or None
