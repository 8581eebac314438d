"""The LLM engine in-process: TTFT, prefill and decode tokens/s per prompt, no HTTP. Compared with
the served numbers, it shows what the server costs."""

from __future__ import annotations

import statistics
import time

from roofserve.load.llm import tagged


def bench_llm_engine(generator, prompt_lengths: list[int], max_tokens: int, runs: int,
                     chat_prompt: str | None) -> list[dict]:
    """In-process, on the serving engine itself: TTFT, prefill tokens/s and decode tokens/s per prompt.

    Prompts: synthetic ids of each length in prompt_lengths, and (chat_prompt) the very prompt that
    `bench_llm_api` sends, through the chat template, so that served TTFT can be compared with it.
    """
    prompts = [(f"{n} tokens", [1 + (i * 7919) % 1000 for i in range(n)]) for n in prompt_lengths]
    if chat_prompt:
        # the length of what `bench_llm_api` sends (each request tagged), so that TTFTs compare
        prompts.append(("chat", generator.prompt_ids([{"role": "user", "content": tagged(chat_prompt, 0)}])))
    rows = []
    for label, ids in prompts:
        ttft, decode = [], []
        for _ in range(runs):
            start = time.perf_counter()
            tokens = generator.tokens(ids, max_tokens, ignore_eos=True)
            next(tokens)
            first = time.perf_counter()
            count = 1 + sum(1 for _ in tokens)
            end = time.perf_counter()
            ttft.append(first - start)
            if count > 1:
                decode.append((count - 1) / (end - first))
        rows.append({"kind": "llm-engine", "prompt": label, "prompt_tokens": len(ids), "max_tokens": max_tokens,
                     "ttft_ms": round(statistics.median(ttft) * 1e3, 2),
                     "prefill_tokens_per_s": round(len(ids) / statistics.median(ttft), 1),
                     "decode_tokens_per_s": round(statistics.median(decode), 2) if decode else None})
    return rows
