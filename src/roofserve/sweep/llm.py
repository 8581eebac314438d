"""The LLM ladder. Each step is measured served (streaming over HTTP) and in-process on the same
engine, alternating in rounds with a bandwidth reading in each (see measure/engine_process.py): on a
shared VM both drift by 10-30% within minutes, so one-after-the-other would compare machine states."""

from __future__ import annotations

import logging
import statistics
from dataclasses import replace
from typing import Any

from roofserve.config import LLMConfig, as_dict, config_flags, secret_env
from roofserve.errors import UserError
from roofserve.load.core import summarize
from roofserve.load.llm import bench_llm_api, chat_prompt
from roofserve.load.process import running_server
from roofserve.sweep.ladder import Ladder, Step, load_ladder

log = logging.getLogger(__name__)


def sweep_llm(path: str, overrides: dict[str, Any] | None = None,
              progress: bool = True) -> tuple[Ladder, list[dict], list[dict]]:
    """(ladder, rows, skipped): the read bandwidth, then every step this machine can run; a step it
    cannot (llama.cpp not installed, bnb4 without CUDA) is skipped with the reason."""
    from roofserve.device import DTYPES, resolve_device
    from roofserve.llm.preflight import preflight
    from roofserve.measure.peaks import measure_bandwidth_gb_s, measure_matmul_tflops

    ladder = load_ladder(path, LLMConfig, overrides)
    device = resolve_device(ladder.steps[0].config.device)
    peaks = [p.row() for p in measure_bandwidth_gb_s(device)]
    # the compute roofs of prefill and of batched steps: each step's precision's matmul peak
    for precision in sorted({s.config.precision for s in ladder.steps}):
        peaks.append(measure_matmul_tflops(DTYPES[precision], device).row())
    read = next(p["value"] for p in peaks if p["name"] == "read")
    log.info("measured read bandwidth: %.1f GB/s", read)
    runnable, skipped = [], []
    for step in ladder.steps:
        try:
            preflight(step.config)
            runnable.append(step)
        except UserError as e:
            skipped.append({"step": step.name, "why": str(e)})
            log.warning("skipping %s: %s", step.name, e)
    rows = peaks
    for index, step in enumerate(runnable, 1):
        log.info("step %d/%d: %s", index, len(runnable), step.name)
        rows += run_step(step, index, read, progress, peaks)
    return ladder, rows, skipped


def run_step(step: Step, index: int, bandwidth_gb_s: float | None, progress: bool = True,
             peaks: list[dict] | None = None) -> list[dict]:
    """Served rows (one per concurrency level) and in-process rows of one step, measured alternately;
    its roofs at the DRAM read bandwidth, or at the rate a buffer of its bytes per token reads at where
    that is faster (the caches hold it, at least in part)."""
    from roofserve.measure.engine_process import EngineProcess
    from roofserve.measure.llm_roof import batch_roofs, prefill_roof, step_roof
    from roofserve.measure.peaks import peak_lookup

    cfg, b = step.config, step.bench
    tag = {"step": step.name, "step_index": index, "why": step.why, "config": as_dict(cfg)}
    in_process = b.engine and cfg.backend != "llama-server"  # llama.cpp's server has no in-process twin here
    rounds = b.rounds if in_process else 1
    per_round = max(1, b.runs // rounds)
    levels = {c: {"results": [], "wall_s": 0.0, "rates": [], "row": None} for c in b.concurrency}
    engine_chat, bandwidths = [], []
    # the bytes a decode step reads (weights, KV cache at the output's middle): each round also times
    # reading a buffer that size, which the caches may hold
    working_set = step_roof(cfg, context_len=b.max_tokens // 2, bandwidth_gb_s=None)["bytes_per_token"]
    engine = EngineProcess(cfg) if in_process else None  # loads (and compiles) while the server does
    try:
        with running_server(["llm", *config_flags(cfg)], ready_timeout_s=900, env=secret_env(cfg)) as url:
            if engine:
                engine.wait_ready()
            for i in range(rounds):
                if engine:
                    bandwidths.append(engine.bandwidth_gb_s(working_set))
                for level, acc in levels.items():
                    load = replace(b, runs=per_round * level, warmup=b.warmup if i == 0 else 0)
                    row, results = bench_llm_api(f"{url}/v1/chat/completions", load, level,
                                                 api_key=cfg.resolved_api_key(), progress=progress)
                    acc["results"] += results
                    acc["wall_s"] += row["wall_s"]
                    acc["rates"].append(row["decode_tokens_per_s"])
                    acc["row"] = row
                if engine:
                    engine_chat += engine.bench([], b.max_tokens, per_round, chat_prompt(b.prompt_words))
        prompt_rows = engine.bench(b.prompt_lengths, b.max_tokens, 3, chat_prompt=None) if engine else []
    finally:
        if engine:
            engine.close()
    bandwidth = statistics.median(m["read_gb_s"] for m in bandwidths) if bandwidths else bandwidth_gb_s
    rates = [m["working_set_read_gb_s"] for m in bandwidths if m.get("working_set_read_gb_s")]
    working_set_bandwidth = statistics.median(rates) if rates else None
    prompt_tokens = next((r.prompt_tokens for acc in levels.values() for r in acc["results"] if r.ok), 0) or 0
    roof = step_roof(cfg, context_len=prompt_tokens + b.max_tokens // 2, bandwidth_gb_s=bandwidth,
                     working_set_gb_s=working_set_bandwidth)
    roof["sweep_bandwidth_gb_s"] = bandwidth_gb_s
    roof["rounds_bandwidth_gb_s"] = [round(m["read_gb_s"], 1) for m in bandwidths]
    roof["gemv_gb_s"] = round(statistics.median(m["gemv_gb_s"] for m in bandwidths), 1) if bandwidths else None
    if any("kernel_gemv_gb_s" in m for m in bandwidths):
        roof["kernel_gemv_gb_s"] = round(statistics.median(m["kernel_gemv_gb_s"] for m in bandwidths), 1)
    # Each level's own roof: min(level, max_batch_size) sequences share a step.
    sizes = {level: min(level, cfg.max_batch_size) for level in levels}
    matmul_peak = peak_lookup(peaks or [], "matmul", cfg.precision)
    peak = matmul_peak if cfg.max_batch_size > 1 else None
    batch = batch_roofs(cfg, prompt_tokens + b.max_tokens // 2, sorted(set(sizes.values())), bandwidth, peak,
                        working_set_bandwidth)

    def prefill(tokens: int) -> dict:
        return {**prefill_roof(batch["linear_params"], batch["lm_head_params"], roof["weight_bytes_per_token"], tokens,
                             matmul_peak, roof["bandwidth_gb_s"]),
                "prefill_matmul_tflops": matmul_peak}

    rows = []
    for level, acc in levels.items():
        served = acc["results"]
        api_row = {**acc["row"], **summarize(served, acc["wall_s"], streamed=True).row(),
                   "rounds_decode_tokens_per_s": acc["rates"], "fixed_length_verified": all(r.output_tokens == b.max_tokens for r in served if r.ok)}
        level_roof = batch["per_batch"][sizes[level]]
        batched = {"sequences_per_step": sizes[level], "matmul_tflops": peak,
                   "aggregate_roof_tokens_per_s": level_roof["roof_tokens_per_s"],
                   "aggregate_bandwidth_roof_tokens_per_s": level_roof["bandwidth_roof_tokens_per_s"],
                   "aggregate_compute_roof_tokens_per_s": level_roof["compute_roof_tokens_per_s"],
                   "crossover_batch_size": batch["crossover_batch_size"]}
        rows.append({**api_row, **tag, **roof, **batched, **prefill(prompt_tokens)})
    if engine_chat:
        first = engine_chat[0]
        chat = {**first, "ttft_ms": statistics.median(r["ttft_ms"] for r in engine_chat),
                "decode_tokens_per_s": round(statistics.median(r["decode_tokens_per_s"] for r in engine_chat), 2),
                "rounds_decode_tokens_per_s": [r["decode_tokens_per_s"] for r in engine_chat]}
        chat["prefill_tokens_per_s"] = round(first["prompt_tokens"] / chat["ttft_ms"] * 1e3, 1)
        rows += [{**r, **tag, **roof, **prefill(r["prompt_tokens"])} for r in [*prompt_rows, chat]]
    return rows
