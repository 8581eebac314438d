"""Theoretical maxima (pure arithmetic; torch only to count FLOPs): FLOPs per image -> compute roof,
and the utilisation of a measured rate."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def count_flops(model: torch.nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass, counted by torch.utils.flop_counter.

    The counter reports 2 FLOPs per multiply-accumulate (FLOPs = 2 x MACs) for convolutions and
    matmuls; elementwise work (activations, batch norm, softmax) is not counted.
    """
    import torch
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


# --- LLM decode: bytes read per generated token -------------------------------------------------
# At batch size 1 every weight is read once per token, so tokens/s <= bandwidth / bytes per token.
# Counted: every linear layer (the LM head too: with tied embeddings it reads the embedding table),
# the norms, and one embedding row; not counted: the rest of the embedding table (only one row of it
# is looked up). Activations are negligible at batch 1.
DENSE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def lm_head_params(config: dict) -> int:
    """Parameters of the LM head (vocab x hidden; with tied embeddings, the embedding table it reads)."""
    return config["vocab_size"] * config["hidden_size"]


def llm_shapes(config: dict) -> tuple[int, int]:
    """(parameters in linear layers incl. the LM head, parameters in norms + one embedding row)."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    per_layer = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2 + 3 * h * inter
    linear = layers * per_layer + lm_head_params(config)
    other = (2 * layers + 1) * h + h
    return linear, other


def weight_bytes_per_token(config: dict, fmt: str, group_size: int = 64, act_dtype: str = "bf16") -> int:
    """Weight bytes read per decoded token, at the weights' storage size.

    fmt: fp32 / bf16 / fp16 (dense), int8 (torchao weight-only: 1 byte + one scale per output row),
    int4 (torchao: half a byte + a scale and a zero point per group of `group_size`).
    Scales, zero points and the norms are in act_dtype.
    """
    linear, other = llm_shapes(config)
    if fmt in DENSE_BYTES:
        return (linear + other) * DENSE_BYTES[fmt]
    scale = DENSE_BYTES[act_dtype]
    if fmt == "int8":
        h, layers = config["hidden_size"], config["num_hidden_layers"]
        heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
        head_dim = config.get("head_dim") or h // heads
        rows = layers * (heads * head_dim + 2 * kv * head_dim + h + 2 * config["intermediate_size"] + h) + config["vocab_size"]
        return linear + rows * scale + other * scale
    if fmt == "int4":
        return linear // 2 + (linear // group_size) * 2 * scale + other * scale
    if fmt == "bnb4":  # NF4: half a byte + an fp32 absmax per 64 weights; the LM head stays unquantized
        head = config["vocab_size"] * config["hidden_size"]
        body = linear - head
        return body // 2 + (body // 64) * 4 + head * scale + other * scale
    raise ValueError(f"unknown weight format {fmt!r}")


def gguf_bytes_per_token(path: str) -> int:
    """Bytes of every tensor in a GGUF file at its block-quantized size (Q4_1: 20 bytes per 32 weights, ...).

    llama.cpp reads all of them per token; with tied embeddings token_embd is the LM head as well.
    """
    from gguf import GGUFReader

    return int(sum(int(t.n_bytes) for t in GGUFReader(path).tensors))


def packed_gguf_bytes_per_token(path: str, dense_bytes: int = 2) -> int:
    """Bytes per token of a GGUF file's weights as `--gguf-weights packed` holds them (llm/gguf.py): Q4_0 and
    Q4_1, Q6_K and Q8_0 as stored, Q4_K at 148 bytes per 256 weights, other quantized types at 34 per 32 (8 bits),
    F32/F16/BF16 tensors at the model's precision (dense_bytes per weight)."""
    from pathlib import Path

    from roofserve.llm.gguf import packed_bytes, read_header

    return packed_bytes(read_header(Path(path))[1], dense_bytes)


def kv_bytes_per_token(config: dict, context_len: int, dtype_bytes: int = 2) -> int:
    """KV cache bytes read for one decoded token at a context of context_len tokens."""
    h, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes * context_len


def mbu(tokens_per_s: float, bytes_per_token: float, bandwidth_gb_s: float) -> float:
    """Model bandwidth utilisation: achieved bytes/s over peak bytes/s."""
    return tokens_per_s * bytes_per_token / (bandwidth_gb_s * 1e9)


# --- LLM decode with B sequences per step --------------------------------------------------------
# One step reads the weights once and each sequence's KV cache, and does 2 FLOPs per linear-layer
# weight per sequence: tokens/s <= B / max(bytes per step / bandwidth, FLOPs per step / peak FLOP/s).
def batch_roof(batch_size: int, weight_bytes: float, kv_bytes_per_sequence: float, linear_params: int,
               bandwidth_gb_s: float | None, peak_tflops: float | None) -> dict:
    """The two roofs of aggregate decode tokens/s at `batch_size` sequences, and which one binds."""
    step_bytes = weight_bytes + batch_size * kv_bytes_per_sequence
    step_flops = 2 * linear_params * batch_size
    bandwidth_roof = batch_size * bandwidth_gb_s * 1e9 / step_bytes if bandwidth_gb_s else None
    compute_roof = batch_size * peak_tflops * 1e12 / step_flops if peak_tflops else None
    roofs = [r for r in (bandwidth_roof, compute_roof) if r]
    bound = None
    if bandwidth_roof and compute_roof:
        bound = "bandwidth" if bandwidth_roof <= compute_roof else "compute"
    return {"batch_size": batch_size, "step_bytes": int(step_bytes), "step_flops": int(step_flops),
            "bandwidth_roof_tokens_per_s": round(bandwidth_roof, 1) if bandwidth_roof else None,
            "compute_roof_tokens_per_s": round(compute_roof, 1) if compute_roof else None,
            "roof_tokens_per_s": round(min(roofs), 1) if roofs else None, "bound": bound}


def crossover_batch_size(weight_bytes: float, kv_bytes_per_sequence: float, linear_params: int,
                         bandwidth_gb_s: float, peak_tflops: float, largest: int = 4096) -> int | None:
    """The smallest batch size at which the compute roof binds (None if none up to `largest`)."""
    for b in range(1, largest + 1):
        if batch_roof(b, weight_bytes, kv_bytes_per_sequence, linear_params, bandwidth_gb_s, peak_tflops)["bound"] == "compute":
            return b
    return None
