"""One meaning of a device name for servers, peaks, benches and sweeps: `auto` is CUDA when torch
sees a GPU, else the CPU; `cuda` without a GPU is a one-line error."""

from __future__ import annotations

import torch

from roofserve.errors import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def resolve_device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda asked for, but torch sees no GPU; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"device must be one of auto, cpu, cuda; got {name!r}")
    return torch.device(name)


def resolve_accelerator(cfg) -> str:
    """'cpu' or 'cuda' for LitServe from a server config, refusing what this machine cannot run."""
    device = resolve_device(cfg.device)
    if cfg.precision == "fp16" and device.type == "cpu":
        raise UserError("fp16 is slow or unsupported on CPU; use --precision bf16 or fp32")
    return device.type
