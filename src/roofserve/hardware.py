"""What this machine can do: measured peaks (matmul FLOP/s per dtype, memory bandwidth) and the
datasheet figures of common GPUs, plus a description of the machine for result files."""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)

# Dense (no sparsity) datasheet peaks: TFLOP/s per dtype and memory bandwidth in GB/s.
DATASHEET = {
    "T4": {"fp32": 8.1, "fp16": 65.0, "bf16": None, "tf32": None, "bandwidth_gb_s": 320},
    "L4": {"fp32": 30.3, "fp16": 121.0, "bf16": 121.0, "tf32": 60.0, "bandwidth_gb_s": 300},
    "A10G": {"fp32": 31.2, "fp16": 125.0, "bf16": 125.0, "tf32": 62.5, "bandwidth_gb_s": 600},
    "A100-SXM4-40GB": {"fp32": 19.5, "fp16": 312.0, "bf16": 312.0, "tf32": 156.0, "bandwidth_gb_s": 1555},
    "A100-SXM4-80GB": {"fp32": 19.5, "fp16": 312.0, "bf16": 312.0, "tf32": 156.0, "bandwidth_gb_s": 2039},
    "H100-SXM": {"fp32": 67.0, "fp16": 989.0, "bf16": 989.0, "tf32": 495.0, "bandwidth_gb_s": 3350},
    "H100-PCIe": {"fp32": 51.0, "fp16": 756.0, "bf16": 756.0, "tf32": 378.0, "bandwidth_gb_s": 2000},
    "H200": {"fp32": 67.0, "fp16": 989.0, "bf16": 989.0, "tf32": 495.0, "bandwidth_gb_s": 4800},
}


def datasheet_for(gpu_name: str | None) -> tuple[str, dict] | None:
    """Match a CUDA device name such as 'NVIDIA H100 80GB HBM3' to a datasheet row."""
    if not gpu_name:
        return None
    name = gpu_name.upper()
    if "H200" in name:
        return "H200", DATASHEET["H200"]
    if "H100" in name:
        key = "H100-PCIe" if "PCIE" in name else "H100-SXM"
        return key, DATASHEET[key]
    if "A100" in name:
        key = "A100-SXM4-80GB" if "80GB" in name else "A100-SXM4-40GB"
        return key, DATASHEET[key]
    for key in ("A10G", "L4", "T4"):
        if key in name:
            return key, DATASHEET[key]
    return None


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict:
    """CPU, cores, memory and GPU of this machine, for every result file."""
    import psutil

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "gpu": gpu,
        "gpu_count": torch.cuda.device_count(),
        "platform": platform.platform(),
    }


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "litserve", "timm", "transformers", "torchao", "llama_cpp_python", "roofserve"):
        try:
            out[name] = md.version(name.replace("_", "-"))
        except md.PackageNotFoundError:
            pass
    return out


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


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


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


def measure_bandwidth_gb_s(device: torch.device, size_bytes: int | None = None) -> list[Peak]:
    """Large copy (bytes read + bytes written), a read-only reduction (bytes read), and the weight
    bytes a one-token bf16 linear layer reads per second (see measure_gemv_gb_s)."""
    size_bytes = size_bytes or (2 << 30 if device.type == "cuda" else 512 << 20)
    copy_s, read_s = _copy_and_read_s(size_bytes, device)  # its buffers are freed before the GEMV test
    return [
        Peak("bandwidth", "copy", device.type, 2 * size_bytes / copy_s / 1e9, "GB/s", size_bytes),
        Peak("bandwidth", "read", device.type, size_bytes / read_s / 1e9, "GB/s", size_bytes),
        measure_gemv_gb_s(device, size_bytes=size_bytes // 2),
    ]


def _copy_and_read_s(size_bytes: int, device: torch.device) -> tuple[float, float]:
    src = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return median_time_s(lambda: dst.copy_(src), device), median_time_s(lambda: src.sum(), device)


def measure_gemv_gb_s(device: torch.device, dtype: torch.dtype = torch.bfloat16, shape: tuple[int, int] = (1536, 576),
                      size_bytes: int = 256 << 20, linear=torch.nn.functional.linear, label: str = "") -> Peak:
    """Weight bytes per second that one-row matmuls (a decode step's linear layers; the default is
    SmolLM2's MLP shape) read from a set of weights too big for the caches. The plain read bandwidth
    is the roof; this is what the matmul kernel (torch's, or `linear(x, w)`, named by `label`) reaches
    under it, so a decode step near this number is limited by the kernel, not by the code around it."""
    out_features, in_features = shape
    weight_bytes = out_features * in_features * torch.finfo(dtype).bits // 8
    weights = [torch.randn(out_features, in_features, device=device).to(dtype)
               for _ in range(max(1, size_bytes // weight_bytes))]
    x = torch.randn(1, in_features, device=device).to(dtype)

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
