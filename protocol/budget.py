"""What decoding a request may cost in memory, checked before the cost is paid.

Decoding may take at most ``DECODE_FACTOR`` times the size of what is decoded, or
``DECODE_ALLOWANCE_BYTES`` where that is more (so no request of an ordinary size is refused
for its shape); beyond, ``TooCostlyToDecode`` (413) says what costs and what to send instead.
Two steps of the decode cost more than their input, and both are bounded from the raw bytes
before they run:

- orjson parses a whole JSON document into Python objects at once: it has no streaming API
  and holds the GIL throughout. Its peak is its copy of the document, a 16-byte node per
  value and the Python objects: for dense input, many times the input. Measured (peak RSS,
  CPython 3.11, orjson 3.13) per byte of a document that is one long array of: floats as
  Python prints them (19 bytes each) 4x; float32 values as numpy prints them (11 bytes) 6x;
  ``1`` 13x; ``"ab"`` 19x; ``[]`` 30x; ``{"a":1}`` 32x; ``[[[...]]]`` 49x; a 64 MiB body of
  ``[]`` took 1.9 GB and 12 s. ``check_json`` counts the bytes that open arrays and objects,
  separate values and quote strings (numpy compares, about 0.8 ms a MiB: 7% of parsing
  float32 data) and bounds the peak from the counts. The bound is at or above every
  measured peak. It charges every value as a number object, so it over-counts small integers
  (which CPython shares: 255 costs a slot, not an object) and structural bytes inside
  strings; it under-counts one thing, text with a character beyond U+FFFF, whose every
  character then takes 4 bytes in its str (measured 5x for such a string). A document under
  ``SCAN_FROM_BYTES`` is within the allowance whatever it holds, so it is not scanned: the
  common small request pays nothing for the check.
- A binary BYTES tensor becomes one ``bytes`` object per element, about 64 bytes each beside
  its content. ``check_bytes_elements`` bounds that from the declared element count before
  the first is made.

Everything else the decode builds is small against its input: a numeric tensor is at most 8
bytes an element once decoded (a JSON element takes at least 2 bytes; a binary tensor is a
view of the body), and is built after orjson's own copy and nodes are freed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from protocol.errors import TooCostlyToDecode

DECODE_FACTOR = 8
"""Decoding may take this many times the size of what is decoded (8): float32 data in JSON,
as numpy prints it, needs 6."""
DECODE_ALLOWANCE_BYTES = 64 * 1024 * 1024
"""... or this much (64 MiB) where that is more: what any one decode may take. Decoding is
synchronous, so one runs at a time per event loop."""

# Upper bounds per JSON token, fitted to the measurements above.
_DOCUMENT_BYTES = 2
"""Per byte of the document: orjson's copy of it, and a string's characters in its str."""
_VALUE_BYTES = 56
"""Per value: orjson's node (16), the value's slot in its list or dict (8) and its object (a
float 24, an int up to 36, with the allocator's rounding)."""
_CONTAINER_BYTES = 48
"""Per array or object, beyond a value's: a list is 56 bytes, a dict 64 empty, 184 with up
to five keys."""
_STRING_BYTES = 88
"""Per string, beyond a value's: the str's header over a float's, and the ``bytes`` copy a
BYTES element gets with its slots in a list and in the object array."""
_BYTES_ELEMENT_BYTES = 64
"""Per binary BYTES element beside its content: the ``bytes`` object (33 and the allocator's
rounding) and its slots in a list and in the object array."""

SCAN_FROM_BYTES = DECODE_ALLOWANCE_BYTES // (_DOCUMENT_BYTES + _VALUE_BYTES + _CONTAINER_BYTES)
"""JSON shorter than this (633 KB) is within the allowance even if every byte opens an array."""
_SCAN_SLICE_BYTES = 256 * 1024
"""The document is counted a slice at a time, so the compares' buffers stay in cache."""


def allowed_bytes(size: int) -> int:
    """The memory that decoding ``size`` bytes may take."""
    return max(DECODE_FACTOR * size, DECODE_ALLOWANCE_BYTES)


def check_json(document: bytes, end: int) -> None:
    """Refuse ``document[:end]`` before it is parsed if parsing may take more than allowed.
    The scan stops as soon as the part scanned is enough to refuse."""
    if end < SCAN_FROM_BYTES:
        return
    allowed = allowed_bytes(end)
    opens = separators = quotes = 0
    for scanned, slice_counts in _token_counts(document, end):
        opens += slice_counts[0]
        separators += slice_counts[1]
        quotes += slice_counts[2]
        # A value opens the document or follows "[", "{", "," or ":".
        values = 1 + opens + separators
        cost = (
            _DOCUMENT_BYTES * end
            + _VALUE_BYTES * values
            + _CONTAINER_BYTES * opens
            + _STRING_BYTES * (quotes // 2)
        )
        if cost > allowed:
            raise TooCostlyToDecode(
                f"the JSON header ({end:,} bytes, whose first {scanned:,} hold up to "
                f"{values:,} values, {opens:,} of them arrays or objects and {quotes // 2:,} "
                "strings)",
                allowed,
                "send large tensors with the binary extension, or fewer values per request",
            )


def _token_counts(document: bytes, end: int) -> Iterator[tuple[int, tuple[int, int, int]]]:
    """Slice by slice of ``document[:end]``: the bytes scanned so far, and the slice's bytes
    that open an array or object, that separate values, and that are quotes, wherever they
    are (inside strings too: an over-count)."""
    # numpy compares into reused buffers: 5x faster than a bytes.count pass per byte value,
    # and they release the GIL.
    raw = np.frombuffer(document, dtype=np.uint8, count=end)
    folded = np.empty(_SCAN_SLICE_BYTES, dtype=np.uint8)
    hits = np.empty(_SCAN_SLICE_BYTES, dtype=np.bool_)
    for start in range(0, end, _SCAN_SLICE_BYTES):
        part = raw[start : start + _SCAN_SLICE_BYTES]
        size = len(part)
        # "[" is 0x5B and "{" 0x7B: with bit 0x20 set, both are "{" and nothing else is.
        np.bitwise_or(part, 0x20, out=folded[:size])
        opens = np.count_nonzero(np.equal(folded[:size], ord("{"), out=hits[:size]))
        commas = np.count_nonzero(np.equal(part, ord(","), out=hits[:size]))
        colons = np.count_nonzero(np.equal(part, ord(":"), out=hits[:size]))
        quotes = np.count_nonzero(np.equal(part, ord('"'), out=hits[:size]))
        yield start + size, (int(opens), int(commas + colons), int(quotes))


def check_bytes_elements(what: str, count: int, size: int) -> None:
    """Refuse a binary BYTES tensor of ``count`` elements in ``size`` bytes before any is made
    if they may take more than allowed."""
    # The elements' content, and the copy of the chunk they are cut from.
    cost = _BYTES_ELEMENT_BYTES * count + 2 * size
    allowed = allowed_bytes(size)
    if cost > allowed:
        raise TooCostlyToDecode(
            f"{what}: {count:,} BYTES elements in {size:,} bytes",
            allowed,
            "send fewer elements per request",
        )
