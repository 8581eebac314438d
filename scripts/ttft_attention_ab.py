#!/usr/bin/env python
"""Prefill (TTFT in-process) of a 64-token prompt, bf16, static 2048-key cache, uncompiled, per attention
setting, alternated in rounds: `auto` (transformers' sdpa with a mask over the whole cache, the default),
`auto` with roofserve's prompt attention (attends only to the filled cache), and `roofserve`.

    .venv/bin/python scripts/ttft_attention_ab.py [--rounds 6]
"""
import argparse
import statistics
import time

import torch

from roofserve.llm.engine import Engine, Sampling
from roofserve.llm.kernels import use_prompt_attention
from roofserve.llm.model import load
from roofserve.measure.peaks import measure_matmul_tflops
from roofserve.measure.roofline import llm_shapes

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--rounds", type=int, default=6)
args = parser.parse_args()
torch.set_num_threads(2)
prompt = list(range(1000, 1064))
engines = {}
for name in ("auto (sdpa)", "auto + prompt attention", "roofserve"):
    model = load("default", "bf16").model
    engine = Engine(model, 2048, static_cache=True, compile=False, attention="roofserve" if name == "roofserve" else "auto")
    if name == "auto + prompt attention":
        use_prompt_attention(model)
    engines[name] = engine


def ttft_ms(engine: Engine) -> float:
    start = time.perf_counter()
    next(iter(engine.generate(prompt, Sampling(1))))
    return (time.perf_counter() - start) * 1e3


times = {name: [] for name in engines}
for engine in engines.values():
    [ttft_ms(engine) for _ in range(3)]
for _ in range(args.rounds):
    for name, engine in engines.items():
        times[name] += [ttft_ms(engine) for _ in range(5)]
peak = measure_matmul_tflops(torch.bfloat16, torch.device("cpu")).value
linear, _ = llm_shapes(engines["roofserve"].model.config.to_dict())
roof_ms = 2 * linear * len(prompt) / (peak * 1e12) * 1e3
for name, t in times.items():
    print(f"{name:26s} median TTFT {statistics.median(t):6.1f} ms  min {min(t):6.1f} ms")
print(f"linear params {linear}, bf16 peak {peak:.3f} TFLOP/s, compute roof {roof_ms:.1f} ms, "
      f"target <= {2 * roof_ms + 10:.1f} ms")
