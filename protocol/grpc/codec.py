"""The gRPC inference codec: Triton's ``ModelInferRequest``/``ModelInferResponse`` and the same
typed messages the HTTP codec makes (``protocol.codec``).

Pure functions, no I/O, shared by both hops as the HTTP codec is::

    client --decode_request--> gateway --encode_request--> pod --decode_request--> runtime
    client <--encode_response-- gateway <--decode_response-- pod <--encode_response-- runtime

A tensor travels either in ``raw_input_contents`` (the binary extension's bytes: little-endian,
BYTES elements each a uint32 length and the bytes), one entry per input in order, or in its
typed ``contents`` field (``fp32_contents``, ``int_contents`` for INT8/16/32, ...). As in
Triton, a request uses one form for all its inputs, and answers always carry
``raw_output_contents``, which every client reads and which costs no per-element work.

``decode_request`` is the same wall as the HTTP codec's: the inputs are checked by
``protocol.codec.check_inputs`` against the model's metadata, and any fault is an
``InvalidRequest`` naming the tensor. Raw inputs become read-only ``np.frombuffer`` views of
the message's bytes. ``decode_response`` reads a pod's answer: a malformed one is
``UpstreamError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from protocol.classification import classified
from protocol.codec import (
    InferenceRequest,
    InferenceResponse,
    WireTensor,
    check_inputs,
    refuse_sequence,
    refuse_shared_memory,
    requested_outputs,
)
from protocol.errors import InvalidRequest, UpstreamError
from protocol.grpc.grpc_service_pb2 import (
    InferParameter,
    InferTensorContents,
    ModelInferRequest,
    ModelInferResponse,
)
from protocol.schema import DATATYPES, ModelMetadata, datatype_of
from protocol.tensors import (
    Array,
    binary_data,
    check_datatype,
    check_range,
    format_shape,
    from_binary,
)

# The typed ``contents`` field of each datatype, as Triton reads them. FP16 has none: raw only.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def decode_request(message: ModelInferRequest, metadata: ModelMetadata) -> InferenceRequest:
    """Decode and validate a request for ``metadata``'s model; ``InvalidRequest`` on any fault."""
    parameters = parameters_of(message.parameters)
    refuse_sequence(parameters)
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidRequest(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs: "
            "give every input raw, or none"
        )
    if not message.inputs:
        raise InvalidRequest("'inputs' must be a non-empty list of tensors, got none")
    wire: list[WireTensor] = []
    seen: set[str] = set()
    for tensor in message.inputs:
        what = f"input '{tensor.name}'"
        if tensor.name in seen:
            raise InvalidRequest(f"{what} appears more than once")
        seen.add(tensor.name)
        refuse_shared_memory(what, tensor.parameters)
        if raw and tensor.HasField("contents"):
            raise InvalidRequest(f"{what}: give its data raw or in 'contents', not both")
        if any(dim < 0 for dim in tensor.shape):
            raise InvalidRequest(
                f"{what}: 'shape' must be non-negative integers, got {format_shape(tensor.shape)}"
            )
        wire.append(WireTensor(what, tensor.name, tensor.datatype, tuple(tensor.shape), None, None))
    ordered = check_inputs(wire, metadata)
    # Raw entries follow the message's input order, which need not be the metadata's.
    chunks = {tensor.name: raw[index] for index, tensor in enumerate(message.inputs)} if raw else {}
    by_name = {tensor.name: tensor for tensor in message.inputs}
    inputs: dict[str, Array] = {}
    for checked in ordered:
        if raw:
            chunk = memoryview(chunks[checked.name])
            inputs[checked.name] = from_binary(checked.what, checked.datatype, checked.shape, chunk)
        else:
            contents = by_name[checked.name].contents
            inputs[checked.name] = _from_contents(
                checked.what, checked.datatype, checked.shape, contents
            )
    # As the HTTP codec reads them: a ``classification`` parameter asks for the top classes.
    outputs = []
    for output in message.outputs:
        refuse_shared_memory(f"output '{output.name}'", output.parameters)
        outputs.append({"name": output.name, "parameters": parameters_of(output.parameters)})
    return InferenceRequest(
        id=message.id or None,
        parameters=parameters,
        inputs=inputs,
        outputs=requested_outputs(outputs, metadata),
        binary_output=True,
    )


def encode_response(
    response: InferenceResponse, requested: tuple[str, ...] | None
) -> ModelInferResponse:
    """The answer with the ``requested`` outputs (None = all), every one in raw contents."""
    names = list(response.outputs) if requested is None else requested
    message = ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version or "",
        id=response.id or "",
    )
    for name in names:
        array = response.outputs.get(name)
        if array is None:
            raise InvalidRequest(f"model '{response.model_name}' returned no output '{name}'")
        message.outputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
        message.raw_output_contents.append(bytes(binary_data(array)))
    return message


def answer(
    request: InferenceRequest, metadata: ModelMetadata, outputs: Mapping[str, Array]
) -> ModelInferResponse:
    """The answer to ``request`` (pods and gateway alike): its id echoed, the outputs it asked
    for (the top classes of those it asked to classify), raw."""
    response = InferenceResponse(
        metadata.name,
        metadata.version,
        request.id,
        {},
        dict(classified(request.outputs, metadata, outputs)),
    )
    names = None if request.outputs is None else tuple(o.name for o in request.outputs)
    return encode_response(response, names)


def encode_request(
    model: str, inputs: Mapping[str, Array], parameters: Mapping[str, bool | int | float | str]
) -> ModelInferRequest:
    """A request for a pod: every input raw, every output asked for."""
    message = ModelInferRequest(model_name=model)
    for key, value in parameters.items():
        _set_parameter(message.parameters[key], value)
    for name, array in inputs.items():
        message.inputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
        message.raw_input_contents.append(bytes(binary_data(array)))
    return message


def decode_response(message: ModelInferResponse) -> dict[str, Array]:
    """A pod's outputs by name; ``UpstreamError`` if the answer is malformed."""
    raw = message.raw_output_contents
    outputs: dict[str, Array] = {}
    try:
        if raw and len(raw) != len(message.outputs):
            raise InvalidRequest(
                f"raw_output_contents has {len(raw)} entries for {len(message.outputs)} outputs"
            )
        for index, tensor in enumerate(message.outputs):
            what = f"output '{tensor.name}'"
            check_datatype(what, tensor.datatype)
            shape = tuple(tensor.shape)
            if raw:
                chunk = memoryview(raw[index])
                outputs[tensor.name] = from_binary(what, tensor.datatype, shape, chunk)
            else:
                outputs[tensor.name] = _from_contents(what, tensor.datatype, shape, tensor.contents)
    except InvalidRequest as exc:
        raise UpstreamError(f"malformed inference response: {exc.message}") from None
    return outputs


def parameters_of(parameters: Mapping[str, InferParameter]) -> dict[str, Any]:
    """Request parameters as the HTTP codec gives them: str, int, float or bool values."""
    values: dict[str, Any] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is None:
            raise InvalidRequest(f"request parameter '{key}' has no value")
        values[key] = getattr(parameter, choice)
    return values


def _set_parameter(parameter: InferParameter, value: bool | int | float | str) -> None:
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = value


def _from_contents(
    what: str, datatype: str, shape: tuple[int, ...], contents: InferTensorContents
) -> Array:
    check_datatype(what, datatype)
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidRequest(f"{what}: {datatype} has no typed contents; send it raw")
    values = getattr(contents, field)
    needed = math.prod(shape)
    if len(values) != needed:
        raise InvalidRequest(
            f"{what}: shape {format_shape(shape)} needs {needed} elements, "
            f"got {len(values)} in {field}"
        )
    if datatype == "BYTES":
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    dtype = DATATYPES[datatype]
    wide = np.array(values, dtype=np.int64 if dtype.kind == "i" else None)
    if dtype.kind in "iu" and wide.size and dtype.itemsize < 4:
        check_range(what, datatype, int(wide.min()), int(wide.max()))
    return wide.astype(dtype).reshape(shape)
