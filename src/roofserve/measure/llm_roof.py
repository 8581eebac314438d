"""The bandwidth roof of one LLM serving config: bytes read per token -> tokens/s at peak bandwidth."""

from __future__ import annotations

from roofserve.measure import roofline
from roofserve.config import LLMConfig
from roofserve.machine import cache_bytes, datasheet_for


def model_shape(model: str) -> dict:
    """The architecture numbers the roofline needs, without loading weights."""
    from roofserve.llm.model import DEFAULT_MODEL, RANDOM_CONFIGS

    if model in (DEFAULT_MODEL, "default"):
        return RANDOM_CONFIGS["smollm2-135m"]  # the bundled GGUF is SmolLM2-135M-Instruct
    if model.startswith("random:"):
        return RANDOM_CONFIGS[model[7:]]
    from transformers import AutoConfig

    if model.endswith(".gguf"):
        from pathlib import Path

        path = Path(model)
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    return AutoConfig.from_pretrained(model).to_dict()


def weight_format(cfg: LLMConfig) -> str:
    if cfg.backend in ("llamacpp", "llama-server"):
        return "gguf"
    if cfg.gguf_weights == "packed":
        return "gguf-packed"
    return cfg.quantize if cfg.quantize != "none" else cfg.precision


def step_roof(cfg: LLMConfig, context_len: int, bandwidth_gb_s: float | None, gpu_name: str | None = None,
              working_set_gb_s: float | None = None) -> dict:
    """Bytes per token (weights at storage size + KV cache at context_len) and the tokens/s roof: at the
    DRAM read bandwidth, or, given the measured read rate of a buffer of about these bytes per token
    (`working_set_gb_s`, measured where they are smaller than the DRAM test's buffer), at that rate:
    a model the caches hold, even in part, reads faster than DRAM, and a DRAM roof would flatter it."""
    shape = model_shape(cfg.model)
    fmt = weight_format(cfg)
    if fmt == "gguf":
        from roofserve.llm.llamacpp import gguf_path

        weights = roofline.gguf_bytes_per_token(str(gguf_path(cfg.model)))
        kv_bytes = 2  # llama.cpp's default f16 KV cache
    elif fmt == "gguf-packed":
        from roofserve.llm.llamacpp import gguf_path

        kv_bytes = 4 if cfg.precision == "fp32" else 2
        weights = roofline.packed_gguf_bytes_per_token(str(gguf_path(cfg.model)), kv_bytes)
    else:
        weights = roofline.weight_bytes_per_token(shape, fmt, cfg.group_size,
                                                  "bf16" if cfg.precision != "fp32" else "fp32")
        kv_bytes = 4 if cfg.precision == "fp32" else 2
    kv = roofline.kv_bytes_per_token(shape, context_len, kv_bytes)
    total = weights + kv
    # a working set read no more than 20% faster than DRAM (noise) is read from DRAM
    small = bool(working_set_gb_s and bandwidth_gb_s and working_set_gb_s > 1.2 * bandwidth_gb_s)
    used = working_set_gb_s if small else bandwidth_gb_s
    out = {"weight_format": fmt, "weight_bytes_per_token": weights, "kv_bytes_per_token": kv,
           "bytes_per_token": total, "memory_level": "cache" if small else "DRAM", "cache_bytes": cache_bytes(),
           "bandwidth_gb_s": used, "dram_bandwidth_gb_s": bandwidth_gb_s, "working_set_read_gb_s": working_set_gb_s,
           "roof_tokens_per_s": round(roofline.memory_roof_per_s(total, used), 1) if used else None}
    sheet = datasheet_for(gpu_name)
    if sheet:
        out["datasheet_roof_tokens_per_s"] = round(roofline.memory_roof_per_s(total, sheet[1]["bandwidth_gb_s"]), 1)
    return out


def batch_roofs(cfg: LLMConfig, context_len: int, batch_sizes: list[int], bandwidth_gb_s: float | None,
                peak_tflops: float | None, working_set_gb_s: float | None = None) -> dict:
    """Per batch size: the bandwidth roof (weights once per step + each sequence's KV cache at
    context_len) and the compute roof (2 x linear parameters x B FLOPs per step at the measured matmul
    peak) of aggregate decode tokens/s, and the batch size where compute starts to bind."""
    shape = model_shape(cfg.model)
    one = step_roof(cfg, context_len, bandwidth_gb_s, working_set_gb_s=working_set_gb_s)
    weights, kv = one["weight_bytes_per_token"], one["kv_bytes_per_token"]
    bandwidth_gb_s = one["bandwidth_gb_s"]  # the level one sequence's bytes come from (batches add KV only)
    linear, _ = roofline.llm_shapes(shape)
    rows = {b: roofline.batch_roof(b, weights, kv, linear, bandwidth_gb_s, peak_tflops) for b in batch_sizes}
    crossover = (roofline.crossover_batch_size(weights, kv, linear, bandwidth_gb_s, peak_tflops)
                 if bandwidth_gb_s and peak_tflops else None)
    return {"per_batch": rows, "crossover_batch_size": crossover, "linear_params": linear,
            "lm_head_params": roofline.lm_head_params(shape)}


def prefill_roof(linear_params: int, lm_head_params: int, weight_bytes: int, prompt_tokens: int,
                 peak_tflops: float | None, bandwidth_gb_s: float | None) -> dict:
    """The floor under a prompt's time to first token: its matmul FLOPs (2 x the layers' linear parameters
    x prompt tokens, plus 2 x the LM head's for the one position whose logits are needed) at the measured
    matmul peak, and reading the weights once at the measured bandwidth; a prefill can be no faster than
    the larger of the two. (Attention's own FLOPs are left out: a few percent at these lengths.)"""
    flops = 2 * ((linear_params - lm_head_params) * prompt_tokens + lm_head_params)
    compute = flops / (peak_tflops * 1e12) * 1e3 if peak_tflops else None
    read = weight_bytes / (bandwidth_gb_s * 1e9) * 1e3 if bandwidth_gb_s else None
    known = [x for x in (compute, read) if x is not None]
    return {"prefill_compute_roof_ms": round(compute, 2) if compute is not None else None,
            "prefill_weight_read_ms": round(read, 2) if read is not None else None,
            "prefill_roof_ms": round(max(known), 2) if known else None}
