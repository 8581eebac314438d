"""The vision ceilings, in-process: model-only img/s per precision and batch size (with FLOPs, MFU
and the compute roof), and decode + preprocess + model without HTTP."""

from __future__ import annotations

import logging
import os

import torch
from tqdm import tqdm

from roofserve.config import VisionCeilingsConfig
from roofserve.device import resolve_device
from roofserve.measure import roofline
from roofserve.measure.peaks import peak_lookup
from roofserve.measure.timing import timed_rate

log = logging.getLogger(__name__)


def measure_ceilings(model: str, weights: str | None, device: str, ceilings: VisionCeilingsConfig,
                     images: list[tuple[str, bytes]], peak_rows: list[dict]) -> list[dict]:
    """Model-only rows, then the in-process pipeline's (unless it has no batch sizes)."""
    rows = bench_model(model, weights, device, ceilings, peak_rows)
    if ceilings.pipeline_batch_sizes:
        rows += bench_pipeline(model, weights, device, ceilings, images)
    return rows


def bench_model(model: str, weights: str | None, device: str, ceilings: VisionCeilingsConfig,
                peak_rows: list[dict] | None = None) -> list[dict]:
    """Model-only images/s per precision and batch size, with FLOPs, MFU and the compute roof."""
    from roofserve.vision.model import build_classifier, resolve_precision

    dev = resolve_device(device)
    precisions, batch_sizes, min_time_s = ceilings.precisions, ceilings.batch_sizes, ceilings.min_time_s
    channels_last, compile = ceilings.channels_last, ceilings.compile
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

            rate = timed_rate(step, batch, min_time_s, device=dev)
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


def bench_pipeline(model: str, weights: str | None, device: str, ceilings: VisionCeilingsConfig,
                   images: list[tuple[str, bytes]], lanes: list[int] | None = None) -> list[dict]:
    """Decode + preprocess + model in one process (no HTTP): the ceiling a server can approach.

    Measured two ways, like a server can run: one lane with all cores for torch, and one lane per
    core (Python threads; PIL and torch release the GIL) with one torch thread each, so decoding
    one batch overlaps the model on another, as two server workers do.
    """
    from concurrent.futures import ThreadPoolExecutor

    from roofserve.vision.model import build_classifier, resolve_precision
    from roofserve.vision.preprocess import decode, to_batch

    dev = resolve_device(device)
    precision = resolve_precision(ceilings.pipeline_precision, dev)
    batch_sizes, channels_last, min_time_s = ceilings.pipeline_batch_sizes, ceilings.channels_last, ceilings.min_time_s
    net, pre = build_classifier(model, weights, dev, precision, channels_last)
    datas = [data for _, data in images]
    decode_rate = timed_rate(lambda: [decode(d, pre, 10**9) for d in datas], len(datas), min_time_s)
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
                    return timed_rate(step, batch, min_time_s, device=dev)

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
