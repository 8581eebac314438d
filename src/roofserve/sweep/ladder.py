"""A ladder: a TOML file of cumulative server configs (steps), the load every step gets ([bench]) and,
for vision, the ceilings measured in the same run ([model]). Loaded and validated here, before
anything starts, so that a typo fails in one line and not minutes into a sweep."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from roofserve.config import (
    LLMConfig,
    LLMLadderConfig,
    VisionCeilingsConfig,
    VisionConfig,
    VisionLoadConfig,
    load_toml,
    make_config,
)
from roofserve.errors import UserError

log = logging.getLogger(__name__)
# server config class -> the class of its ladder's [bench] table
BENCH_CONFIGS = {VisionConfig: VisionLoadConfig, LLMConfig: LLMLadderConfig}
_TOP_KEYS = {"bench", "server", "step"}  # and [model] in a vision ladder


@dataclass
class Step:
    name: str
    why: str
    config: Any  # VisionConfig or LLMConfig
    bench: Any  # VisionLoadConfig or LLMLadderConfig


@dataclass
class Ladder:
    path: str
    doc: dict
    steps: list[Step]
    ceilings: VisionCeilingsConfig | None  # vision ladders: the [model] table


def load_ladder(path: str, cls: type = VisionConfig, overrides: dict[str, Any] | None = None) -> Ladder:
    """Steps are cumulative: each step's [step.server] table changes the config of the step before;
    a step may also change the load (e.g. `payload = "raw"`). `repeat = "NAME"` starts a step from an
    earlier step's config instead (A B A B runs, where the VM's drift must not pass for a difference),
    and the steps after it go on from there. `overrides` (from the CLI) win over [bench]."""
    doc = load_toml(path)
    if not doc.get("step"):
        raise UserError(f"{path} has no [[step]] tables")
    unknown = set(doc) - _TOP_KEYS - ({"model"} if cls is VisionConfig else set())
    if unknown:
        raise UserError(f"unknown tables in {path}: {', '.join(sorted(unknown))} (known: bench, server, step"
                        f"{', model' if cls is VisionConfig else ''})")
    bench_cls = BENCH_CONFIGS[cls]
    where = f"{path} [bench]"
    bench = _checked(where, lambda: make_config(bench_cls, doc.get("bench"), overrides))
    ceilings = _checked(f"{path} [model]", lambda: make_config(VisionCeilingsConfig, doc.get("model"))) \
        if cls is VisionConfig else None
    bench_keys = set(bench_cls.__dataclass_fields__)
    server: dict[str, Any] = dict(doc.get("server", {}))
    steps, servers = [], {}  # servers: each step's server table, for `repeat`
    for i, table in enumerate(doc["step"], 1):
        if "name" not in table:
            raise UserError(f"step {i} in {path} has no name")
        extra = set(table) - bench_keys - {"name", "why", "server", "repeat"}
        if extra:
            raise UserError(f"step {table['name']!r} in {path}: unknown keys {', '.join(sorted(extra))}")
        if "repeat" in table:
            if table["repeat"] not in servers:
                raise UserError(f"step {table['name']!r} in {path}: repeat = {table['repeat']!r} names no step "
                                f"before it (steps so far: {', '.join(servers) or 'none'})")
            server.clear()
            server.update(servers[table["repeat"]])
        server.update(table.get("server", {}))
        servers[table["name"]] = dict(server)
        step_load = {k: v for k, v in table.items() if k in bench_keys}
        where = f"step {table['name']!r} in {path}"
        config = _checked(where, lambda: make_config(cls, server))
        step_bench = _checked(where, lambda: make_config(bench_cls, dataclasses.asdict(bench), step_load, overrides))
        _refuse_inert(where, set(step_load), step_bench)
        steps.append(Step(table["name"], table.get("why", ""), config, step_bench))
    if not any(getattr(s.bench, "engine", True) for s in steps):
        _refuse_inert(f"{path} [bench]", set(doc.get("bench", {})), steps[0].bench)
    return Ladder(path, doc, steps, ceilings)


def _refuse_inert(where: str, given: set[str], bench) -> None:
    """Keys that apply to in-process runs only, given where none run: the user meant something that
    does not happen (e.g. `rounds` to alternate served steps; `repeat` does that)."""
    inert = sorted(given & set(getattr(bench, "ENGINE_ONLY", ())))
    if inert and not bench.engine:
        raise UserError(f"{where}: {', '.join(inert)} only apply with engine = true (the in-process runs); "
                        "here engine = false, so remove them (to alternate steps, add steps with "
                        "repeat = \"<step name>\")")


def _checked(where: str, build):
    try:
        return build()
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
