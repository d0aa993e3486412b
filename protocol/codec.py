"""The v2 inference codec (Open Inference Protocol REST plus Triton's binary tensor extension).

Pure functions between HTTP bodies and typed messages, with no I/O, shared by both hops::

    client --decode_request--> gateway --encode_request--> pod --decode_request--> runtime
    client <--encode_response-- gateway <--decode_response-- pod <--encode_response-- runtime

A body is a JSON header, then, when the ``Inference-Header-Content-Length`` header says where
the JSON ends, the binary chunks of the tensors that carry ``parameters.binary_data_size``, in
the order those tensors appear in the JSON. Per-tensor conversion lives in ``protocol.tensors``.

``decode_request`` is the wall in front of every model: it checks a client's body against the
model's metadata, byte accounting included, and raises ``InvalidRequest`` (400) naming the
tensor on the first mismatch, so nothing malformed reaches a runtime. No other exception
escapes it for any input; the tests hold it to that with random bodies. ``decode_response``
reads a pod's answer: a malformed one is the pod's fault, so it raises ``UpstreamError`` (502).

What a decode costs is bounded by its body, whatever the body holds. JSON that orjson would
take more than a few times its size to parse is refused (413, ``TooCostlyToDecode``, an
``InvalidRequest``) before it is parsed, as are BYTES elements too many for their bytes
(``protocol.budget``); every check that can refuse a request runs before any array is built;
tensor entries are read only up to the first unknown or repeated name, JSON ``data`` nests no
deeper than its shape and a shape has at most ``MAX_DIMENSIONS``. Time is linear in the body.

Decoded binary tensors are read-only views of the body, so the body stays alive with them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from protocol.budget import check_json
from protocol.errors import BazaarError, InvalidRequest, UpstreamError
from protocol.schema import ModelMetadata, TensorSpec, datatype_of
from protocol.tensors import (
    Array,
    binary_data,
    check_datatype,
    format_shape,
    from_binary,
    from_json,
    json_data,
    json_type,
)

_MISSING = object()

MAX_DIMENSIONS = 32
"""The most dimensions a tensor's shape may have: numpy's limit before numpy 2. It also keeps
a shape's element count cheap to compute (``math.prod`` of 100,000 large dimensions took
two minutes) and to quote in a message."""


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """One entry of a request's ``outputs``."""

    name: str
    binary: bool | None
    """Its ``parameters.binary_data``; None when the client did not say."""
    classification: int = 0
    """Its ``parameters.classification``: answer the top this many classes (0: the scores)."""


@dataclass(slots=True)
class InferenceRequest:
    """A decoded, validated inference request."""

    id: str | None
    parameters: dict[str, Any]
    """Request-level parameters as sent (priority, timeout, binary_data_output, ...)."""
    inputs: dict[str, Array]
    """In metadata order; BYTES tensors are object arrays of ``bytes``."""
    outputs: tuple[RequestedOutput, ...] | None
    """None = every output of the model, with default settings."""
    binary_output: bool
    """``parameters.binary_data_output``: outputs default to binary (False when not said)."""

    def rows(self, max_batch_size: int) -> int:
        """Batch rows this request takes: its first dimension if the model batches, else 1."""
        if max_batch_size <= 0 or not self.inputs:
            return 1
        return int(next(iter(self.inputs.values())).shape[0])


@dataclass(slots=True)
class InferenceResponse:
    """An inference answer, before encoding or after decoding."""

    model_name: str
    model_version: str | None
    id: str | None
    parameters: dict[str, Any]
    outputs: dict[str, Array]


@dataclass(frozen=True, slots=True)
class WireTensor:
    """A tensor entry of a request, checked for form but not yet against a model."""

    what: str
    """How messages name it: ``input 'x'`` or ``output 'y'``."""
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: object
    """The JSON ``data`` (unchecked); None when the tensor is binary."""
    binary_size: int | None


MAX_ID_CHARS = 1024
"""The longest request ``id``: a correlation key, not a payload."""


def decode_request(
    body: bytes, header_length: int | None, metadata: ModelMetadata
) -> InferenceRequest:
    """Decode and validate a request for ``metadata``'s model; ``InvalidRequest`` on any fault.

    ``header_length`` is the ``Inference-Header-Content-Length`` value, None when absent (then
    the whole body is JSON).
    """
    header, rest = _split_body(body, header_length)
    request_id = header.get("id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise InvalidRequest(f"request 'id' must be a string, got {json_type(request_id)}")
        if len(request_id) > MAX_ID_CHARS:
            # It is echoed in the answer: a 250 MB id would be sent back whole.
            raise InvalidRequest(
                f"request 'id' has {len(request_id)} characters, more than {MAX_ID_CHARS}"
            )
    parameters = _parameters("request", header.get("parameters", {}))
    refuse_sequence(parameters)
    binary_output = _flag("request", parameters, "binary_data_output")
    expected = [spec.name for spec in metadata.inputs]
    wire = _wire_tensors("input", header.get("inputs", _MISSING), False, expected, metadata.name)
    chunks = _chunks(wire, rest, header_length is not None)
    ordered = check_inputs(wire, metadata)
    outputs = requested_outputs(header.get("outputs"), metadata)
    # Arrays last: everything that can refuse the request cheaply has.
    return InferenceRequest(
        id=request_id,
        parameters=parameters,
        inputs={tensor.name: _array(tensor, chunks) for tensor in ordered},
        outputs=outputs,
        binary_output=bool(binary_output),
    )


def check_inputs(wire: list[WireTensor], metadata: ModelMetadata) -> list[WireTensor]:
    """The request's input tensors in ``metadata``'s order, each checked against its spec and
    the batch dimension across them (``InvalidRequest`` on the first fault). Shared with the
    gRPC codec, which reads the same fields from protobuf."""
    given = {tensor.name: tensor for tensor in wire}
    expected = [spec.name for spec in metadata.inputs]
    _check_known("input", given, expected, metadata.name)
    for name in expected:
        if name not in given:
            raise InvalidRequest(
                f"missing input '{name}': model '{metadata.name}' has inputs {_listed(expected)}"
            )
    ordered = [given[spec.name] for spec in metadata.inputs]
    for tensor, spec in zip(ordered, metadata.inputs, strict=True):
        _check_against_spec(tensor, spec)
    if metadata.max_batch_size > 0:
        _check_batch(ordered, metadata.max_batch_size)
    return ordered


def encode_request(request: InferenceRequest, binary: bool = True) -> tuple[bytes, int | None]:
    """A request body for a pod: ``(body, header_length)``, the length None if all JSON.

    With ``binary`` every input goes binary and every output is asked for binary, since the
    gateway decodes the pod's answer itself; without it the client's own choices go through.
    """
    parameters = dict(request.parameters)
    if binary:
        parameters["binary_data_output"] = True
    header: dict[str, Any] = {}
    if request.id is not None:
        header["id"] = request.id
    if parameters:
        header["parameters"] = parameters
    if request.outputs is not None:
        header["outputs"] = [
            _requested_json(output.name, True if binary else output.binary)
            for output in request.outputs
        ]
    tensors = ((f"input '{name}'", name, array, binary) for name, array in request.inputs.items())
    return _encode(header, "inputs", tensors)


def encode_response(
    response: InferenceResponse,
    requested: tuple[RequestedOutput, ...] | None,
    binary_output: bool,
) -> tuple[bytes, int | None]:
    """A response body: ``(body, header_length)``, the length None if all JSON.

    Only the ``requested`` outputs go out (None = all, in ``response.outputs`` order); each is
    binary if its own flag says so, else if ``binary_output`` does.
    """
    if requested is None:
        chosen = [(name, binary_output) for name in response.outputs]
    else:
        chosen = [
            (output.name, binary_output if output.binary is None else output.binary)
            for output in requested
        ]
    header: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version is not None:
        header["model_version"] = response.model_version
    if response.id is not None:
        header["id"] = response.id
    if response.parameters:
        header["parameters"] = response.parameters
    tensors = (
        (f"output '{name}'", name, _produced(response, name), binary) for name, binary in chosen
    )
    return _encode(header, "outputs", tensors)


def decode_response(body: bytes, header_length: int | None) -> InferenceResponse:
    """Decode a pod's response body; ``UpstreamError`` if it is malformed."""
    try:
        header, rest = _split_body(body, header_length)
        model_name = header.get("model_name")
        if not isinstance(model_name, str):
            raise InvalidRequest(f"'model_name' must be a string, got {json_type(model_name)}")
        model_version = header.get("model_version")
        if model_version is not None and not isinstance(model_version, str):
            raise InvalidRequest(
                f"'model_version' must be a string, got {json_type(model_version)}"
            )
        response_id = header.get("id")
        if response_id is not None and not isinstance(response_id, str):
            raise InvalidRequest(f"'id' must be a string, got {json_type(response_id)}")
        wire = _wire_tensors("output", header.get("outputs", _MISSING), allow_empty=True)
        chunks = _chunks(wire, rest, header_length is not None)
        outputs: dict[str, Array] = {}
        for tensor in wire:
            check_datatype(tensor.what, tensor.datatype)
            outputs[tensor.name] = _array(tensor, chunks)
        return InferenceResponse(
            model_name=model_name,
            model_version=model_version,
            id=response_id,
            parameters=_parameters("response", header.get("parameters", {})),
            outputs=outputs,
        )
    except InvalidRequest as exc:
        raise UpstreamError(f"malformed inference response: {exc.message}") from None


def _split_body(body: bytes, header_length: int | None) -> tuple[dict[str, Any], memoryview]:
    view = memoryview(body)
    whole = header_length is None
    if header_length is None:
        header_length = len(view)
    elif not 0 < header_length <= len(view):
        raise InvalidRequest(
            f"Inference-Header-Content-Length {header_length} must be between 1 and "
            f"the body length {len(view)}"
        )
    check_json(body, header_length)
    try:
        # orjson reads bytes faster than a memoryview slice: slice only when binary follows.
        header = orjson.loads(body if whole else view[:header_length])
    except orjson.JSONDecodeError as exc:
        # Binary tensors sent without Inference-Header-Content-Length end up here.
        hint = " (binary tensors need Inference-Header-Content-Length)" if whole else ""
        raise InvalidRequest(f"the JSON header is not valid JSON{hint}: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidRequest(f"the JSON header must be an object, got {json_type(header)}")
    return header, view[header_length:]


def _parameters(where: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where} 'parameters' must be an object, got {json_type(value)}")
    for key, item in value.items():
        # bool is an int, so this admits exactly the spec's string, number or bool.
        if not isinstance(item, str | int | float):
            raise InvalidRequest(
                f"{where} parameter '{key}' must be a string, number or boolean, "
                f"got {json_type(item)}"
            )
    return value


def _flag(where: str, parameters: dict[str, Any], key: str) -> bool | None:
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest(
            f"{where}: parameters.{key} must be true or false, got {json_type(value)}"
        )
    return value


def _wire_tensors(
    kind: str,
    value: object,
    allow_empty: bool,
    expected: list[str] | None = None,
    model: str = "",
) -> list[WireTensor]:
    """The tensor entries, each checked as it is read: a name repeated or, when ``expected``
    is given, not among them stops the reading, so a request with a million entries costs
    no more than one with a model's count plus one."""
    if not isinstance(value, list) or not (value or allow_empty):
        got = "nothing" if value is _MISSING else json_type(value) if value else "an empty array"
        raise InvalidRequest(f"'{kind}s' must be a non-empty array of tensors, got {got}")
    tensors: dict[str, WireTensor] = {}
    for index, item in enumerate(value):
        tensor = _wire_tensor(kind, index, item)
        if tensor.name in tensors:
            raise InvalidRequest(f"{tensor.what} appears more than once")
        if expected is not None:
            _check_known(kind, [tensor.name], expected, model)
        tensors[tensor.name] = tensor
    return list(tensors.values())


def _wire_tensor(kind: str, index: int, item: object) -> WireTensor:
    if not isinstance(item, dict):
        raise InvalidRequest(f"{kind}s[{index}] must be an object, got {json_type(item)}")
    name = item.get("name", _MISSING)
    if not isinstance(name, str):
        raise InvalidRequest(f"{kind}s[{index}]: 'name' must be a string, got {_got(name)}")
    what = f"{kind} '{name}'"
    datatype = item.get("datatype", _MISSING)
    if not isinstance(datatype, str):
        raise InvalidRequest(f"{what}: 'datatype' must be a string, got {_got(datatype)}")
    shape = item.get("shape", _MISSING)
    if isinstance(shape, list) and len(shape) > MAX_DIMENSIONS:
        raise InvalidRequest(
            f"{what}: 'shape' has {len(shape)} dimensions, more than the {MAX_DIMENSIONS} "
            "a tensor may have"
        )
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidRequest(
            f"{what}: 'shape' must be an array of non-negative integers, got {_show(shape)}"
        )
    parameters = _parameters(what, item.get("parameters", {}))
    refuse_shared_memory(what, parameters)
    size = parameters.get("binary_data_size")
    if size is not None and (type(size) is not int or size < 0):
        raise InvalidRequest(
            f"{what}: parameters.binary_data_size must be a non-negative integer, got {size!r}"
        )
    if (size is None) == ("data" not in item):
        raise InvalidRequest(
            f"{what}: needs exactly one of 'data' and parameters.binary_data_size, got "
            + ("both" if size is not None else "neither")
        )
    return WireTensor(what, name, datatype, tuple(shape), item.get("data"), size)


def _chunks(
    tensors: list[WireTensor], rest: memoryview, has_header_length: bool
) -> dict[str, memoryview]:
    """Each binary tensor's slice of the bytes after the JSON, which they must use up exactly."""
    chunks: dict[str, memoryview] = {}
    offset = 0
    for tensor in tensors:
        if tensor.binary_size is None:
            continue
        end = offset + tensor.binary_size
        if end > len(rest):
            hint = "" if has_header_length else " (Inference-Header-Content-Length is missing)"
            raise InvalidRequest(
                f"{tensor.what}: binary_data_size {tensor.binary_size} overruns the "
                f"{len(rest) - offset} bytes left after the JSON header{hint}"
            )
        chunks[tensor.name] = rest[offset:end]
        offset = end
    if offset != len(rest):
        claimed = ", ".join(tensor.what for tensor in tensors if tensor.name in chunks)
        raise InvalidRequest(
            f"{len(rest)} bytes follow the JSON header but the binary_data_size of "
            f"{claimed or 'no tensor'} add up to {offset}"
        )
    return chunks


def _check_known(kind: str, names: Iterable[str], expected: list[str], model: str) -> None:
    for name in names:
        if name not in expected:
            raise InvalidRequest(
                f"unknown {kind} '{name}': model '{model}' has {kind}s {_listed(expected)}"
            )


def _check_against_spec(tensor: WireTensor, spec: TensorSpec) -> None:
    what, shape = tensor.what, tensor.shape
    check_datatype(what, tensor.datatype)
    if tensor.datatype != spec.datatype:
        raise InvalidRequest(f"{what}: datatype {tensor.datatype}, expected {spec.datatype}")
    if len(shape) != len(spec.shape):
        raise InvalidRequest(
            f"{what}: shape {format_shape(shape)} has rank {len(shape)}, expected rank "
            f"{len(spec.shape)} (shape {format_shape(spec.shape)})"
        )
    for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if want != -1 and got != want:
            raise InvalidRequest(
                f"{what}: shape {format_shape(shape)} does not match {format_shape(spec.shape)}"
                f" at dimension {axis}: expected {want}, got {got}"
            )


def _check_batch(tensors: list[WireTensor], max_batch_size: int) -> None:
    """The first dimension is the batch: one size for all inputs, from 1 to the model's limit."""
    first = tensors[0]
    for tensor in tensors:
        rows = tensor.shape[0] if tensor.shape else 0
        if rows < 1:
            raise InvalidRequest(f"{tensor.what}: batch size {rows}, expected at least 1")
        if rows > max_batch_size:
            raise InvalidRequest(
                f"{tensor.what}: batch size {rows} exceeds the model's max_batch_size "
                f"{max_batch_size}"
            )
        if rows != first.shape[0]:
            raise InvalidRequest(
                f"{tensor.what}: batch size {rows} differs from {first.what}'s {first.shape[0]}"
            )


def _array(tensor: WireTensor, chunks: dict[str, memoryview]) -> Array:
    if tensor.binary_size is None:
        return from_json(tensor.what, tensor.datatype, tensor.shape, tensor.data)
    return from_binary(tensor.what, tensor.datatype, tensor.shape, chunks[tensor.name])


def requested_outputs(value: object, metadata: ModelMetadata) -> tuple[RequestedOutput, ...] | None:
    """A request's ``outputs`` (JSON), each a known output of the model, none twice."""
    # An empty list counts as none given, as tritonclient treats it: every output comes back.
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise InvalidRequest(f"'outputs' must be an array, got {json_type(value)}")
    requested: list[RequestedOutput] = []
    expected = [spec.name for spec in metadata.outputs]
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidRequest(f"outputs[{index}] must be an object, got {json_type(item)}")
        name = item.get("name", _MISSING)
        if not isinstance(name, str):
            raise InvalidRequest(f"outputs[{index}]: 'name' must be a string, got {_got(name)}")
        what = f"output '{name}'"
        _check_known("output", [name], expected, metadata.name)
        if any(output.name == name for output in requested):
            raise InvalidRequest(f"{what} is requested more than once")
        parameters = _parameters(what, item.get("parameters", {}))
        refuse_shared_memory(what, parameters)
        classification = parameters.get("classification", 0)
        if type(classification) is not int or classification < 0:
            raise InvalidRequest(
                f"{what}: parameters.classification must be an integer >= 0, got {classification!r}"
            )
        binary = _flag(what, parameters, "binary_data")
        requested.append(RequestedOutput(name, binary, classification))
    return tuple(requested)


def refuse_shared_memory(what: str, parameters: Iterable[str]) -> None:
    """``InvalidRequest`` naming the extension if a tensor's parameters ask for shared memory
    (``shared_memory_region``, ``_byte_size``, ``_offset``): bazaar has no region registry,
    and ignoring them would answer a client that reads a region nobody wrote."""
    for key in parameters:
        if key.startswith("shared_memory_"):
            raise InvalidRequest(
                f"{what}: parameter '{key}' asks for the shared memory extension, "
                "which this server does not implement"
            )


def refuse_sequence(parameters: Mapping[str, Any]) -> None:
    """``InvalidRequest`` naming the extension if the request is part of a sequence
    (``sequence_id``, ``sequence_start``, ``sequence_end``; tritonclient sends them for a
    ``sequence_id`` other than 0): bazaar keeps no state between requests and batches any
    requests together, so a stateful model would not get its sequence."""
    for key in ("sequence_id", "sequence_start", "sequence_end"):
        if parameters.get(key) not in (None, 0, "", False):
            raise InvalidRequest(
                f"parameter '{key}' asks for the sequence batching extension, which this "
                "server does not implement"
            )


def _requested_json(name: str, binary: bool | None) -> dict[str, Any]:
    if binary is None:
        return {"name": name}
    return {"name": name, "parameters": {"binary_data": binary}}


def _produced(response: InferenceResponse, name: str) -> Array:
    array = response.outputs.get(name)
    if array is None:
        # The request was checked against the metadata, so this is the model's fault: a 500.
        raise BazaarError(f"model '{response.model_name}' returned no output '{name}'")
    return array


def _encode(
    header: dict[str, Any], key: str, tensors: Iterable[tuple[str, str, Array, bool]]
) -> tuple[bytes, int | None]:
    entries: list[dict[str, Any]] = []
    chunks: list[bytes | memoryview] = []
    for what, name, array, binary in tensors:
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array),
            "shape": list(array.shape),
        }
        if binary:
            chunk = binary_data(array)
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = json_data(what, array)
        entries.append(entry)
    header[key] = entries
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


def _listed(names: list[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)


def _show(value: object) -> str:
    """A short JSON rendering of a bad value (it came from orjson, so it serialises)."""
    if value is _MISSING:
        return "nothing"
    shown = orjson.dumps(value).decode()
    return shown if len(shown) <= 40 else shown[:37] + "..."


def _got(value: object) -> str:
    return "nothing" if value is _MISSING else json_type(value)
