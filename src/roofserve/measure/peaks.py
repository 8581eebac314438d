"""What this machine can do, measured: matmul FLOP/s per dtype and memory bandwidth (plain reads,
copies, and the weight bytes one-row matmuls stream). Datasheet figures live in roofserve.machine."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

import torch

from roofserve.device import DTYPE_NAMES
from roofserve.measure.timing import median_time_s

log = logging.getLogger(__name__)

@dataclass
class Peak:
    resource: str  # "matmul" or "bandwidth"
    name: str  # dtype, or "copy" / "read"
    device: str
    value: float  # TFLOP/s for matmul, GB/s for bandwidth
    unit: str
    size: int

    def row(self) -> dict:
        return {"kind": "peak", **asdict(self)}


def measure_matmul_tflops(dtype: torch.dtype, device: torch.device, n: int | None = None) -> Peak:
    """FLOP/s of one large square matmul: 2 * n^3 FLOPs per call."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = median_time_s(lambda: torch.mm(a, b), device, repeats=10 if device.type == "cuda" else 5)
    name = DTYPE_NAMES[dtype]
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        name = "tf32"
    return Peak("matmul", name, device.type, 2 * n**3 / seconds / 1e12, "TFLOP/s", n)


def dram_buffer_bytes(device: torch.device) -> int:
    """A buffer that cannot sit in the caches: 4x the CPU's last-level cache (at least 512 MiB, at most
    an eighth of the memory), or 2 GiB on a GPU."""
    if device.type == "cuda":
        return 2 << 30
    from roofserve.machine import cache_bytes

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(max(512 << 20, 4 * (cache_bytes() or 0)), max(512 << 20, memory // 8))


def measure_bandwidth_gb_s(device: torch.device, size_bytes: int | None = None, copy: bool = True) -> list[Peak]:
    """A read-only reduction over a buffer several times the caches (bytes read: the DRAM roof), a copy
    of it (bytes read + written; skipped with copy=False), and the weight bytes a one-token bf16 linear
    layer reads per second (see measure_gemv_gb_s)."""
    size_bytes = size_bytes or dram_buffer_bytes(device)
    peaks = []
    if copy:
        peaks.append(Peak("bandwidth", "copy", device.type, 2 * size_bytes / _copy_s(size_bytes, device) / 1e9,
                          "GB/s", size_bytes))
    peaks.append(Peak("bandwidth", "read", device.type, measure_read_gb_s(size_bytes, device), "GB/s", size_bytes))
    peaks.append(measure_gemv_gb_s(device, size_bytes=size_bytes // 2))
    return peaks


def measure_read_gb_s(size_bytes: int, device: torch.device) -> float:
    """GB/s of reading a buffer of size_bytes over and over: at a model's bytes per token, the rate its
    decode steps could read them at, from the caches as far as they hold them (a CPU's reported cache
    size says little about that on a shared VM: measure it)."""
    src = torch.ones(max(1, size_bytes // 4), dtype=torch.float32, device=device)
    return size_bytes / median_time_s(lambda: src.sum(), device) / 1e9


def _copy_s(size_bytes: int, device: torch.device) -> float:
    src = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return median_time_s(lambda: dst.copy_(src), device)


def measure_gemv_gb_s(device: torch.device, dtype: torch.dtype = torch.bfloat16, shape: tuple[int, int] = (1536, 576),
                      size_bytes: int | None = None, linear=torch.nn.functional.linear, label: str = "",
                      prepare=None) -> Peak:
    """Weight bytes per second that one-row matmuls (a decode step's linear layers; the default is
    SmolLM2's MLP shape) read from a set of weights too big for the caches. The plain read bandwidth
    is the roof; this is what the matmul kernel (torch's, or `linear(x, w)`, named by `label`) reaches
    under it, so a decode step near this number is limited by the kernel, not by the code around it.
    `prepare(w)` turns each weight into what `linear` takes (a packed layout), outside the clock."""
    size_bytes = size_bytes or dram_buffer_bytes(device) // 2
    out_features, in_features = shape
    weight_bytes = out_features * in_features * torch.finfo(dtype).bits // 8
    # constant weights: the time does not depend on the values, and filling is far faster than randn
    weights = [torch.full((out_features, in_features), 0.01, dtype=dtype, device=device)
               for _ in range(max(1, size_bytes // weight_bytes))]
    x = torch.randn(1, in_features, device=device).to(dtype)
    if prepare is not None:
        weights = [prepare(w) for w in weights]

    def all_layers() -> None:
        for w in weights:
            linear(x, w)

    seconds = median_time_s(all_layers, device, warmup=2, repeats=5)
    name = f"gemv-{DTYPE_NAMES[dtype]}" + (f"-{label}" if label else "")
    total = weight_bytes * len(weights)
    return Peak("bandwidth", name, device.type, total / seconds / 1e9, "GB/s", total)


def measure_peaks(device: torch.device) -> list[Peak]:
    dtypes = [torch.float32, torch.bfloat16]
    if device.type == "cuda":
        dtypes.append(torch.float16)
    peaks = []
    for dtype in dtypes:
        peaks.append(measure_matmul_tflops(dtype, device))
    if device.type == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        peaks.append(measure_matmul_tflops(torch.float32, device))
        torch.backends.cuda.matmul.allow_tf32 = old
    peaks.extend(measure_bandwidth_gb_s(device))
    return peaks


def peak_lookup(rows: list[dict], resource: str, name: str) -> float | None:
    """A measured peak from result rows, e.g. ("matmul", "bf16") in TFLOP/s or ("bandwidth", "read") in GB/s."""
    for row in rows:
        if row.get("kind") == "peak" and row["resource"] == resource and row["name"] == name:
            return row["value"]
    return None
