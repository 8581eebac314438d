"""roofserve's worker-to-HTTP transport (server.transport.PipeTransport), with real spawned writer
processes as LitServe's workers are: every answer arrives whole and in its writer's order, large ones
included, while several writers share the pipe; a torn or broken answer is dropped, not the reader.
The servers' e2e tests run every answer through it too."""

import asyncio
import multiprocessing as mp
import os
import pickle

from roofserve.server import transport as tr
from roofserve.server.transport import PipeTransport

SIZES = (10, 4000, 5000, 300_000)  # one chunk, one full chunk, two chunks, many chunks


def _writer(transport: PipeTransport, tag: int, count: int) -> None:
    for i in range(count):
        size = SIZES[i % len(SIZES)]
        transport.send((tag, i, bytes([i % 256]) * size), consumer_id=0)


async def _receive(transport: PipeTransport, count: int, timeout_s: float = 60.0, start=lambda: None) -> list:
    """The answers handed to `deliver`'s callback, once `count` of them are in; `start` runs after the
    reader is set up (it starts the writers)."""
    got: list = []
    transport.deliver(0, got.append)
    start()
    deadline = asyncio.get_running_loop().time() + timeout_s
    while len(got) < count:
        assert asyncio.get_running_loop().time() < deadline, f"{len(got)} of {count} answers in {timeout_s} s"
        await asyncio.sleep(0.01)
    return got


def test_answers_from_several_spawned_writers_arrive_whole_and_in_order():
    transport = PipeTransport(consumers=1)
    writers = [mp.get_context("spawn").Process(target=_writer, args=(transport, tag, 40)) for tag in range(3)]

    got = asyncio.run(_receive(transport, 3 * 40, start=lambda: [w.start() for w in writers]))
    for w in writers:
        w.join(30)
        assert w.exitcode == 0
    for tag in range(3):
        mine = [(i, data) for t, i, data in got if t == tag]
        assert [i for i, _ in mine] == list(range(40)), "each writer's answers in the order it sent them"
        for i, data in mine:
            assert data == bytes([i % 256]) * SIZES[i % len(SIZES)]


def test_a_torn_answer_and_one_that_does_not_unpickle_are_dropped_and_the_reader_goes_on():
    transport = PipeTransport(consumers=1)
    write = transport._pipes[0][1]
    dead_pid, live_pid = 999_999, os.getpid()
    # a worker killed after the first chunk of a large answer; its pid later reused by a new worker
    os.write(write, tr._HEADER.pack(dead_pid, 5, tr._FIRST) + b"torn!")
    os.write(write, tr._HEADER.pack(live_pid, 7, tr._FIRST | tr._LAST) + b"garbage")  # not a pickle
    transport.send("after the garbage", 0)
    whole = pickle.dumps("the reused pid's own answer")
    os.write(write, tr._HEADER.pack(dead_pid, 3, tr._FIRST) + whole[:3])
    os.write(write, tr._HEADER.pack(dead_pid, len(whole) - 3, tr._LAST) + whole[3:])

    assert asyncio.run(_receive(transport, 2, timeout_s=10)) == ["after the garbage", "the reused pid's own answer"]


def _exit_with_read_ends(transport: PipeTransport) -> None:
    raise SystemExit(10 + sum(read != -1 for read, _ in transport._pipes))


def test_a_spawned_worker_gets_only_the_write_ends():
    transport = PipeTransport(consumers=2)
    child = mp.get_context("spawn").Process(target=_exit_with_read_ends, args=(transport,))
    child.start()
    child.join(30)
    assert child.exitcode == 10, "no read end in the worker"


def test_litserves_consumer_task_waits_while_answers_go_to_the_handler():
    transport = PipeTransport(consumers=1)
    got = []

    async def main() -> None:
        transport.deliver(0, got.append)
        waiting = asyncio.ensure_future(transport.areceive(0))  # LitServe's consumer task: waits, gets nothing
        for i in range(3):
            transport.send(("answer", i), 0)
        while len(got) < 3:
            await asyncio.sleep(0.01)
        assert not waiting.done()
        waiting.cancel()

    asyncio.run(asyncio.wait_for(main(), 10))
    assert got == [("answer", 0), ("answer", 1), ("answer", 2)]
