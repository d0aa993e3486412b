"""Schemathesis hooks for ``test_openapi.py`` (loaded by the CLI from ``SCHEMATHESIS_HOOKS``).

``flatmap_case`` sends each generated JSON inference request either as it is or in the
binary tensor extension's form, so the binary decoding is fuzzed from well-formed JSON
headers (with valid and invalid data), not only from the random bytes schemathesis makes
for an ``application/octet-stream`` body. ``filter_failure`` accepts one 5xx: the 504 of a
request whose own deadline passed.
"""

from __future__ import annotations

import copy
import json
import struct
from typing import Any

import numpy as np
import schemathesis
from hypothesis import strategies as st
from schemathesis import Case
from schemathesis.core.failures import Failure, ServerError

from protocol.schema import DATATYPES

HEADER_LENGTH = "Inference-Header-Content-Length"


@schemathesis.hook
def flatmap_case(context: Any, case: Case) -> st.SearchStrategy[Case]:
    """A JSON inference request, as it is or in binary form."""
    if case.media_type != "application/json" or not case.path.endswith("/infer"):
        return st.just(case)
    return st.sampled_from([case, binary_form(case)])


@schemathesis.hook
def filter_failure(context: Any, failure: Failure, case: Case, response: Any) -> bool:
    """Every failure but the 504 of a request that set its own deadline
    (``X-Request-Timeout-Ms`` or ``parameters.timeout``): the design answers a deadline that
    passes with 504, however short the client made it."""
    sent = response.request
    body = sent.body.encode() if isinstance(sent.body, str) else sent.body or b""
    asked = "X-Request-Timeout-Ms" in sent.headers or b'"timeout"' in body
    return not (isinstance(failure, ServerError) and response.status_code == 504 and asked)


def binary_form(case: Case) -> Case:
    """``case`` with the data of every input that packs as its datatype moved to the binary
    part of the body, and the JSON part's length in ``Inference-Header-Content-Length``."""
    body = case.body
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        return case
    header = copy.deepcopy(body)
    chunks = []
    for tensor in header["inputs"]:
        chunk = _packed(tensor)
        if chunk is not None and isinstance(tensor.setdefault("parameters", {}), dict):
            del tensor["data"]
            tensor["parameters"]["binary_data_size"] = len(chunk)
            chunks.append(chunk)
    json_part = json.dumps(header).encode()  # orjson refuses integers past 64 bits
    binary = case.derive()
    binary.body = json_part + b"".join(chunks)
    binary.media_type = "application/octet-stream"
    binary.headers[HEADER_LENGTH] = str(len(json_part))
    return binary


def _packed(tensor: object) -> bytes | None:
    """A tensor's JSON data in the binary layout; None if it does not pack as its datatype."""
    if not isinstance(tensor, dict):
        return None
    datatype, data = tensor.get("datatype"), tensor.get("data")
    if not isinstance(datatype, str) or datatype not in DATATYPES or not isinstance(data, list):
        return None
    if datatype == "BYTES":
        if not all(isinstance(s, str) for s in data):
            return None
        return b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in data)
    try:
        with np.errstate(over="ignore"):  # a number past FP16's range packs as infinity
            return np.asarray(data, dtype=DATATYPES[datatype]).tobytes()
    except (ValueError, TypeError, OverflowError):
        return None
