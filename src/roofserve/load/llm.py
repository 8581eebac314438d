"""The LLM load generator: streaming chat requests against any OpenAI-compatible endpoint, timed per
chunk (TTFT, TPOT, ITL, tokens/s). No torch: runs on a client machine."""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from tqdm import tqdm

from roofserve.config import LLMLoadConfig
from roofserve.errors import UserError
from roofserve.load.datasets import ChatRequest
from roofserve.load.http import Connection, run_loop
from roofserve.load.sse import SSEParser
from roofserve.load.strategies import percentile

log = logging.getLogger(__name__)
# A prompt that keeps a chat model talking, for fixed-length runs where EOS cannot be ignored.
LONG_PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a map. Use many chapters."
# Waits of the bench client: for the response headers (a request may queue behind others) and for each
# piece of a stream after them (a long prefill of a big model on a few cores), beyond which it is a stall.
HEADERS_TIMEOUT_S, STALL_TIMEOUT_S = 600.0, 300.0


def _connection(base: str) -> Connection:
    return Connection(base, timeout_s=HEADERS_TIMEOUT_S, read_timeout_s=STALL_TIMEOUT_S)


def tagged(prompt: str, i: int) -> str:
    """Request i's prompt: a numbered tag in front, the same number of tokens for every i."""
    return f"[{i:05d}] {prompt}"


@dataclass
class StreamResult:
    """One request: all times in ms from the moment it was sent."""

    ok: bool
    error: str | None = None
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    itl_ms: list[float] = field(default_factory=list)

    @property
    def tpot_ms(self) -> float | None:
        """Decode time per output token after the first: (e2e - ttft) / (tokens - 1)."""
        if not self.ok or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1)

    @property
    def decode_tokens_per_s(self) -> float | None:
        return 1e3 / self.tpot_ms if self.tpot_ms else None


def make_body(model: str, prompt: str, max_tokens: int, ignore_eos: bool, stream: bool = True) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension; roofserve honours it too
    return body


async def stream_one(conn: Connection, path: str, body: bytes, headers: dict[str, str]) -> StreamResult:
    """Send one streaming chat request and time every content chunk. A success needs an HTTP 200, a
    first token, a finish_reason and the closing `[DONE]`: a stream cut anywhere, or stalled past the
    connection's read timeout, is an error row."""
    parser = SSEParser()
    start = time.perf_counter()
    last = None
    done = False
    result = StreamResult(ok=False)
    try:
        async for status, chunk in conn.stream("POST", path, headers, body):
            if status != 200:
                result.error = f"HTTP {status}"
                continue
            for data in parser.feed(chunk):
                if data == "[DONE]":
                    done = True
                    continue
                doc = json.loads(data)
                if "error" in doc:
                    result.error = str(doc["error"].get("message", "error"))[:80]
                    continue
                now = (time.perf_counter() - start) * 1e3
                for choice in doc.get("choices") or []:
                    if choice.get("delta", {}).get("content"):
                        if result.ttft_ms is None:
                            result.ttft_ms = now
                        else:
                            result.itl_ms.append(now - last)
                        last = now
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
                if doc.get("usage"):
                    result.output_tokens = doc["usage"].get("completion_tokens")
                    result.prompt_tokens = doc["usage"].get("prompt_tokens")
    except Exception as e:  # a failed request is a row
        result.error = type(e).__name__
    result.e2e_ms = (time.perf_counter() - start) * 1e3
    if result.error is None and result.ttft_ms is not None and not (done and result.finish_reason):
        result.error = "stream ended without " + ("a finish_reason" if done else "[DONE]")
    result.ok = result.error is None and result.ttft_ms is not None
    if result.ok and result.output_tokens is None:
        result.output_tokens = len(result.itl_ms) + 1  # server sent no usage: count chunks
    return result


def summarize(results: list[StreamResult], wall_s: float) -> dict:
    ok = [r for r in results if r.ok]

    def pcts(values: list[float], name: str) -> dict:
        return {f"{name}_p{q}_ms": (round(percentile(values, q), 3) if values else None) for q in (50, 90, 99)}

    out_tokens = sum(r.output_tokens or 0 for r in ok)
    row = {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": sorted({r.error for r in results if r.error}),
        "output_tokens_mean": round(statistics.fmean([r.output_tokens for r in ok]), 1) if ok else None,
        "prompt_tokens": ok[0].prompt_tokens if ok else None,
        "decode_tokens_per_s": round(statistics.median([r.decode_tokens_per_s for r in ok if r.decode_tokens_per_s]), 2)
        if any(r.decode_tokens_per_s for r in ok) else None,
        "output_tokens_per_s": round(out_tokens / wall_s, 2) if wall_s else None,
        "wall_s": round(wall_s, 2),
    }
    row.update(pcts([r.ttft_ms for r in ok], "ttft"))
    row.update(pcts([r.tpot_ms for r in ok if r.tpot_ms], "tpot"))
    # inter-token latency is measured between messages; a server may put several tokens in one
    row["tokens_per_message"] = round(statistics.fmean([r.output_tokens / (len(r.itl_ms) + 1) for r in ok]), 2) if ok else None
    row.update(pcts([x for r in ok for x in r.itl_ms], "itl"))
    row.update(pcts([r.e2e_ms for r in ok], "e2e"))
    return row


def bench_llm_api(
    url: str,
    model: str = "",
    prompt: str = LONG_PROMPT,
    max_tokens: int = 128,
    runs: int = 10,
    concurrency: int = 1,
    ignore_eos: bool = True,
    warmup: int = 1,
    api_key: str | None = None,
    progress: bool = True,
) -> tuple[dict, list[StreamResult]]:
    """`runs` streaming requests, `concurrency` at a time (1 = the synchronous, no-batching mode)."""
    parts = urlsplit(url)
    base, path = f"http://{parts.netloc}", parts.path or "/v1/chat/completions"
    # A different prompt per request (a numbered tag in front, the same length for every request): a
    # server with a prefix cache must prefill each one, as it would for different users.
    bodies = [json.dumps(make_body(model, tagged(prompt, i), max_tokens, ignore_eos)).encode()
              for i in range(warmup + runs)]
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"

    async def run() -> tuple[list[StreamResult], float]:
        conns = [_connection(base) for _ in range(concurrency)]
        for _ in range(warmup):
            await stream_one(conns[0], path, bodies.pop(), headers)
        budget = iter(range(runs))
        results: list[StreamResult] = []
        bar = tqdm(total=runs, desc=f"llm c={concurrency}", disable=None if progress else True, leave=False)

        async def client(conn: Connection) -> None:
            for _ in budget:
                results.append(await stream_one(conn, path, bodies.pop(), headers))
                bar.update()

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in conns))
        wall = time.perf_counter() - start
        bar.close()
        await asyncio.gather(*(c.close() for c in conns))
        return results, wall

    results, wall = run_loop(run())
    row = {"kind": "llm-api", "url": url, "concurrency": concurrency, "max_tokens": max_tokens,
           "ignore_eos": ignore_eos, **summarize(results, wall)}
    short = [r for r in results if r.ok and r.output_tokens != max_tokens]
    row["fixed_length_verified"] = not short
    return row, results


def bench_llm_levels(url: str, model: str, load: LLMLoadConfig, api_key: str | None = None,
                     progress: bool = True) -> list[dict]:
    """An llm-api row per concurrency level of `load`, each followed by its llm-request rows."""
    prompt = LONG_PROMPT if not load.prompt_words else " ".join(["word"] * load.prompt_words) + ". " + LONG_PROMPT
    rows = []
    for concurrency in load.concurrency:
        row, results = bench_llm_api(url, model, prompt, load.max_tokens, load.runs, concurrency, load.ignore_eos,
                                     load.warmup, api_key, progress)
        rows.append(row)
        rows += [{"kind": "llm-request", "concurrency": concurrency, **r} for r in result_rows(results)]
    return rows


def result_rows(results: list[StreamResult]) -> list[dict]:
    return [{k: v for k, v in asdict(r).items() if k != "itl_ms"} | {"tpot_ms": r.tpot_ms} for r in results]


def parse_goodput(specs: list[str]) -> dict[str, float]:
    """vLLM's --goodput syntax: ["ttft:200", "tpot:50", "e2el:2000"] (ms) -> {"ttft": 200.0, ...}."""
    slos = {}
    for spec in specs:
        name, _, value = spec.partition(":")
        if name not in GOODPUT_METRICS:
            raise UserError(f"--goodput {spec!r}: the metric must be one of {', '.join(GOODPUT_METRICS)}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise UserError(f"--goodput {spec!r}: expected METRIC:MILLISECONDS, e.g. ttft:200") from None
    return slos


GOODPUT_METRICS = ("ttft", "tpot", "e2el")


def _meets(r: StreamResult, slos: dict[str, float]) -> bool:
    values = {"ttft": r.ttft_ms, "tpot": r.tpot_ms or 0.0, "e2el": r.e2e_ms}
    return r.ok and all(values[name] is not None and values[name] <= limit for name, limit in slos.items())


def serve_stats(results: list[StreamResult], wall_s: float, slos: dict[str, float],
                percentiles: tuple[int, ...] = (50, 90, 99)) -> dict:
    """The numbers `vllm bench serve` prints, under its key names (ms; throughputs per second)."""
    ok = [r for r in results if r.ok]
    total_in = sum(r.prompt_tokens or 0 for r in ok)
    total_out = sum(r.output_tokens or 0 for r in ok)
    out = {"duration": round(wall_s, 3), "completed": len(ok), "failed": len(results) - len(ok),
           "total_input_tokens": total_in, "total_output_tokens": total_out,
           "request_throughput": round(len(ok) / wall_s, 3) if wall_s else None,
           "request_goodput": round(sum(_meets(r, slos) for r in ok) / wall_s, 3) if slos and wall_s else None,
           "output_throughput": round(total_out / wall_s, 2) if wall_s else None,
           "total_token_throughput": round((total_in + total_out) / wall_s, 2) if wall_s else None}
    series = {"ttft": [r.ttft_ms for r in ok], "tpot": [r.tpot_ms for r in ok if r.tpot_ms is not None],
              "itl": [x for r in ok for x in r.itl_ms], "e2el": [r.e2e_ms for r in ok]}
    for name, values in series.items():
        out[f"mean_{name}_ms"] = round(statistics.fmean(values), 3) if values else None
        out[f"median_{name}_ms"] = round(statistics.median(values), 3) if values else None
        out[f"std_{name}_ms"] = round(statistics.pstdev(values), 3) if values else None
        for q in percentiles:
            out[f"p{q}_{name}_ms"] = round(percentile(values, q), 3) if values else None
    return out


def bench_llm_serve(url: str, requests: list[ChatRequest], model: str = "", rate: float = float("inf"),
                    burstiness: float = 1.0, max_concurrency: int | None = None, ignore_eos: bool = True,
                    warmup: int = 1, slos: dict[str, float] | None = None, api_key: str | None = None,
                    seed: int = 0, progress: bool = True) -> tuple[dict, list[StreamResult]]:
    """`vllm bench serve`'s load: the requests arrive at `rate` per second, the gaps drawn from a gamma
    distribution of shape `burstiness` (1: Poisson; below 1 burstier; inf rate: all at once), with at most
    `max_concurrency` in flight (the others wait, their clocks not yet started). A request's times run from
    when it is sent. `warmup` requests go first, one at a time, unrecorded."""
    import random

    parts = urlsplit(url)
    base, path = f"http://{parts.netloc}", parts.path or "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    bodies = [json.dumps(make_body(model, r.prompt, r.max_tokens, ignore_eos)).encode() for r in requests]
    rng = random.Random(seed)
    gaps = [0.0 if rate == float("inf") else rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
            for _ in requests]

    async def run() -> tuple[list[StreamResult], float]:
        idle: list[Connection] = []
        limit = asyncio.Semaphore(max_concurrency or len(requests))
        bar = tqdm(total=len(requests), desc="llm serve", disable=None if progress else True, leave=False)
        results: list[StreamResult | None] = [None] * len(requests)

        async def one(i: int) -> None:
            async with limit:
                conn = idle.pop() if idle else _connection(base)
                results[i] = await stream_one(conn, path, bodies[i], headers)
                idle.append(conn)
                bar.update()

        for body in bodies[:warmup]:
            conn = idle.pop() if idle else _connection(base)
            await stream_one(conn, path, body, headers)
            idle.append(conn)
        start = time.perf_counter()
        tasks = []
        for i, gap in enumerate(gaps):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
        bar.close()
        await asyncio.gather(*(c.close() for c in idle))
        return results, wall

    results, wall = run_loop(run())
    row = {"kind": "llm-serve", "url": url, "num_prompts": len(requests),
           "request_rate": None if rate == float("inf") else rate,  # None: all at once
           "burstiness": burstiness, "max_concurrency": max_concurrency, "ignore_eos": ignore_eos,
           "goodput_slos_ms": slos or {}, **serve_stats(results, wall, slos or {})}
    return row, results


def vllm_result(row: dict, results: list[StreamResult], model: str, requests: list[ChatRequest]) -> dict:
    """The JSON `vllm bench serve --save-result` writes: its summary keys, and per request input and
    output lengths, TTFT and ITLs in seconds, and errors."""
    import datetime as dt

    keep = {k: v for k, v in row.items() if k not in ("kind", "url", "ignore_eos", "goodput_slos_ms", "failed")}
    return {"date": dt.datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": "openai-chat", "model_id": model,
            "tokenizer_id": model, **keep, "request_rate": row["request_rate"] or "inf",
            "input_lens": [r.prompt_tokens or 0 for r in results],
            "output_lens": [r.output_tokens or 0 for r in results],
            "ttfts": [(r.ttft_ms or 0.0) / 1e3 for r in results],
            "itls": [[x / 1e3 for x in r.itl_ms] for r in results],
            "generated_texts": [""] * len(results), "errors": [r.error or "" for r in results],
            "roofserve": {"note": "written by roofserve bench llm-serve --result-format vllm",
                          "max_tokens": [r.max_tokens for r in requests]}}
