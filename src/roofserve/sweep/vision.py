"""The vision ladder: the ceilings (peaks, model-only, in-process pipeline) measured first, then each
step's server started, loaded with the same requests, and stopped."""

from __future__ import annotations

import logging
from typing import Any

from roofserve.config import VisionConfig, as_dict, config_flags, secret_env
from roofserve.load.process import server_process
from roofserve.load.vision import bench_api
from roofserve.sweep.ladder import Ladder, load_ladder

log = logging.getLogger(__name__)


def sweep_vision(path: str, overrides: dict[str, Any] | None = None, images: list[tuple[str, bytes]] | None = None,
                 skip_model: bool = False, progress: bool = True) -> tuple[Ladder, list[dict]]:
    """(ladder, rows): peaks and ceilings measured on the first step's device, then every step's load rows."""
    from roofserve.device import resolve_device
    from roofserve.examples import example_images
    from roofserve.measure.peaks import measure_peaks
    from roofserve.measure.vision import measure_ceilings

    ladder = load_ladder(path, VisionConfig, overrides)
    images = images or example_images()
    first = ladder.steps[0].config
    rows = [p.row() for p in measure_peaks(resolve_device(first.device))]
    if not skip_model:
        log.info("measuring the ceilings: model-only and in-process pipeline")
        rows += measure_ceilings(first.model, first.weights, first.device, ladder.ceilings, images, rows)
    return ladder, rows + run_steps(ladder, images, progress)


def run_steps(ladder: Ladder, images: list[tuple[str, bytes]], progress: bool = True) -> list[dict]:
    rows = []
    for index, step in enumerate(ladder.steps, 1):
        log.info("step %d/%d: %s", index, len(ladder.steps), step.name)
        with server_process(["vision", *config_flags(step.config)], env=secret_env(step.config)) as server:
            level_rows = bench_api(f"{server.url}/predict", images, step.bench, step.config.resolved_api_key(), progress,
                                   server_pid=server.proc.pid)
        for row in level_rows:
            # the server's own /info config records what ran (e.g. precision "auto" resolved)
            row.update({"step": step.name, "step_index": index, "why": step.why,
                        "config": row.get("config") or as_dict(step.config)})
        rows.extend(level_rows)
    return rows
