"""What a model accepts and returns: v2 datatypes, tensor specs and model metadata.

Shapes use -1 for a variable dimension. When ``max_batch_size > 0`` the first dimension of
every input and output is the batch dimension (reported as -1), as in Triton's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.errors import InvalidRequest

# v2 datatype -> numpy dtype (little-endian, as the binary extension is). BYTES tensors are
# object arrays of ``bytes``. BF16 has no numpy dtype and is refused by name.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}


def datatype_of(array: np.ndarray[Any, Any]) -> str:
    """The v2 datatype name of a numpy array (object and string arrays are BYTES)."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    little = array.dtype.newbyteorder("<")
    for name, dtype in DATATYPES.items():
        if dtype.kind != "O" and dtype == little:
            return name
    raise InvalidRequest(f"numpy dtype {array.dtype} has no v2 datatype")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of a model."""

    name: str
    datatype: str
    """A key of ``DATATYPES``."""
    shape: tuple[int, ...]
    """Full shape including the batch dimension; -1 where any size is accepted."""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["datatype"]), tuple(int(d) for d in data["shape"]))


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """A model version as clients see it (v2 model metadata plus the batch limit)."""

    name: str
    version: str
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    """Rows per request the model takes along its first dimension; 0 = the model does not batch."""
    labels: tuple[str, ...] = ()
    """Class labels by index, for the classification extension (``protocol.classification``):
    the pod reads them from the model's labels file, the gateway from the pod's config. Not
    part of the v2 metadata."""

    def input(self, name: str) -> TensorSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    def output(self, name: str) -> TensorSpec | None:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        return None

    def to_json(self, versions: list[str] | None = None) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": versions if versions is not None else [self.version],
            "platform": self.platform,
            "inputs": [spec.to_json() for spec in self.inputs],
            "outputs": [spec.to_json() for spec in self.outputs],
            "parameters": {"max_batch_size": self.max_batch_size},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], version: str | None = None) -> ModelMetadata:
        versions = data.get("versions") or [""]
        parameters = data.get("parameters") or {}
        return cls(
            name=str(data["name"]),
            version=version if version is not None else str(versions[-1]),
            platform=str(data.get("platform", "")),
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            max_batch_size=int(parameters.get("max_batch_size", 0)),
        )
