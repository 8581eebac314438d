"""What one streamed message costs the machine, by process, for each worker-to-HTTP transport.

Starts one chat server per transport (stream interval 1: a message per token) and, alternating between
them for --rounds, streams --requests long and then as many short requests at one user. The CPU each
process spent on the long requests minus the short ones, over the messages that differ, is the CPU per
message (the prompt, the request and the startup cancel out; what an idle server spends per second, its
watchdogs, is measured first and subtracted for each run's duration). Processes: the inference worker, the
HTTP process, LitServe's manager (the queues, with transport "manager"), and this script as the client.
The default model (random:tiny) costs almost nothing per token, so what is left is the serving stack.

    .venv/bin/python scripts/message_cost.py [--model random:tiny] [--transports pipe,manager] [--rounds 2]
        [--server-args "--max-batch-size 1"] [--out results/message-cost.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import statistics
import time

import psutil

from roofserve.config import LLMLoadConfig, make_config
from roofserve.load.llm import bench_llm_api
from roofserve.load.monitor import tree_cpu_s
from roofserve.load.process import server_process


def _role(pid: int, role: str, root: int) -> str:
    """load.monitor's role, with its roofserve processes told apart: main, LitServe's manager, HTTP."""
    if role != "server processes (main, HTTP, queues)":
        return {"inference workers": "worker"}.get(role, "other")
    if pid == root:
        return "main"
    with contextlib.suppress(psutil.Error):  # the manager listens on a unix socket (and inherited the TCP one)
        if any("listener-" in str(c.laddr) for c in psutil.Process(pid).net_connections("unix")):
            return "manager"
    return "http"


def _cpu(root: int) -> dict[str, float]:
    """CPU seconds by role in the server's tree, plus this process (the client)."""
    out: dict[str, float] = {}
    for pid, (role, seconds) in tree_cpu_s(root).items():
        role = _role(pid, role, root)
        out[role] = out.get(role, 0.0) + seconds
    out["client"] = time.process_time()
    return out


def idle_rates(root: int, seconds: float) -> dict[str, float]:
    """CPU seconds per second by role while nothing is asked (the server's watchdogs and monitors), so that
    time-driven work is not counted per message: the long requests take longer than the short ones."""
    before = _cpu(root)
    time.sleep(seconds)
    after = _cpu(root)
    return {k: (after[k] - before.get(k, 0.0)) / seconds for k in after if k != "client"}


def measure(url: str, root: int, long_tokens: int, short_tokens: int, requests: int, idle: dict[str, float]) -> dict:
    spent = {}
    rows = {}
    for tokens in (long_tokens, short_tokens):
        before, start = _cpu(root), time.perf_counter()
        load = make_config(LLMLoadConfig, {"max_tokens": tokens, "runs": requests, "warmup": 0})
        rows[tokens], _ = bench_llm_api(url, load, progress=False)
        after, wall = _cpu(root), time.perf_counter() - start
        spent[tokens] = {k: after[k] - before.get(k, 0.0) - idle.get(k, 0.0) * wall for k in after}
    messages = requests * (long_tokens - short_tokens)
    per_message = {k: (spent[long_tokens][k] - spent[short_tokens].get(k, 0.0)) * 1e3 / messages
                   for k in spent[long_tokens]}
    long_row = rows[long_tokens]
    return {"ms_per_message": {k: round(v, 4) for k, v in per_message.items()},
            "tpot_p50_ms": long_row["tpot_p50_ms"], "decode_tokens_per_s": long_row["decode_tokens_per_s"],
            "errors": long_row["errors"] + rows[short_tokens]["errors"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--transports", default="pipe,manager")
    ap.add_argument("--server-args", default="--max-batch-size 1", help="more `roofserve serve llm` flags")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=4, help="requests per length per round")
    ap.add_argument("--long", type=int, default=512, help="tokens in a long request")
    ap.add_argument("--short", type=int, default=16, help="tokens in a short request")
    ap.add_argument("--idle-s", type=float, default=6.0, help="seconds to measure each idle server's CPU")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    transports = args.transports.split(",")
    results: dict[str, list[dict]] = {t: [] for t in transports}
    with contextlib.ExitStack() as stack:
        servers = {t: stack.enter_context(server_process(
            ["llm", "--model", args.model, "--stream-interval", "1", "--transport", t,
             *shlex.split(args.server_args)])) for t in transports}
        for server in servers.values():  # warm-up: first requests compile, fill caches
            bench_llm_api(server.url, make_config(LLMLoadConfig, {"max_tokens": args.short, "runs": 2, "warmup": 0}),
                          progress=False)
        idle = {t: idle_rates(servers[t].proc.pid, args.idle_s) for t in transports}
        for t, rates in idle.items():
            print(f"idle {t:8s} " + "  ".join(f"{k} {v * 1e3:.1f}" for k, v in sorted(rates.items()) if v)
                  + "  (CPU ms per second, subtracted)", flush=True)
        for r in range(args.rounds):
            for t in transports:
                row = measure(servers[t].url, servers[t].proc.pid, args.long, args.short, args.requests, idle[t])
                results[t].append(row)
                print(f"round {r + 1} {t:8s} TPOT p50 {row['tpot_p50_ms']:6.2f} ms  "
                      + "  ".join(f"{k} {v:.3f}" for k, v in sorted(row["ms_per_message"].items())
                                  if abs(v) >= 0.0005) + "  (CPU ms per message)", flush=True)
    summary = []
    for t, rows in results.items():
        roles = sorted({k for row in rows for k in row["ms_per_message"]})
        med = {k: round(statistics.median(row["ms_per_message"].get(k, 0.0) for row in rows), 4) for k in roles}
        stack_ms = sum(v for k, v in med.items() if k != "worker")
        summary.append({"transport": t, "model": args.model, "server_args": args.server_args,
                        "idle_cpu_ms_per_s": {k: round(v * 1e3, 2) for k, v in idle[t].items()},
                        "ms_per_message_median": med, "serving_ms_per_message": round(stack_ms, 4),
                        "tpot_p50_ms_median": statistics.median(row["tpot_p50_ms"] for row in rows),
                        "errors": sum(row["errors"] for row in rows), "rounds": rows})
        print(f"{t:8s} serving stack (all but the worker) {stack_ms:.3f} CPU ms per message; "
              f"TPOT p50 {summary[-1]['tpot_p50_ms_median']:.2f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
        print("results:", args.out)


if __name__ == "__main__":
    main()
