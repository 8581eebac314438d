"""The load core (load.core.run) against a small real server on 127.0.0.1 that counts the requests it
holds at once: a closed loop never holds more than its users, an open loop's arrivals follow the rate and
its cap, warm-ups go first and unrecorded, and a request that raises is a row."""

import asyncio
import math

import pytest

from roofserve.load import core
from roofserve.load.http import Connection


async def _server(hold_s: float):
    """Answers every request after hold_s; records the most requests it held at once."""
    state = {"now": 0, "most": 0, "paths": []}

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                state["paths"].append(head.split(b" ")[1].decode())
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
                await asyncio.sleep(hold_s)
                state["now"] -= 1
                code = b"503 Busy" if b"/fail" in head else b"200 OK"
                writer.write(b"HTTP/1.1 " + code + b"\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, state, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def _get(conn: Connection, i: int):
    async def send() -> core.RequestResult:
        status, _ = await conn.request("GET", "/fail" if i == 3 else f"/r{i}")
        return core.RequestResult(ok=status == 200, status=status, error=None if status == 200 else f"HTTP {status}")

    return send()


def _run(pattern, requests: int, warmup: int = 0, hold_s: float = 0.02, send=_get):
    async def main():
        server, state, url = await _server(hold_s)
        try:
            rows, wall = await core.run(lambda: Connection(url, timeout_s=5), send, pattern, requests, warmup=warmup)
        finally:
            server.close()
        return rows, wall, state

    return asyncio.run(main())


def test_a_closed_loop_holds_its_users_and_warms_up_unrecorded_first():
    rows, wall, state = _run(core.Concurrency(3), requests=12, warmup=3)
    assert state["most"] == 3
    assert state["paths"][:3] == ["/r12", "/r13", "/r14"]  # warm-ups numbered after the measured requests
    assert len(rows) == 12 and sum(r.ok for r in rows) == 11  # request 3 got a 503: a row, not an exception
    summary = core.summarize(rows, wall)
    assert summary.error_kinds == {"HTTP 503": 1} and summary.latency.by_percentile[50] >= 20
    starts = [r.start_s for r in rows]
    assert starts == sorted(starts)  # in request order: request i is sent when a client takes it


def test_an_open_loop_sends_at_its_rate_up_to_its_cap():
    rows, wall, state = _run(core.Rate(math.inf, max_in_flight=4), requests=10, hold_s=0.1)
    assert state["most"] == 4 and len(rows) == 10  # all at once, four at a time
    assert wall == pytest.approx(0.3, abs=0.25)  # three waves of 0.1 s
    rows, wall, _ = _run(core.Rate(50.0, seed=1), requests=20, hold_s=0.0)
    starts = [r.start_s for r in rows]
    assert starts == sorted(starts) and 0.1 < starts[-1] < 1.5  # 20 arrivals at 50/s: about 0.4 s
    assert core.Rate(50.0, seed=1).gaps_s(20) == core.Rate(50.0, seed=1).gaps_s(20)  # the seed fixes them


def test_a_request_that_raises_is_a_failed_row():
    async def broken(conn, i):
        raise ConnectionResetError("gone")

    rows, wall, _ = _run(core.Concurrency(2), requests=4, send=broken)
    assert [r.error for r in rows] == ["ConnectionResetError"] * 4 and all(r.latency_ms is not None for r in rows)
    assert core.summarize(rows, wall).row()["req_per_s"] == 0.0
