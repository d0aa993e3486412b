"""What decoding a large or hostile inference body costs: peak memory and CPU time, per shape.

``python -m loadtests.decodecost [--mib 64] [--case NAME ...]`` builds each body (about
``--mib`` MiB) in a fresh child process, resets the process's peak RSS (Linux
``/proc/self/clear_refs``), runs ``protocol.codec.decode_request`` against a model whose
inputs take any shape, and prints the body size, the peak RSS above what the body itself
holds, that peak as a multiple of the body, the decode's CPU time (wall time on a shared
machine says more about the neighbours) and the outcome: decoded, or the error's status and
message. A child per body keeps one shape's garbage and allocator state out of the next
one's figures. The largest accepted shape peaks at about 6.3 times the body (1.6 GB at 250
MiB); the refused ones at nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from loadtests.procs import peak_rss_bytes, reset_peak_rss, rss_bytes
from protocol.codec import decode_request
from protocol.errors import BazaarError
from protocol.schema import ModelMetadata, TensorSpec

MODEL = ModelMetadata(
    name="any",
    version="1",
    platform="onnxruntime_onnx",
    inputs=(
        TensorSpec("x", "FP32", (-1, -1)),
        TensorSpec("t", "BYTES", (-1,)),
    ),
    outputs=(TensorSpec("y", "FP32", (-1, -1)),),
    max_batch_size=0,
)
"""Variable dimensions and no batch limit: the codec's own limits are all that stand."""

Body = tuple[bytes, int | None]
"""A request body and its ``Inference-Header-Content-Length`` (None: all JSON)."""


def _repeat(item: bytes, size: int) -> tuple[bytes, int]:
    """``item`` joined by commas to about ``size`` bytes, and how many times it is there."""
    count = max(1, size // (len(item) + 1))
    return b",".join([item] * count), count


def _request(
    x: bytes, x_shape: list[int], t: bytes = b'["a"]', t_count: int = 1, rest: bytes = b""
) -> bytes:
    """A JSON request with ``x`` and ``t`` as their JSON ``data``, ``rest`` more top-level
    members."""
    return (
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":' + orjson.dumps(x_shape)
        + b',"data":' + x + b'},{"name":"t","datatype":"BYTES","shape":'
        + orjson.dumps([t_count]) + b',"data":' + t + b"}]" + rest + b"}"
    )  # fmt: skip


_FLOAT32 = np.random.default_rng(0).random(4096, dtype=np.float32)


def _floats(size: int, written: bytes) -> Body:
    """``x`` as flat JSON numbers: ``_FLOAT32`` as ``written``, repeated."""
    copies = max(1, size // len(written))
    data = b",".join([written[1:-1]] * copies)
    return _request(b"[" + data + b"]", [1, len(_FLOAT32) * copies]), None


def json_flat_floats(size: int) -> Body:
    """Floats as Python's json and tritonclient write float32 data: via float64, 17 digits."""
    return _floats(size, orjson.dumps(_FLOAT32.tolist()))


def json_flat_float32(size: int) -> Body:
    """Floats as numpy and bazaar's encoder write float32 data: the shortest, about 9 digits."""
    return _floats(size, orjson.dumps(_FLOAT32, option=orjson.OPT_SERIALIZE_NUMPY))


def json_flat_short(size: int) -> Body:
    """The densest numbers: ``1,1,1,...``."""
    data, count = _repeat(b"1", size)
    return _request(b"[" + data + b"]", [1, count]), None


def json_nested_pixels(size: int) -> Body:
    """Pixels nested as ``[[r, g, b], ...]``, as an image's natural form ends."""
    pixels, count = _repeat(b"[255,128,7]", size)
    return _request(b"[" + pixels + b"]", [count, 3]), None


def json_nested_rows(size: int) -> Body:
    """One array per element: ``[[1],[1],...]``."""
    data, count = _repeat(b"[1]", size)
    return _request(b"[" + data + b"]", [count, 1]), None


def json_nested_deep(size: int) -> Body:
    """The elements 1,000 arrays down (orjson refuses more than 1,024)."""
    data, count = _repeat(b"1", size)
    return _request(b"[" * 1000 + data + b"]" * 1000, [1, count]), None


def json_many_inputs(size: int) -> Body:
    """An ``inputs`` array of one small tensor repeated (the issue's had a million)."""
    entry = b'{"name":"x","datatype":"FP32","shape":[1],"data":[0]}'
    entries, _ = _repeat(entry, size)
    return b'{"inputs":[' + entries + b"]}", None


def json_many_outputs(size: int) -> Body:
    """An ``outputs`` array of one output repeated."""
    entries, _ = _repeat(b'{"name":"y"}', size)
    return _request(b"[[1]]", [1, 1], rest=b',"outputs":[' + entries + b"]"), None


def json_bytes_huge(size: int) -> Body:
    """One BYTES element of ``size`` ASCII characters."""
    return _request(b"[[1]]", [1, 1], t=b'["' + b"a" * size + b'"]'), None


def json_bytes_wide(size: int) -> Body:
    """One BYTES element whose one 4-byte character makes every character 4 bytes in a str."""
    return _request(b"[[1]]", [1, 1], t=b'["\xf0\x9f\x98\x80' + b"a" * size + b'"]'), None


def json_bytes_tiny(size: int) -> Body:
    """BYTES elements of two characters each."""
    data, count = _repeat(b'"ab"', size)
    return _request(b"[[1]]", [1, 1], t=b"[" + data + b"]", t_count=count), None


def json_parameters_deep(size: int) -> Body:
    """A parameter whose value is arrays 1,000 deep, as many as fit."""
    nested, _ = _repeat(b"[" * 1000 + b"]" * 1000, size)
    return _request(b"[[1]]", [1, 1], rest=b',"parameters":{"p":[' + nested + b"]}"), None


def json_parameters_wide(size: int) -> Body:
    """A parameter whose value is the densest containers JSON has: ``[[],[],...]``."""
    empties, _ = _repeat(b"[]", size)
    return _request(b"[[1]]", [1, 1], rest=b',"parameters":{"p":[' + empties + b"]}"), None


def json_unknown_key(size: int) -> Body:
    """A member the protocol does not know, holding ``[{},{},...]``."""
    empties, _ = _repeat(b"{}", size)
    return _request(b"[[1]]", [1, 1], rest=b',"junk":[' + empties + b"]"), None


def json_count_mismatch(size: int) -> Body:
    """Numbers for a shape that declares 10."""
    data, _ = _repeat(b"1", size)
    return _request(b"[" + data + b"]", [1, 10]), None


def json_shape_huge(size: int) -> Body:
    """Numbers for a shape that declares 2**40."""
    data, _ = _repeat(b"1", size)
    return _request(b"[" + data + b"]", [1, 2**40]), None


def _binary(x: dict[str, Any], t: dict[str, Any], chunk: bytes) -> tuple[bytes, int]:
    """A binary-extension body: the JSON header of tensors ``x`` and ``t``, then ``chunk``."""
    head = orjson.dumps({"inputs": [{"name": "x", **x}, {"name": "t", **t}]})
    return head + chunk, len(head)


_ONE_FP32 = {"datatype": "FP32", "shape": [1, 1], "data": [1]}
_ONE_BYTES = {"datatype": "BYTES", "shape": [1], "data": ["a"]}


def binary_fp32(size: int) -> Body:
    """An FP32 tensor of ``size`` bytes, binary."""
    count = size // 4
    x = {"datatype": "FP32", "shape": [1, count], "parameters": {"binary_data_size": 4 * count}}
    return _binary(x, _ONE_BYTES, bytes(4 * count))


def binary_bytes_tiny(size: int) -> Body:
    """BYTES elements of two bytes each (six with their lengths), binary."""
    element = b"\x02\0\0\0ab"
    count = size // len(element)
    t = {"datatype": "BYTES", "shape": [count], "parameters": {"binary_data_size": 6 * count}}
    return _binary(_ONE_FP32, t, element * count)


def binary_header_length_lies(size: int) -> Body:
    """``binary_fp32`` with an Inference-Header-Content-Length that claims all of it as JSON."""
    body, _ = binary_fp32(size)
    return body, len(body)


def binary_size_lies(size: int) -> Body:
    """An FP32 tensor whose binary_data_size claims four times the bytes that follow."""
    x = {"datatype": "FP32", "shape": [1, size], "parameters": {"binary_data_size": 4 * size}}
    return _binary(x, _ONE_BYTES, bytes(size))


CASES: dict[str, Callable[[int], Body]] = {
    case.__name__: case
    for case in (
        json_flat_floats, json_flat_float32, json_flat_short, json_nested_pixels,
        json_nested_rows, json_nested_deep, json_many_inputs, json_many_outputs,
        json_bytes_huge, json_bytes_wide, json_bytes_tiny, json_parameters_deep,
        json_parameters_wide, json_unknown_key, json_count_mismatch, json_shape_huge,
        binary_fp32, binary_bytes_tiny, binary_header_length_lies, binary_size_lies,
    )
}  # fmt: skip
"""Each body shape by name: a function of the body's approximate size in bytes."""


def measure(case: str, size: int) -> dict[str, object]:
    """Decode one body in this process: its size, the peak RSS over it, the time, the outcome."""
    body, header_length = CASES[case](size)
    gc.collect()
    pid = os.getpid()
    reset_peak_rss(pid)  # peak RSS := current RSS
    before = rss_bytes(pid)
    started = time.process_time()
    try:
        request = decode_request(body, header_length, MODEL)
        outcome = "decoded " + ", ".join(f"{n}{list(a.shape)}" for n, a in request.inputs.items())
    except BazaarError as exc:
        outcome = f"{exc.status} {exc.message[:90]}"
    elapsed = time.process_time() - started
    peak = peak_rss_bytes(pid) - before
    return {
        "case": case,
        "body_mib": len(body) / 2**20,
        "peak_mib": peak / 2**20,
        "ratio": peak / len(body),
        "seconds": elapsed,
        "outcome": outcome,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=64, help="body size (default %(default)s)")
    parser.add_argument("--case", action="append", choices=list(CASES), help="default: all")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = int(args.mib * 2**20)
    if args.child:
        print(json.dumps(measure(args.child, size)))
        return 0
    print(f"{'case':28} {'body MiB':>9} {'peak MiB':>9} {'x body':>7} {'CPU s':>9}  outcome")
    for case in args.case or CASES:
        command = [sys.executable, "-m", "loadtests.decodecost", "--mib", str(args.mib)]
        done = subprocess.run(
            [*command, "--child", case], capture_output=True, text=True, check=False
        )
        if done.returncode:
            print(f"{case:28} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        row = json.loads(done.stdout)
        print(
            f"{row['case']:28} {row['body_mib']:9.1f} {row['peak_mib']:9.1f} {row['ratio']:7.1f}"
            f" {row['seconds']:9.3f}  {row['outcome']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
