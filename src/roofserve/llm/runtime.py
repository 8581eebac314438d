"""Build the generator a worker serves with: our PyTorch engine (with its optimizations) or llama.cpp."""

from __future__ import annotations

import logging

import torch

from roofserve.config import LLMConfig
from roofserve.device import DTYPES
from roofserve.errors import UserError
from roofserve.llm.generator import Generator

log = logging.getLogger(__name__)


def quantize(model: torch.nn.Module, scheme: str, group_size: int, device: torch.device) -> None:
    """torchao weight-only quantization of every nn.Linear (the LM head included; the embedding table stays)."""
    if scheme == "none":
        return
    if scheme == "bnb4":
        return quantize_bnb4(model, device)
    from torchao.quantization import quantize_

    if scheme == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        quantize_(model, Int8WeightOnlyConfig())
    elif scheme == "int4":
        hidden = model.config.hidden_size
        if hidden % group_size:
            raise UserError(f"int4 group size {group_size} does not divide the hidden size {hidden}; try 64 or 32")
        if device.type == "cpu":
            # torchao 0.18: CPU int4 lives in the prototype namespace and needs bf16 activations.
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            if next(model.parameters()).dtype != torch.bfloat16:
                raise UserError("int4 on CPU needs --precision bf16")
            quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=group_size))
        else:
            from torchao.quantization import Int4WeightOnlyConfig

            quantize_(model, Int4WeightOnlyConfig(group_size=group_size))


def quantize_bnb4(model: torch.nn.Module, device: torch.device) -> None:
    """bitsandbytes NF4 for every linear layer but the LM head, as the reference deployment served
    (preflight has checked for CUDA and bitsandbytes)."""
    import bitsandbytes as bnb

    dtype = next(model.parameters()).dtype
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=dtype, quant_type="nf4")
                new.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    new.bias = child.bias
                setattr(parent, name, new.to(device))  # moving to the GPU quantizes


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def apply_lora(model: torch.nn.Module, source: str) -> torch.nn.Module:
    """Wrap the model with a PEFT LoRA adapter, unmerged (two extra thin matmuls per linear layer, as
    the reference deployment served it). `source`: an adapter folder, or random:RANK (random A and B on
    every linear layer of the blocks: the cost of an adapter, for speed work; answers drift from the
    base model's)."""
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError:
        raise UserError("--lora needs peft: pip install 'roofserve[lora]'") from None
    if source.startswith("random:"):
        rank = int(source.removeprefix("random:"))
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, init_lora_weights=False)
        return get_peft_model(model, config).eval()
    return PeftModel.from_pretrained(model, source).eval()


class TorchGenerator(Generator):
    """Our engine (llm.engine: one request at a time at max_batch_size 1, a continuous batch above), or with
    --no-static-cache the transformers baseline (llm.baseline), one request at a time."""

    def __init__(self, cfg: LLMConfig, device: str | torch.device):
        from roofserve.llm.model import load

        device = torch.device(device)
        loaded = load(cfg.model, cfg.precision, device, cfg.gguf_weights)
        if loaded.packed_bytes is not None:
            from roofserve.llm.gguf import MemoryPlan, kv_bytes_per_slot

            kv = kv_bytes_per_slot(loaded.model.config, cfg.max_seq_len, DTYPES[cfg.precision])
            plan = MemoryPlan(loaded.packed_bytes, loaded.dense_bytes, kv, cfg.max_seq_len, cfg.max_batch_size)
            for line in plan.lines():
                log.info("memory plan: %s", line)
        quantize(loaded.model, cfg.quantize, cfg.group_size, device)
        if cfg.gemv == "roofserve":
            from roofserve.llm.kernels import measure_gemm_crossover, use_gemv_kernel

            # up to the row count where our kernel stops beating torch's matmul on this machine: decode
            # steps of every batch size, and prompts too where it wins at their row counts (AMX)
            max_rows = cfg.gemv_rows
            if not max_rows:
                ratios = measure_gemm_crossover()
                max_rows = max((rows for rows, ratio in ratios.items() if ratio >= 1.0
                                and all(ratios[r] >= 1.0 for r in ratios if r < rows)), default=1)
                log.info("our GEMM vs torch (x faster) by rows: %s; ours up to %d rows",
                         {r: round(v, 2) for r, v in ratios.items()}, max_rows)
            log.info("GEMV kernel on %d linear layers", use_gemv_kernel(loaded.model, max_rows))
        model = apply_lora(loaded.model, cfg.lora) if cfg.lora else loaded.model
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self.random_weights = loaded.random_weights
        if cfg.static_cache:
            from roofserve.llm.engine import Engine

            self.batch = Engine(model, cfg)
            log.info("warm-up took %.1f s", self.batch.warm_up())
            if self.batch.compile_cached and (cfg.compile or cfg.compile_prefill):
                from roofserve.config import inductor_cache

                log.info("compiled graphs are cached in %s: later starts of this model reuse them", inductor_cache())
        else:
            from functools import partial

            from roofserve.llm.baseline import transformers_tokens, use_attention
            from roofserve.llm.engine import OneAtATime

            use_attention(model, cfg.attention)
            self.batch = OneAtATime(partial(transformers_tokens, model, prefill_chunk=cfg.prefill_chunk))
        eos = loaded.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.stop_ids = {i for i in [*eos, self.tokenizer.eos_token_id] if i is not None}


def build_generator(cfg: LLMConfig, device: str):
    if cfg.backend == "llamacpp":
        from roofserve.llm.llamacpp import LlamaCppGenerator

        return LlamaCppGenerator(cfg)
    return TorchGenerator(cfg, device)


def build_in_process(cfg: LLMConfig) -> tuple[Generator, str]:
    """(generator, device) for an in-process bench, after the server's own checks (preflight: one-line
    errors, and the device it would serve on), with cfg's threads per worker, or all of torch's
    threads when that is 0."""
    from roofserve.llm.preflight import preflight

    device, _, _ = preflight(cfg)
    torch.set_num_threads(cfg.threads_per_worker or torch.get_num_threads())
    return build_generator(cfg, device), device
