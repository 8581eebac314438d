"""Timing done right: warm up, synchronize the device, then time; never count a compile or warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time_s(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of fn() after warm-up, with the device synchronized around each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_rate(fn: Callable[[], object], items_per_call: int, min_time_s: float, warmup: int = 2,
               device: torch.device | None = None) -> float:
    """Items per second of fn() after warm-up, over at least min_time_s and 3 calls."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    _sync(device)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < min_time_s:
        fn()
        calls += 1
    _sync(device)
    return calls * items_per_call / (time.perf_counter() - start)
