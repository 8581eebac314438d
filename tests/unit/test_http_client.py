"""The load generator's HTTP client against small real servers on 127.0.0.1 that close kept-alive
connections, send trailers, or end bodies by closing."""

import asyncio

from roofserve.load.http import Connection


async def _serve(answer: bytes, keep_alive: bool):
    """A server that answers each request with `answer`, then closes the connection unless keep_alive."""
    served = []

    async def handle(reader, writer):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")), 0)
            await reader.readexactly(length)
            served.append(head.split(b" ")[1])
            writer.write(answer)
            await writer.drain()
            if not keep_alive:
                writer.close()
                return

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, served, server.sockets[0].getsockname()[1]


def test_a_connection_the_server_closed_is_opened_again():
    async def main():
        # no Connection: close header: the server just hangs up after each answer, as an idle timeout does
        server, served, port = await _serve(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", keep_alive=False)
        conn = Connection(f"http://127.0.0.1:{port}", timeout_s=5)
        results = []
        for i in range(3):
            await asyncio.sleep(0.05)  # the server's close arrives while the connection is idle
            results.append(await conn.request("GET", f"/r{i}"))
        await conn.close()
        server.close()
        return results, served

    results, served = asyncio.run(main())
    assert results == [(200, b"ok")] * 3 and served == [b"/r0", b"/r1", b"/r2"]  # each sent exactly once


def test_chunked_bodies_with_trailers_and_close_delimited_bodies():
    async def main():
        chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n")
        server, _, port = await _serve(chunked, keep_alive=True)
        conn = Connection(f"http://127.0.0.1:{port}", timeout_s=5)
        first = await conn.request("GET", "/a")
        second = await conn.request("GET", "/b")  # the trailer was consumed: the next answer parses
        await conn.close()
        server.close()
        server2, _, port2 = await _serve(b"HTTP/1.0 200 OK\r\n\r\nuntil the end", keep_alive=False)
        conn2 = Connection(f"http://127.0.0.1:{port2}", timeout_s=5)
        third = await conn2.request("GET", "/c")
        fourth = await conn2.request("GET", "/d")
        await conn2.close()
        server2.close()
        return first, second, third, fourth

    first, second, third, fourth = asyncio.run(main())
    assert first == second == (200, b"abcde")
    assert third == fourth == (200, b"until the end")


def _sse(*events: str) -> bytes:
    body = b"".join(f"data: {e}\n\n".encode() for e in events)
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + body


def test_the_bench_client_needs_done_and_a_finish_reason_and_ends_a_stall():
    import json
    import time

    from roofserve.load.llm import stream_one

    token = json.dumps({"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]})
    last = json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 1}})

    async def one(answer: bytes, stall: bool = False):
        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            if stall:
                await asyncio.sleep(30)  # headers and a token, then nothing, connection open
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        conn = Connection(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", timeout_s=5, read_timeout_s=0.5)
        started = time.monotonic()
        result = await stream_one(conn, "/v1/chat/completions", b"{}", {})
        await conn.close()
        server.close()
        return result, time.monotonic() - started

    whole, _ = asyncio.run(one(_sse(token, last, "[DONE]")))
    assert whole.ok and whole.finish_reason == "length" and whole.output_tokens == 1
    cut, _ = asyncio.run(one(_sse(token)))  # cut at an event boundary
    assert not cut.ok and "[DONE]" in cut.error
    unfinished, _ = asyncio.run(one(_sse(token, "[DONE]")))
    assert not unfinished.ok and "finish_reason" in unfinished.error
    stalled, seconds = asyncio.run(one(_sse(token)[:-2], stall=True))
    assert not stalled.ok and stalled.error == "TimeoutError" and seconds < 5
