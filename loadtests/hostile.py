"""Hostile clients: slow, idle and oversized ones, each an asyncio attack that keeps at it
until told to stop, counting how the server ended each of its connections.

Attacks (``ATTACKS``), each holding ``connections`` connections at once:

- ``slow-headers`` (slowloris): a request line, then one header byte every
  ``TRICKLE_INTERVAL_S``; the edge answers 408 once its header timeout passes.
- ``slow-body``: complete headers declaring a ``SLOW_BODY_BYTES`` body, then one body byte
  every ``TRICKLE_INTERVAL_S``; 408 once the body falls behind its pace.
- ``idle``: connections that send nothing. At the server's connection cap each new one
  closes the longest idle, and the server closes each after its keep-alive timeout; the
  attack opens a replacement for each closed one, at most ``IDLE_REOPEN_PER_S`` a second,
  so it presses on the cap without becoming a connect flood.
- ``huge-headers``: a header ``HUGE_HEADER_BYTES`` long (100 MiB) streamed as fast as the
  server reads it; 431 once past the header limit.
- ``huge-bodies``: inference bodies of ``HUGE_BODY_BYTES`` (250 MiB: over the default 64 MiB
  limit, so refused as declared, or once past it when sent chunked; under a limit raised
  past them, the codec's bounds refuse them), one of each of ``body_shapes`` in turn: a tensor of
  tens of millions of numbers, millions of small tensors, nesting past any parser's depth,
  one huge string, a binary tensor, the numbers sent chunked (no length declared), and
  bytes that are not JSON at all. Each body is generated as it is sent, from a repeated
  unit, so the attacker holds a MiB of it, never 250.

Each connection ends in one of the ``Outcomes``: the status the server answered (only the
status line is read), ``closed`` (closed, or reset, without an answer), ``open`` (still
open when the attack was stopped), or ``connect failed``. A connection is never reused.

Run as ``python -m loadtests.hostile KIND --port P --connections N``: the attack runs until
SIGTERM or SIGINT, then prints its outcomes as JSON. The benchmark runs it so, in a process
of its own at the lowest priority, so that the attacker's own work never delays the
generator that measures the normal traffic beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import uvloop

TRICKLE_INTERVAL_S = 1.0
"""Slowloris pace: one byte per second per connection."""
SLOW_BODY_BYTES = 1_000_000
"""The body a slow-body connection declares (and never finishes)."""
IDLE_REOPEN_PER_S = 2_000.0
"""The idle attack's replacements for closed connections, at most, per second."""
HUGE_HEADER_BYTES = 100 * 1024 * 1024
HUGE_BODY_BYTES = 250 * 1024 * 1024
BLOCK_BYTES = 1024 * 1024
"""Oversized requests are written a block at a time."""
ANSWER_TIMEOUT_S = 120.0
"""How long a fully sent request waits for its answer before it counts as ``closed``."""

Writer = Callable[[asyncio.StreamWriter], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True)
class BodyShape:
    """A body of about ``HUGE_BODY_BYTES``: ``prefix``, ``unit`` repeated, ``suffix``."""

    name: str
    prefix: bytes
    unit: bytes
    count: int
    suffix: bytes
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    chunked: bool = False
    """Sent with ``Transfer-Encoding: chunked`` instead of a Content-Length."""

    @property
    def size(self) -> int:
        return len(self.prefix) + len(self.unit) * self.count + len(self.suffix)

    def blocks(self) -> Iterator[bytes]:
        """The body, ``BLOCK_BYTES`` or so at a time."""
        yield self.prefix
        per_block = max(1, BLOCK_BYTES // len(self.unit))
        block = self.unit * per_block
        whole, rest = divmod(self.count, per_block)
        for _ in range(whole):
            yield block
        yield self.unit * rest + self.suffix


def _tensor(name: str, shape: list[int], **extra: object) -> bytes:
    return json.dumps({"name": name, "datatype": "FP32", "shape": shape, **extra}).encode()


def body_shapes(width: int, size: int = HUGE_BODY_BYTES) -> tuple[BodyShape, ...]:
    """Every shape of oversized body, for a model whose input ``input`` is FP32 [-1, width]."""
    number = b"0.5,"
    rows = size // len(number) // width
    numbers_head = _tensor("input", [rows, width])[:-1] + b', "data": ['
    tiny = _tensor("input", [1, 1], data=[0]) + b","
    one_row = _tensor("input", [1, width], data=[0.5] * width)
    binary_head = b'{"inputs": [' + _tensor(
        "input", [size // 4 // width, width], parameters={"binary_data_size": size}
    ) + b"]}"  # fmt: skip
    return (
        BodyShape("numbers", b'{"inputs": [' + numbers_head, number, rows * width - 1, b"0.5]}]}"),
        BodyShape("tensors", b'{"inputs": [', tiny, size // len(tiny), tiny[:-1] + b"]}"),
        BodyShape("nesting", b'{"inputs": ', b"[", size - 11, b""),
        BodyShape("string", b'{"id": "', b"a", size, b'", "inputs": [' + one_row + b"]}"),
        BodyShape(
            "binary",
            binary_head,
            b"\0" * 4096,
            size // 4096,
            b"",
            (
                ("Content-Type", "application/octet-stream"),
                ("Inference-Header-Content-Length", str(len(binary_head))),
            ),
        ),
        BodyShape(
            "chunked",
            b'{"inputs": [' + numbers_head,
            number,
            rows * width - 1,
            b"0.5]}]}",
            chunked=True,
        ),
        BodyShape("not-json", b"", b"x" * 4096, size // 4096, b""),
    )


Outcomes = Counter[str]
"""How the server ended an attack's connections: by status, ``closed``, ``open``,
``connect failed``."""


def describe(outcomes: Outcomes) -> str:
    """``408 x120, closed x3``."""
    return ", ".join(f"{kind} x{count}" for kind, count in sorted(outcomes.items()))


async def _read_status(reader: asyncio.StreamReader) -> str:
    try:
        line = await reader.readline()
    except (ConnectionError, OSError):
        return "closed"
    parts = line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        return "closed"
    return parts[1].decode()


async def exchange(host: str, port: int, write: Writer) -> str:
    """Open a connection and ``write`` to it until the server answers or closes it; the
    outcome (a status, ``closed`` or ``connect failed``)."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return "connect failed"
    sender = asyncio.create_task(write(writer))
    status = asyncio.create_task(_read_status(reader))
    try:
        await asyncio.wait({sender, status}, return_when=asyncio.FIRST_COMPLETED)
        # All sent, or the server stopped taking it: now its answer, however long it takes.
        await asyncio.wait({status}, timeout=ANSWER_TIMEOUT_S)
        return status.result() if status.done() else "closed"
    finally:
        for task in (sender, status):
            task.cancel()
        await asyncio.gather(sender, status, return_exceptions=True)
        # Abort, not close: a close would first flush what the server no longer reads.
        writer.transport.abort()


def request_head(path: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: hostile", *(f"{n}: {v}" for n, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def trickle(opening: bytes, byte: bytes) -> Writer:
    async def write(writer: asyncio.StreamWriter) -> None:
        writer.write(opening)
        while True:
            await writer.drain()
            await asyncio.sleep(TRICKLE_INTERVAL_S)
            writer.write(byte)

    return write


def stream(head: bytes, blocks: Callable[[], Iterator[bytes]], chunked: bool = False) -> Writer:
    async def write(writer: asyncio.StreamWriter) -> None:
        writer.write(head)
        for block in blocks():
            if not block:
                continue  # in a chunked body, an empty chunk would end it
            writer.write(b"%x\r\n%b\r\n" % (len(block), block) if chunked else block)
            await writer.drain()
        if chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    return write


def huge_body(path: str, shape: BodyShape) -> Writer:
    length = (
        ("Transfer-Encoding", "chunked") if shape.chunked else ("Content-Length", f"{shape.size}")
    )
    return stream(request_head(path, (*shape.headers, length)), shape.blocks, shape.chunked)


def huge_header() -> Writer:
    opening = b"GET /v2 HTTP/1.1\r\nHost: hostile\r\nX-Huge: "
    block = b"a" * BLOCK_BYTES
    return stream(opening, lambda: iter([block] * (HUGE_HEADER_BYTES // BLOCK_BYTES)))


async def send_nothing(writer: asyncio.StreamWriter) -> None:
    """An idle connection's writer: it waits until the server closes the connection."""
    await asyncio.Event().wait()


async def attack(
    kind: str,
    host: str,
    port: int,
    connections: int,
    stop: asyncio.Event,
    *,
    model: str = "mlp",
    width: int = 256,
    outcomes: Outcomes | None = None,
) -> Outcomes:
    """Run attack ``kind`` with ``connections`` at once until ``stop`` is set, against the
    inference route of ``model`` (its input ``input`` is FP32 [-1, width]); counts into
    ``outcomes`` if given, so that a caller can watch."""
    path = f"/v2/models/{model}/infer"
    outcomes = Counter() if outcomes is None else outcomes
    shapes = body_shapes(width)
    started = time.perf_counter()
    opened = 0

    def writer_for(index: int) -> Writer:
        if kind == "slow-headers":
            return trickle(f"POST {path} HTTP/1.1\r\nHost: hostile\r\nX-Slow: ".encode(), b"a")
        if kind == "slow-body":
            return trickle(request_head(path, (("Content-Length", f"{SLOW_BODY_BYTES}"),)), b"0")
        if kind == "huge-headers":
            return huge_header()
        if kind == "huge-bodies":
            return huge_body(path, shapes[index % len(shapes)])
        if kind == "idle":
            return send_nothing
        raise ValueError(f"unknown attack {kind!r}")

    async def one_after_another(slot: int) -> None:
        nonlocal opened
        index = slot
        while not stop.is_set():
            if kind == "idle":
                # Replacements are paced: the attack is on the cap, not the accept loop.
                due = started + opened / IDLE_REOPEN_PER_S
                opened += 1
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            connected.add(slot)
            outcome = await exchange(host, port, writer_for(index))
            connected.discard(slot)
            outcomes[outcome] += 1
            index += connections

    connected: set[int] = set()
    slots = [asyncio.create_task(one_after_another(slot)) for slot in range(connections)]
    await stop.wait()
    outcomes["open"] += len(connected)
    for task in slots:
        task.cancel()
    await asyncio.gather(*slots, return_exceptions=True)
    return outcomes


ATTACKS = ("slow-headers", "slow-body", "idle", "huge-headers", "huge-bodies")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=ATTACKS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--model", default="mlp", help="its input 'input' is FP32 [-1, WIDTH]")
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args()

    async def run() -> Outcomes:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        print("attacking", flush=True)  # the signal handlers are in place
        return await attack(
            args.kind, args.host, args.port, args.connections, stop,
            model=args.model, width=args.width,
        )  # fmt: skip

    outcomes = uvloop.run(run())
    json.dump(dict(outcomes), sys.stdout)


if __name__ == "__main__":
    main()
