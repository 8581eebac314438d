#!/usr/bin/env python
"""Prefill (TTFT in-process) of a 64-token prompt, bf16, static cache, our attention: before (full logits,
eager attention over the whole 2048-key cache) vs after (last-position logits, filled keys only), alternated."""
import statistics, time, torch
from roofserve.llm.model import load
from roofserve.llm.engine import Engine, Sampling
from roofserve.llm import kernels, engine as engine_mod
from roofserve.measure.peaks import measure_matmul_tflops
torch.set_num_threads(2)
m = load("default", "bf16").model
eng = Engine(m, 2048, static_cache=True, compile=False, attention="roofserve")
prompt = list(range(1000, 1064))
new_prompt_attention, new_forward = kernels.prompt_attention, Engine._forward
def old_forward(self, ids, positions, cache):
    out = self.model(input_ids=ids, cache=cache, cache_position=positions, use_cache=True)
    return out.logits, getattr(out, "cache", None) or out.past_key_values
def old_attention(module, q, k, v, mask, scaling, dropout=0.0, **kw):
    from transformers.models.llama.modeling_llama import eager_attention_forward
    return eager_attention_forward(module, q, k, v, mask, scaling, dropout, **kw)
def set_variant(new):
    Engine._forward = new_forward if new else old_forward
    kernels.prompt_attention = new_prompt_attention if new else old_attention
def ttft_ms():
    t = time.perf_counter(); next(iter(eng.generate(prompt, Sampling(1)))); return (time.perf_counter() - t) * 1e3
times = {False: [], True: []}
for new in (False, True):
    set_variant(new); [ttft_ms() for _ in range(3)]
for _ in range(6):
    for new in (False, True):
        set_variant(new); times[new] += [ttft_ms() for _ in range(5)]
peak = measure_matmul_tflops(torch.bfloat16, torch.device("cpu")).value
params = sum(p.numel() for p in m.parameters())
roof_ms = 2 * params * len(prompt) / (peak * 1e12) * 1e3
for new in (False, True):
    print(("after " if new else "before"), "median TTFT ms", round(statistics.median(times[new]), 1), "min", round(min(times[new]), 1))
print("params", params, "bf16 peak TFLOP/s", round(peak, 3), "compute roof ms", round(roof_ms, 1), "target <=", round(2 * roof_ms + 10, 1))
