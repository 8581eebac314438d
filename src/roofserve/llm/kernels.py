"""CPU kernels for bf16 decode steps: a few-row matmul (GEMV at one row) and attention of one query
per sequence over the filled part of its KV cache (one slot per sequence, or transformers' static cache).

GEMV and GEMM. At batch size 1 every linear layer of a decode step is a matrix-vector product: it reads each weight
once and does two FLOPs per weight, so its speed is the rate at which it streams the weight matrix.
On the CPUs we measured, torch's one-row bf16 `linear` (oneDNN) streams at a quarter to a half of the
machine's read bandwidth. Our kernel streams weights packed once for AVX512-BF16's pair dot product
(`pack_pairs`: per block of 16 output columns, per pair of k, one 64-byte vector): a broadcast pair of
each input row times that vector adds to 16 outputs, so with B rows (a batched decode step, up to 16)
each weight vector loaded serves all B rows and no horizontal sums are left at the end; software
prefetch runs 4 KB ahead of each stream. On CPUs with AMX the same packed weights are tiles as they
lie (16 pairs x 16 columns) and one tile instruction replaces 16 dot products per row, from 2 rows on,
so a batched decode step costs about the weights' read time at any row count up to 16, where the vector
path slows with every row (measured figures: docs/kernels.md). Shapes that do not pack
(out_features not a multiple of 16) take an older dot-product kernel (`gemv_bf16`, `gemm_bf16`). CPUs
without AVX512-BF16 get plain loops that the compiler vectorizes.

Attention. With a static cache, the matmul-softmax attention reads all max_seq_len slots of the cache
every step (masking the empty ones), far below the read bandwidth (docs/kernels.md). This
kernel reads positions 0..pos only: per KV head, the query heads that share it score against its keys
(bf16 pair dot products, 16 keys' sums gathered into one vector at a time), softmax in fp32, weighted
sum of values (each value row read once for the group, without copying K and V); (sequence, KV head)
tasks split over threads. Head sizes that are not a multiple of 32 take a plain loop.

Both are built from source on first use (a C++ compiler is needed, as torch.compile on CPU needs one)
and registered as the operators `roofserve::gemv_bf16`, `gemm_bf16`, `gemm_packed_bf16`,
`decode_attention`, `slot_attention` and `gemm_quant` (GGUF's 4- and 8-bit blocks, llm/gguf.py), so
compiled code calls them without Python.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from roofserve.errors import UserError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")  # the C++ operators


@functools.cache
def load_kernel() -> None:
    """Build (first time on this machine; cached afterwards) and register the operators."""
    cpu = _cpu_description()
    # -march=native ties the binary to this CPU: the name does too, so a shared cache never mixes CPUs.
    name = "roofserve_kernels_" + hashlib.sha1(cpu.encode()).hexdigest()[:10]
    start = time.perf_counter()
    try:
        build(name)
    except (RuntimeError, OSError) as e:  # no compiler, no Python headers
        raise UserError(f"roofserve's CPU kernels did not build ({str(e).splitlines()[0]}); install a C++ "
                        "compiler (g++), or use --gemv torch and another --attention") from None
    torch.library.register_fake("roofserve::gemv_bf16")(_gemv_shape)
    torch.library.register_fake("roofserve::gemm_bf16")(_gemv_shape)
    torch.library.register_fake("roofserve::gemm_packed_bf16")(_packed_shape)
    torch.library.register_fake("roofserve::decode_attention")(_attention_shape)
    torch.library.register_fake("roofserve::slot_attention")(_slot_attention_shape)
    torch.library.register_fake("roofserve::gemm_quant")(_quant_shape)
    log.info("CPU kernels ready in %.1f s (AVX512-BF16: %s)", time.perf_counter() - start, " avx512_bf16" in cpu)


def build(name: str, extra_cflags: tuple[str, ...] = ()) -> None:
    """Compile kernels.cpp for this CPU and load it into this process (once per process: the operators'
    namespace can be registered only once). torch rebuilds it when the file or the flags change."""
    from torch.utils.cpp_extension import load

    _ninja_on_path()
    load(name, sources=[str(SOURCE)], is_python_module=False,
         extra_cflags=["-O3", "-march=native", "-fopenmp", *extra_cflags], extra_ldflags=["-fopenmp"])


def _ninja_on_path() -> None:
    """torch builds extensions with the `ninja` it finds on PATH; the pip package's copy sits in the
    venv's bin folder, which is not on PATH unless the venv is activated."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        raise UserError("roofserve's CPU kernels need ninja to build: pip install ninja") from None
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _cpu_description() -> str:
    """The machine, the CPU model and its feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    found = [next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags")]
    return " ".join([platform.machine(), platform.processor(), *found]) + " "


def _gemv_shape(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _packed_shape(x: torch.Tensor, wp: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], wp.shape[0] * 16))


def _quant_shape(x, u, d, m, bits, mfac):
    return x.new_empty((*x.shape[:-1], u.shape[0] * 16))


def pack_pairs(w: torch.Tensor) -> torch.Tensor:
    """w (N, K) bf16 -> (N/16, K/2, 16, 2), the layout gemm_packed_bf16 streams (N a multiple of 16, K even)."""
    n, k = w.shape
    return w.view(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def _attention_shape(q, k, v, position, scale):
    return q.new_empty((1, 1, q.shape[1], q.shape[3]))


def _slot_attention_shape(q, k, v, slots, positions, scale):
    return q.new_empty((q.shape[0], 1, q.shape[1], q.shape[3]))


def measure_gemv_peak():
    """The weight bytes per second our GEMV kernel streams, as `measure_gemv_gb_s` measures torch's
    (a `gemv-bf16-roofserve` Peak): the rate a decode step with `--gemv roofserve` can reach at most."""
    from roofserve.measure.peaks import measure_gemv_gb_s

    load_kernel()
    return measure_gemv_gb_s(torch.device("cpu"), linear=torch.ops.roofserve.gemm_packed_bf16, prepare=pack_pairs,
                             label="roofserve")


def gemv_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) holding one row, w (N, K), both bf16 on CPU -> x @ w.T of shape (..., N), bf16."""
    load_kernel()
    return torch.ops.roofserve.gemv_bf16(x, w)


# the row counts our kernel is measured at: decode steps (batch buckets) and prompt chunks (up to the
# default --prefill-chunk)
GEMM_ROWS = (1, 2, 4, 8, 16, 64, 256)
FEW_ROWS = 16  # the most rows the unpacked kernel (gemm_bf16, shapes that do not pack) takes


class GemvLinear(torch.nn.Module):
    """A bias-free nn.Linear whose calls of up to `max_rows` rows go to our kernel: the rows where it was
    measured faster than torch's matmul on this machine (see `measure_gemm_crossover`): decode steps,
    batched or not, and with AMX prompt chunks too. Other calls go to torch. Shares the original weight
    (tied embeddings stay tied) and keeps a copy packed for the kernel (`pack_pairs`; the weight bytes
    twice in memory) where the shape allows (out_features a multiple of 16, in_features even)."""

    def __init__(self, linear: torch.nn.Linear, max_rows: int = 1):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.max_rows = max_rows
        packable = self.out_features % 16 == 0 and self.in_features % 2 == 0
        self.register_buffer("packed", pack_pairs(self.weight.detach()) if packable else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= self.max_rows and self.packed is not None:
            return torch.ops.roofserve.gemm_packed_bf16(x, self.packed)
        if rows <= min(self.max_rows, FEW_ROWS):
            if rows == 1:
                return torch.ops.roofserve.gemv_bf16(x, self.weight)
            return torch.ops.roofserve.gemm_bf16(x, self.weight)
        return torch.nn.functional.linear(x, self.weight)


def measure_gemm_crossover(shape: tuple[int, int] = (1536, 576), size_bytes: int = 128 << 20) -> dict[int, float]:
    """Weight GB/s of our kernel over torch's bf16 matmul at each row count of GEMM_ROWS, on one-step
    weights too big for the caches: {rows: ours / torch}. Our kernel wins at one row everywhere we
    measured; with more rows and no AMX its vector path runs out of dot-product throughput, and with AMX
    it can win up to hundreds of rows, so the crossover is measured on each machine, not assumed
    (figures: docs/kernels.md)."""
    from roofserve.measure.timing import median_time_s

    load_kernel()
    out_features, in_features = shape
    weights = [torch.randn(shape).bfloat16() for _ in range(max(1, size_bytes // (out_features * in_features * 2)))]
    packed = [pack_pairs(w) for w in weights]
    cpu = torch.device("cpu")
    ratios = {}
    for rows in GEMM_ROWS:
        x = torch.randn(rows, in_features).bfloat16()
        ours = median_time_s(lambda: [torch.ops.roofserve.gemm_packed_bf16(x, w) for w in packed], cpu, warmup=1,
                             repeats=3)
        theirs = median_time_s(lambda: [torch.nn.functional.linear(x, w) for w in weights], cpu, warmup=1, repeats=3)
        ratios[rows] = theirs / ours
    return ratios


def use_gemv_kernel(model: torch.nn.Module, max_rows: int = 1) -> int:
    """Swap every bias-free bf16 CPU nn.Linear with plain (not quantized) weights for a GemvLinear that
    sends calls of up to max_rows rows to our kernel; returns how many were swapped."""
    load_kernel()
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            w = getattr(child, "weight", None)
            if (type(child) is torch.nn.Linear and child.bias is None and type(w) is torch.nn.Parameter
                    and w.dtype == torch.bfloat16 and w.device.type == "cpu"):
                setattr(parent, name, GemvLinear(child, max_rows))
                swapped += 1
    return swapped


def prompt_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention, but a batch-1 prompt over a static cache attends only to the
    filled part: the cache is max_seq_len long (2048 keys by default) while a 64-token prompt fills 64,
    and eager attention over all of them is a large part of a short prompt's compute."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    position = kwargs.get("cache_position")
    if query.shape[0] == 1 and query.shape[2] > 1 and position is not None and position.numel() == query.shape[2]:
        end = int(position[-1]) + 1  # the cache's filled length after this prompt (one host read per layer)
        if end < key.shape[2]:
            key, value = key[:, :, :end], value[:, :, :end]
            if attention_mask is not None:
                attention_mask = attention_mask[..., :end]
    return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def decode_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """A transformers attention function (registered as "roofserve"): one bf16 CPU query at batch size
    1 with a cache position (our engine's decode step) goes to the kernel; anything else (prompts,
    batches, masks with padding) to prompt_attention."""
    position = kwargs.get("cache_position")
    if (query.shape[0] == 1 and query.shape[2] == 1 and position is not None and position.numel() == 1
            and query.dtype == torch.bfloat16 and query.device.type == "cpu"):
        return torch.ops.roofserve.decode_attention(query, key, value, position, scaling), None
    return prompt_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def use_decode_attention(model: torch.nn.Module) -> None:
    """Make the model's attention layers call decode_attention."""
    load_kernel()
    _register("roofserve", decode_attention)
    model.set_attn_implementation("roofserve")


def use_prompt_attention(model: torch.nn.Module) -> None:
    """Eager attention whose prompts attend only to the filled cache (what the compiled CPU step uses)."""
    _register("roofserve-eager", prompt_attention)
    model.set_attn_implementation("roofserve-eager")


def _register(name: str, fn) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, eager_mask)  # the mask eager attention takes
