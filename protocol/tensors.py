"""One tensor's data between its two wire forms and numpy, for the v2 codec.

A tensor travels either as JSON ``data`` (nested or flat lists, row-major) or as a chunk of the
binary extension (little-endian, row-major; BYTES elements each a uint32 LE length and the raw
bytes). Every function is pure and raises ``InvalidRequest`` naming the tensor (``what``, e.g.
``input 'x'``) with what was expected and what came.

Speed is the point of the shapes below. JSON data is flattened a row at a time, its element
types are collected in one C-level pass (``set(map(type, flat))``), integer ranges are checked
with ``min``/``max``, and numpy converts the list in one call; binary data becomes an
``np.frombuffer`` view of the request body, without a copy (so it is read-only). Only BYTES
elements are handled one at a time, since each becomes its own ``bytes`` object; binary ones
are counted against the shape and the memory budget (``protocol.budget``) before the first.

JSON has no NaN or infinity: orjson writes them as ``null``, which the reader refuses, so
clients that need them ask for binary outputs.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.budget import check_bytes_elements
from protocol.errors import InvalidRequest
from protocol.schema import DATATYPES, datatype_of

Array = npt.NDArray[Any]

_LENGTH = struct.Struct("<I")
# JSON names of the Python types orjson produces, for messages a client can act on.
_JSON_TYPES = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
    type(None): "null",
}


def format_shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _rounds_to_infinity(dtype: np.dtype[Any]) -> float:
    """The smallest magnitude that rounds to infinity in ``dtype``: its largest value plus
    half a unit in the last place (the largest value itself, as JSON prints it, may read
    back a little above it and still round down)."""
    info = np.finfo(dtype)
    return float(info.max) + float(info.eps) * 2.0 ** (info.maxexp - 2)


ROUNDS_TO_INFINITY = {name: _rounds_to_infinity(DATATYPES[name]) for name in ("FP16", "FP32")}
"""Per float datatype, the magnitude JSON data must stay under (FP64: any finite number)."""
ROUNDS_TO_INFINITY["FP64"] = float("inf")


def check_datatype(what: str, datatype: str) -> None:
    """Refuse datatypes we cannot hold: BF16 has no numpy dtype, others are unknown."""
    if datatype == "BF16":
        raise InvalidRequest(f"{what}: BF16 is not supported")
    if datatype not in DATATYPES:
        known = ", ".join(DATATYPES)
        raise InvalidRequest(f"{what}: unknown datatype '{datatype}', expected one of {known}")


def from_json(what: str, datatype: str, shape: Sequence[int], data: object) -> Array:
    """The array for JSON ``data`` of a known ``datatype``, checked against ``shape``."""
    flat = _flatten(what, data, shape)
    _check_count(what, shape, len(flat))
    dtype = DATATYPES[datatype]
    types = set(map(type, flat))
    if datatype == "BYTES":
        _check_types(what, datatype, types, {str}, "strings")
        array = np.empty(len(flat), dtype=object)
        array[:] = [text.encode() for text in flat]
    elif datatype == "BOOL":
        _check_types(what, datatype, types, {bool}, "true or false")
        array = np.array(flat, dtype=dtype)
    elif dtype.kind in "iu":
        _check_types(what, datatype, types, {int}, "integers")
        if flat:
            check_range(what, datatype, min(flat), max(flat))
        array = np.array(flat, dtype=dtype)
    else:
        _check_types(what, datatype, types, {int, float}, "numbers")
        # Through float64 (exact for any JSON number numpy accepts) and a range check:
        # cheaper than np.errstate on every request, and JSON carries no infinities.
        wide = np.array(flat, dtype=np.float64)
        if wide.size and float(np.abs(wide).max()) >= ROUNDS_TO_INFINITY[datatype]:
            bad, limit = max(flat, key=abs), float(np.finfo(dtype).max)
            raise InvalidRequest(
                f"{what}: value {bad} is out of range for {datatype} (largest {limit:g})"
            )
        array = wide.astype(dtype)
    return _shaped(what, array, shape)


def from_binary(what: str, datatype: str, shape: Sequence[int], chunk: memoryview) -> Array:
    """The array for a binary chunk of a known ``datatype``, checked against ``shape``."""
    if datatype == "BYTES":
        return _shaped(what, _bytes_elements(what, shape, chunk), shape)
    dtype = DATATYPES[datatype]
    if len(chunk) % dtype.itemsize:
        raise InvalidRequest(
            f"{what}: binary_data_size {len(chunk)} is not a multiple of the "
            f"{datatype} element size {dtype.itemsize}"
        )
    _check_count(what, shape, len(chunk) // dtype.itemsize)
    if datatype == "BOOL":
        raw = np.frombuffer(chunk, dtype=np.uint8)
        if raw.size and raw.max() > 1:
            raise InvalidRequest(f"{what}: BOOL bytes must be 0 or 1, got {int(raw.max())}")
        return _shaped(what, raw.view(np.bool_), shape)
    return _shaped(what, np.frombuffer(chunk, dtype=dtype), shape)


def json_data(what: str, array: Array) -> Any:
    """``array`` as JSON ``data`` (flat), in a form ``orjson.OPT_SERIALIZE_NUMPY`` takes."""
    datatype = datatype_of(array)
    if datatype == "BYTES":
        try:
            return [_as_text(element) for element in array.ravel().tolist()]
        except UnicodeDecodeError:
            raise InvalidRequest(
                f"{what}: BYTES data is not UTF-8 text, so it cannot be JSON; ask for binary data"
            ) from None
    # orjson serialises only native-order, contiguous arrays, and not every release takes FP16.
    dtype = np.dtype(np.float32) if datatype == "FP16" else DATATYPES[datatype]
    return np.ascontiguousarray(array, dtype=dtype).ravel()


def binary_data(array: Array) -> bytes | memoryview:
    """``array`` as a binary-extension chunk; fixed-size types without a copy."""
    datatype = datatype_of(array)
    if datatype == "BYTES":
        parts: list[bytes] = []
        for element in array.ravel().tolist():
            raw = as_bytes(element)
            parts += (_LENGTH.pack(len(raw)), raw)
        return b"".join(parts)
    contiguous = np.ascontiguousarray(array, dtype=DATATYPES[datatype])
    return contiguous.reshape(-1).view(np.uint8).data


def _flatten(what: str, data: object, shape: Sequence[int]) -> list[Any]:
    # Nesting is flattened level by level, so the per-element work stays in C; like Triton,
    # only the element count has to match the shape, not the nesting. Nesting deeper than the
    # shape's rank is neither of the spec's forms (nested as the shape, or flat), and refusing
    # it bounds the levels walked by the shape.
    if not isinstance(data, list):
        raise InvalidRequest(f"{what}: 'data' must be an array, got {json_type(data)}")
    flat: list[Any] = data
    depth = 1
    while flat and type(flat[0]) is list:
        depth += 1
        if depth > max(len(shape), 1):
            raise InvalidRequest(
                f"{what}: 'data' nests deeper than shape {format_shape(shape)}: at most "
                f"{max(len(shape), 1)} levels of arrays"
            )
        if not all(type(item) is list for item in flat):
            raise InvalidRequest(f"{what}: 'data' mixes arrays and values at the same level")
        flat = list(chain.from_iterable(flat))
    return flat


def _check_count(what: str, shape: Sequence[int], count: int) -> None:
    needed = math.prod(shape)
    if count != needed:
        raise InvalidRequest(
            f"{what}: shape {format_shape(shape)} needs {needed} elements, got {count}"
        )


def _check_types(
    what: str, datatype: str, types: set[type], allowed: set[type], expected: str
) -> None:
    wrong = types - allowed
    if wrong:
        got = ", ".join(sorted(_JSON_TYPES.get(t, t.__name__) for t in wrong))
        raise InvalidRequest(f"{what}: {datatype} data must be {expected}, got {got}")


def check_range(what: str, datatype: str, low: int, high: int) -> None:
    """``InvalidRequest`` if integers from ``low`` to ``high`` do not fit ``datatype``."""
    info = np.iinfo(DATATYPES[datatype])
    bad = high if high > info.max else low if low < info.min else None
    if bad is not None:
        raise InvalidRequest(
            f"{what}: value {bad} is out of range for {datatype} [{info.min}, {info.max}]"
        )


def _bytes_elements(what: str, shape: Sequence[int], chunk: memoryview) -> Array:
    needed, size = math.prod(shape), len(chunk)
    if needed * _LENGTH.size > size:
        raise InvalidRequest(
            f"{what}: shape {format_shape(shape)} needs {needed} elements, at least "
            f"{needed * _LENGTH.size} bytes, but binary_data_size is {size}"
        )
    check_bytes_elements(what, needed, size)
    # Slicing a bytes copy makes each element in one step (a memoryview slice takes two);
    # the loop is the one place the codec handles elements one at a time.
    raw, unpack, offset = chunk.tobytes(), _LENGTH.unpack_from, 0
    elements: list[bytes] = []
    for index in range(needed):
        if offset == size:
            raise InvalidRequest(
                f"{what}: shape {format_shape(shape)} needs {needed} elements, got {index}"
            )
        start = offset + _LENGTH.size
        if start > size:
            raise InvalidRequest(f"{what}: BYTES element {index} has a truncated length")
        (length,) = unpack(raw, offset)
        offset = start + length
        if offset > size:
            raise InvalidRequest(
                f"{what}: BYTES element {index} of {length} bytes overruns the "
                f"{size - start} bytes left in binary_data_size"
            )
        elements.append(raw[start:offset])
    if offset < size:
        raise InvalidRequest(
            f"{what}: shape {format_shape(shape)} needs {needed} elements, "
            f"but {size - offset} bytes follow the last one"
        )
    array = np.empty(needed, dtype=object)
    array[:] = elements
    return array


def _shaped(what: str, array: Array, shape: Sequence[int]) -> Array:
    try:
        return array.reshape(shape)
    except ValueError:
        # Only an empty tensor gets here (the element count already matched): a shape such as
        # [0, 2**62] is empty but still too large for numpy to describe.
        raise InvalidRequest(f"{what}: shape {format_shape(shape)} is too large") from None


def _as_text(element: object) -> str:
    return element.decode() if isinstance(element, bytes) else str(element)


def as_bytes(element: object) -> bytes:
    """A BYTES element as the wire carries it: as tritonclient's ``serialize_byte_tensor``,
    bytes as they are, anything else as UTF-8 text."""
    return element if isinstance(element, bytes) else str(element).encode()
