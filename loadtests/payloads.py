"""Random, valid inference bodies for any v2 model, built from its metadata alone.

``ModelSpec.from_metadata`` reads the JSON of ``GET /v2/models/{m}`` (bazaar, Triton, KServe and
MLServer all answer it); ``build_payload`` turns a spec into a complete request body, either
all-JSON (flat row-major ``data``) or with the binary tensor extension (every input a chunk
after the JSON header, ``Inference-Header-Content-Length`` set, outputs asked for in binary).

Shapes: a leading ``-1`` is the batch dimension and gets ``rows``; any other ``-1`` gets
``VARIABLE_DIM``. Values are uniform floats in [0, 1), small non-negative integers (integer
inputs are usually ids or indices, which a model checks against a table of unknown size, and
0..15 fits any of them), random booleans, and short ASCII strings for BYTES. The wrong-shape
mode gives one fixed dimension an extra element (or, when no dimension is fixed, the tensor
an extra axis) and sends data that matches the wrong shape, so the shape is the only fault a
server can report.

Only the standard library is used: the locustfile imports this module inside Locust's worker
processes, and in a cluster those run the stock Locust image, which has no numpy.
"""

from __future__ import annotations

import json
import random
import string
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

VARIABLE_DIM = 8
"""Size given to a variable dimension other than the batch dimension."""

MAX_INTEGER = 15
MAX_BYTES_LENGTH = 16

# v2 datatype -> struct format of one little-endian element (BYTES is length-prefixed).
_FORMATS = {
    "BOOL": "?",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "FP16": "e",
    "FP32": "f",
    "FP64": "d",
}
DATATYPES = (*_FORMATS, "BF16", "BYTES")
"""Every datatype of the Open Inference Protocol."""


class PayloadError(ValueError):
    """Metadata this module cannot build a request for."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    """As the server declares it; -1 where any size is accepted."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The inputs of one model, as its v2 metadata declares them."""

    name: str
    inputs: tuple[TensorSpec, ...]

    @classmethod
    def from_metadata(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Read ``GET /v2/models/{m}``; ``PayloadError`` names what is missing or unknown."""
        try:
            name = str(data["name"])
            inputs = tuple(
                TensorSpec(str(t["name"]), str(t["datatype"]), tuple(int(d) for d in t["shape"]))
                for t in data["inputs"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PayloadError(f"not v2 model metadata ({exc!r}): {data!r:.200}") from None
        if not inputs:
            raise PayloadError(f"model '{name}' declares no inputs")
        for spec in inputs:
            if spec.datatype not in DATATYPES:
                raise PayloadError(
                    f"model '{name}' input '{spec.name}': unknown datatype '{spec.datatype}'"
                )
        return cls(name, inputs)


@dataclass(frozen=True, slots=True)
class Payload:
    """One request body and the headers that must travel with it."""

    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


def concrete_shape(spec: TensorSpec, rows: int, wrong_shape: bool = False) -> tuple[int, ...]:
    """The shape sent for ``spec``: variable dimensions filled in, one made wrong if asked."""
    shape = [
        (rows if axis == 0 else VARIABLE_DIM) if dim == -1 else dim
        for axis, dim in enumerate(spec.shape)
    ]
    if not wrong_shape:
        return tuple(shape)
    fixed = [axis for axis, dim in enumerate(spec.shape) if dim != -1]
    if fixed:
        shape[fixed[-1]] += 1
        return tuple(shape)
    return (*shape, 2)


def random_values(datatype: str, count: int, rng: random.Random) -> list[Any]:
    """``count`` random elements of ``datatype``, as Python values JSON can carry."""
    if datatype == "BOOL":
        return [rng.random() < 0.5 for _ in range(count)]
    if datatype == "BYTES":
        letters = string.ascii_letters
        return [
            "".join(rng.choices(letters, k=rng.randint(1, MAX_BYTES_LENGTH))) for _ in range(count)
        ]
    if datatype in ("FP16", "FP32", "FP64", "BF16"):
        # Four decimals keep JSON bodies short; the exact values do not matter.
        return [round(rng.random(), 4) for _ in range(count)]
    return [rng.randint(0, MAX_INTEGER) for _ in range(count)]


def binary_chunk(datatype: str, values: Sequence[Any]) -> bytes:
    """``values`` as the binary tensor extension lays them out (little-endian, row-major)."""
    if datatype == "BYTES":
        encoded = [str(value).encode() for value in values]
        return b"".join(struct.pack("<I", len(item)) + item for item in encoded)
    if datatype == "BF16":
        # bfloat16 is the upper half of a float32.
        singles = struct.pack(f"<{len(values)}f", *values)
        return b"".join(singles[i + 2 : i + 4] for i in range(0, len(singles), 4))
    return struct.pack(f"<{len(values)}{_FORMATS[datatype]}", *values)


def build_payload(
    model: ModelSpec,
    rng: random.Random,
    *,
    binary: bool,
    rows: int = 1,
    wrong_shape: bool = False,
    parameters: Mapping[str, Any] | None = None,
) -> Payload:
    """A request body for ``model`` with random inputs of the declared shapes and datatypes.

    ``parameters`` are request-level (``priority``, ``timeout``, ...); a binary body also asks
    for binary outputs, as a client that sends binary would.
    """
    request_parameters = dict(parameters or {})
    if binary:
        request_parameters["binary_data_output"] = True
    inputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for spec in model.inputs:
        shape = concrete_shape(spec, rows, wrong_shape)
        count = 1
        for dim in shape:
            count *= dim
        values = random_values(spec.datatype, count, rng)
        tensor: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": shape}
        if binary:
            chunk = binary_chunk(spec.datatype, values)
            tensor["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            tensor["data"] = values
        inputs.append(tensor)
    header: dict[str, Any] = {"inputs": inputs}
    if request_parameters:
        header["parameters"] = request_parameters
    encoded = json.dumps(header, separators=(",", ":")).encode()
    if not binary:
        return Payload(encoded, {"Content-Type": "application/json"})
    return Payload(
        encoded + b"".join(chunks),
        {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(encoded)),
        },
    )
