"""Answers from the inference workers to the HTTP process over one OS pipe, read in the event loop.

LitServe 0.2.19 sends every answer (every streamed message) through a multiprocessing Manager queue:
the worker's put is a round trip to the manager process, and the HTTP process's get is another one,
made from a thread-pool thread for each message: with a model that costs almost nothing, that hop is
most of a streamed message's CPU (measured: docs/many-users.md). (Its `fast_queue=True`, ZeroMQ, is
not used by 0.2.19: the server builds its TransportConfig with a misspelled field and always gets
Manager queues.)

Here a worker writes each answer straight into a pipe that the HTTP process's event loop watches
(`add_reader`): one write in the worker, one read and one unpickle in the HTTP process, no third
process and no thread hop. Several workers share a pipe without a lock: every write is at most
PIPE_BUF bytes, which POSIX makes atomic, and a larger answer goes in chunks that carry the writer's
pid and are joined per writer. A worker killed between the chunks of one answer leaves only its own
partial answer behind (dropped when that pid, reused, starts a new one); an answer that does not
unpickle is logged and dropped, never the reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import pickle
import select
import struct
from collections.abc import Callable
from multiprocessing import reduction
from typing import Any

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<iIB")  # writer pid, chunk length, flags
_FIRST, _LAST = 1, 2
_CHUNK = select.PIPE_BUF - _HEADER.size
_PIPE_BYTES = 1 << 20  # answers held while the HTTP process is busy, before a worker's write waits
_F_SETPIPE_SZ = 1031  # Linux fcntl


class PipeTransport:
    """LitServe's MessageTransport interface over pipes: `send` in the workers; in the HTTP process(es)
    `deliver` hands each answer to a callback as it is read. (Duck-typed: server.lit is the one module
    that imports LitServe's internals.)"""

    def __init__(self, consumers: int):
        self._pipes = [os.pipe() for _ in range(consumers)]  # (read fd, write fd) per HTTP process
        for _, write in self._pipes:
            with contextlib.suppress(OSError):  # a bigger buffer where the system allows it
                fcntl.fcntl(write, _F_SETPIPE_SZ, _PIPE_BYTES)
        self._readers: dict[int, _Reader] = {}

    def __reduce__(self):
        # Spawned workers get the write ends only, duplicated into them (the HTTP processes are forked
        # and inherit everything).
        return _rebuild_writer, ([reduction.DupFd(write) for _, write in self._pipes],)

    def send(self, item: Any, consumer_id: int) -> None:
        data, fd, pid = pickle.dumps(item, pickle.HIGHEST_PROTOCOL), self._pipes[consumer_id][1], os.getpid()
        if len(data) <= _CHUNK:
            os.write(fd, _HEADER.pack(pid, len(data), _FIRST | _LAST) + data)  # one atomic write (<= PIPE_BUF)
            return
        view = memoryview(data)
        for start in range(0, len(data), _CHUNK):
            part = view[start:start + _CHUNK]
            flags = (_FIRST if start == 0 else 0) | (_LAST if start + _CHUNK >= len(data) else 0)
            os.write(fd, _HEADER.pack(pid, len(part), flags) + part)

    def deliver(self, consumer_id: int, handle: Callable[[Any], None]) -> None:
        """In an HTTP process, from its event loop: hand each answer to `handle` as soon as it is read
        (no consumer task to wake)."""
        self._readers[consumer_id] = _Reader(self._pipes[consumer_id][0], handle)

    async def areceive(self, consumer_id: int = 0, timeout: float | None = None, block: bool = True) -> Any:
        """LitServe's consumer task waits here until it is cancelled: answers go to `deliver`'s callback."""
        await asyncio.get_running_loop().create_future()

    def close(self, **kwargs) -> None:
        for reader in self._readers.values():
            reader.close()


def _rebuild_writer(writes: list) -> PipeTransport:
    transport = PipeTransport.__new__(PipeTransport)
    transport._pipes = [(-1, dup.detach()) for dup in writes]
    transport._readers = {}
    return transport


class _Reader:
    """The read end in an HTTP process: each complete answer, in order, to `handle`."""

    def __init__(self, fd: int, handle: Callable[[Any], None]):
        self.fd = fd
        self.handle = handle
        self.loop = asyncio.get_running_loop()
        self.buffer = bytearray()
        self.partial: dict[int, list[bytes]] = {}  # writer pid -> chunks of an answer not yet complete
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, _PIPE_BYTES)
        except BlockingIOError:
            return
        if not data:  # every write end closed: the server is going away
            self.close()
            return
        self.buffer += data
        buf, pos = self.buffer, 0
        while len(buf) - pos >= _HEADER.size:
            pid, length, flags = _HEADER.unpack_from(buf, pos)
            end = pos + _HEADER.size + length
            if end > len(buf):
                break
            chunk = bytes(buf[pos + _HEADER.size:end])
            pos = end
            if flags == _FIRST | _LAST:  # the usual answer: one chunk
                data = chunk
            else:
                if flags & _FIRST:
                    self.partial[pid] = []
                if pid not in self.partial:  # the rest of an answer whose start was dropped
                    continue
                self.partial[pid].append(chunk)
                if not flags & _LAST:
                    continue
                data = b"".join(self.partial.pop(pid))
            try:
                answer = pickle.loads(data)
            except Exception:
                log.exception("dropped an answer from worker pid %d that does not unpickle", pid)
                continue
            try:
                self.handle(answer)
            except Exception:
                log.exception("an answer from worker pid %d could not be delivered", pid)
        del buf[:pos]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.fd)
