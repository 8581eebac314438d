"""Result files: JSON with the rows of one run and the config, versions and machine they came from."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from roofserve.errors import UserError
from roofserve.hardware import describe_machine, versions


def run_meta(command: str, config: dict | None = None) -> dict:
    return {
        "command": command,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "versions": versions(),
        "config": config or {},
    }


def write_results(path: str | Path, meta: dict, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return path


def read_results(paths: list[str | Path]) -> tuple[list[dict], list[dict]]:
    """(metas, rows) of the given files; folders are searched for *.json."""
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
            metas.append(doc["meta"])
            rows.extend({**row, "source": doc["meta"]["command"]} for row in doc["rows"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{f} is not a roofserve result file") from None
    return metas, rows
