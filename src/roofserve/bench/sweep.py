"""A ladder of server configs, run one after the other against the same load, with the ceilings
(peaks, model-only, in-process pipeline) measured in the same run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from roofserve.bench.process import running_server
from roofserve.config import LLMConfig, VisionConfig, as_dict, load_toml, make_config
from roofserve.errors import UserError

log = logging.getLogger(__name__)
BENCH_DEFAULTS = {
    VisionConfig: {"payload": "raw", "concurrency": [1, 8, 32, 64], "rate": [], "requests": 400, "duration_s": 60.0,
                   "warmup": 16},
    LLMConfig: {"runs": 12, "rounds": 3, "max_tokens": 128, "ignore_eos": True, "warmup": 1, "engine": True,
                "prompt_lengths": [32, 256], "concurrency": 1},
}


@dataclass
class Step:
    name: str
    why: str
    config: Any
    bench: dict[str, Any]


def load_ladder(path: str, overrides: dict[str, Any] | None = None, cls: type = VisionConfig) -> tuple[dict, list[Step]]:
    """Steps are cumulative: each step's [step.server] table changes the config of the step before."""
    doc = load_toml(path)
    if not doc.get("step"):
        raise UserError(f"{path} has no [[step]] tables")
    bench = dict(BENCH_DEFAULTS[cls])
    _BENCH_KEYS = set(bench)
    bench.update(doc.get("bench", {}))
    bench.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = set(bench) - _BENCH_KEYS
    if unknown:
        raise UserError(f"unknown [bench] keys in {path}: {', '.join(sorted(unknown))}")
    server: dict[str, Any] = dict(doc.get("server", {}))
    steps = []
    for i, table in enumerate(doc["step"], 1):
        if "name" not in table:
            raise UserError(f"step {i} in {path} has no name")
        server.update(table.get("server", {}))
        step_bench = {**bench, **{k: v for k, v in table.items() if k in _BENCH_KEYS}}
        steps.append(Step(table["name"], table.get("why", ""), make_config(cls, server), step_bench))
    return doc, steps


def server_flags(cfg: Any) -> list[str]:
    flags = []
    for key, value in as_dict(cfg, hide=()).items():
        if key in ("host", "port") or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


def run_ladder(doc: dict, steps: list[Step], images: list[tuple[str, bytes]], progress: bool = True) -> list[dict]:
    from roofserve.bench.vision import bench_api

    rows = []
    for index, step in enumerate(steps, 1):
        log.info("step %d/%d: %s", index, len(steps), step.name)
        with running_server(["vision", *server_flags(step.config)]) as url:
            b = step.bench
            level_rows = bench_api(f"{url}/predict", images, b["payload"], b["concurrency"], b["rate"], b["requests"],
                                   b["duration_s"], b["warmup"], step.config.api_key, progress)
        for row in level_rows:
            # the server's own /info config records what ran (e.g. precision "auto" resolved)
            row.update({"step": step.name, "step_index": index, "why": step.why,
                        "config": row.get("config") or as_dict(step.config)})
        rows.extend(level_rows)
    return rows


def run_llm_ladder(steps: list[Step], bandwidth_gb_s: float | None, progress: bool = True) -> list[dict]:
    """Each step: served (streaming over HTTP, one request at a time) and in-process on the same engine,
    alternating in `rounds` (see engine_process), with the read bandwidth measured in every round."""
    import statistics

    from roofserve.bench.engine_process import EngineProcess
    from roofserve.bench.llm import bench_llm_api, summarize
    from roofserve.llm.roof import step_roof

    rows = []
    for index, step in enumerate(steps, 1):
        cfg, b = step.config, step.bench
        log.info("step %d/%d: %s", index, len(steps), step.name)
        tag = {"step": step.name, "step_index": index, "why": step.why, "config": as_dict(cfg)}
        rounds = b["rounds"] if b["engine"] else 1
        per_round = max(1, b["runs"] // rounds)
        served, walls, served_rates, engine_chat, bandwidths = [], 0.0, [], [], []
        engine = EngineProcess(cfg) if b["engine"] else None  # loads (and compiles) while the server does
        try:
            with running_server(["llm", *server_flags(cfg)], ready_timeout_s=900) as url:
                if engine:
                    engine.wait_ready()
                for i in range(rounds):
                    if engine:
                        bandwidths.append(engine.bandwidth_gb_s())
                    row, results = bench_llm_api(f"{url}/v1/chat/completions", "", max_tokens=b["max_tokens"],
                                                 runs=per_round, concurrency=b["concurrency"],
                                                 ignore_eos=b["ignore_eos"], warmup=b["warmup"] if i == 0 else 0,
                                                 api_key=cfg.api_key, progress=progress)
                    served += results
                    walls += row["wall_s"]
                    served_rates.append(row["decode_tokens_per_s"])
                    if engine:
                        engine_chat += engine.bench([], b["max_tokens"], per_round, chat=True)
            prompt_rows = engine.bench(b["prompt_lengths"], b["max_tokens"], 3, chat=False) if engine else []
        finally:
            if engine:
                engine.close()
        api_row = {**row, **summarize(served, walls), "rounds_decode_tokens_per_s": served_rates,
                   "fixed_length_verified": all(r.output_tokens == b["max_tokens"] for r in served if r.ok)}
        bandwidth = statistics.median(m["read_gb_s"] for m in bandwidths) if bandwidths else bandwidth_gb_s
        roof = step_roof(cfg, context_len=(api_row.get("prompt_tokens") or 0) + b["max_tokens"] // 2,
                         bandwidth_gb_s=bandwidth)
        roof["sweep_bandwidth_gb_s"] = bandwidth_gb_s
        roof["rounds_bandwidth_gb_s"] = [round(m["read_gb_s"], 1) for m in bandwidths]
        roof["gemv_gb_s"] = round(statistics.median(m["gemv_gb_s"] for m in bandwidths), 1) if bandwidths else None
        if any("kernel_gemv_gb_s" in m for m in bandwidths):
            roof["kernel_gemv_gb_s"] = round(statistics.median(m["kernel_gemv_gb_s"] for m in bandwidths), 1)
        rows.append({**api_row, **tag, **roof})
        if engine_chat:
            first = engine_chat[0]
            chat = {**first, "ttft_ms": statistics.median(r["ttft_ms"] for r in engine_chat),
                    "decode_tokens_per_s": round(statistics.median(r["decode_tokens_per_s"] for r in engine_chat), 2),
                    "rounds_decode_tokens_per_s": [r["decode_tokens_per_s"] for r in engine_chat]}
            chat["prefill_tokens_per_s"] = round(first["prompt_tokens"] / chat["ttft_ms"] * 1e3, 1)
            rows += [{**r, **tag, **roof} for r in [*prompt_rows, chat]]
    return rows
