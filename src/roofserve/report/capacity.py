"""Capacity on paper: from a served step's measured throughput at a latency target, the cores (and
machines, and dollars) a given load needs, and a check of that linear model against the measurements.
For the chat server the load is concurrent users (`chat_section`).

The model: a config serves r req/s at its best level whose p99 is within the target, using c cores
(its CPU % of the machine's cores); it scales by adding replicas, so a load L needs L / (r / c) cores.
That ignores the load balancer's own cost and assumes replicas do not share anything but the network;
the check compares its prediction for a step with more replicas against what that step measured here.
"""

from __future__ import annotations

import math

TARGET_REQ_PER_S = 10_000.0
P99_TARGET_MS = 500.0
USD_PER_CORE_HOUR = 0.05  # an assumption to scale from, not a quote: put your own price here


def cores_busy(row: dict, machine_cores: int) -> float:
    """The cores the server kept busy: its own processes' CPU time per request x req/s where that was
    measured (a sweep's server; the load generator on the same machine is not in it), else the CPU % of
    the whole machine (load generator included: an overestimate)."""
    per_request_ms = row.get("cpu_ms_per_request")
    if per_request_ms:
        return max(0.01, sum(per_request_ms.values()) * row["req_per_s"] / 1e3)
    return max(0.01, (row.get("cpu_percent") or 100.0) / 100.0 * machine_cores)


def at_target(rows: list[dict], p99_ms: float = P99_TARGET_MS) -> dict | None:
    """The level with the most req/s whose p99 latency is within the target."""
    within = [r for r in rows if r["latency_p99_ms"] <= p99_ms and r["errors"] == 0]
    return max(within, key=lambda r: r["req_per_s"], default=None)


def plan(row: dict, machine_cores: int, load: float = TARGET_REQ_PER_S, price: float = USD_PER_CORE_HOUR) -> dict:
    per_core = row["req_per_s"] / cores_busy(row, machine_cores)
    cores = math.ceil(load / per_core)
    return {"req_per_s": row["req_per_s"], "per_core": per_core, "cores": cores,
            "machines": math.ceil(cores / machine_cores), "usd_per_hour": cores * price}


def replicas(row: dict) -> int:
    config = row.get("config") or {}
    platform = config.get("platform", config.get("engine"))  # result files written before 0.1.0 say "engine"
    return config.get("ray_replicas", 1) if platform == "ray" else config.get("workers_per_device", 1)


def section(steps: dict[str, list[dict]], machine_cores: int) -> tuple[str, list[list], list[str]]:
    """The report's part: its intro, one table line per step (steps with no level within the latency
    target say so), and the model checks where a step differs from an earlier one only in its replicas."""
    body, chosen = [], {}
    for name, rows in steps.items():
        best = at_target(rows)
        if best is None:
            body.append([name, "-", "-", "-", "-", "-", f"no level with p99 <= {P99_TARGET_MS:g} ms"])
            continue
        chosen[name] = best
        p = plan(best, machine_cores)
        body.append([name, best["req_per_s"], best.get("concurrency") or best.get("rate_per_s"), round(p["per_core"], 1),
                     p["cores"], p["machines"], f"${p['usd_per_hour']:,.0f}"])
    intro = (f"Cores for **{TARGET_REQ_PER_S:,.0f} req/s** at p99 <= {P99_TARGET_MS:g} ms, scaling each step's "
             f"measured req/s per core the server kept busy (its best level within the target; the server's own "
             f"processes' CPU time, without the load generator's, where measured) linearly; machines of this one's "
             f"{machine_cores} cores; dollars at an assumed ${USD_PER_CORE_HOUR} per core-hour "
             "(`report/capacity.py`). The load balancer's own cost is not in it.")
    checks = []
    for name, row in chosen.items():
        base = next((r for n, r in chosen.items() if n != name and _same_but_replicas(r, row)
                     and replicas(r) < replicas(row)), None)
        if base is not None:
            predicted = plan(base, machine_cores)["per_core"] * cores_busy(row, machine_cores)
            checks.append(f"{name}: predicted from {base.get('step')} {predicted:.1f} req/s, measured "
                          f"{row['req_per_s']:.1f} ({row['req_per_s'] / predicted - 1:+.0%})")
    return intro, body, checks


def _same_but_replicas(a: dict, b: dict) -> bool:
    ignore = {"port", "ray_replicas", "workers_per_device", "threads_per_worker"}
    ca, cb = a.get("config") or {}, b.get("config") or {}
    return {k: v for k, v in ca.items() if k not in ignore} == {k: v for k, v in cb.items() if k not in ignore}


CHAT_USERS = 1_000
TPOT_TARGET_MS = 100.0  # 10 tokens/s for every user: faster than people read
TTFT_P99_TARGET_MS = 2_000.0


def users_at_target(rows: list[dict], tpot_ms: float = TPOT_TARGET_MS, ttft_p99_ms: float = TTFT_P99_TARGET_MS):
    """The concurrency level with the most users whose median TPOT and p99 TTFT are within the targets
    and whose requests all succeeded."""
    within = [r for r in rows if r.get("tpot_p50_ms") and r["tpot_p50_ms"] <= tpot_ms
              and r.get("ttft_p99_ms") is not None and r["ttft_p99_ms"] <= ttft_p99_ms and r.get("errors", 0) == 0
              and r.get("ok", 0) == r.get("requests", 0)]
    return max(within, key=lambda r: r["concurrency"], default=None)


def chat_section(levels: dict[str, list[dict]], machine_cores: int, users: int = CHAT_USERS,
                 price: float = USD_PER_CORE_HOUR) -> tuple[str, list[list]]:
    """Replicas (one server per machine like this one), cores and dollars for `users` concurrent chat
    users: each step's most users per server within the latency targets, scaled linearly."""
    body = []
    for name, rows in levels.items():
        best = users_at_target(rows)
        if best is None:
            missed = f"no level within TPOT p50 <= {TPOT_TARGET_MS:g} ms and TTFT p99 <= {TTFT_P99_TARGET_MS:g} ms"
            body.append([name, "-", "-", "-", "-", missed])
            continue
        servers = math.ceil(users / best["concurrency"])
        cores = servers * machine_cores
        body.append([name, best["concurrency"], best.get("output_tokens_per_s"), servers, cores,
                     f"${cores * price:,.0f}"])
    intro = (f"Servers for **{users:,} concurrent chat users** (each streaming, as in the levels above), scaling "
             f"linearly each step's most users per server among its measured levels with median TPOT <= "
             f"{TPOT_TARGET_MS:g} ms and p99 TTFT <= {TTFT_P99_TARGET_MS:g} ms (a server may hold more than the "
             f"largest level measured); one server per machine of this one's {machine_cores} cores; "
             f"dollars at an assumed ${price} per core-hour (`report/capacity.py`). A step with no such level "
             "cannot meet the targets at any load here.")
    return intro, body
