"""The vision load generator: image requests against any classifier URL, per concurrency level or
Poisson rate, with latency percentiles and the machine's CPU/GPU use. No torch."""

from __future__ import annotations

import base64
import json
import logging

from tqdm import tqdm

from roofserve.config import PAYLOADS, VisionLoadConfig
from roofserve.errors import UserError
from roofserve.load import core
from roofserve.load.http import Connection, run_loop
from roofserve.load.monitor import Monitor

log = logging.getLogger(__name__)
MAX_IN_FLIGHT = 512  # an open-loop level's connections at most; later arrivals wait for one


def prepare_requests(images: list[tuple[str, bytes]], payload: str) -> list[tuple[dict[str, str], bytes]]:
    """(headers, body) per image, encoded once before the clock starts."""
    out = []
    for name, data in images:
        ctype = "image/png" if name.lower().endswith(".png") else "image/jpeg"
        if payload == "raw":
            out.append(({"Content-Type": ctype}, data))
        elif payload == "base64":
            body = json.dumps({"image": base64.b64encode(data).decode()}).encode()
            out.append(({"Content-Type": "application/json"}, body))
        elif payload == "multipart":
            boundary = "roofserve-boundary-7e3f"
            body = (
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                f"Content-Type: {ctype}\r\n\r\n"
            ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
            out.append(({"Content-Type": f"multipart/form-data; boundary={boundary}"}, body))
        else:
            raise UserError(f"payload must be one of {', '.join(PAYLOADS)}")
    return out


def image_sender(images: list[tuple[str, bytes]], payload: str, path: str = "/predict",
                 api_key: str | None = None) -> core.Send:
    """A Send that posts the images in turn, encoded once up front."""
    prepared = prepare_requests(images, payload)

    async def send(conn: Connection, i: int) -> core.RequestResult:
        headers, body = prepared[i % len(prepared)]
        if api_key:
            headers = {**headers, "X-API-Key": api_key}
        status, _ = await conn.request("POST", path, headers, body)
        ok = 200 <= status < 300
        return core.RequestResult(ok=ok, status=status, error=None if ok else f"HTTP {status}")

    return send


def bench_api(url: str, images: list[tuple[str, bytes]], load: VisionLoadConfig, api_key: str | None = None,
              progress: bool = True, server_pid: int | None = None) -> list[dict]:
    """One row per load level: req/s, latency percentiles, errors, CPU % and GPU %; given the server's
    pid (a server this process started), the CPU milliseconds per request of each kind of its processes."""
    payload, requests, duration_s = load.payload, load.requests, load.duration_s
    base, _, path = url.partition("//")[2].partition("/")
    base_url, path = f"http://{base}", "/" + path if path else "/predict"
    send = image_sender(images, payload, path, api_key)

    server_config = _server_config(base_url, api_key)
    levels = [("concurrency", c) for c in load.concurrency] + [("rate_per_s", r) for r in load.rate]
    rows = []
    bar = tqdm(total=len(levels) * requests, desc="api sweep", disable=None if progress else True, leave=False)
    for mode, level in levels:
        with Monitor(server_pid=server_pid) as mon:
            pattern = (core.Concurrency(int(level)) if mode == "concurrency"
                       else core.Rate(float(level), max_in_flight=MAX_IN_FLIGHT))
            warmup = load.warmup if mode == "concurrency" else 0
            results, wall = run_loop(core.run(lambda: Connection(base_url), send, pattern, requests, duration_s,
                                              warmup, bar.update))
        row = {"kind": "vision-api", "url": url, "payload": payload, "mode": mode, mode: level, "config": server_config}
        row.update(core.summarize(results, wall).row())
        row.update(mon.summary())
        answered = len(results) + warmup  # the warm-up ran in the window
        if mon.cpu_s_by_role and answered:
            row["cpu_ms_per_request"] = {role: round(1e3 * s / answered, 2) for role, s in mon.cpu_s_by_role.items()
                                         if s > 0}
        rows.append(row)
    bar.close()
    return rows


def _server_config(base_url: str, api_key: str | None) -> dict | None:
    """The config a roofserve server reports at /info (None for other servers)."""
    import urllib.request

    request = urllib.request.Request(base_url + "/info", headers={"X-API-Key": api_key} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())["model"]["config"]
    except Exception:
        return None
