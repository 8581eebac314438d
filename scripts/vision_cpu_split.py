#!/usr/bin/env python
"""Where a served image's CPU time goes: start the vision server with the given flags, load it over HTTP,
and split the CPU seconds between the HTTP process (the one listening on the port), the inference workers,
LitServe's other processes, and the load generator itself; printed per request. On 2 shared cores the
sum is what bounds req/s, so this names the part to cut.

    .venv/bin/python scripts/vision_cpu_split.py --server-args "--runtime openvino" \
        [--concurrency 64 --requests 600]
"""
import argparse
import shlex
import time

import psutil

from roofserve.config import VisionLoadConfig
from roofserve.examples import example_images
from roofserve.load.process import start_server, stop_process_group
from roofserve.load.vision import bench_api


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def roles(root: psutil.Process, port: int) -> dict[int, str]:
    out = {root.pid: "launcher"}
    for child in root.children(recursive=True):
        try:
            listening = any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in child.net_connections())
        except psutil.Error:
            listening = False
        out[child.pid] = "http" if listening else "other"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-args", default="")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=600)
    args = parser.parse_args()
    server = start_server(["vision", *shlex.split(args.server_args)])
    try:
        port = int(server.url.rsplit(":", 1)[1])
        root = psutil.Process(server.proc.pid)
        load = VisionLoadConfig(concurrency=[args.concurrency], requests=args.requests, warmup=16, payload="raw")
        bench_api(f"{server.url}/predict", example_images(), load, None, False)  # warm: workers busy from here
        role = roles(root, port)
        procs = {pid: psutil.Process(pid) for pid in role}
        me = psutil.Process()
        before = {pid: cpu_s(p) for pid, p in procs.items()}
        mine, start = cpu_s(me), time.perf_counter()
        [row] = bench_api(f"{server.url}/predict", example_images(), load, None, False)
        wall = time.perf_counter() - start
        used = {pid: cpu_s(p) - before[pid] for pid, p in procs.items()}
        client = cpu_s(me) - mine
    finally:
        stop_process_group(server.proc)
    n = row["ok"]
    # the workers are the busiest processes that are not the HTTP one (LitServe's manager and launcher idle)
    others = sorted((u, pid) for pid, u in used.items() if role[pid] == "other")
    workers = [pid for u, pid in others if u > 0.2 * max(u for u, _ in others)]
    split = {"http process": sum(u for pid, u in used.items() if role[pid] == "http"),
             f"{len(workers)} inference worker(s)": sum(used[pid] for pid in workers),
             "launcher, manager, rest": sum(u for pid, u in used.items() if role[pid] != "http" and pid not in workers),
             "load generator (this process)": client}
    total = sum(split.values())
    print(f"{n} requests in {wall:.1f} s = {n / wall:.1f} req/s at concurrency {args.concurrency}; "
          f"{total:.1f} CPU s of {wall * psutil.cpu_count():.1f} available")
    for name, seconds in split.items():
        print(f"  {name:32s} {seconds / n * 1e3:6.2f} ms CPU per request  ({seconds / total:.0%})")


if __name__ == "__main__":
    main()
