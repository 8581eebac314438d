"""The LLM load generator: streaming chat requests against any OpenAI-compatible endpoint, timed per
chunk (TTFT, TPOT, ITL, tokens/s). No torch: runs on a client machine."""

from __future__ import annotations

import json
import logging
import time
from urllib.parse import urlsplit

from tqdm import tqdm

from roofserve.config import LLMLoadConfig, LLMServeBenchConfig
from roofserve.errors import UserError
from roofserve.load import core
from roofserve.load.core import RequestResult
from roofserve.load.datasets import ChatRequest
from roofserve.load.http import Connection, run_loop
from roofserve.load.sse import SSEParser

log = logging.getLogger(__name__)
# A prompt that keeps a chat model talking, for fixed-length runs where EOS cannot be ignored.
LONG_PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a map. Use many chapters."
# Waits of the bench client: for the response headers (a request may queue behind others) and for each
# piece of a stream after them (a long prefill of a big model on a few cores), beyond which it is a stall.
HEADERS_TIMEOUT_S, STALL_TIMEOUT_S = 600.0, 300.0


def _connection(base: str) -> Connection:
    return Connection(base, timeout_s=HEADERS_TIMEOUT_S, read_timeout_s=STALL_TIMEOUT_S)


def chat_prompt(prompt_words: int = 0) -> str:
    """The benchmarks' chat prompt: LONG_PROMPT, after `prompt_words` words where asked (a longer prefill)."""
    return LONG_PROMPT if not prompt_words else " ".join(["word"] * prompt_words) + ". " + LONG_PROMPT


def tagged(prompt: str, i: int) -> str:
    """Request i's prompt: a numbered tag in front, the same number of tokens for every i."""
    return f"[{i:05d}] {prompt}"


def make_body(model: str, prompt: str, max_tokens: int, ignore_eos: bool, stream: bool = True) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension; roofserve honours it too
    return body


async def stream_one(conn: Connection, path: str, body: bytes, headers: dict[str, str]) -> RequestResult:
    """Send one streaming chat request and time every content chunk. A success needs an HTTP 200, a
    first token, a finish_reason and the closing `[DONE]`: a stream cut anywhere, or stalled past the
    connection's read timeout, is an error row."""
    parser = SSEParser()
    start = time.perf_counter()
    last = None
    done = False
    result = RequestResult(ok=False)
    try:
        async for status, chunk in conn.stream("POST", path, headers, body):
            result.status = status
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
    result.latency_ms = (time.perf_counter() - start) * 1e3
    if result.error is None and result.ttft_ms is not None and not (done and result.finish_reason):
        result.error = "stream ended without " + ("a finish_reason" if done else "[DONE]")
    result.ok = result.error is None and result.ttft_ms is not None
    if result.ok and result.output_tokens is None:
        result.output_tokens = len(result.itl_ms) + 1  # server sent no usage: count chunks
    return result


def _chat_target(url: str, api_key: str | None) -> tuple[str, str, dict[str, str]]:
    """(base URL, path, headers) of an OpenAI-compatible chat completions URL."""
    parts = urlsplit(url)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return f"http://{parts.netloc}", parts.path or "/v1/chat/completions", headers


def chat_sender(path: str, bodies: list[bytes], headers: dict[str, str]) -> core.Send:
    """A Send that streams request i's body (bodies taken in turn)."""

    async def send(conn: Connection, i: int) -> RequestResult:
        return await stream_one(conn, path, bodies[i % len(bodies)], headers)

    return send


def bench_llm_api(url: str, load: LLMLoadConfig, concurrency: int = 1, model: str = "", api_key: str | None = None,
                  progress: bool = True) -> tuple[dict, list[RequestResult]]:
    """`load.runs` streaming requests of `load.max_tokens` tokens, `concurrency` at a time (1: the
    synchronous, no-batching mode), after `load.warmup` unrecorded ones: (the llm-api row, the requests)."""
    base, path, headers = _chat_target(url, api_key)
    # A different prompt per request (a numbered tag in front, the same length for every request): a
    # server with a prefix cache must prefill each one, as it would for different users.
    prompt = chat_prompt(load.prompt_words)
    bodies = [json.dumps(make_body(model, tagged(prompt, i), load.max_tokens, load.ignore_eos)).encode()
              for i in range(load.runs + load.warmup)]
    bar = tqdm(total=load.runs, desc=f"llm c={concurrency}", disable=None if progress else True, leave=False)
    results, wall = run_loop(core.run(lambda: _connection(base), chat_sender(path, bodies, headers),
                                      core.Concurrency(concurrency), load.runs, warmup=load.warmup,
                                      on_done=bar.update))
    bar.close()
    row = {"kind": "llm-api", "url": url, "concurrency": concurrency, "max_tokens": load.max_tokens,
           "ignore_eos": load.ignore_eos, **core.summarize(results, wall, streamed=True).row()}
    row["fixed_length_verified"] = all(r.output_tokens == load.max_tokens for r in results if r.ok)
    return row, results


def bench_llm_levels(url: str, model: str, load: LLMLoadConfig, api_key: str | None = None,
                     progress: bool = True) -> list[dict]:
    """An llm-api row per concurrency level of `load`, each followed by its llm-request rows."""
    rows = []
    for concurrency in load.concurrency:
        row, results = bench_llm_api(url, load, concurrency, model, api_key, progress)
        rows.append(row)
        rows += request_rows(results, concurrency)
    return rows


def request_rows(results: list[RequestResult], concurrency: int) -> list[dict]:
    return [{"kind": "llm-request", "concurrency": concurrency, **r.row()} for r in results]


def parse_goodput(specs: list[str]) -> dict[str, float]:
    """vLLM's --goodput syntax: ["ttft:200", "tpot:50", "e2el:2000"] (ms) -> {"ttft": 200.0, ...}."""
    slos = {}
    for spec in specs:
        name, _, value = spec.partition(":")
        if name not in core.GOODPUT_METRICS:
            raise UserError(f"--goodput {spec!r}: the metric must be one of {', '.join(core.GOODPUT_METRICS)}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise UserError(f"--goodput {spec!r}: expected METRIC:MILLISECONDS, e.g. ttft:200") from None
    return slos


def bench_llm_serve(url: str, requests: list[ChatRequest], cfg: LLMServeBenchConfig, model: str = "",
                    api_key: str | None = None, progress: bool = True) -> tuple[dict, list[RequestResult]]:
    """`vllm bench serve`'s load: the requests arrive at cfg.request_rate per second (0: all at once), the
    gaps drawn from a gamma distribution of shape cfg.burstiness (1: Poisson; below 1 burstier), with at
    most cfg.max_concurrency in flight (the others wait, their clocks not yet started). A request's times
    run from when it is sent. cfg.warmup requests (the first ones again) go first, one at a time,
    unrecorded. Goodput counts the requests within every cfg.goodput target."""
    rate, slos = cfg.request_rate or float("inf"), parse_goodput(cfg.goodput)
    base, path, headers = _chat_target(url, api_key)
    bodies = [json.dumps(make_body(model, r.prompt, r.max_tokens, cfg.ignore_eos)).encode() for r in requests]
    pattern = core.Rate(rate, cfg.burstiness, cfg.max_concurrency or None, cfg.seed)
    bar = tqdm(total=len(requests), desc="llm serve", disable=None if progress else True, leave=False)
    results, wall = run_loop(core.run(lambda: _connection(base), chat_sender(path, bodies, headers), pattern,
                                      len(requests), warmup=cfg.warmup, on_done=bar.update))
    bar.close()
    row = {"kind": "llm-serve", "url": url, "num_prompts": len(requests),
           "request_rate": cfg.request_rate or None,  # None: all at once
           "burstiness": cfg.burstiness, "max_concurrency": cfg.max_concurrency or None,
           "ignore_eos": cfg.ignore_eos, "goodput_slos_ms": slos, **core.summarize(results, wall, streamed=True, slos_ms=slos).row()}
    return row, results


# our summary's names -> vLLM's (`vllm bench serve --save-result`); e2el is vLLM's end-to-end latency
_VLLM_TOTALS = {"wall_s": "duration", "ok": "completed", "prompt_tokens_total": "total_input_tokens",
                "output_tokens_total": "total_output_tokens", "req_per_s": "request_throughput",
                "goodput_req_per_s": "request_goodput", "output_tokens_per_s": "output_throughput",
                "total_tokens_per_s": "total_token_throughput"}
_VLLM_METRICS = {"ttft": "ttft", "tpot": "tpot", "itl": "itl", "latency": "e2el"}


def vllm_keys(row: dict) -> dict:
    """A summary row under vLLM's key names: totals, and mean_/median_/std_/pNN_ of each metric."""
    out = {theirs: row[ours] for ours, theirs in _VLLM_TOTALS.items()}
    for ours, theirs in _VLLM_METRICS.items():
        for key, value in row.items():
            if key.startswith(ours + "_") and key.endswith("_ms"):
                stat = key[len(ours) + 1:-3]  # mean, std, p50, p90, p99
                if stat.startswith("p") and stat[1:].isdigit():
                    out[f"p{stat[1:]}_{theirs}_ms"] = value
                    if stat == "p50":
                        out[f"median_{theirs}_ms"] = value
                elif stat in ("mean", "std"):
                    out[f"{stat}_{theirs}_ms"] = value
    return out


def vllm_result(row: dict, results: list[RequestResult], model: str, requests: list[ChatRequest]) -> dict:
    """The JSON `vllm bench serve --save-result` writes: its summary keys, and per request input and
    output lengths, TTFT and ITLs in seconds, and errors."""
    import datetime as dt

    return {"date": dt.datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": "openai-chat", "model_id": model,
            "tokenizer_id": model, "num_prompts": row["num_prompts"], "burstiness": row["burstiness"],
            "max_concurrency": row["max_concurrency"], **vllm_keys(row), "request_rate": row["request_rate"] or "inf",
            "input_lens": [r.prompt_tokens or 0 for r in results],
            "output_lens": [r.output_tokens or 0 for r in results],
            "ttfts": [(r.ttft_ms or 0.0) / 1e3 for r in results],
            "itls": [[x / 1e3 for x in r.itl_ms] for r in results],
            "generated_texts": [""] * len(results), "errors": [r.error or "" for r in results],
            "roofserve": {"note": "written by roofserve bench llm-serve --result-format vllm",
                          "max_tokens": [r.max_tokens for r in requests]}}
