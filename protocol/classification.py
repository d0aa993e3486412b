"""Triton's classification extension: ``outputs[].parameters.classification: k`` answers an
output's top ``k`` classes instead of its scores.

The answer is a BYTES tensor of ``"score:index"`` strings, ``"score:index:label"`` where the
model has labels (``ModelMetadata.labels``, line ``index`` of the model's labels file), best
first, ties by lower index. As in Triton, a batching model's output is ranked row by row
(every element of a row is a class: shape ``[batch, k]``), a model that does not batch is
ranked whole (shape ``[k]``), ``k`` is cut to the classes there are, and the score is
written as C's ``%f`` writes it (``0.971200``), an integer score as an integer. Pure
functions; both hops apply them where they answer, over HTTP (``protocol.fastpath.answer``)
and gRPC (an output's ``classification`` parameter, ``tritonclient.grpc``'s ``class_count``)
alike: ``classified``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from protocol.codec import RequestedOutput
from protocol.errors import InvalidRequest
from protocol.schema import ModelMetadata
from protocol.tensors import Array


def classified(
    requested: Sequence[RequestedOutput] | None,
    metadata: ModelMetadata,
    outputs: Mapping[str, Array],
) -> Mapping[str, Array]:
    """``outputs`` with each output the request asked to classify replaced by its top
    classes (the same mapping when none is)."""
    for output in requested or ():
        if output.classification and output.name in outputs:
            outputs = {
                **outputs,
                output.name: classify(
                    f"output '{output.name}'",
                    outputs[output.name],
                    output.classification,
                    metadata.labels,
                    metadata.max_batch_size > 0,
                ),
            }
    return outputs


def classify(what: str, scores: Array, k: int, labels: Sequence[str], batched: bool) -> Array:
    """The top ``k`` of ``scores`` as Triton's classification strings (see the module)."""
    if scores.dtype.kind not in "biuf":
        raise InvalidRequest(f"{what}: classification needs a numeric output, not {scores.dtype}")
    rows = scores.reshape(scores.shape[0] if batched and scores.ndim else 1, -1)
    k = min(k, rows.shape[1])
    # A stable sort of the negated scores: best first, ties by lower index.
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :k]
    floats = rows.dtype.kind == "f"
    answer = np.empty(order.shape, dtype=object)
    for row, indices in enumerate(order):
        for place, index in enumerate(indices):
            score = rows[row, index]
            text = f"{score:f}:{index}" if floats else f"{int(score)}:{index}"
            if index < len(labels):
                text += f":{labels[index]}"
            answer[row, place] = text.encode()
    return answer if batched else answer.reshape(k)
