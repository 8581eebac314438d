"""The load core: one request row, two load patterns, one summary. No torch.

Every client (vision images, LLM chat streams, the fleet's rolling restart) sends through `run`: a
`Send` performs one request on a kept-alive connection and returns its RequestResult; a request that
raises is recorded as a failed row, never raised. A run is bounded by a request count and, where
given, a duration, and stops by itself. `summarize` turns the rows into one Summary, whose `row()`
spells every statistic `{metric}_{stat}_ms` (latency_p99_ms, ttft_p50_ms, ...); other tools' names
(vLLM's) are written only where a file in their format is (load/llm.py, vllm_result).
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

from roofserve.load.http import Connection

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """One request. Times in ms from when it was sent; the streamed fields only for streamed answers."""

    ok: bool
    error: str | None = None
    status: int | None = None  # the HTTP status (None: no answer)
    start_s: float = 0.0  # when it was sent, from the start of the run
    latency_ms: float | None = None  # sent to the last byte of the answer
    ttft_ms: float | None = None
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    itl_ms: list[float] = field(default_factory=list)  # between streamed messages

    @property
    def tpot_ms(self) -> float | None:
        """Decode time per output token after the first: (latency - ttft) / (tokens - 1)."""
        if not self.ok or self.ttft_ms is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.latency_ms - self.ttft_ms) / (self.output_tokens - 1)

    @property
    def decode_tokens_per_s(self) -> float | None:
        return 1e3 / self.tpot_ms if self.tpot_ms else None

    def row(self) -> dict:
        """The per-request result row (without the inter-token gaps)."""
        return {k: v for k, v in asdict(self).items() if k != "itl_ms"} | {"tpot_ms": self.tpot_ms}


# send(conn, i) performs request i on a kept-alive connection. Measured requests are numbered 0..n-1,
# warm-up requests after them, so that a sender can give each one a body of its own.
Send = Callable[[Connection, int], Awaitable[RequestResult]]


@dataclass(frozen=True)
class Concurrency:
    """Closed loop: `users` clients, each sending its next request when its last one is answered.
    Warm-up requests are spread over the clients (every connection opens before the clock starts)."""

    users: int


@dataclass(frozen=True)
class Rate:
    """Open loop: requests arrive `per_s` per second (inf: all at once), the gaps drawn from a gamma
    distribution of shape `burstiness` (1: Poisson, below 1 burstier), whatever the server does; at most
    `max_in_flight` at once (the rest wait, their clocks not started). Warm-ups go one at a time."""

    per_s: float
    burstiness: float = 1.0
    max_in_flight: int | None = None
    seed: int = 0

    def gaps_s(self, n: int) -> list[float]:
        if math.isinf(self.per_s):
            return [0.0] * n
        rng = random.Random(self.seed)
        return [rng.gammavariate(self.burstiness, 1.0 / (self.per_s * self.burstiness)) for _ in range(n)]


async def _one(send: Send, conn: Connection, i: int, t0: float) -> RequestResult:
    start = time.perf_counter()
    try:
        result = await send(conn, i)
    except Exception as e:  # a failed request is a row
        result = RequestResult(ok=False, error=type(e).__name__)
    result.start_s = start - t0
    if result.latency_ms is None:
        result.latency_ms = (time.perf_counter() - start) * 1e3
    return result


async def run(connect: Callable[[], Connection], send: Send, pattern: Concurrency | Rate, requests: int,
              duration_s: float = math.inf, warmup: int = 0, on_done: Callable[[], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> tuple[list[RequestResult], float]:
    """`requests` requests in `pattern` (after `warmup` unrecorded ones), until the count, the duration
    or should_stop() ends the run: (the rows of the requests sent, in request order; the wall time in s)."""
    if isinstance(pattern, Concurrency):
        return await _closed(connect, send, pattern.users, requests, duration_s, warmup, on_done, should_stop)
    return await _open(connect, send, pattern, requests, duration_s, warmup, on_done)


async def _closed(connect, send, users, requests, duration_s, warmup, on_done, should_stop):
    conns = [connect() for _ in range(users)]
    try:
        warm = iter(range(requests, requests + warmup))

        async def warm_client(conn: Connection) -> None:
            for i in warm:
                await _one(send, conn, i, 0.0)

        await asyncio.gather(*(warm_client(c) for c in conns))
        budget = iter(range(requests))
        results: list[RequestResult | None] = [None] * requests
        t0 = time.perf_counter()
        deadline = t0 + duration_s

        async def client(conn: Connection) -> None:
            for i in budget:
                if time.perf_counter() > deadline or (should_stop and should_stop()):
                    return
                results[i] = await _one(send, conn, i, t0)
                if on_done:
                    on_done()

        await asyncio.gather(*(client(c) for c in conns))
        return [r for r in results if r is not None], time.perf_counter() - t0
    finally:
        await asyncio.gather(*(c.close() for c in conns))


async def _open(connect, send, pattern: Rate, requests, duration_s, warmup, on_done):
    idle: list[Connection] = []
    results: list[RequestResult | None] = [None] * requests
    limit = asyncio.Semaphore(pattern.max_in_flight or max(1, requests))

    async def one(i: int, t0: float) -> RequestResult:
        async with limit:
            conn = idle.pop() if idle else connect()
            result = await _one(send, conn, i, t0)
            idle.append(conn)  # a connection the server closed opens again on its next request
            return result

    async def measured(i: int, t0: float) -> None:
        results[i] = await one(i, t0)
        if on_done:
            on_done()

    try:
        for i in range(requests, requests + warmup):
            await one(i, 0.0)
        tasks = []
        t0 = time.perf_counter()
        arrival = 0.0
        for i, gap in enumerate(pattern.gaps_s(requests)):
            arrival += gap
            if arrival > duration_s:
                break
            if (wait := t0 + arrival - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(measured(i, t0)))
        await asyncio.gather(*tasks)
        return [r for r in results if r is not None], time.perf_counter() - t0
    finally:
        await asyncio.gather(*(c.close() for c in idle))


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Stats:
    """One metric over the successful requests, in ms; None where there were none."""

    mean: float | None
    std: float | None
    by_percentile: dict[int, float | None]

    @classmethod
    def of(cls, values: list[float], percentiles: tuple[int, ...] = PERCENTILES) -> Stats:
        qs = sorted({50, *percentiles})  # the median, always
        if not values:
            return cls(None, None, {q: None for q in qs})
        return cls(_r(statistics.fmean(values)), _r(statistics.pstdev(values)),
                   {q: _r(percentile(values, q)) for q in qs})

    def row(self, name: str) -> dict:
        return {f"{name}_mean_ms": self.mean, f"{name}_std_ms": self.std,
                **{f"{name}_p{q}_ms": v for q, v in self.by_percentile.items()}}


# latency and goodput targets, in vLLM's --goodput names: ttft, tpot, e2el (end-to-end = our latency)
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class Summary:
    """A load level's result: counts, throughput and latency statistics; the token fields for streams."""

    requests: int
    ok: int
    error_kinds: dict[str, int]
    wall_s: float
    latency: Stats
    # streamed answers
    ttft: Stats | None = None
    tpot: Stats | None = None
    itl: Stats | None = None
    prompt_tokens_total: int = 0
    output_tokens_total: int = 0
    output_tokens_mean: float | None = None
    prompt_tokens: int | None = None  # the first answered request's
    decode_tokens_per_s: float | None = None  # the median request's 1 / TPOT
    tokens_per_message: float | None = None  # a server may put several tokens in one message
    goodput_req_per_s: float | None = None  # requests within every --goodput target, per second

    @property
    def errors(self) -> int:
        return self.requests - self.ok

    def row(self) -> dict:
        per_s = (lambda n: round(n / self.wall_s, 3) if self.wall_s > 0 else None)
        out = {"requests": self.requests, "ok": self.ok, "errors": self.errors, "error_kinds": self.error_kinds,
               "wall_s": round(self.wall_s, 3), "req_per_s": per_s(self.ok), **self.latency.row("latency")}
        if self.ttft is None:
            return out
        out |= {"output_tokens_mean": self.output_tokens_mean, "prompt_tokens": self.prompt_tokens,
                "prompt_tokens_total": self.prompt_tokens_total, "output_tokens_total": self.output_tokens_total,
                "decode_tokens_per_s": self.decode_tokens_per_s, "output_tokens_per_s": per_s(self.output_tokens_total),
                "total_tokens_per_s": per_s(self.prompt_tokens_total + self.output_tokens_total),
                "tokens_per_message": self.tokens_per_message, "goodput_req_per_s": self.goodput_req_per_s}
        return out | self.ttft.row("ttft") | self.tpot.row("tpot") | self.itl.row("itl")


def summarize(results: list[RequestResult], wall_s: float, streamed: bool = False,
              slos_ms: dict[str, float] | None = None, percentiles: tuple[int, ...] = PERCENTILES) -> Summary:
    """The Summary of a level's rows; `streamed` adds TTFT, TPOT, ITL and token counts, `slos_ms`
    (GOODPUT_METRICS -> ms) the goodput."""
    ok = [r for r in results if r.ok]
    errors = Counter(r.error or f"HTTP {r.status}" for r in results if not r.ok)
    base = dict(requests=len(results), ok=len(ok), error_kinds=dict(errors), wall_s=wall_s,
                latency=Stats.of([r.latency_ms for r in ok], percentiles))
    if not streamed:
        return Summary(**base)
    rates = [r.decode_tokens_per_s for r in ok if r.decode_tokens_per_s]
    goodput = None
    if slos_ms and wall_s > 0:
        goodput = round(sum(_meets(r, slos_ms) for r in ok) / wall_s, 3)
    return Summary(
        **base,
        ttft=Stats.of([r.ttft_ms for r in ok], percentiles),
        tpot=Stats.of([r.tpot_ms for r in ok if r.tpot_ms is not None], percentiles),
        itl=Stats.of([x for r in ok for x in r.itl_ms], percentiles),
        prompt_tokens_total=sum(r.prompt_tokens or 0 for r in ok),
        output_tokens_total=sum(r.output_tokens or 0 for r in ok),
        output_tokens_mean=round(statistics.fmean(r.output_tokens or 0 for r in ok), 1) if ok else None,
        prompt_tokens=ok[0].prompt_tokens if ok else None,
        decode_tokens_per_s=round(statistics.median(rates), 2) if rates else None,
        tokens_per_message=round(statistics.fmean((r.output_tokens or 0) / (len(r.itl_ms) + 1) for r in ok), 2)
        if ok else None,
        goodput_req_per_s=goodput,
    )


def _meets(r: RequestResult, slos_ms: dict[str, float]) -> bool:
    values = {"ttft": r.ttft_ms, "tpot": r.tpot_ms or 0.0, "e2el": r.latency_ms}
    return all(values[name] is not None and values[name] <= limit for name, limit in slos_ms.items())


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)
