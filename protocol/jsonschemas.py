"""JSON Schemas (draft 2020-12, as OpenAPI 3.1 uses them) of the v2 bodies.

The inference bodies are derived from the tensor schema: a datatype's JSON element (type and
range) from its numpy dtype in ``schema.DATATYPES``, a model's tensors from its
``ModelMetadata``, so the schemas follow the models a server holds. What JSON Schema cannot
say is left to the descriptions that use these: that a tensor's element count must match
its shape, that every input has the same batch size, that ``data`` may also be nested.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from protocol.schema import DATATYPES, ModelMetadata, TensorSpec
from protocol.tensors import ROUNDS_TO_INFINITY

Schema = dict[str, Any]

STRING: Schema = {"type": "string"}
BOOLEAN: Schema = {"type": "boolean"}
OBJECT: Schema = {"type": "object"}
NON_NEGATIVE: Schema = {"type": "integer", "minimum": 0}
PARAMETERS: Schema = {
    "type": "object",
    "additionalProperties": {"type": ["string", "number", "boolean"]},
}
"""A v2 ``parameters`` map: each value a string, number or boolean."""


def record(required: Mapping[str, Schema], optional: Mapping[str, Schema] = {}) -> Schema:
    """An object with these properties, the ``required`` ones required."""
    return {"type": "object", "required": list(required), "properties": {**required, **optional}}


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


ERROR = record({"error": STRING})
METADATA_TENSOR = record(
    {"name": STRING, "datatype": {"enum": list(DATATYPES)}, "shape": array({"type": "integer"})}
)
MODEL_METADATA = record(
    {"name": STRING, "platform": STRING, "inputs": array(METADATA_TENSOR)},
    {"versions": array(STRING), "outputs": array(METADATA_TENSOR), "parameters": PARAMETERS},
)
REQUEST_PARAMETERS: Schema = {
    **PARAMETERS,
    "properties": {
        "priority": {
            **NON_NEGATIVE,
            "description": "Schedule policy (Triton's): 1 is the highest level, 0 the default",
        },
        "timeout": {
            **NON_NEGATIVE,
            "description": "How long the request may take, in microseconds (0: no limit)",
        },
        "binary_data_output": {**BOOLEAN, "description": "Every output as binary"},
    },
}
OUTPUT_PARAMETERS: Schema = {
    **PARAMETERS,
    "properties": {"binary_data": {**BOOLEAN, "description": "This output as binary"}},
}
EXAMPLE_MAX_ELEMENTS = 4096
"""A model whose one-row request holds more elements has no example: documents are built
per request, and a picture model's would weigh megabytes."""


def inference_request(model: ModelMetadata | None) -> Schema:
    """The JSON request for ``model``'s inputs and outputs, or for any model's (None)."""
    if model is None:
        inputs = {**array(_any_tensor(output=False)), "minItems": 1}
        output_name = STRING
    else:
        # Any order, each input once: oneOf over the inputs and exactly as many items.
        tensors = [_tensor(spec, model.max_batch_size, output=False) for spec in model.inputs]
        inputs = {**array({"oneOf": tensors}), "minItems": len(tensors), "maxItems": len(tensors)}
        output_name = {"enum": [spec.name for spec in model.outputs]}
    requested = record({"name": output_name}, {"parameters": OUTPUT_PARAMETERS})
    return record(
        {"inputs": inputs},
        {"id": STRING, "parameters": REQUEST_PARAMETERS, "outputs": array(requested)},
    )


def inference_response(model: ModelMetadata | None) -> Schema:
    """The JSON response from ``model``, or from any model (None)."""
    if model is None:
        name, tensors = STRING, _any_tensor(output=True)
    else:
        name = {"const": model.name}
        specs = model.outputs
        tensors = {"oneOf": [_tensor(spec, model.max_batch_size, output=True) for spec in specs]}
    return record(
        {"model_name": name, "outputs": array(tensors)},
        {"model_version": STRING, "id": STRING, "parameters": PARAMETERS},
    )


def example_request(model: ModelMetadata) -> Schema | None:
    """A one-row request of zeros (false, empty strings) for ``model``."""
    inputs = []
    for spec in model.inputs:
        shape = [1 if size == -1 else size for size in spec.shape]
        count = math.prod(shape)
        if count > EXAMPLE_MAX_ELEMENTS:
            return None
        zero = {"BYTES": "", "BOOL": False}.get(spec.datatype, 0)
        data = [zero] * count
        inputs.append({"name": spec.name, "datatype": spec.datatype, "shape": shape, "data": data})
    return {"inputs": inputs}


def _any_tensor(output: bool) -> Schema:
    """A tensor of any name and shape, as many forms as there are datatypes."""
    return {
        "oneOf": [
            record(
                {
                    "name": STRING,
                    "datatype": {"const": datatype},
                    "shape": array(NON_NEGATIVE),
                    "data": array(_element(datatype, output)),
                },
                {"parameters": PARAMETERS},
            )
            for datatype in DATATYPES
        ]
    }


def _tensor(spec: TensorSpec, max_batch_size: int, output: bool) -> Schema:
    """One of a model's tensors: its name, datatype and rank, its elements' type and range
    and, when all but the batch dimension are fixed, their count. A request's shape also
    names each dimension's size (the batch dimension's from 1 to ``max_batch_size``)."""
    batches = max_batch_size > 0 and len(spec.shape) > 0
    rank = len(spec.shape)
    shape: Schema = {**array(NON_NEGATIVE), "minItems": rank, "maxItems": rank}
    if rank and not output:
        # Not in responses: schemathesis (4.32) rewrites a response schema's prefixItems to
        # draft 7's tuple form, then validates with draft 2020-12, which refuses it.
        shape["prefixItems"] = [
            {**NON_NEGATIVE, "minimum": 1, "maximum": max_batch_size}
            if axis == 0 and batches
            else NON_NEGATIVE
            if size == -1
            else {"const": size}
            for axis, size in enumerate(spec.shape)
        ]
    data = array(_element(spec.datatype, output))
    fixed = spec.shape[1:] if batches else spec.shape
    if -1 not in fixed:
        per_row = math.prod(fixed)
        data |= {"minItems": per_row, "maxItems": per_row * max(1, max_batch_size)}
    return record(
        {
            "name": {"const": spec.name},
            "datatype": {"const": spec.datatype},
            "shape": shape,
            "data": data,
        },
        {"parameters": PARAMETERS},
    )


def _element(datatype: str, output: bool) -> Schema:
    """A JSON element of ``datatype``: its JSON type and the datatype's range."""
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        return {}  # a datatype we cannot hold (BF16): refused with 400, whatever the data
    if dtype.kind == "O":
        return STRING
    if dtype.kind == "b":
        return BOOLEAN
    if dtype.kind in "iu":
        ints = np.iinfo(dtype)
        return {"type": "integer", "minimum": int(ints.min), "maximum": int(ints.max)}
    # JSON has no NaN or infinity: an output holding one carries null there.
    number: Schema = {"type": ["number", "null"] if output else "number"}
    limit = ROUNDS_TO_INFINITY[datatype]
    if math.isinf(limit):
        return number
    return {**number, "exclusiveMinimum": -limit, "exclusiveMaximum": limit}
