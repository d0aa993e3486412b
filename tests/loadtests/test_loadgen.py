"""The load generator's accounting, against a small server of the test's own that answers,
refuses, drops, doubles or withholds answers on cue: every request sent must end up counted
exactly once, as an answer by status, an error, or unanswered."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable

import pytest

from loadtests.hostile import BodyShape, body_shapes
from loadtests.loadgen import Request, closed_loop, open_loop, stop_after, trace_loop

REQUEST = Request("/v2/models/m/infer", b'{"inputs": []}', (("Content-Type", "application/json"),))

Cue = Callable[[int], str]
"""What the server does with its n-th request: a status, ``drop``, ``double`` or ``hold``."""


def answer(status: str) -> bytes:
    return f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\n{{}}".encode()


@contextlib.asynccontextmanager
async def cued_server(cue: Cue, delay_s: float = 0.0) -> AsyncIterator[int]:
    """An HTTP/1.1 server doing with each request what ``cue`` says; yields its port."""
    numbers = itertools.count()
    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                action = cue(next(numbers))
                await asyncio.sleep(delay_s)
                if action == "drop":
                    break
                if action == "hold":
                    await reader.read()  # until the client gives up
                    break
                writer.write(answer("200") * 2 if action == "double" else answer(action))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            handlers.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]
        # The client has closed its side: let each handler see it and close its own.
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


async def test_a_closed_loop_counts_every_answer_by_status() -> None:
    async with cued_server(lambda n: "503" if n % 3 == 0 else "200") as port:
        tally = await closed_loop("127.0.0.1", port, REQUEST, 4, stop_after(0.3))
    assert tally.sent > 10
    assert tally.answered == tally.sent and tally.lost == 0
    assert set(tally.statuses) == {200, 503}
    assert len(tally.ok_latencies_s) == tally.statuses[200]
    assert 0 < tally.ok_while_loaded <= tally.statuses[200]
    assert tally.goodput == tally.ok_while_loaded / tally.loaded_s


async def test_a_request_whose_connection_closes_unanswered_is_lost_and_the_loop_goes_on() -> None:
    async with cued_server(lambda n: "drop" if n % 5 == 4 else "200") as port:
        tally = await closed_loop("127.0.0.1", port, REQUEST, 2, stop_after(0.3))
    dropped = tally.errors["closed without an answer"]
    assert dropped > 0 and tally.statuses[200] > 4 * dropped - 2
    assert tally.lost == dropped == sum(tally.errors.values())
    assert tally.sent == tally.answered + tally.lost


async def test_a_second_answer_to_one_request_is_counted() -> None:
    async with cued_server(lambda n: "double" if n == 0 else "200") as port:
        tally = await closed_loop("127.0.0.1", port, REQUEST, 1, stop_after(0.2))
    assert tally.unsolicited == 1
    assert tally.answered == tally.sent


async def test_requests_still_unanswered_at_the_drain_deadline_are_counted() -> None:
    async with cued_server(lambda n: "hold" if n < 3 else "200") as port:
        tally = await closed_loop("127.0.0.1", port, REQUEST, 3, stop_after(0.1), drain_s=0.2)
    assert (tally.sent, tally.answered, tally.unanswered, tally.lost) == (3, 0, 3, 3)
    assert not tally.errors


async def test_an_open_loop_keeps_its_rate_and_counts_what_it_could_not_send() -> None:
    async with cued_server(lambda n: "200", delay_s=1.0) as port:
        tally = await open_loop("127.0.0.1", port, REQUEST, 100, 5, stop_after(0.5))
    assert tally.sent == 5 and tally.statuses == Counter({200: 5})
    assert 45 <= tally.sent + tally.missed <= 52  # 100/s for 0.5 s, give or take a tick
    assert min(tally.ok_latencies_s) >= 1.0  # counted from when each fell due


async def test_a_trace_loop_sends_each_request_when_it_falls_due() -> None:
    due = [0.0, 0.05, 0.3, 0.3, 0.6]
    async with cued_server(lambda n: "200", delay_s=0.1) as port:
        tally = await trace_loop("127.0.0.1", port, REQUEST, due, 10)
    assert tally.sent == 5 and tally.statuses == Counter({200: 5}) and tally.missed == 0
    # Each answer is placed at its due time, and timed from it (the server takes 0.1 s).
    assert sorted(tally.ok_due_s) == pytest.approx(due, abs=0.02)
    assert min(tally.ok_latencies_s) >= 0.1
    assert 0.6 <= tally.loaded_s < 0.7  # the trace's last request ends the load


async def test_a_trace_loop_counts_what_it_could_not_send() -> None:
    async with cued_server(lambda n: "200", delay_s=0.3) as port:
        tally = await trace_loop("127.0.0.1", port, REQUEST, [0.0, 0.01, 0.02, 0.5], 1)
    # One connection, busy for 0.3 s: the two due meanwhile are missed, the last one goes.
    assert (tally.sent, tally.missed, tally.statuses[200]) == (2, 2, 2)


@pytest.mark.parametrize("shape", body_shapes(4, size=4096 * 3), ids=lambda shape: shape.name)
def test_an_oversized_body_is_as_long_as_it_declares(shape: BodyShape) -> None:
    assert sum(len(block) for block in shape.blocks()) == shape.size


def test_the_numbers_body_is_a_request_whose_shape_matches_its_data() -> None:
    numbers = next(shape for shape in body_shapes(4, size=4096) if shape.name == "numbers")
    tensor = json.loads(b"".join(numbers.blocks()))["inputs"][0]
    rows, width = tensor["shape"]
    assert (width, len(tensor["data"])) == (4, rows * width)
