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
lie (16 pairs x 16 columns) and one tile instruction replaces 16 dot products per row, from 2 rows on:
in a decode step of SmolLM2 all linear layers took ~16 ms at 1 to 16 rows on this VM (the weights'
read time), where the vector path took 16 ms at 1 row, 22 at 8 and 38 at 16. Shapes that do not pack
(out_features not a multiple of 16) take an older dot-product kernel (`gemv_bf16`, `gemm_bf16`). CPUs
without AVX512-BF16 get plain loops that the compiler vectorizes.

Attention. With a static cache, the matmul-softmax attention reads all max_seq_len slots of the cache
every step (masking the empty ones), and inductor's fused kernel for it ran at ~7 GB/s here. This
kernel reads positions 0..pos only: per KV head, the query heads that share it score against its keys
(bf16 pair dot products, 16 keys' sums gathered into one vector at a time), softmax in fp32, weighted
sum of values (each value row read once for the group, without copying K and V); (sequence, KV head)
tasks split over threads. Head sizes that are not a multiple of 32 take a plain loop.

Both are built from source on first use (a C++ compiler is needed, as torch.compile on CPU needs one)
and registered as the operators `roofserve::gemv_bf16`, `gemm_bf16`, `gemm_packed_bf16`,
`decode_attention` and `slot_attention`, so compiled code calls them without Python.
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
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// out[m, n] = sum_k w[n, k] * x[m, k] for weight rows [begin, end) of w (N x K, row-major) and all M rows
// of x (M x K), fp32 accumulation. Weight rows go in blocks of NB, inputs in chunks of MC: each loaded
// weight vector serves MC inputs and each loaded input vector NB weight rows, and a block of weight rows
// stays in L1 while its input chunks pass, so the weights stream from memory once per call.
#ifdef __AVX512BF16__
template <int NB, int MC>
inline void block(const uint16_t* x, const uint16_t* w, at::BFloat16* out, int64_t N, int64_t K, int64_t n) {
  const int64_t main = K & ~int64_t(31);
  const __mmask32 tail = (__mmask32)((1ull << (K - main)) - 1);
  __m512 acc[MC][NB];
  for (int i = 0; i < MC; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < main; k += 32) {
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + (n + j) * K + k);
    for (int i = 0; i < MC; ++i) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * K + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[j], xv);
    }
  }
  if (tail) {
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + (n + j) * K + main);
    for (int i = 0; i < MC; ++i) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + i * K + main);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[j], xv);
    }
  }
  for (int i = 0; i < MC; ++i)
    for (int j = 0; j < NB; ++j) out[i * N + n + j] = _mm512_reduce_add_ps(acc[i][j]);
}

template <int NB>
inline void chunks(const uint16_t* x, int64_t M, const uint16_t* w, at::BFloat16* out, int64_t N, int64_t K,
                   int64_t n) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) block<NB, 4>(x + m * K, w, out + m * N, N, K, n);
  switch (M - m) {
    case 3: block<NB, 3>(x + m * K, w, out + m * N, N, K, n); break;
    case 2: block<NB, 2>(x + m * K, w, out + m * N, N, K, n); break;
    case 1: block<NB, 1>(x + m * K, w, out + m * N, N, K, n); break;
  }
}

void rows(const uint16_t* x, int64_t M, const uint16_t* w, at::BFloat16* out, int64_t N, int64_t K,
          int64_t begin, int64_t end) {
  int64_t n = begin;
  for (; n + 4 <= end; n += 4) chunks<4>(x, M, w, out, N, K, n);
  for (; n < end; ++n) chunks<1>(x, M, w, out, N, K, n);
}
#else
void rows(const uint16_t* x, int64_t M, const uint16_t* w, at::BFloat16* out, int64_t N, int64_t K,
          int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    const uint16_t* r = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const uint16_t* xm = x + m * K;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += bf16_to_float(r[k]) * bf16_to_float(xm[k]);
      out[m * N + n] = acc;
    }
  }
}
#endif

// An uninitialized result with x's shape but `n` in its last dimension.
at::Tensor out_like(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return at::empty(shape, x.options());
}

// x (..., K) with M rows in all, w (N, K) -> (..., N). For few rows (decode steps): M = 1 is a GEMV.
at::Tensor gemm_bf16(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "gemm_bf16: bf16 tensors only");
  TORCH_CHECK(w.dim() == 2 && x.size(-1) == w.size(1), "gemm_bf16: x's last dimension must be w's width");
  const int64_t N = w.size(0), K = w.size(1), M = x.numel() / K;
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto out = out_like(x, N);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr());
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  // Blocks of 4 weight rows; at least 64 rows per thread so small layers do not pay for a fork.
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b, int64_t e) {
    rows(xp, M, wp, op, N, K, b * 4, std::min(e * 4, N));
  });
  return out;
}

// The same product from weights packed for AVX512-BF16's pair dot product (pack_pairs in Python):
// wp (N/16, K/2, 16, 2): per block of 16 output columns, per pair of k, one 64-byte vector. A broadcast
// pair of an input row times that vector adds to 16 outputs at once, so accumulators hold outputs, not
// partial dot products: no horizontal sums (what made the kernel above lose to oneDNN past 2 rows).
// Tiles of MB input rows x NB column blocks; the weights stream once per call in the order they lie.
// Software prefetch, in 64-byte vectors ahead of the one loaded: the hardware prefetchers alone left
// the kernel at ~11 GB/s of this VM's ~18; 64 ahead measured best of 0-128 here (~19 GB/s at 1-4 rows).
#ifndef PF_DIST
#define PF_DIST 64
#endif
// One row stays on the vector path: alternating in one compiled decode step, tiles took 11.4 ms at 1 row
// and vectors 10.9; from 2 rows tiles won (11.9 vs 12.5 at 2, 15.6 vs 22.5 at 8).
#ifndef AMX_MIN_ROWS
#define AMX_MIN_ROWS 2
#endif
#ifdef __AVX512BF16__
template <int MB, int NB>
inline void packed_tile(const uint16_t* x, int64_t K, const uint16_t* wp, at::BFloat16* out, int64_t N,
                        int64_t block) {
  const int64_t pairs = K / 2;
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  const uint16_t* wb = wp + block * pairs * 32;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j) {
#if PF_DIST > 0
      _mm_prefetch(reinterpret_cast<const char*>(wb + (j * pairs + p + PF_DIST) * 32), _MM_HINT_T0);
#endif
      wv[j] = (__m512bh)_mm512_loadu_si512(wb + (j * pairs + p) * 32);
    }
    for (int i = 0; i < MB; ++i) {
      int32_t pair;
      __builtin_memcpy(&pair, x + i * K + 2 * p, 4);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * N + (block + j) * 16),
                          (__m256i)_mm512_cvtneps_pbh(acc[i][j]));
}

template <int NB>
inline void packed_rows(const uint16_t* x, int64_t M, int64_t K, const uint16_t* wp, at::BFloat16* out, int64_t N,
                        int64_t block) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) packed_tile<8, NB>(x + m * K, K, wp, out + m * N, N, block);
  switch (M - m) {
    case 7: packed_tile<7, NB>(x + m * K, K, wp, out + m * N, N, block); break;
    case 6: packed_tile<6, NB>(x + m * K, K, wp, out + m * N, N, block); break;
    case 5: packed_tile<5, NB>(x + m * K, K, wp, out + m * N, N, block); break;
    case 4: packed_tile<4, NB>(x + m * K, K, wp, out + m * N, N, block); break;
    case 3: packed_tile<3, NB>(x + m * K, K, wp, out + m * N, N, block); break;
    case 2: packed_tile<2, NB>(x + m * K, K, wp, out + m * N, N, block); break;
    case 1: packed_tile<1, NB>(x + m * K, K, wp, out + m * N, N, block); break;
  }
}
#endif

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
// AMX: the same packed weights are tiles as they lie (16 pairs x 16 columns, 1 KB each), so from
// AMX_MIN_ROWS input rows one tile instruction does what 16 dot products per row do above, and the
// kernel is left reading weights. Linux hands out the tile registers only on request (once per process).
bool amx_ready() {
  static const bool ready = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ready;
}

struct TileConfig {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// rows [0, M) of x (M <= 16) by column blocks [block, block + count) (count <= 4) over all of K (a
// multiple of 32): tiles 0-3 accumulate, 4 holds 32 k of the inputs, 5 the weights.
inline void amx_blocks(const uint16_t* x, int64_t M, int64_t K, const uint16_t* wp, at::BFloat16* out, int64_t N,
                       int64_t block, int64_t count) {
  const int64_t pairs = K / 2;
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int64_t k = 0; k < K; k += 32) {
    _tile_loadd(4, x + k, K * 2);
    for (int64_t j = 0; j < count; ++j) {
      const uint16_t* b = wp + ((block + j) * pairs + k / 2) * 32;
#if PF_DIST > 0
      for (int line = 0; line < 16; ++line)
        _mm_prefetch(reinterpret_cast<const char*>(b + (PF_DIST + line) * 32), _MM_HINT_T0);
#endif
      _tile_loadd(5, b, 64);
      switch (j) {
        case 0: _tile_dpbf16ps(0, 4, 5); break;
        case 1: _tile_dpbf16ps(1, 4, 5); break;
        case 2: _tile_dpbf16ps(2, 4, 5); break;
        default: _tile_dpbf16ps(3, 4, 5); break;
      }
    }
  }
  alignas(64) float c[16 * 16];
  for (int64_t j = 0; j < count; ++j) {
    switch (j) {
      case 0: _tile_stored(0, c, 64); break;
      case 1: _tile_stored(1, c, 64); break;
      case 2: _tile_stored(2, c, 64); break;
      default: _tile_stored(3, c, 64); break;
    }
    for (int64_t i = 0; i < M; ++i)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * N + (block + j) * 16),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(c + i * 16)));
  }
}

void amx_gemm(const uint16_t* x, int64_t M, int64_t K, const uint16_t* wp, at::BFloat16* out, int64_t N) {
  const int64_t blocks = N / 16;
  at::parallel_for(0, (blocks + 3) / 4, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t m = 0; m < M; m += 16) {
      const int64_t rows = std::min<int64_t>(16, M - m);
      TileConfig cfg = {};
      cfg.palette_id = 1;
      for (int t = 0; t < 5; ++t) cfg.rows[t] = rows, cfg.colsb[t] = 64;
      cfg.rows[5] = 16, cfg.colsb[5] = 64;
      _tile_loadconfig(&cfg);
      for (int64_t g = g0; g < g1; ++g)
        amx_blocks(x + m * K, rows, K, wp, out + m * N, N, 4 * g, std::min<int64_t>(4, blocks - 4 * g));
      _tile_release();
    }
  });
}
#endif

// From how many rows gemm_packed_bf16 takes the tile path (where the CPU has one); a runtime setting so
// that one process can measure both paths (set_amx_min_rows returns the previous value).
int64_t amx_min_rows = AMX_MIN_ROWS;

int64_t set_amx_min_rows(int64_t rows) {
  const int64_t previous = amx_min_rows;
  amx_min_rows = rows;
  return previous;
}

// x (..., K) with M rows, wp (N/16, K/2, 16, 2) -> (..., N).
at::Tensor gemm_packed_bf16(const at::Tensor& x, const at::Tensor& wp) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && wp.scalar_type() == at::kBFloat16, "gemm_packed_bf16: bf16 only");
  TORCH_CHECK(wp.dim() == 4 && wp.size(2) == 16 && wp.size(3) == 2 && x.size(-1) == 2 * wp.size(1),
              "gemm_packed_bf16: wp must be (N/16, K/2, 16, 2) for x's width K");
  const int64_t blocks = wp.size(0), K = x.size(-1), N = blocks * 16, M = x.numel() / K;
  auto xc = x.contiguous();
  TORCH_CHECK(wp.is_contiguous(), "gemm_packed_bf16: wp must be contiguous");
  auto out = out_like(x, N);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const uint16_t* wpp = reinterpret_cast<const uint16_t*>(wp.data_ptr());
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
  if (M >= amx_min_rows && K % 32 == 0 && amx_ready()) {
    amx_gemm(xp, M, K, wpp, op, N);
    return out;
  }
#endif
#ifdef __AVX512BF16__
  // pairs of column blocks (32 outputs); at least 4 pairs per thread so small layers do not pay for a fork
  at::parallel_for(0, (blocks + 1) / 2, 4, [&](int64_t b, int64_t e) {
    for (int64_t pair = b; pair < e; ++pair) {
      if (2 * pair + 1 < blocks) packed_rows<2>(xp, M, K, wpp, op, N, 2 * pair);
      else packed_rows<1>(xp, M, K, wpp, op, N, 2 * pair);
    }
  });
#else
  const int64_t pairs = K / 2;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m) {
        float acc = 0.f;
        const uint16_t* wb = wpp + (n / 16) * pairs * 32 + (n % 16) * 2;
        for (int64_t p = 0; p < pairs; ++p)
          acc += bf16_to_float(wb[p * 32]) * bf16_to_float(xp[m * K + 2 * p])
                 + bf16_to_float(wb[p * 32 + 1]) * bf16_to_float(xp[m * K + 2 * p + 1]);
        op[m * N + n] = acc;
      }
  });
#endif
  return out;
}

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.numel() == w.size(-1), "gemv_bf16: x must be one row of w's width");
  return gemm_bf16(x, w);
}

#ifdef __AVX512BF16__
inline __m512 load_bf16x16(const uint16_t* p) {  // 16 bf16 -> 16 fp32 (a bf16 is the top half of an fp32)
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

inline __mmask16 first_lanes(int64_t n) {  // the lanes of a 16-wide vector that hold n (or more) values
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

inline __m512 exp16(__m512 x) {  // e^x for x <= 0 (softmax): 2^n * 2^f, f in [-0.5, 0.5], degree-6 polynomial
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 16 vectors -> one whose lane m is the sum of v[m]'s lanes: a transpose-and-add tree (44 instructions
// where 16 horizontal sums take about 130, each a chain).
inline __m512 sum16(const __m512* v) {
  __m512 w[8], x[4];
  for (int k = 0; k < 8; ++k)  // 128-bit blocks 0-1: v[2k] folded in half, 2-3: v[2k + 1]
    w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // block j: v[4i + j] folded to 4 lanes
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
  const __m512 f = _mm512_add_ps(  // lane 4j + i: the sum of v[4i + j]
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), f);
}

// One key row's dot product with a query head held as bf16 pairs (qb: D / 32 vectors), in 16 fp32 lanes
// still to be summed.
inline __m512 key_dot(const __m512bh* qb, const uint16_t* kr, int64_t C2) {
  __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), qb[0], (__m512bh)_mm512_loadu_si512(kr));
  for (int64_t c = 1; c < C2; ++c) acc = _mm512_dpbf16_ps(acc, qb[c], (__m512bh)_mm512_loadu_si512(kr + 32 * c));
  return acc;
}

// The query heads of one KV head of one sequence: scores against keys 0..position (head by head: a key
// row comes from memory for the first and from the core's cache for the others), softmax in fp32,
// weighted sum of values (each value row read once for the whole group).
inline void group_attention(const uint16_t* qp, const uint16_t* kp, const uint16_t* vp, at::BFloat16* op,
                            float* scores, int64_t b, int64_t kvh, const int64_t* slp, const int64_t* pp, int64_t H,
                            int64_t KVH, int64_t L, int64_t D, int64_t group, float scale) {
  const int64_t T = pp[b] + 1, C = D / 16;
  const uint16_t* kh = kp + (slp[b] * KVH + kvh) * L * D;
  const uint16_t* vh = vp + (slp[b] * KVH + kvh) * L * D;
  // scores: bf16 pair dot products (no conversions), 16 keys at a time summed across lanes by sum16
  const int64_t C2 = D / 32;
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t g = 0; g < group; ++g) {
    const uint16_t* qh = qp + (b * H + kvh * group + g) * D;
    __m512bh qb[8];
    for (int64_t c = 0; c < C2; ++c) qb[c] = (__m512bh)_mm512_loadu_si512(qh + 32 * c);
    int64_t t = 0;
    for (; t + 16 <= T; t += 16) {
      __m512 acc[16];
      for (int u = 0; u < 16; ++u) acc[u] = key_dot(qb, kh + (t + u) * D, C2);
      _mm512_storeu_ps(scores + g * L + t, _mm512_mul_ps(sum16(acc), sc));
    }
    for (; t < T; ++t) scores[g * L + t] = _mm512_reduce_add_ps(key_dot(qb, kh + t * D, C2)) * scale;
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * L;
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < T; t += 16) {
      const __mmask16 m = first_lanes(T - t);
      top = _mm512_mask_max_ps(top, m, top, _mm512_maskz_loadu_ps(m, s + t));
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < T; t += 16) {
      const __mmask16 m = first_lanes(T - t);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), mx));
      _mm512_mask_storeu_ps(s + t, m, e);
      sum = _mm512_mask_add_ps(sum, m, sum, e);
    }
    const float inv = 1.f / _mm512_reduce_add_ps(sum);
    for (int64_t t = 0; t < T; ++t) s[t] *= inv;
  }
  __m512 acc[16][16];
  for (int64_t g = 0; g < group; ++g)
    for (int64_t c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < T; ++t) {
    __m512 vv[16];
    for (int64_t c = 0; c < C; ++c) vv[c] = load_bf16x16(vh + t * D + 16 * c);
    for (int64_t g = 0; g < group; ++g) {
      const __m512 w = _mm512_set1_ps(scores[g * L + t]);
      for (int64_t c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(w, vv[c], acc[g][c]);
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t c = 0; c < C; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + (b * H + kvh * group + g) * D + 16 * c),
                          (__m256i)_mm512_cvtneps_pbh(acc[g][c]));
}
#endif

// One query per sequence over a slot-per-sequence static cache. q (B, H, 1, D); k and v caches
// (S, KVH, L, D) with S >= the slots used; slots (B,): each query's cache slot; positions (B,): each
// query's position, so it attends to slots' entries 0..position and reads nothing past them.
// Returns (B, 1, H, D), the layout the model's output projection expects.
at::Tensor slot_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                          const at::Tensor& positions, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "slot_attention: bf16 tensors only");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "slot_attention: one query per sequence");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), S = k.size(0), KVH = k.size(1), L = k.size(2);
  TORCH_CHECK(H % KVH == 0 && k.size(3) == D && v.sizes() == k.sizes(), "slot_attention: shapes do not match");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "slot_attention: the caches must be contiguous");
  auto sl = slots.to(at::kLong).contiguous();
  auto ps = positions.to(at::kLong).contiguous();
  TORCH_CHECK(sl.numel() == B && ps.numel() == B, "slot_attention: one slot and one position per query");
  const int64_t* slp = sl.data_ptr<int64_t>();
  const int64_t* pp = ps.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(slp[b] >= 0 && slp[b] < S && pp[b] >= 0 && pp[b] < L, "slot_attention: slot or position outside the cache");
  auto qc = q.contiguous();
  auto out = at::empty({B, 1, H, D}, q.options());
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(qc.data_ptr());
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(v.data_ptr());
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const int64_t group = H / KVH;
#ifdef __AVX512BF16__
  if (D % 32 == 0 && D <= 256 && group <= 16) {
    // one task per (sequence, KV head): its `group` query heads share each key and value row read
    at::parallel_for(0, B * KVH, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> scores(group * L);
      for (int64_t task = t0; task < t1; ++task)
        group_attention(qp, kp, vp, op, scores.data(), task / KVH, task % KVH, slp, pp, H, KVH, L, D, group,
                        float(scale));
    });
    return out;
  }
#endif
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf(D), acc(D), p(L);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, T = pp[b] + 1;
      const uint16_t* kh = kp + ((slp[b] * KVH) + h / group) * L * D;
      const uint16_t* vh = vp + ((slp[b] * KVH) + h / group) * L * D;
      const uint16_t* qh = qp + i * D;
      for (int64_t d = 0; d < D; ++d) qf[d] = bf16_to_float(qh[d]) * float(scale);
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
        const float wt = p[t] / total;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += wt * bf16_to_float(vh[t * D + d]);
      }
      for (int64_t d = 0; d < D; ++d) op[i * D + d] = acc[d];
    }
  });
  return out;
}

// The batch-1 case over a (1, KVH, L, D) cache (transformers' static cache) at `position`.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& position, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(0) == 1 && q.size(2) == 1, "decode_attention: one query of batch 1");
  auto slot = at::zeros({1}, position.options().dtype(at::kLong));
  return slot_attention(q, k.contiguous(), v.contiguous(), slot, position.reshape({1}), scale);
}

}  // namespace

TORCH_LIBRARY(roofserve, m) {
  m.def("gemv_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("gemm_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("gemm_packed_bf16(Tensor x, Tensor wp) -> Tensor");
  m.def("set_amx_min_rows(int rows) -> int", &set_amx_min_rows);  // no tensors: a catch-all kernel
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor position, float scale) -> Tensor");
  m.def("slot_attention(Tensor q, Tensor k, Tensor v, Tensor slots, Tensor positions, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(roofserve, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("gemm_bf16", &gemm_bf16);
  m.impl("gemm_packed_bf16", &gemm_packed_bf16);
  m.impl("decode_attention", &decode_attention);
  m.impl("slot_attention", &slot_attention);
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
    torch.library.register_fake("roofserve::gemm_bf16")(_gemv_shape)
    torch.library.register_fake("roofserve::gemm_packed_bf16")(_packed_shape)
    torch.library.register_fake("roofserve::decode_attention")(_attention_shape)
    torch.library.register_fake("roofserve::slot_attention")(_slot_attention_shape)
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


def _packed_shape(x: torch.Tensor, wp: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], wp.shape[0] * 16))


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
    measured; with more rows and no AMX its vector path runs out of dot-product throughput (on a
    2-core Xeon: 2.5x torch at 1 row, 1.4x at 8, 0.9x at 16), so the crossover is measured, not assumed.
    With AMX it won up to 256 rows (a 64-token prompt's linear layers of SmolLM2: 59 ms torch, 30 ours)."""
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
    filled part: the cache is max_seq_len long (2048 keys) while a 64-token prompt fills 64, and eager
    attention over all of them cost more than a third of the prompt's compute here."""
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
