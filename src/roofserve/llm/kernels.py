"""Two CPU kernels for the decode step at batch size 1, bf16: a one-row matmul (GEMV) and attention of
one query over the filled part of a static KV cache.

GEMV. At batch size 1 every linear layer of a decode step is a matrix-vector product: it reads each weight
once and does two FLOPs per weight, so its speed is the rate at which it streams the weight matrix.
On the CPUs we measured, torch's one-row bf16 `linear` (oneDNN) streams at a quarter to a half of the
machine's read bandwidth. This kernel streams rows of the weight matrix with AVX512-BF16 dot
products (32 weights per instruction, fp32 accumulators, four rows at a time so each load of the
input vector serves four rows), split over torch's threads. CPUs without AVX512-BF16 get a plain
loop that the compiler vectorizes.

Attention. With a static cache, the matmul-softmax attention reads all max_seq_len slots of the cache
every step (masking the empty ones), and inductor's fused kernel for it ran at ~7 GB/s here. This
kernel reads positions 0..pos only: per query head, scores against its KV head's keys (grouped-query
attention without copying K and V), softmax in fp32, weighted sum of values; heads split over threads.

Both are built from source on first use (a C++ compiler is needed, as torch.compile on CPU needs one)
and registered as the operators `roofserve::gemv_bf16` and `roofserve::decode_attention`, so
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

_SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

namespace {

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// out[n] = sum_k w[n, k] * x[k] for rows [begin, end) of w (N x K, row-major), fp32 accumulation.
#ifdef __AVX512BF16__
void rows(const uint16_t* x, const uint16_t* w, at::BFloat16* out, int64_t K, int64_t begin, int64_t end) {
  const int64_t main = K & ~int64_t(31);
  const __mmask32 tail = (__mmask32)((1ull << (K - main)) - 1);
  int64_t n = begin;
  for (; n + 4 <= end; n += 4) {
    const uint16_t* r = w + n * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < main; k += 32) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(r + k), xv);
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(r + K + k), xv);
      a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(r + 2 * K + k), xv);
      a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(r + 3 * K + k), xv);
    }
    if (tail) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + main);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(tail, r + main), xv);
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(tail, r + K + main), xv);
      a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_maskz_loadu_epi16(tail, r + 2 * K + main), xv);
      a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_maskz_loadu_epi16(tail, r + 3 * K + main), xv);
    }
    out[n] = _mm512_reduce_add_ps(a0);
    out[n + 1] = _mm512_reduce_add_ps(a1);
    out[n + 2] = _mm512_reduce_add_ps(a2);
    out[n + 3] = _mm512_reduce_add_ps(a3);
  }
  for (; n < end; ++n) {
    const uint16_t* r = w + n * K;
    __m512 a = _mm512_setzero_ps();
    for (int64_t k = 0; k < main; k += 32)
      a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(r + k), (__m512bh)_mm512_loadu_si512(x + k));
    if (tail)
      a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_maskz_loadu_epi16(tail, r + main),
                           (__m512bh)_mm512_maskz_loadu_epi16(tail, x + main));
    out[n] = _mm512_reduce_add_ps(a);
  }
}
#else
void rows(const uint16_t* x, const uint16_t* w, at::BFloat16* out, int64_t K, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    const uint16_t* r = w + n * K;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < K; ++k) acc += bf16_to_float(r[k]) * bf16_to_float(x[k]);
    out[n] = acc;
  }
}
#endif

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "gemv_bf16: bf16 tensors only");
  TORCH_CHECK(w.dim() == 2 && x.size(-1) == w.size(1) && x.numel() == w.size(1), "gemv_bf16: x must be one row of w's width");
  const int64_t N = w.size(0), K = w.size(1);
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  auto out = at::empty(shape, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr());
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  // Blocks of 4 rows; at least 64 rows per thread so small layers do not pay for a fork.
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b, int64_t e) {
    rows(xp, wp, op, K, b * 4, std::min(e * 4, N));
  });
  return out;
}

// q (1, H, 1, D), k and v caches (1, KVH, L, D), position (1,): the query's position; it attends to
// slots 0..position. Returns (1, 1, H, D), the layout the model's output projection expects.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& position, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "decode_attention: bf16 tensors only");
  TORCH_CHECK(q.dim() == 4 && q.size(0) == 1 && q.size(2) == 1, "decode_attention: one query of batch 1");
  const int64_t H = q.size(1), D = q.size(3), KVH = k.size(1), L = k.size(2);
  TORCH_CHECK(H % KVH == 0 && k.size(3) == D && v.sizes() == k.sizes(), "decode_attention: shapes do not match");
  const int64_t T = position.item<int64_t>() + 1;
  TORCH_CHECK(T >= 1 && T <= L, "decode_attention: position outside the cache");
  auto qc = q.contiguous();
  auto kc = k.contiguous();
  auto vc = v.contiguous();
  auto out = at::empty({1, 1, H, D}, q.options());
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(qc.data_ptr());
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(kc.data_ptr());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(vc.data_ptr());
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const int64_t group = H / KVH;
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> qf(D), acc(D), p(T);
    for (int64_t h = h0; h < h1; ++h) {
      const uint16_t* kh = kp + (h / group) * L * D;
      const uint16_t* vh = vp + (h / group) * L * D;
      for (int64_t d = 0; d < D; ++d) qf[d] = bf16_to_float(qp[h * D + d]) * float(scale);
      float top = -INFINITY;
      for (int64_t t = 0; t < T; ++t) {
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) s += qf[d] * bf16_to_float(kh[t * D + d]);
        p[t] = s;
        top = std::max(top, s);
      }
      float total = 0.f;
      for (int64_t t = 0; t < T; ++t) total += (p[t] = std::exp(p[t] - top));
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < T; ++t) {
        const float w = p[t] / total;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += w * bf16_to_float(vh[t * D + d]);
      }
      for (int64_t d = 0; d < D; ++d) op[h * D + d] = acc[d];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(roofserve, m) {
  m.def("gemv_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor position, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(roofserve, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("decode_attention", &decode_attention);
}
"""


@functools.cache
def load_kernel() -> None:
    """Build (first time on this machine, about 20 s; cached afterwards) and register the operators."""
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
    torch.library.register_fake("roofserve::decode_attention")(_attention_shape)
    log.info("CPU kernels ready in %.1f s (AVX512-BF16: %s)", time.perf_counter() - start, " avx512_bf16" in cpu)


def build(name: str, extra_cflags: tuple[str, ...] = ()) -> None:
    """Compile _SOURCE for this CPU and load it into this process (once per process: the operators'
    namespace can be registered only once)."""
    from torch.utils.cpp_extension import load_inline

    _ninja_on_path()
    load_inline(name, cpp_sources=_SOURCE, is_python_module=False,
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


def _attention_shape(q, k, v, position, scale):
    return q.new_empty((1, 1, q.shape[1], q.shape[3]))


def measure_gemv_peak():
    """The weight bytes per second our GEMV kernel streams, as `measure_gemv_gb_s` measures torch's
    (a `gemv-bf16-roofserve` Peak): the rate a decode step with `--gemv roofserve` can reach at most."""
    from roofserve.hardware import measure_gemv_gb_s

    load_kernel()
    return measure_gemv_gb_s(torch.device("cpu"), linear=torch.ops.roofserve.gemv_bf16, label="roofserve")


def gemv_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) holding one row, w (N, K), both bf16 on CPU -> x @ w.T of shape (..., N), bf16."""
    load_kernel()
    return torch.ops.roofserve.gemv_bf16(x, w)


class GemvLinear(torch.nn.Module):
    """A bias-free nn.Linear whose one-row calls (decode steps) go to the GEMV kernel; prompts
    (several rows) still go to torch's matmul. Shares the original weight (tied embeddings stay tied)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            return torch.ops.roofserve.gemv_bf16(x, self.weight)
        return torch.nn.functional.linear(x, self.weight)


def use_gemv_kernel(model: torch.nn.Module) -> int:
    """Swap every bias-free bf16 CPU nn.Linear with plain (not quantized) weights for a GemvLinear;
    returns how many were swapped."""
    load_kernel()
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            w = getattr(child, "weight", None)
            if (type(child) is torch.nn.Linear and child.bias is None and type(w) is torch.nn.Parameter
                    and w.dtype == torch.bfloat16 and w.device.type == "cpu"):
                setattr(parent, name, GemvLinear(child))
                swapped += 1
    return swapped


def decode_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """A transformers attention function (registered as "roofserve"): one bf16 CPU query at batch size
    1 with a cache position (our engine's decode step) goes to the kernel; anything else (prompts,
    batches, masks with padding) to transformers' eager attention."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    position = kwargs.get("cache_position")
    if (query.shape[0] == 1 and query.shape[2] == 1 and position is not None and position.numel() == 1
            and query.dtype == torch.bfloat16 and query.device.type == "cpu"):
        return torch.ops.roofserve.decode_attention(query, key, value, position, scaling), None
    return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def use_decode_attention(model: torch.nn.Module) -> None:
    """Make the model's attention layers call decode_attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    load_kernel()
    AttentionInterface.register("roofserve", decode_attention)
    AttentionMaskInterface.register("roofserve", eager_mask)  # prompts go to eager attention: its mask
    model.set_attn_implementation("roofserve")
