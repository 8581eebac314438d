"""A ladder of server configs, run one after the other against the same load, with the ceilings
(peaks, model-only, in-process pipeline) measured in the same run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from roofserve.bench.process import running_server
from roofserve.config import VisionConfig, as_dict, load_toml, make_config
from roofserve.errors import UserError

log = logging.getLogger(__name__)
_BENCH_KEYS = {"payload", "concurrency", "rate", "requests", "duration_s", "warmup"}


@dataclass
class Step:
    name: str
    why: str
    config: VisionConfig
    bench: dict[str, Any]


def load_ladder(path: str, overrides: dict[str, Any] | None = None) -> tuple[dict, list[Step]]:
    """Steps are cumulative: each step's [step.server] table changes the config of the step before."""
    doc = load_toml(path)
    if not doc.get("step"):
        raise UserError(f"{path} has no [[step]] tables")
    bench = {"payload": "raw", "concurrency": [1, 8, 32, 64], "rate": [], "requests": 400, "duration_s": 60.0, "warmup": 16}
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
        steps.append(Step(table["name"], table.get("why", ""), make_config(VisionConfig, server), step_bench))
    return doc, steps


def server_flags(cfg: VisionConfig) -> list[str]:
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
            row.update({"step": step.name, "step_index": index, "why": step.why, "config": as_dict(step.config)})
        rows.extend(level_rows)
    return rows
