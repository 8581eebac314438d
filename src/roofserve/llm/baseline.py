"""The reference deployment's decode, kept as the ladder's first step (`--no-static-cache`): transformers'
own forward over its DynamicCache, eager, one token per call, its attention implementation as chosen
(`--attention sdpa|eager`). Everything faster is llm.engine."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from roofserve.llm.sampling import Sampling, sample


def use_attention(model: torch.nn.Module, attention: str) -> None:
    """transformers' attention for the model's layers: auto keeps the model's own (SDPA)."""
    if attention == "roofserve":
        from roofserve.llm.kernels import use_decode_attention

        use_decode_attention(model)
    elif attention != "auto":
        model.set_attn_implementation(attention)


@torch.inference_mode()
def transformers_tokens(model: torch.nn.Module, prompt_ids: list[int], sampling: Sampling,
                        stop_ids: set[int] = frozenset(), prefill_chunk: int = 256) -> Iterator[int]:
    """Generated ids, one by one; ends at a stop id (not yielded) or after max_new_tokens."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(sampling.seed) if sampling.seed is not None else None
    sampling.start(prompt_ids)
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt_ids], device=device)
    positions = torch.arange(len(prompt_ids), device=device)

    def forward(tokens: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        # logits_to_keep=1: the LM head runs on the last position only -> (vocab,)
        out = model(input_ids=tokens, cache=cache, cache_position=at, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    for start in range(0, len(prompt_ids), prefill_chunk):  # one chunk's activations at a time
        logits = forward(ids[:, start:start + prefill_chunk], positions[start:start + prefill_chunk])
    position = len(prompt_ids)
    for i in range(sampling.max_new_tokens):
        token = sample(logits.cpu() if generator else logits, sampling, generator)
        if token in stop_ids:
            return
        if sampling.observe:
            sampling.observe(logits, token)
        yield token
        if i + 1 < sampling.max_new_tokens:
            logits = forward(torch.tensor([[token]], device=device), torch.tensor([position], device=device))
            position += 1
