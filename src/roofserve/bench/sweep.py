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
    LLMConfig: {"runs": 8, "max_tokens": 128, "ignore_eos": True, "warmup": 1, "engine": True,
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
    """Each step: served (streaming over HTTP, one request at a time), then in-process on the same engine."""
    from roofserve.bench.llm import bench_llm_api
    from roofserve.llm.roof import step_roof

    rows = []
    for index, step in enumerate(steps, 1):
        cfg, b = step.config, step.bench
        log.info("step %d/%d: %s", index, len(steps), step.name)
        tag = {"step": step.name, "step_index": index, "why": step.why, "config": as_dict(cfg)}
        with running_server(["llm", *server_flags(cfg)], ready_timeout_s=900) as url:
            api_row, _ = bench_llm_api(f"{url}/v1/chat/completions", "", max_tokens=b["max_tokens"], runs=b["runs"],
                                       concurrency=b["concurrency"], ignore_eos=b["ignore_eos"], warmup=b["warmup"],
                                       api_key=cfg.api_key, progress=progress)
        roof = step_roof(cfg, context_len=(api_row.get("prompt_tokens") or 0) + b["max_tokens"] // 2,
                         bandwidth_gb_s=bandwidth_gb_s)
        rows.append({**api_row, **tag, **roof})
        if b["engine"]:
            for row in engine_rows(cfg, b):
                rows.append({**row, **tag, **roof})
    return rows


def engine_rows(cfg: Any, bench: dict[str, Any]) -> list[dict]:
    """`roofserve bench llm-engine` with the step's config, in a fresh process: nothing (compiled code,
    thread pools, memory) carries over from one step, or from the sweep's own client, to the next."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        out = f"{folder}/engine.json"
        args = [sys.executable, "-m", "roofserve", "bench", "llm-engine", *server_flags(cfg), "--out", out,
                "--prompt-lengths", ",".join(map(str, bench["prompt_lengths"])), "--max-tokens", str(bench["max_tokens"])]
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"in-process engine bench failed: {done.stderr.strip().splitlines()[-1:]}")
        return [r for r in json.loads(open(out).read())["rows"] if r["kind"] == "llm-engine"]
