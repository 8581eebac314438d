"""Vision benchmarks: model-only throughput, the in-process pipeline, and API load sweeps."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from roofserve import roofline
from roofserve.bench import load
from roofserve.bench.http import Connection
from roofserve.bench.monitor import Monitor
from roofserve.errors import UserError

log = logging.getLogger(__name__)
PAYLOADS = ("raw", "base64", "multipart")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def example_images(folder: str | None = None) -> list[tuple[str, bytes]]:
    """Images to send: those in `folder`, or the photos that scikit-image and foolbox ship."""
    if folder:
        paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not paths:
            raise UserError(f"no .jpg/.png/.webp images in {folder}")
    else:
        paths = []
        for package, names in (
            ("skimage", ("data/chelsea.png", "data/coffee.png", "data/astronaut.png")),
            ("foolbox", ("data/imagenet_00_243.jpg", "data/imagenet_16_251.jpg", "data/imagenet_01_559.jpg")),
        ):
            spec = importlib.util.find_spec(package)
            if spec and spec.submodule_search_locations:
                root = Path(spec.submodule_search_locations[0])
                paths += [root / n for n in names if (root / n).is_file()]
        if not paths:
            raise UserError("no example images: pass --images DIR, or pip install scikit-image and foolbox (--no-deps)")
    return [(p.name, p.read_bytes()) for p in paths]


def _timed_rate(fn, items_per_call: int, min_time_s: float, warmup: int = 2, sync=None) -> float:
    """Items per second of fn() after warm-up, over at least min_time_s and 3 calls."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < min_time_s:
        fn()
        calls += 1
    if sync:
        sync()
    return calls * items_per_call / (time.perf_counter() - start)


def bench_model(
    model: str,
    weights: str | None,
    precisions: list[str],
    batch_sizes: list[int],
    device: str = "cpu",
    channels_last: bool = True,
    compile: bool = False,
    min_time_s: float = 1.0,
    peak_rows: list[dict] | None = None,
) -> list[dict]:
    """Model-only images/s per precision and batch size, with FLOPs, MFU and the compute roof."""
    from roofserve.hardware import peak_lookup
    from roofserve.vision.model import build_classifier, resolve_device, resolve_precision

    dev = resolve_device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    rows = []
    for precision in dict.fromkeys(resolve_precision(p, dev) for p in precisions):
        net, pre = build_classifier(model, weights, dev, precision, channels_last, compile=False)
        example = torch.zeros(1, 3, pre.input_size, pre.input_size, dtype=torch.uint8, device=dev)
        flops = roofline.count_flops(net, example)
        runner = torch.compile(net, dynamic=False) if compile else net
        peak = peak_lookup(peak_rows or [], "matmul", precision)
        for batch in tqdm(batch_sizes, desc=f"model {precision}", leave=False, disable=None):
            images = torch.randint(0, 256, (batch, 3, pre.input_size, pre.input_size), dtype=torch.uint8, device=dev)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)

            def step():
                with torch.inference_mode():
                    runner(images)

            rate = _timed_rate(step, batch, min_time_s, sync=sync)
            rows.append(
                {
                    "kind": "vision-model",
                    "model": model,
                    "precision": precision,
                    "batch_size": batch,
                    "channels_last": channels_last,
                    "compile": compile,
                    "device": dev.type,
                    "img_per_s": round(rate, 2),
                    "flops_per_image": flops,
                    "achieved_tflops": round(rate * flops / 1e12, 4),
                    "peak_tflops": peak,
                    "mfu": round(roofline.mfu(rate, flops, peak), 4) if peak else None,
                    "compute_roof_img_per_s": round(roofline.compute_roof_per_s(flops, peak), 1) if peak else None,
                }
            )
    return rows


def bench_pipeline(
    model: str,
    weights: str | None,
    precision: str,
    batch_sizes: list[int],
    images: list[tuple[str, bytes]],
    device: str = "cpu",
    channels_last: bool = True,
    min_time_s: float = 1.0,
    lanes: list[int] | None = None,
) -> list[dict]:
    """Decode + preprocess + model in one process (no HTTP): the ceiling a server can approach.

    Measured two ways, like a server can run: one lane with all cores for torch, and one lane per
    core (Python threads; PIL and torch release the GIL) with one torch thread each, so decoding
    one batch overlaps the model on another, as two server workers do.
    """
    from concurrent.futures import ThreadPoolExecutor

    from roofserve.vision.model import build_classifier, resolve_device, resolve_precision
    from roofserve.vision.preprocess import decode, to_batch

    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    net, pre = build_classifier(model, weights, dev, precision, channels_last)
    datas = [data for _, data in images]
    decode_rate = _timed_rate(lambda: [decode(d, pre, 10**9) for d in datas], len(datas), min_time_s)
    cores = os.cpu_count() or 1
    lanes = lanes or sorted({1, cores})
    threads_before = torch.get_num_threads()
    rows = []
    try:
        for lane_count in lanes:
            torch.set_num_threads(max(1, cores // lane_count))
            for batch in tqdm(batch_sizes, desc=f"pipeline x{lane_count}", leave=False, disable=None):
                chunk = [datas[i % len(datas)] for i in range(batch)]

                def step():
                    x = to_batch([decode(d, pre, 10**9) for d in chunk]).to(dev)
                    with torch.inference_mode():
                        net(x).cpu()

                def lane() -> float:
                    return _timed_rate(step, batch, min_time_s)

                with ThreadPoolExecutor(lane_count) as pool:
                    rate = sum(pool.map(lambda _: lane(), range(lane_count)))
                rows.append({
                    "kind": "vision-pipeline", "model": model, "precision": precision, "batch_size": batch,
                    "device": dev.type, "lanes": lane_count, "threads": torch.get_num_threads(),
                    "img_per_s": round(rate, 2), "decode_ms_per_image": round(1e3 / decode_rate, 3),
                })
    finally:
        torch.set_num_threads(threads_before)
    return rows


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


def bench_api(
    url: str,
    images: list[tuple[str, bytes]],
    payload: str = "raw",
    concurrencies: list[int] = (1, 8, 32),
    rates: list[float] = (),
    requests: int = 400,
    duration_s: float = 60.0,
    warmup_requests: int = 16,
    api_key: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """One row per load level: req/s, latency percentiles, errors, CPU % and GPU %."""
    base, _, path = url.partition("//")[2].partition("/")
    base_url, path = f"http://{base}", "/" + path if path else "/predict"
    prepared = prepare_requests(images, payload)
    counter = iter(range(1 << 62))

    async def send(conn: Connection) -> int:
        headers, body = prepared[next(counter) % len(prepared)]
        if api_key:
            headers = {**headers, "X-API-Key": api_key}
        status, _ = await conn.request("POST", path, headers, body)
        return status

    server_config = _server_config(base_url, api_key)
    levels = [("concurrency", c) for c in concurrencies] + [("rate_per_s", r) for r in rates]
    rows = []
    bar = tqdm(total=len(levels) * requests, desc="api sweep", disable=None if progress else True, leave=False)
    for mode, level in levels:
        with Monitor() as mon:
            if mode == "concurrency":
                run = load.closed_loop(base_url, send, int(level), requests, duration_s, warmup_requests, bar.update)
            else:
                run = load.poisson(base_url, send, float(level), requests, duration_s, on_done=bar.update)
            results, wall = asyncio.run(run)
        row = {"kind": "vision-api", "url": url, "payload": payload, "mode": mode, mode: level, "config": server_config}
        row.update(load.summarize(results, wall))
        row.update(mon.summary())
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
