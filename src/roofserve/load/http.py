"""A minimal HTTP/1.1 keep-alive client on asyncio streams.

A load generator that shares 2 cores with the server it measures must be cheap: this client costs a
small fraction of httpx's CPU per request. It speaks plain http (load tests only target localhost),
Content-Length, chunked (with trailers) and close-delimited bodies, opens a kept-alive connection again
when the server closed it while idle, and can stream a body chunk by chunk (for SSE).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

try:
    import uvloop
except ImportError:  # not on Windows
    uvloop = None

T = TypeVar("T")


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop where installed: a streamed message costs our client less CPU than on
    asyncio's own loop (scripts/message_cost.py measures both)."""
    return uvloop.run(main) if uvloop is not None else asyncio.run(main)


class HTTPError(Exception):
    pass


class _ClosedBeforeAnswer(Exception):
    """The server closed the connection before sending a byte of the answer."""


class Connection:
    def __init__(self, url: str, timeout_s: float = 60.0, read_timeout_s: float | None = None):
        """timeout_s bounds connecting and waiting for the response headers; read_timeout_s (default:
        timeout_s) the wait for each piece of the body after them, so a stalled answer ends."""
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"only http:// URLs are supported, got {url!r}")
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout_s = timeout_s
        self.read_timeout_s = read_timeout_s or timeout_s
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=1 << 22), self.timeout_s
        )

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass
        self.reader = self.writer = None

    async def _send(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str]]:
        """Send the request and read the status and headers. A kept-alive connection that the server has
        closed meanwhile (its idle timeout, its request cap) is opened again once and the request resent:
        nothing of it can have been processed, since not a byte of an answer came back."""
        reused = self.writer is not None
        if not reused:
            await self._connect()
        try:
            return await self._exchange(method, path, headers, body)
        except (_ClosedBeforeAnswer, ConnectionResetError, BrokenPipeError):
            if not reused:
                raise HTTPError("connection closed by server") from None
            await self.close()
            await self._connect()
            try:
                return await self._exchange(method, path, headers, body)
            except (_ClosedBeforeAnswer, ConnectionResetError, BrokenPipeError):
                raise HTTPError("connection closed by server") from None

    async def _exchange(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str]]:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise _ClosedBeforeAnswer()
        try:
            status = int(status_line.split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise HTTPError(f"bad status line {status_line[:80]!r}") from None
        response_headers = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            key, _, value = line.decode("latin-1").partition(":")
            response_headers[key.strip().lower()] = value.strip()
        if status_line.startswith(b"HTTP/1.0") and "keep-alive" not in response_headers.get("connection", "").lower():
            response_headers["connection"] = "close"  # HTTP/1.0 closes unless it says otherwise
        return status, response_headers

    async def _chunks(self, headers: dict[str, str]) -> AsyncIterator[bytes]:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await self.reader.readline()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (await self.reader.readline()).strip():  # trailers, then the blank line
                        pass
                    return
                chunk = await self.reader.readexactly(size + 2)
                yield chunk[:-2]
        elif "content-length" in headers:
            length = int(headers["content-length"])
            if length:
                yield await self.reader.readexactly(length)
        else:  # body ends when the connection does
            while chunk := await self.reader.read(65536):
                yield chunk
            await self.close()

    async def _timed(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The body's chunks, each waited for at most read_timeout_s (TimeoutError past it). A timer per
        chunk (asyncio.timeout), not wait_for's task per chunk: this runs once per streamed message."""
        while True:
            try:
                async with asyncio.timeout(self.read_timeout_s):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            yield chunk

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> tuple[int, bytes]:
        """Send one request and read the whole answer: (status, body)."""
        try:
            status, response_headers = await asyncio.wait_for(self._send(method, path, headers or {}, body), self.timeout_s)
            data = b"".join([c async for c in self._timed(self._chunks(response_headers))])
            if _closes(response_headers):
                await self.close()
            return status, data
        except BaseException:
            await self.close()
            raise

    async def stream(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> AsyncIterator[tuple[int, bytes]]:
        """Send one request and yield (status, chunk) as body chunks arrive."""
        try:
            status, response_headers = await asyncio.wait_for(self._send(method, path, headers or {}, body), self.timeout_s)
            async for chunk in self._timed(self._chunks(response_headers)):
                yield status, chunk
            if _closes(response_headers):
                await self.close()
        except BaseException:
            await self.close()
            raise


def _closes(headers: dict[str, str]) -> bool:
    return headers.get("connection", "").lower() == "close"
