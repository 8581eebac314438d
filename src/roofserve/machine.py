"""This machine for result files (CPU, cores, memory, GPU, library versions), the datasheet figures of
common GPUs, and the open-file limit (servers and load generators hold many sockets). No torch at
import: the client side (load generator, report) uses it too."""

from __future__ import annotations

import os
import platform
import resource
import sys

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


def cache_bytes() -> int | None:
    """The CPU's last-level cache in bytes as the OS reports it (Linux sysfs; None where unknown): what a
    bandwidth test's buffer must exceed to read from DRAM. On a shared VM it can be far more than a
    process gets, so which roof a model gets is measured (measure.peaks.measure_read_gb_s), not read here."""
    from pathlib import Path

    levels = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
            levels.append((int((index / "level").read_text()), int(size.rstrip("KMG")) * scale))
        except (OSError, ValueError):
            continue
    return max(levels)[1] if levels else None


def describe_machine() -> dict:
    """CPU, cores, memory and GPU of this machine, for every result file."""
    import psutil

    torch = sys.modules.get("torch")  # a client-side run (no torch loaded) reports no GPU: it uses none
    cuda = torch is not None and torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else None
    cache = cache_bytes()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "cache_mb": round(cache / 2**20) if cache else None,
        "gpu": gpu,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "platform": platform.platform(),
    }


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "litserve", "timm", "transformers", "torchao", "llama_cpp_python", "onnx",
                 "onnxruntime", "openvino", "nncf", "roofserve"):
        try:
            out[name] = md.version(name.replace("_", "-"))
        except md.PackageNotFoundError:
            pass
    return out


def raise_fd_limit(needed: int) -> int:
    """Raise this process's open-file limit toward `needed` (up to the hard limit); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft
