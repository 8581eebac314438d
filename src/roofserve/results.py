"""Result files: JSON with the rows of one run and the config, versions and machine they came from.

Every row has a `kind`, and each kind has a schema (ROW_SCHEMAS: the fields it must carry, with their
types), checked when a file is written and when it is read, so that the report reads fields it knows
are there. Every file's meta names its `suite` (vision, llm, machine or soak), and reading stamps it on
each row: the report tells a vision run's peaks from an LLM run's by that, not by guessing.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from roofserve.errors import UserError
from roofserve.machine import describe_machine, versions

NUM = (int, float)
OPT_NUM = (int, float, type(None))
# kind -> {field: allowed types}; rows may carry more fields than these
ROW_SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    "peak": {"resource": (str,), "name": (str,), "device": (str,), "value": NUM, "unit": (str,)},
    "vision-model": {"model": (str,), "precision": (str,), "batch_size": (int,), "img_per_s": NUM,
                     "flops_per_image": (int,), "mfu": OPT_NUM, "compute_roof_img_per_s": OPT_NUM},
    "vision-pipeline": {"precision": (str,), "batch_size": (int,), "lanes": (int,), "threads": (int,),
                        "img_per_s": NUM, "decode_ms_per_image": NUM},
    "vision-accuracy": {"runtime": (str,), "precision": (str,), "photos": (int,), "top1_agree": (int,),
                        "animal_agree": (int,), "mean_abs_prob_diff": NUM, "passed": (bool,)},
    "vision-decode": {"image": (str,), "format": (str,), "width": (int,), "height": (int,), "decode_ms": NUM},
    "vision-api": {"mode": (str,), "requests": (int,), "ok": (int,), "errors": (int,), "error_kinds": (dict,),
                   "req_per_s": NUM, "latency_p50_ms": OPT_NUM, "latency_p99_ms": OPT_NUM},
    "llm-api": {"concurrency": (int,), "requests": (int,), "ok": (int,), "errors": (int,),
                "decode_tokens_per_s": OPT_NUM, "ttft_p50_ms": OPT_NUM, "tpot_p50_ms": OPT_NUM},
    "llm-request": {"concurrency": (int,), "ok": (bool,), "ttft_ms": OPT_NUM},
    "llm-serve": {"num_prompts": (int,), "requests": (int,), "ok": (int,), "wall_s": NUM, "req_per_s": OPT_NUM,
                  "ttft_mean_ms": OPT_NUM, "tpot_mean_ms": OPT_NUM},
    "llm-engine": {"prompt": (str,), "prompt_tokens": (int,), "ttft_ms": NUM, "decode_tokens_per_s": OPT_NUM},
    "soak": {"server": (str,), "requests": (int,), "passed": (bool,)},
    "soak-case": {"server": (str,), "case": (str,), "good": (bool,), "requests": (int,)},
    "crowd": {"round": (int,), "stalled": (int,), "concurrency": (int,), "requests": (int,), "ok": (int,),
              "latency_p99_ms": OPT_NUM},
    "fleet": {"replicas": (int,), "requests": (int,), "ok": (int,), "errors": (int,), "status_5xx": (int,),
              "restarts": (list,), "passed": (bool,)},
    "crowd-summary": {"stalled": (int,), "p99_ratio": OPT_NUM, "passed": (bool,)},
    "gguf-engine": {"file": (str,), "engine": (str,), "round": (int,), "prefill_tokens_per_s": NUM,
                    "decode_tokens_per_s": NUM, "peak_rss_gb": NUM},
    "gguf-summary": {"file": (str,), "decode_x": NUM, "prefill_x": NUM},
}
# command -> the suite its rows belong to
SUITES = {"peak": "machine", "bench vision-model": "vision", "bench vision-api": "vision", "sweep vision": "vision",
          "bench llm": "llm", "bench llm-engine": "llm", "sweep llm": "llm", "bench soak": "soak", "bench llm-serve": "llm",
          "bench crowd": "soak", "bench fleet": "soak", "bench gguf": "llm"}


def check_row(row: dict) -> None:
    """Raise ValueError naming the first field of `row` that its kind's schema does not find."""
    kind = row.get("kind")
    if kind not in ROW_SCHEMAS:
        raise ValueError(f"unknown row kind {kind!r}")
    for name, types in ROW_SCHEMAS[kind].items():
        if name not in row:
            raise ValueError(f"{kind} row without {name!r}")
        value = row[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"{kind} row: {name} = {value!r} is not {'/'.join(t.__name__ for t in types)}")


def run_meta(command: str, config: dict | None = None) -> dict:
    return {
        "command": command,
        "suite": SUITES[command],
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "versions": versions(),
        "config": config or {},
    }


def write_results(path: str | Path, meta: dict, rows: list[dict]) -> Path:
    for row in rows:
        check_row(row)  # a bug in a bench fails here, not later in the report
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return path


def read_results(paths: list[str | Path]) -> tuple[list[dict], list[dict]]:
    """(metas, rows) of the given files; folders are searched for *.json. Each row gets its file's
    `source` (the command) and `suite`."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.json")))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"no result file or folder at {p}")
    if not files:
        raise UserError(f"no result files (*.json) in {', '.join(map(str, paths))}")
    metas, rows = [], []
    for f in files:
        try:
            doc = json.loads(f.read_text())
            meta = doc["meta"]
            suite = meta.get("suite") or SUITES[meta["command"]]  # files from before `suite` was written
            for row in doc["rows"]:
                check_row(row)
                rows.append({**row, "source": meta["command"], "suite": suite})
            metas.append(meta)
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{f} is not a roofserve result file") from None
        except ValueError as e:
            raise UserError(f"{f}: {e}") from None
    return metas, rows
