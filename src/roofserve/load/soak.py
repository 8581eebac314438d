"""Soak: a bounded run of mixed good and bad requests against a server on 127.0.0.1 that this
process started, sampling the memory (RSS) of the server's whole process tree along the way.

Alongside, a crowd of stalled clients (load.crowd: uploads that stop, headers that stop, connections
that send nothing) is held open and reopened as the server closes them.

It passes when no good request got a 5xx or failed to connect, every bad request got a 4xx, no
stalled connection outlived the server's timeout + 5 s, and the memory after the run is within
`rss_tolerance` of the memory after the warm-up.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import psutil
from tqdm import tqdm

from roofserve.load.crowd import KINDS, Crowd, limits_from
from roofserve.load.process import ServerProcess


@dataclass(frozen=True)
class Case:
    name: str
    good: bool
    send: Callable[[httpx.Client, str], int | str]  # (client, base URL) -> HTTP status, or what went wrong


def _post(path: str, **request) -> Callable[[httpx.Client, str], int]:
    return lambda client, url: client.post(url + path, **request).status_code


def _bomb_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")  # 400 Mpixel in about 50 KB
    return buf.getvalue()


def vision_cases(images: list[tuple[str, bytes]], max_payload_bytes: int) -> list[Case]:
    jpeg = next(data for name, data in images if name.endswith(".jpg"))
    png = next(data for name, data in images if name.endswith(".png"))
    raw, as_json = {"Content-Type": "image/jpeg"}, {"Content-Type": "application/json"}
    return [
        Case("jpeg", True, _post("/predict", content=jpeg, headers=raw)),
        Case("png", True, _post("/predict", content=png, headers={"Content-Type": "image/png"})),
        Case("base64 json", True, _post("/predict", json={"image": base64.b64encode(jpeg).decode()})),
        Case("multipart", True, _post("/predict", files={"file": ("x.jpg", jpeg, "image/jpeg")})),
        Case("not an image", False, _post("/predict", content=b"hello", headers=raw)),
        Case("truncated jpeg", False, _post("/predict", content=jpeg[: len(jpeg) // 2], headers=raw)),
        Case("empty body", False, _post("/predict", content=b"", headers=raw)),
        Case("malformed json", False, _post("/predict", content=b"{nope", headers=as_json)),
        Case("invalid base64", False, _post("/predict", json={"image": "%%%"})),
        Case("wrong content type", False, _post("/predict", content=b"hi", headers={"Content-Type": "text/plain"})),
        Case("decompression bomb", False,
             _post("/predict", content=_bomb_png(), headers={"Content-Type": "image/png"})),
        Case("over the size cap", False, _post("/predict", content=b"\xff" * (max_payload_bytes + 1), headers=raw)),
        *_header_cases("/predict"),
    ]


def _raw(request: bytes) -> Callable[[httpx.Client, str], int | str]:
    """A request sent as raw bytes on its own connection (httpx spends ~0.7 s of CPU building 5000
    headers, which would throttle the soak's other clients); the answer's status."""

    def send(client: httpx.Client, url: str) -> int | str:
        parts = urlsplit(url)
        with socket.create_connection((parts.hostname, parts.port or 80), timeout=30) as sock:
            try:
                sock.sendall(request)
            except (BrokenPipeError, ConnectionResetError):  # answered and closed before all of it arrived
                pass
            head = sock.recv(64)
        return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else "NoAnswer"

    return send


def _header_cases(path: str) -> list[Case]:
    """Requests whose headers break the server's limits (431 at the defaults)."""
    start = f"POST {path} HTTP/1.1\r\nHost: localhost\r\n".encode()
    many = b"".join(b"X-Filler-%d: 1\r\n" % i for i in range(5000))
    return [Case("one 40 KB header", False, _raw(start + b"X-Big: " + b"a" * 40_000 + b"\r\n\r\n")),
            Case("5000 headers", False, _raw(start + many + b"Content-Length: 0\r\n\r\n"))]


def _stream_and_leave(client: httpx.Client, url: str) -> int:
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 64,
            "stream": True, "ignore_eos": True}
    with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i >= 3:
                break  # hang up mid-stream: the server must stop generating and stay well
        return response.status_code


def _stream(client: httpx.Client, url: str) -> int | str:
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "stream": True}
    with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    return response.status_code if response.status_code != 200 or lines[-1] == "data: [DONE]" else "IncompleteStream"


def llm_cases(max_seq_len: int, max_payload_bytes: int) -> list[Case]:
    chat = "/v1/chat/completions"
    hello = [{"role": "user", "content": "Say hello."}]
    return [
        Case("chat", True, _post(chat, json={"messages": hello, "max_tokens": 8})),
        Case("chat stream", True, _stream),
        Case("stream, client leaves", True, _stream_and_leave),
        Case("chat with stop string", True, _post(chat, json={"messages": hello, "max_tokens": 8, "stop": ["."]})),
        Case("malformed json", False, _post(chat, content=b"{oops", headers={"Content-Type": "application/json"})),
        Case("no messages", False, _post(chat, json={"max_tokens": 8})),
        Case("unknown role", False, _post(chat, json={"messages": [{"role": "wizard", "content": "hi"}]})),
        Case("max_tokens a string", False, _post(chat, json={"messages": hello, "max_tokens": "10"})),
        Case("temperature too high", False, _post(chat, json={"messages": hello, "temperature": 5})),
        Case("prompt over context", False,
             _post(chat, json={"messages": [{"role": "user", "content": "word " * max_seq_len}], "max_tokens": 8})),
        Case("wrong content type", False, _post(chat, content=b"hi", headers={"Content-Type": "text/plain"})),
        Case("over the size cap", False, _post(chat, content=b"x" * (max_payload_bytes + 1),
                                                headers={"Content-Type": "application/json"})),
        *_header_cases(chat),
    ]


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:  # a process that ended between listing and reading
            pass
    return total / 1e6


def soak(server: ServerProcess, cases: list[Case], duration_s: float, concurrency: int, name: str,
         warmup_s: float = 10.0, rss_tolerance: float = 0.05, progress: bool = True,
         crowd: Crowd | None = None) -> list[dict]:
    """Send `cases` round-robin from `concurrency` threads for duration_s, with `crowd` (not yet
    entered) held meanwhile; returns a summary row and one row per case. Memory is compared between
    the end of the warm-up and the end of the run."""
    statuses: dict[str, Counter] = {case.name: Counter() for case in cases}
    next_case, lock = itertools.count(), threading.Lock()
    start = time.monotonic()
    end = start + warmup_s + duration_s
    rss = [(0.0, tree_rss_mb(server.proc.pid))]

    def client_loop() -> None:
        with httpx.Client(timeout=60) as client:
            while time.monotonic() < end:
                case = cases[next(next_case) % len(cases)]
                try:
                    status: int | str = case.send(client, server.url)
                except httpx.HTTPError as e:
                    status = type(e).__name__
                with lock:
                    statuses[case.name][status] += 1

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(concurrency)]
    if crowd is not None:
        crowd.__enter__()
    for t in threads:
        t.start()
    bar = tqdm(total=round(warmup_s + duration_s), desc=f"soak {name}", unit="s", disable=not progress)
    while (now := time.monotonic()) < end:
        time.sleep(min(1.0, end - now))
        rss.append((time.monotonic() - start, tree_rss_mb(server.proc.pid)))
        bar.n = round(time.monotonic() - start)
        bar.set_postfix(requests=sum(sum(c.values()) for c in statuses.values()), rss_mb=f"{rss[-1][1]:.0f}")
    bar.close()
    for t in threads:
        t.join(timeout=90)
    if crowd is not None:
        crowd.__exit__(None, None, None)

    def count(good: bool, test: Callable[[int | str], bool]) -> int:
        return sum(n for case in cases if case.good == good
                   for status, n in statuses[case.name].items() if test(status))

    def is_5xx(status: int | str) -> bool:
        return not isinstance(status, int) or status >= 500  # connection errors count as server failures

    warm_rss = next(mb for t, mb in rss if t >= warmup_s) if rss[-1][0] >= warmup_s else rss[-1][1]
    summary = {
        "kind": "soak", "server": name, "duration_s": duration_s, "warmup_s": warmup_s, "concurrency": concurrency,
        "requests": sum(sum(c.values()) for c in statuses.values()),
        "good_requests": count(True, lambda s: True), "good_ok": count(True, lambda s: s == 200),
        "good_5xx": count(True, is_5xx), "bad_requests": count(False, lambda s: True),
        "bad_4xx": count(False, lambda s: isinstance(s, int) and 400 <= s < 500), "bad_5xx": count(False, is_5xx),
        "rss_start_mb": round(rss[0][1], 1), "rss_warm_mb": round(warm_rss, 1), "rss_end_mb": round(rss[-1][1], 1),
        "rss_max_mb": round(max(mb for _, mb in rss), 1),
        "rss_growth_pct": round(100 * (rss[-1][1] - warm_rss) / warm_rss, 2),
        "rss_samples": [[round(t, 1), round(mb, 1)] for t, mb in rss],
        **(crowd.stats() if crowd is not None else {}),
    }
    summary["passed"] = (summary["good_5xx"] == 0 and summary["good_ok"] == summary["good_requests"]
                         and summary["bad_4xx"] == summary["bad_requests"] and not summary.get("stalled_late")
                         and summary["rss_growth_pct"] <= 100 * rss_tolerance)
    rows = [summary]
    for case in cases:
        rows.append({"kind": "soak-case", "server": name, "case": case.name, "good": case.good,
                     "requests": sum(statuses[case.name].values()),
                     "statuses": json.dumps({str(k): v for k, v in sorted(statuses[case.name].items(), key=str)})})
    return rows


def run_soak(server_name: str, server_args: str, duration_s: float, concurrency: int, warmup_s: float,
             rss_tolerance: float, stalled: int = 0) -> tuple[list[dict], int]:
    """Start `roofserve serve SERVER_NAME SERVER_ARGS` on 127.0.0.1, soak it with the cases that fit the
    caps it reports at /info and `stalled` stalled clients, stop it; (rows, the server's exit code)."""
    import shlex

    from roofserve.examples import example_images
    from roofserve.load.process import start_server, stop_process_group

    server = start_server([server_name, *shlex.split(server_args)], ready_timeout_s=900)
    try:
        cfg = httpx.get(server.url + "/info", timeout=10).json()["model"]["config"]  # the caps the server runs with
        cases = (vision_cases(example_images(), cfg["max_payload_bytes"]) if server_name == "vision"
                 else llm_cases(cfg["max_seq_len"], cfg["max_payload_bytes"]))
        path = "/predict" if server_name == "vision" else "/v1/chat/completions"
        crowd = Crowd(server.url, stalled, KINDS, limits_from(cfg), path) if stalled else None
        rows = soak(server, cases, duration_s, concurrency, server_name, warmup_s, rss_tolerance, crowd=crowd)
    finally:
        exit_code = stop_process_group(server.proc)
    rows[0]["server_exit_code"] = exit_code
    return rows, exit_code
