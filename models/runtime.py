"""ONNX Runtime sessions: one per loaded model version.

This is the only module that imports ``onnxruntime``. A ``ModelRuntime`` owns one
``InferenceSession`` and a pool of ``instances`` threads: ``infer`` hands the batch to a
thread (ORT releases the GIL while it computes, so the event loop stays free and
``instances`` batches really execute at once) and waits on a semaphore first, so no more
than ``instances`` batches are ever queued inside the runtime. Everything else waits in
the gateway, where priorities and deadlines apply. A batch with a deadline (the request's
``timeout``) that passes while it waits for an instance is dropped, never computed: its
caller has given up on it, and computing it would only delay the batches behind it.

The session is warmed at load for every batch size a batch can have (powers of two up to
``max_batch_size``, the maximum and the preferred sizes), so the first real request does
not pay for ORT's first-run allocation at a new shape.

Providers: ``device: cpu`` uses the CPU provider; ``cuda`` needs ``CUDAExecutionProvider``
(the ``onnxruntime-gpu`` build and a GPU) and fails to load without it; ``auto`` takes CUDA
when present and falls back to the CPU provider otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from models.config import ModelConfig, resolve_metadata
from models.utilisation import BusyTracker
from protocol.errors import (
    ConfigError,
    DeadlineExceeded,
    InferenceFailed,
    InvalidRequest,
    ModelNotReady,
)
from protocol.schema import DATATYPES, ModelMetadata, TensorSpec
from protocol.statistics import InferenceStatistics
from protocol.tensors import as_bytes

log = logging.getLogger(__name__)

ORT_DATATYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def select_providers(device: str, available: list[str]) -> list[str]:
    """Execution providers for a configured device, given what this ORT build offers."""
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise ConfigError(
            "device",
            None,
            "'cuda' needs CUDAExecutionProvider (install onnxruntime-gpu on a machine with a "
            f"GPU); this build offers {available}",
        )
    if device in ("cuda", "auto") and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def graph_specs(nodes: list[Any], where: str) -> list[TensorSpec]:
    """Tensor specs of ORT graph inputs or outputs; symbolic and unknown dims become -1."""
    specs = []
    for node in nodes:
        datatype = ORT_DATATYPES.get(node.type)
        if datatype is None:
            raise ConfigError(where, node.name, f"ONNX type {node.type} is not supported")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
        specs.append(TensorSpec(node.name, datatype, shape))
    return specs


def warmup_batch_sizes(max_batch_size: int, preferred: tuple[int, ...]) -> list[int]:
    if max_batch_size == 0:
        return [0]
    sizes = {max_batch_size, *preferred}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


@dataclass(frozen=True, slots=True)
class Execution:
    """Where one batch's time went, in seconds (Triton's statistics phases)."""

    queue_s: float
    """From ``infer`` until an instance's thread took the batch."""
    input_s: float
    """Preparing ONNX Runtime's feeds."""
    infer_s: float
    """The session's run: the compute time."""
    output_s: float
    """Reading the outputs back."""


class ModelRuntime:
    """One loaded model version: its session, metadata, busy time and statistics."""

    def __init__(
        self,
        name: str,
        version: int,
        path: Path,
        config: ModelConfig,
        labels: tuple[str, ...] = (),
    ) -> None:
        where = str(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = config.intra_op_threads
        options.inter_op_num_threads = config.inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning intra-op threads burn a core while idle; the gateway and the other
        # workers on the same machine need it more.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = select_providers(config.device, ort.get_available_providers())
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise ConfigError(where, None, f"ONNX Runtime cannot load the model: {exc}") from exc
        self.providers: list[str] = self._session.get_providers()
        if config.device == "auto" and self.providers[0] != "CUDAExecutionProvider":
            # Loud on purpose: a pod that holds a GPU and computes on the CPU is slow and
            # costly, and nothing else would say so (bazaar_model_execution_provider does).
            log.warning(
                "%s version %s: device 'auto' found no CUDAExecutionProvider; computing on %s",
                name,
                version,
                self.providers[0],
            )
        self.config = config
        self._min_batch_s = config.min_batch_time_ms / 1000
        self.metadata: ModelMetadata = resolve_metadata(
            name,
            str(version),
            config,
            graph_specs(self._session.get_inputs(), where),
            graph_specs(self._session.get_outputs(), where),
            where,
        )
        self.metadata = dataclasses.replace(self.metadata, labels=labels)
        self.busy = BusyTracker(config.instances)
        self.statistics = InferenceStatistics()
        """Triton's statistics extension for this version, kept by its caller."""
        self._executor = ThreadPoolExecutor(config.instances, thread_name_prefix=f"ort-{name}")
        self._slots: asyncio.Semaphore | None = None
        self._closed = False
        self._warm_up()
        log.info(
            "loaded %s version %s from %s on %s (max_batch_size %d)",
            name,
            version,
            path,
            self.providers[0],
            self.metadata.max_batch_size,
        )

    async def infer(
        self,
        inputs: dict[str, np.ndarray[Any, Any]],
        output_names: list[str],
        deadline: float | None = None,
    ) -> tuple[dict[str, np.ndarray[Any, Any]], Execution]:
        """Run one batch; returns the outputs and where its time went.

        ``deadline`` (the loop's clock): ``DeadlineExceeded`` if no instance is free by then.
        """
        queued = time.perf_counter()
        if self._slots is None:  # asyncio objects belong to the running loop
            self._slots = asyncio.Semaphore(self.config.instances)
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            raise DeadlineExceeded(
                f"model '{self.metadata.name}': the request's timeout passed while it waited"
                " for a free instance"
            ) from None
        if self._closed:
            self._slots.release()
            raise ModelNotReady(self.metadata.name, "unloaded")
        run = asyncio.get_running_loop().run_in_executor(
            self._executor, self._run, inputs, output_names, queued
        )
        # The instance is free when the run ends, not when its caller stops waiting: a
        # caller that left (its client disconnected) must not let a further batch onto it.
        run.add_done_callback(self._finished)
        return await asyncio.shield(run)

    def _finished(self, run: asyncio.Future[Any]) -> None:
        assert self._slots is not None
        self._slots.release()
        if not run.cancelled():
            run.exception()  # retrieved: a caller that left would never see it

    def close(self) -> None:
        """Stop taking batches; waits for those executing."""
        self._closed = True
        self._executor.shutdown(wait=True)

    def _run(
        self, inputs: dict[str, np.ndarray[Any, Any]], output_names: list[str], queued: float
    ) -> tuple[dict[str, np.ndarray[Any, Any]], Execution]:
        taken = time.perf_counter()
        feeds = {name: _to_ort(array) for name, array in inputs.items()}
        self.busy.begin()
        started = time.perf_counter()
        try:
            results = self._session.run(output_names, feeds)
            # The benchmark's accelerator (ModelConfig.min_batch_time_ms): the instance is
            # held, and busy, for the batch time it models.
            time.sleep(max(0.0, self._min_batch_s - (time.perf_counter() - started)))
        except Exception as exc:
            # Validation already matched names, types and fixed dims; what ORT still refuses
            # (a variable dim a Reshape cannot take) is about the input's values or sizes.
            if type(exc).__name__ in ("InvalidArgument", "InvalidGraph"):
                raise InvalidRequest(f"model rejected the input: {exc}") from exc
            raise InferenceFailed(f"inference failed: {exc}") from exc
        finally:
            ended = time.perf_counter()
            self.busy.end()
        outputs = {name: _from_ort(out) for name, out in zip(output_names, results, strict=True)}
        execution = Execution(
            queue_s=taken - queued,
            input_s=started - taken,
            infer_s=ended - started,
            output_s=time.perf_counter() - ended,
        )
        return outputs, execution

    def _warm_up(self) -> None:
        started = time.perf_counter()
        sizes = warmup_batch_sizes(
            self.metadata.max_batch_size, self.config.dynamic_batching.preferred_batch_sizes
        )
        names = [spec.name for spec in self.metadata.outputs]
        for rows in sizes:
            feeds = {spec.name: _zeros(spec, rows) for spec in self.metadata.inputs}
            try:
                self._session.run(names, {k: _to_ort(v) for k, v in feeds.items()})
            except Exception as exc:  # a model may refuse all-zero input; serving still works
                log.warning("warm-up of %s at batch %d failed: %s", self.metadata.name, rows, exc)
                return
        log.debug(
            "warmed %s for batch sizes %s in %.0f ms",
            self.metadata.name,
            sizes,
            (time.perf_counter() - started) * 1000,
        )


def _zeros(spec: TensorSpec, rows: int) -> np.ndarray[Any, Any]:
    shape = [1 if d < 0 else d for d in spec.shape]
    if rows:
        shape[0] = rows
    if spec.datatype == "BYTES":
        return np.full(shape, b"", dtype=object)
    return np.zeros(shape, dtype=DATATYPES[spec.datatype])


def _to_ort(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    # ORT's string tensors take str objects; the protocol carries bytes.
    if array.dtype == object:
        return np.vectorize(_as_str, otypes=[object])(array) if array.size else array
    return array


def _from_ort(array: Any) -> np.ndarray[Any, Any]:
    result = np.asarray(array)
    if result.dtype == object or result.dtype.kind == "U":
        return np.vectorize(as_bytes, otypes=[object])(result) if result.size else result
    return result


def _as_str(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
