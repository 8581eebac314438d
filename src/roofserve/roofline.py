"""Theoretical maxima: FLOPs per image -> compute roof, and the utilisation of a measured rate."""

from __future__ import annotations

import torch
from torch import nn


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass, counted by torch.utils.flop_counter.

    The counter reports 2 FLOPs per multiply-accumulate (FLOPs = 2 x MACs) for convolutions and
    matmuls; elementwise work (activations, batch norm, softmax) is not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(example)
    return int(counter.get_total_flops())


def compute_roof_per_s(flops_per_item: float, peak_tflops: float) -> float:
    """Items per second if every FLOP ran at the peak rate."""
    return peak_tflops * 1e12 / flops_per_item


def mfu(items_per_s: float, flops_per_item: float, peak_tflops: float) -> float:
    """Model FLOP utilisation: achieved FLOP/s over peak FLOP/s."""
    return items_per_s * flops_per_item / (peak_tflops * 1e12)


def memory_roof_per_s(bytes_per_item: float, bandwidth_gb_s: float) -> float:
    """Items per second if each item only had to move bytes_per_item at the peak bandwidth."""
    return bandwidth_gb_s * 1e9 / bytes_per_item
