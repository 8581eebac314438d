"""The vision ceilings, in-process: model-only img/s per precision and batch size (with FLOPs, MFU
and the compute roof), and decode + preprocess + model without HTTP."""

from __future__ import annotations

import logging
import os
import statistics

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


def runtime_pairs(ceilings: VisionCeilingsConfig, device: torch.device) -> list[tuple[str, str]]:
    """The (runtime, precision) pairs to measure: each runtime in each precision it runs here. A runtime
    that is not installed, or a pair it does not run, is skipped with a warning."""
    from roofserve.errors import UserError
    from roofserve.vision.runtimes import resolve

    pairs = []
    for runtime in ceilings.runtimes:
        for precision in ceilings.precisions:
            try:
                pair = resolve(runtime, precision, device)
            except UserError as e:
                log.warning("skipping %s %s: %s", runtime, precision, e)
                continue
            if pair not in pairs:
                pairs.append(pair)
    return pairs


def bench_model(model: str, weights: str | None, device: str, ceilings: VisionCeilingsConfig,
                peak_rows: list[dict] | None = None) -> list[dict]:
    """Model-only images/s per runtime, precision and batch size, with FLOPs, MFU and the compute roof;
    and the accuracy guard's row for each runtime and precision."""
    from roofserve.measure.accuracy import check_accuracy, photo_batch, reference_probs
    from roofserve.vision.model import build_classifier
    from roofserve.vision.runtimes import build_runner

    dev = resolve_device(device)
    batch_sizes, min_time_s, channels_last = ceilings.batch_sizes, ceilings.min_time_s, ceilings.channels_last
    net, pre = build_classifier(model, weights, "cpu", "fp32", channels_last=False)
    flops = roofline.count_flops(net, torch.zeros(1, 3, pre.input_size, pre.input_size, dtype=torch.uint8))
    reference = None
    if ceilings.accuracy:
        photos, _ = photo_batch(pre)
        reference = reference_probs(model, weights, photos)
    del net
    # every runner is built first, then measured in alternating rounds: a shared machine's speed can drift
    # by tens of percent within minutes, and configs are compared only side by side
    runners, rows = [], []
    for runtime, precision in runtime_pairs(ceilings, dev):
        compile = ceilings.compile and runtime == "torch"
        runner = build_runner(model, weights, dev, runtime, precision, channels_last, compile)
        runners.append((runner, compile))
        if ceilings.accuracy:
            rows.append({**check_accuracy(runner, model, weights, reference), "device": dev.type, "compile": compile})
    rates: dict[tuple[int, int], list[float]] = {}
    points = [(b, i) for b in batch_sizes for i in range(len(runners))]
    with tqdm(total=ceilings.rounds * len(points), desc="model-only", leave=False, disable=None) as bar:
        for _ in range(ceilings.rounds):
            for batch, i in points:
                images = torch.randint(0, 256, (batch, 3, pre.input_size, pre.input_size), dtype=torch.uint8, device=dev)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                rates.setdefault((batch, i), []).append(
                    timed_rate(lambda: runners[i][0](images), batch, min_time_s / ceilings.rounds, device=dev))
                bar.update()
    for i, (runner, compile) in enumerate(runners):
        # int8 is compared with the bf16 matmul peak (its own int8 peak is not measured)
        peak = peak_lookup(peak_rows or [], "matmul", runner.precision if runner.precision != "int8" else "bf16")
        for batch in batch_sizes:
            rounds = rates[(batch, i)]
            rate = statistics.median(rounds)
            rows.append(
                {
                    "kind": "vision-model",
                    "model": model,
                    "runtime": runner.runtime,
                    "precision": runner.precision,
                    "batch_size": batch,
                    "channels_last": channels_last,
                    "compile": compile,
                    "device": dev.type,
                    "img_per_s": round(rate, 2),
                    "rounds_img_per_s": [round(r, 2) for r in rounds],
                    "flops_per_image": flops,
                    "achieved_tflops": round(rate * flops / 1e12, 4),
                    "peak_tflops": peak,
                    "mfu": round(roofline.mfu(rate, flops, peak), 4) if peak else None,
                    "compute_roof_img_per_s": round(roofline.compute_roof_per_s(flops, peak), 1) if peak else None,
                }
            )
    return rows


def measure_decode(images: list[tuple[str, bytes]], pre, min_time_s: float) -> list[dict]:
    """Decode + resize + crop per image, with its format, size and (for JPEG) whether it is progressive:
    progressive JPEGs and PNGs cost several times a baseline JPEG of the same size."""
    import io

    from PIL import Image

    from roofserve.vision.preprocess import decode

    rows = []
    for name, data in images:
        img = Image.open(io.BytesIO(data))
        rate = timed_rate(lambda: decode(data, pre, 10**9), 1, min_time_s)
        rows.append({"kind": "vision-decode", "image": name, "format": img.format, "width": img.size[0],
                     "height": img.size[1], "bytes": len(data), "progressive": bool(img.info.get("progressive")),
                     "decode_ms": round(1e3 / rate, 3)})
    return rows


def bench_pipeline(model: str, weights: str | None, device: str, ceilings: VisionCeilingsConfig,
                   images: list[tuple[str, bytes]], lanes: list[int] | None = None) -> list[dict]:
    """Decode + preprocess + model without HTTP: the ceiling a server can approach.

    Measured as a server runs: one lane (a process) with all cores, and one lane per core with one
    thread each, so that decoding one batch overlaps the model on another, as two server workers do.
    Lanes are processes, not threads: a runtime's own thread pool and the GIL would otherwise couple
    them in ways the server's worker processes are not.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from roofserve.vision.runtimes import resolve

    dev = resolve_device(device)
    runtime, precision = resolve(ceilings.pipeline_runtime, ceilings.pipeline_precision, dev)
    cores = os.cpu_count() or 1
    rows = []
    for lane_count in tqdm(lanes or sorted({1, cores}), desc="pipeline", leave=False, disable=None):
        context = mp.get_context("spawn")
        barrier = context.Manager().Barrier(lane_count)
        threads = max(1, cores // lane_count)
        job = (model, weights, dev.type, runtime, precision, ceilings.channels_last, threads, images,
               ceilings.pipeline_batch_sizes, ceilings.min_time_s, barrier)
        with ProcessPoolExecutor(lane_count, mp_context=context) as pool:
            lane_rates = list(pool.map(_pipeline_lane, [job] * lane_count))
        for i, batch in enumerate(ceilings.pipeline_batch_sizes):
            rows.append({
                "kind": "vision-pipeline", "model": model, "runtime": runtime, "precision": precision,
                "batch_size": batch, "device": dev.type, "lanes": lane_count, "threads": threads,
                "img_per_s": round(sum(rates[i] for rates, _ in lane_rates), 2),
                "decode_ms_per_image": lane_rates[0][1],
            })
    pre = _preprocess_of(model, weights)
    return measure_decode(images, pre, ceilings.min_time_s / len(images)) + rows


def _preprocess_of(model: str, weights: str | None):
    from roofserve.vision.model import build_net

    return build_net(model, weights)[1]


def _pipeline_lane(job: tuple) -> tuple[list[float], float]:
    """One lane in its own process: (img/s per batch size, decode ms per image), timed in step with the
    other lanes (the barrier) so that they share the cores as server workers do."""
    (model, weights, device, runtime, precision, channels_last, threads, images, batch_sizes, min_time_s,
     barrier) = job
    from roofserve.vision.preprocess import decode, to_batch
    from roofserve.vision.runtimes import build_runner

    torch.set_num_threads(threads)
    runner = build_runner(model, weights, device, runtime, precision, channels_last, compile=False, threads=threads)
    datas = [data for _, data in images]
    barrier.wait()
    decode_rate = timed_rate(lambda: [decode(d, runner.pre, 10**9) for d in datas], len(datas), min_time_s)
    rates = []
    for batch in batch_sizes:
        chunk = [datas[i % len(datas)] for i in range(batch)]
        runner(to_batch([decode(d, runner.pre, 10**9) for d in chunk]))
        barrier.wait()
        rates.append(timed_rate(lambda: runner(to_batch([decode(d, runner.pre, 10**9) for d in chunk])), batch,
                                min_time_s, device=torch.device(device)))
    return rates, round(1e3 / decode_rate, 3)
