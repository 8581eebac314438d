"""A crowd of stalled clients: connections that start a request and then stop, each reopened when the
server closes it, held on a thread of their own while other load runs.

Kinds: "upload" declares a 100 KB body and sends 10 bytes of it; "headers" stops in the middle of a
header line; "idle" connects and sends nothing. For each connection the crowd records how the server
ended it (its status line, or a reset) and how long it was held; one held longer than its kind's
limit (the server's timeout + 5 s) counts as late. Only for 127.0.0.1 and servers you run.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time
from collections import Counter
from urllib.parse import urlsplit

from roofserve.load.http import run_loop

KINDS = ("upload", "headers", "idle")
GRACE_S = 5.0  # what a stalled connection may outlive its timeout by


def _prefix(kind: str, path: str, api_key: str | None) -> bytes:
    key = f"X-API-Key: {api_key}\r\n".encode() if api_key else b""
    if kind == "upload":
        return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/jpeg\r\n".encode() + key
                + b"Content-Length: 100000\r\n\r\n0123456789")
    if kind == "headers":
        return f"POST {path} HTTP/1.1\r\nHost: localhost\r\n".encode() + key + b"Content-Le"
    if kind == "idle":
        return b""
    raise ValueError(f"unknown stalled-client kind {kind!r}; known: {', '.join(KINDS)}")


def limits_from(server_config: dict) -> dict[str, float]:
    """Per kind, how long the server may hold a stalled connection: its timeout + GRACE_S."""
    headers = server_config["header_timeout_s"] + GRACE_S
    return {"upload": server_config["body_timeout_s"] + GRACE_S, "headers": headers, "idle": headers}


class _Slots:
    """The connections, in the crowd's own process: one asyncio loop, one coroutine per slot."""

    def __init__(self, host: str, port: int, slots: list[tuple[str, bytes]], limits_s: dict, opened) -> None:
        self.host, self.port, self.slots, self.limits_s = host, port, slots, limits_s
        self.opened = opened  # a multiprocessing.Value, read by the parent to know when all are open
        self.ended: Counter[str] = Counter()  # how the server ended connections: "408", "503", "reset", ...
        self.connect_errors: Counter[str] = Counter()
        self.late = 0
        self.held_max_s: dict[str, float] = {}
        self.holding: dict[int, tuple[str, float]] = {}  # slot -> (kind, when its connection opened)

    async def slot(self, slot: int, kind: str, prefix: bytes) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError as e:
                self.connect_errors[type(e).__name__] += 1
                await asyncio.sleep(0.2)
                continue
            opened = time.monotonic()
            self.holding[slot] = (kind, opened)
            self.opened.value += 1
            try:
                if prefix:
                    writer.write(prefix)
                answer = await reader.read()  # until the server closes
                end = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.1 ") else "closed"
            except (ConnectionError, OSError):
                end = "reset"
            finally:
                self.holding.pop(slot, None)
                writer.close()
            held = time.monotonic() - opened
            self.ended[end] += 1
            self.held_max_s[kind] = max(self.held_max_s.get(kind, 0.0), held)
            if held > self.limits_s.get(kind, float("inf")):
                self.late += 1

    async def run(self, stop) -> dict:
        tasks = [asyncio.create_task(self.slot(i, kind, prefix)) for i, (kind, prefix) in enumerate(self.slots)]
        while not stop.is_set():
            await asyncio.sleep(0.05)
        now = time.monotonic()  # connections still held past their limit are late too
        still_open = list(self.holding.values())
        self.late += sum(now - t > self.limits_s.get(kind, float("inf")) for kind, t in still_open)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {"stalled": len(self.slots), "stalled_opened": self.opened.value, "stalled_open_at_end": len(still_open),
                "stalled_ended": dict(self.ended), "stalled_late": self.late,
                "stalled_held_max_s": {k: round(v, 2) for k, v in self.held_max_s.items()},
                "stalled_connect_errors": dict(self.connect_errors)}


def _crowd_process(host, port, slots, limits_s, opened, stop, results) -> None:
    from roofserve.machine import raise_fd_limit

    raise_fd_limit(len(slots) + 256)
    results.put(run_loop(_Slots(host, port, slots, limits_s, opened).run(stop)))


class Crowd:
    """`size` stalled connections to `url`, kinds taken in turn from `kinds`, held by a process of their
    own (so that the load generator's threads cannot delay what it observes). Use as a context manager:
    entering returns once all are open (or after 30 s); leaving closes them; then `stats()`."""

    def __init__(self, url: str, size: int, kinds: tuple[str, ...] = ("upload",), limits_s: dict | None = None,
                 path: str = "/predict", api_key: str | None = None):
        parts = urlsplit(url)
        if parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError("a stalled-client crowd only targets 127.0.0.1 or localhost")
        ctx = multiprocessing.get_context("spawn")
        self._opened, self._stop, self._results = ctx.Value("l", 0), ctx.Event(), ctx.Queue()
        slots = [(kind, _prefix(kind, path, api_key)) for kind in (kinds * size)[:size]]
        self._proc = ctx.Process(target=_crowd_process, daemon=True, name="roofserve-crowd",
                                 args=(parts.hostname, parts.port or 80, slots, limits_s or {}, self._opened,
                                       self._stop, self._results))
        self.size = size
        self._stats: dict = {}

    def __enter__(self) -> Crowd:
        self._proc.start()
        deadline = time.monotonic() + 30
        while self._opened.value < self.size and time.monotonic() < deadline and self._proc.is_alive():
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        try:
            self._stats = self._results.get(timeout=30)
        except queue.Empty:
            self._stats = {"stalled": self.size, "stalled_error": "the crowd process did not report"}
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()

    def stats(self) -> dict:
        """What the crowd saw (units in the names); `stalled_late` must be 0 for a server that keeps its
        timeouts. Available after leaving the context."""
        return self._stats


def bench_under_crowd(server_args: list[str], size: int, concurrency: int, requests: int, rounds: int,
                      progress: bool = True) -> tuple[list[dict], int]:
    """Start `roofserve serve vision SERVER_ARGS` on 127.0.0.1 and measure classification at `concurrency`
    undisturbed and with `size` stalled uploads held open, alternating `rounds` times (this machine's
    speed drifts: only side by side is fair). Rows: one per run, and a summary with the ratio of the
    median p99 latencies. Returns (rows, the server's exit code)."""
    import statistics

    import httpx
    from tqdm import tqdm

    from roofserve.config import VisionLoadConfig, make_config
    from roofserve.examples import example_images
    from roofserve.load.process import start_server, stop_process_group
    from roofserve.load.vision import bench_api

    load = make_config(VisionLoadConfig, {"concurrency": [concurrency], "rate": [], "requests": requests})
    images = example_images()
    server = start_server(["vision", *server_args], ready_timeout_s=600)
    rows = []
    try:
        cfg = httpx.get(server.url + "/info", timeout=10).json()["model"]["config"]
        limits = limits_from(cfg)
        bench_api(server.url + "/predict", images, load, progress=False)  # warm-up, not recorded
        runs = [(r, stalled) for r in range(rounds) for stalled in (0, size)]
        for r, stalled in tqdm(runs, desc="crowd bench", disable=not progress):
            if stalled:
                with Crowd(server.url, stalled, ("upload",), limits) as crowd:
                    level = bench_api(server.url + "/predict", images, load, progress=False)[0]
                extra = crowd.stats()
            else:
                level = bench_api(server.url + "/predict", images, load, progress=False)[0]
                extra = {}
            rows.append({"kind": "crowd", "round": r, "stalled": stalled, "concurrency": concurrency,
                         **{k: level[k] for k in ("requests", "ok", "errors", "error_kinds", "req_per_s",
                                                  "latency_p50_ms", "latency_p99_ms")}, **extra})
    finally:
        exit_code = stop_process_group(server.proc)

    def median_p99(stalled: int) -> float | None:
        values = [row["latency_p99_ms"] for row in rows if row["stalled"] == stalled and row["latency_p99_ms"]]
        return statistics.median(values) if values else None

    calm, crowded = median_p99(0), median_p99(size)
    ratio = round(crowded / calm, 2) if calm and crowded else None
    all_ok = all(row["ok"] == row["requests"] for row in rows)
    rows.append({"kind": "crowd-summary", "stalled": size, "concurrency": concurrency, "rounds": rounds,
                 "latency_p99_ms_undisturbed": calm, "latency_p99_ms_stalled": crowded, "p99_ratio": ratio,
                 "all_ok": all_ok, "stalled_late": sum(row.get("stalled_late", 0) for row in rows),
                 "passed": bool(all_ok and ratio is not None and ratio <= 2.0 and
                                not any(row.get("stalled_late") for row in rows)),
                 "server_exit_code": exit_code})
    return rows, exit_code
