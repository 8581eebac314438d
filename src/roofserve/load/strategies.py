"""Load strategies against an HTTP endpoint: closed-loop concurrency N and open-loop Poisson rate.

A request result is a row; a failed request is recorded, not raised. Every run is bounded by a
request count and a duration, and stops by itself.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from roofserve.load.http import Connection

# send(conn) performs one request on a keep-alive connection and returns the HTTP status.
Send = Callable[[Connection], Awaitable[int]]


@dataclass
class RequestResult:
    start_s: float
    latency_ms: float
    status: int
    ok: bool
    error: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(results: list[RequestResult], wall_s: float) -> dict:
    ok = [r.latency_ms for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = r.error or str(r.status)
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": errors,
        "wall_s": round(wall_s, 3),
        "req_per_s": round(len(ok) / wall_s, 2) if wall_s > 0 else 0.0,
        "latency_p50_ms": _round(percentile(ok, 50)),
        "latency_p90_ms": _round(percentile(ok, 90)),
        "latency_p99_ms": _round(percentile(ok, 99)),
        "latency_mean_ms": _round(sum(ok) / len(ok) if ok else None),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


async def _timed(send: Send, conn: Connection, t0: float) -> RequestResult:
    start = time.perf_counter()
    try:
        status = await send(conn)
        error = None if 200 <= status < 300 else f"HTTP {status}"
    except Exception as e:  # a failed request is a row
        status, error = 0, type(e).__name__
    return RequestResult(start - t0, (time.perf_counter() - start) * 1e3, status, error is None, error)


async def closed_loop(
    url: str,
    send: Send,
    concurrency: int,
    requests: int,
    duration_s: float,
    warmup_requests: int = 0,
    on_done: Callable[[], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[RequestResult], float]:
    """`concurrency` clients, each sending its next request when the last one is answered, until the
    request budget, the duration or should_stop() ends the run."""
    conns = [Connection(url) for _ in range(concurrency)]
    try:
        warm = iter(range(warmup_requests))

        async def warm_client(conn: Connection) -> None:
            for _ in warm:
                await _timed(send, conn, 0.0)

        await asyncio.gather(*(warm_client(c) for c in conns))
        budget = iter(range(requests))
        results: list[RequestResult] = []
        t0 = time.perf_counter()
        deadline = t0 + duration_s

        async def client(conn: Connection) -> None:
            for _ in budget:
                if time.perf_counter() > deadline or (should_stop and should_stop()):
                    return
                results.append(await _timed(send, conn, t0))
                if on_done:
                    on_done()

        await asyncio.gather(*(client(c) for c in conns))
        return results, time.perf_counter() - t0
    finally:
        await asyncio.gather(*(c.close() for c in conns))


async def poisson(
    url: str,
    send: Send,
    rate_per_s: float,
    requests: int,
    duration_s: float,
    seed: int = 0,
    max_in_flight: int = 512,
    on_done: Callable[[], None] | None = None,
) -> tuple[list[RequestResult], float]:
    """Open loop: requests arrive at exponential intervals whatever the server does."""
    rng = random.Random(seed)
    idle: list[Connection] = []
    results: list[RequestResult] = []
    in_flight: set[asyncio.Task] = set()

    async def one() -> None:
        conn = idle.pop() if idle else Connection(url)
        result = await _timed(send, conn, t0)
        results.append(result)
        (idle.append(conn) if result.ok else await conn.close())
        if on_done:
            on_done()

    t0 = time.perf_counter()
    next_at = t0
    for _ in range(requests):
        next_at += rng.expovariate(rate_per_s)
        if next_at - t0 > duration_s:
            break
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        if len(in_flight) >= max_in_flight:
            results.append(RequestResult(time.perf_counter() - t0, 0.0, 0, False, "client overloaded"))
            continue
        task = asyncio.create_task(one())
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight)
    wall = time.perf_counter() - t0
    await asyncio.gather(*(c.close() for c in idle))
    return results, wall
