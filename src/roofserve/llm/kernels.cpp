// CPU kernels for bf16 decode steps, registered as torch operators (namespace roofserve).
// Built by roofserve.llm.kernels.build with g++ -O3 -march=native -fopenmp on first use; see kernels.py
// for what each operator does and which layer calls it.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>
#if defined(__AVX512BF16__) || defined(__AVX512VNNI__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__)
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
// the kernel well below the read bandwidth; the distance was the best of 0-128 where measured
// (docs/kernels.md). -DPF_DIST=N overrides it.
#ifndef PF_DIST
#define PF_DIST 64
#endif
// One row stays on the vector path: alternating in one compiled decode step, the vectors won at 1 row
// and the tiles from 2 rows on (docs/kernels.md).
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

#if defined(__AMX_TILE__)
// Linux hands out AMX's tile registers only on request, once per process (all its threads); where it
// refuses (an old kernel, a hypervisor that hides the state), the tile paths below are not taken.
bool amx_ready() {
  static const bool ready = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ready;
}

struct TileConfig {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
#endif

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
// AMX: the same packed weights are tiles as they lie (16 pairs x 16 columns, 1 KB each), so from
// AMX_MIN_ROWS input rows one tile instruction does what 16 dot products per row do above, and the
// kernel is left reading weights.

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

int64_t set_amx_min_rows(int64_t rows) { return std::exchange(amx_min_rows, rows); }

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

// ---- Quantized weights (GGUF's 4-, 6- and 8-bit block formats, repacked once at load) ----
// Every format becomes w[n, k] = d[n, b] * u[n, k] + m[n, b] for blocks b of 32 k, with u unsigned (4 or 8
// bits): Q4_0 is u = q (0..15), m = -8d; Q8_0 is u = q + 128, m = -128d; Q4_1 and Q4_K keep a stored m.
// Q6_K has a scale per 16 k: w = d * sc * (u - 32), u = q (0..63), so each block's two halves are summed
// apart (SCALES 3 below), and the inputs carry -32 x the sums of each block's halves for the -32.
// The inputs are quantized per row to int8 (xq, scale dx) as llama.cpp does, so a block's dot product is an
// integer one: sum_k w x = d dx sum(u xq) + m dx sum(xq); one scale per block of 32 k (llama.cpp's Q8_0
// inputs), except for Q6_K: one per 256 k (its Q8_K), applied once per 256 k instead of once per block.
// Layout (pack_gguf below; pack8 in llm/gguf.py): per block of 16 output columns, per block of 32 k, the
// 16 x 32 values as 64-byte vectors of 16 columns x 4 consecutive k, which is what AVX512-VNNI's vpdpbusd
// multiplies by a broadcast group of 4 input bytes: vector j holds k = 4j..4j+3 (8 bits: 8 vectors, 512
// bytes) or, 4 bits, k = 4j.. in the low nibbles and k = 16 + 4j.. in the high ones (4 vectors, 256 bytes),
// or, 6 bits, those 4 vectors of the low 4 bits and 2 of the high 2 (vector h, bits 2i..2i+1: those of
// vector 4h + i; 384 bytes). d and m: (N/16, K/32, 16) fp16. Accumulators hold 16 outputs, so no
// horizontal sums are left, and each loaded weight vector serves every input row of the tile.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) bits = sign | 0x7F800000 | (man << 13);
  else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
  else if (man) {  // subnormal
    int e = -1;
    uint32_t m = man;
    do { ++e; m <<= 1; } while (!(m & 0x400));
    bits = sign | (uint32_t(112 - e) << 23) | ((m & 0x3FF) << 13);
  } else bits = sign;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// The quantized inputs of M rows: xq (M x K int8), per row and block of 32 k dx (the absolute maximum / 127 of
// the block's group: the block, or its 256 k), cx = dx * sum(xq) (what a stored m multiplies), off = mfac *
// sum(xq) (where a block's integer sums start when m = mfac * d: the -8 or -128 of Q4_0 and Q8_0, exact) and,
// for Q6_K's halves, halves (-32 x the sums of the block's first and last 16: two per block).
struct Inputs {
  const int8_t* xq;
  const float *dx, *cx;
  const int32_t *off, *halves;
  int64_t K;
  Inputs from(int64_t row) const {  // rows [row, M)
    const int64_t r = row * (K / 32);
    return {xq + row * K, dx + r, cx + r, off + r, halves + 2 * r, K};
  }
};

// group: 32 or 256 k per scale (a divisor of K)
template <typename T>
void quantize_inputs(const T* x, int64_t M, int64_t K, int64_t group, int32_t mfac, int8_t* xq, float* dx, float* cx,
                     int32_t* off, int32_t* halves) {
  const int64_t per = group / 32;  // blocks per group
  for (int64_t g = 0; g < M * (K / 32); g += per) {
    float top = 0.f;
    for (int64_t t = 0; t < group; ++t) top = std::max(top, std::fabs(float(x[g * 32 + t])));
    const float scale = top / 127.f, inv = top > 0.f ? 127.f / top : 0.f;
    for (int64_t i = g; i < g + per; ++i) {
      int sum = 0;
      for (int t = 0; t < 32; ++t) {
        const int q = int(std::nearbyint(float(x[i * 32 + t]) * inv));
        xq[i * 32 + t] = int8_t(q);
        sum += q;
        if (t == 15) halves[2 * i] = -32 * sum;
      }
      halves[2 * i + 1] = -32 * sum - halves[2 * i];
      dx[i] = scale;
      cx[i] = scale * float(sum);
      off[i] = mfac * sum;
    }
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#ifndef QPF_BLOCKS
#define QPF_BLOCKS 8  // software prefetch, in blocks of 32 k ahead (2-4 KB)
#endif
// Rows [0, MB) of the inputs by column block cb, all of K.
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {
#ifdef __AVX512BF16__
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
#else  // VNNI without BF16 (e.g. Ice Lake): round each to nearest even
  alignas(64) float f[16];
  _mm512_store_ps(f, v);
  for (int i = 0; i < 16; ++i) p[i] = at::BFloat16(f[i]);
#endif
}

// SCALES: 0, fp16 d per block (m = mfac * d); 1, fp16 d and m per block; 2 (Q4_K as stored): per block a
// 6-bit scale and minimum (uint8, (N/16, K/32, 2, 16)), per 256 weights fp16 d and dmin ((N/16, K/256, 2, 16)):
// w = d * scale * u - dmin * minimum; 3 (Q6_K as stored): per block the int8 scales of its two halves
// (int8, (N/16, K/32, 2, 16)), per 256 weights fp16 d ((N/16, K/256, 16)): w = d * scale * (u - 32).
// One column block's scales (cb of N/16, K/32 blocks): at(b) gives the 16 columns' d and m of block b
// (SCALES 3: the d * scale of its first and second half).
template <int SCALES>
struct ColumnScales {
  const uint16_t* db;  // fp16 d per block, or (SCALES 2) d and dmin, (3) d, per 256 weights
  const uint16_t* mb;  // SCALES 1: fp16 m per block
  const uint8_t* sb;   // SCALES 2: 6-bit scales and minimums per block; 3: int8 scales of the halves
  ColumnScales(const uint16_t* d, const void* mn, int64_t cb, int64_t blocks)
      : db(d + cb * (SCALES == 2 ? blocks / 8 * 32 : SCALES == 3 ? blocks / 8 * 16 : blocks * 16)),
        mb(SCALES == 1 ? static_cast<const uint16_t*>(mn) + cb * blocks * 16 : nullptr),
        sb(SCALES >= 2 ? static_cast<const uint8_t*>(mn) + cb * blocks * 32 : nullptr) {}

  inline void at(int64_t b, float mfac, __m512& dw, __m512& mw) const {
    if (SCALES == 3) {
      const __m512 sd = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(db + (b / 8) * 16)));
      const __m128i* sc = reinterpret_cast<const __m128i*>(sb + b * 32);
      dw = _mm512_mul_ps(sd, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(sc))));
      mw = _mm512_mul_ps(sd, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(sc + 1))));
    } else if (SCALES == 2) {
      const uint16_t* sup = db + (b / 8) * 32;
      const __m512 sd = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sup)));
      const __m512 smin = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sup + 16)));
      const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + b * 32))));
      const __m512 mc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + b * 32 + 16))));
      dw = _mm512_mul_ps(sd, sc);
      mw = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(smin, mc));
    } else {
      dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(db + b * 16)));
      mw = SCALES == 1 ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mb + b * 16)))
                       : _mm512_mul_ps(dw, _mm512_set1_ps(mfac));
    }
  }
};

// One input row's block (index rb of the inputs' blocks) added to its 16 outputs: isum = sum(u xq) per
// column, from in.off (SCALES 0).
template <int SCALES>
inline __m512 add_block(__m512 acc, __m512i isum, __m512 dw, __m512 mw, const Inputs& in, int64_t rb) {
  acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(in.dx[rb])), dw, acc);
  return SCALES != 0 ? _mm512_fmadd_ps(mw, _mm512_set1_ps(in.cx[rb]), acc) : acc;
}

// The same for Q6_K (SCALES 3): a block's half sums lo and hi (each from -32 x the inputs' sum, in.halves:
// exact integers) times their scales dlo and dhi, into its super-block's part (not yet times the inputs'
// scale, which is one per 256 k).
inline __m512 add_halves(__m512 part, __m512i lo, __m512i hi, __m512 dlo, __m512 dhi) {
  part = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), dlo, part);
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), dhi, part);
}

// A 6-bit block (384 bytes) as the 8 vectors of 8-bit values that the dot products take.
inline void unpack6(const uint8_t* w, __m512i* wv) {
  const __m512i low = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
  const __m512i h0 = _mm512_loadu_si512(w + 256), h1 = _mm512_loadu_si512(w + 320);
  for (int j = 0; j < 4; ++j) {
    const __m512i v = _mm512_loadu_si512(w + 64 * j);
    wv[j] = _mm512_and_si512(v, low);
    wv[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
  }
  // bits 2i..2i+1 of h to bits 4..5: shifts within 16-bit lanes, the bits from the other byte masked off
  // (ternary logic 0xF8: a | (b & c))
  wv[0] = _mm512_ternarylogic_epi32(wv[0], _mm512_slli_epi16(h0, 4), top, 0xF8);
  wv[1] = _mm512_ternarylogic_epi32(wv[1], _mm512_slli_epi16(h0, 2), top, 0xF8);
  wv[2] = _mm512_ternarylogic_epi32(wv[2], h0, top, 0xF8);
  wv[3] = _mm512_ternarylogic_epi32(wv[3], _mm512_srli_epi16(h0, 2), top, 0xF8);
  wv[4] = _mm512_ternarylogic_epi32(wv[4], _mm512_slli_epi16(h1, 4), top, 0xF8);
  wv[5] = _mm512_ternarylogic_epi32(wv[5], _mm512_slli_epi16(h1, 2), top, 0xF8);
  wv[6] = _mm512_ternarylogic_epi32(wv[6], h1, top, 0xF8);
  wv[7] = _mm512_ternarylogic_epi32(wv[7], _mm512_srli_epi16(h1, 2), top, 0xF8);
}

template <int MB, int BITS, int SCALES, typename OUT>
inline void quant_tile(const Inputs& in, const uint8_t* u, const uint16_t* d, const void* mn, float mfac, OUT* out,
                       int64_t N, int64_t cb) {
  const int64_t K = in.K, blocks = K / 32, bytes = BITS * 64;
  const uint8_t* ub = u + cb * blocks * bytes;
  const ColumnScales<SCALES> scales(d, mn, cb, blocks);
  // Q6_K (SCALES 3): the inputs' scale applied once per 256 k, part holding the super-block's sums before it
  constexpr bool SUPER = SCALES == 3;
  constexpr int64_t G = SUPER ? 8 : 1;  // blocks per input scale applied
  __m512 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b0 = 0; b0 < blocks; b0 += G) {
    __m512 part[MB];
    for (int i = 0; i < MB; ++i) part[i] = _mm512_setzero_ps();
    for (int64_t b = b0; b < b0 + G; ++b) {
      const uint8_t* w = ub + b * bytes;
      _mm_prefetch(reinterpret_cast<const char*>(w + QPF_BLOCKS * bytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + QPF_BLOCKS * bytes + 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + QPF_BLOCKS * bytes + 128), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + QPF_BLOCKS * bytes + 192), _MM_HINT_T0);
      if (BITS >= 6) {
        _mm_prefetch(reinterpret_cast<const char*>(w + QPF_BLOCKS * bytes + 256), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w + QPF_BLOCKS * bytes + 320), _MM_HINT_T0);
      }
      if (BITS == 8) {
        _mm_prefetch(reinterpret_cast<const char*>(w + QPF_BLOCKS * bytes + 384), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w + QPF_BLOCKS * bytes + 448), _MM_HINT_T0);
      }
      __m512i wv[8];
      if (BITS == 6) {
        unpack6(w, wv);
      } else if (BITS == 4) {
        for (int j = 0; j < 4; ++j) {
          const __m512i v = _mm512_loadu_si512(w + 64 * j);
          wv[j] = _mm512_and_si512(v, low);
          wv[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
      } else {
        for (int j = 0; j < 8; ++j) wv[j] = _mm512_loadu_si512(w + 64 * j);
      }
      __m512 dw, mw;
      scales.at(b, mfac, dw, mw);
      for (int i = 0; i < MB; ++i) {
        const int8_t* xb = in.xq + i * K + b * 32;
        const int64_t rb = i * blocks + b;
        // SCALES 3: k 0-15, 16-31, each from its -32 x the inputs' sum
        __m512i isum[2] = {SCALES == 0   ? _mm512_set1_epi32(in.off[rb])
                           : SCALES == 3 ? _mm512_set1_epi32(in.halves[2 * rb])
                                         : _mm512_setzero_si512(),
                           SCALES == 3 ? _mm512_set1_epi32(in.halves[2 * rb + 1]) : _mm512_setzero_si512()};
        for (int j = 0; j < 8; ++j) {
          int32_t group;
          __builtin_memcpy(&group, xb + 4 * j, 4);
          __m512i& sum = isum[SCALES == 3 && j >= 4];
          sum = _mm512_dpbusd_epi32(sum, wv[j], _mm512_set1_epi32(group));
        }
        if (SCALES == 3) part[i] = add_halves(part[i], isum[0], isum[1], dw, mw);  // dw, mw: the halves' scales
        else acc[i] = add_block<SCALES>(acc[i], isum[0], dw, mw, in, rb);
      }
    }
    if (SUPER)
      for (int i = 0; i < MB; ++i) acc[i] = _mm512_fmadd_ps(part[i], _mm512_set1_ps(in.dx[i * blocks + b0]), acc[i]);
  }
  for (int i = 0; i < MB; ++i) store16(out + i * N + cb * 16, acc[i]);
}

template <int BITS, int SCALES, typename OUT>
void quant_rows(const Inputs& in, int64_t M, const uint8_t* u, const uint16_t* d, const void* mn, float mfac, OUT* out,
                int64_t N, int64_t cb) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) quant_tile<8, BITS, SCALES>(in.from(m), u, d, mn, mfac, out + m * N, N, cb);
  switch (M - m) {
    case 7: quant_tile<7, BITS, SCALES>(in.from(m), u, d, mn, mfac, out + m * N, N, cb); break;
    case 6: quant_tile<6, BITS, SCALES>(in.from(m), u, d, mn, mfac, out + m * N, N, cb); break;
    case 5: quant_tile<5, BITS, SCALES>(in.from(m), u, d, mn, mfac, out + m * N, N, cb); break;
    case 4: quant_tile<4, BITS, SCALES>(in.from(m), u, d, mn, mfac, out + m * N, N, cb); break;
    case 3: quant_tile<3, BITS, SCALES>(in.from(m), u, d, mn, mfac, out + m * N, N, cb); break;
    case 2: quant_tile<2, BITS, SCALES>(in.from(m), u, d, mn, mfac, out + m * N, N, cb); break;
    case 1: quant_tile<1, BITS, SCALES>(in.from(m), u, d, mn, mfac, out + m * N, N, cb); break;
  }
}

#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
// AMX: one tile instruction (tdpbsud: signed inputs, unsigned weights) multiplies up to 16 input rows by a
// column block's 32 k; the 8-bit layout is such a tile as it lies (8 rows of 16 columns x 4 k), 4-bit
// blocks are unpacked to one first. Each block has its own scales, so its 16 x 16 integer sums leave the
// tile every block and are scaled as on the vector path (the same operations, so the same results).
// Four blocks are in flight at once (tiles 0-3): while the vector units scale block b's sums, the tile
// unit works on the blocks after it. Tiles 4-5 hold inputs, 6-7 weights.
// Block b into sums tile t (0-3): inputs xq (the row tile's, row stride K), weights w (a 512-byte tile).
// HALF (Q6_K): half-block b (16 k) instead, weights a 256-byte tile (the tiles configured to match).
template <bool HALF>
inline void issue_block(int t, const int8_t* xq, int64_t K, int64_t b, const uint8_t* w) {
  constexpr int64_t k = HALF ? 16 : 32, bytes = HALF ? 256 : 512;
  for (int line = 0; line < bytes / 64; ++line)
    _mm_prefetch(reinterpret_cast<const char*>(w + QPF_BLOCKS * bytes + 64 * line), _MM_HINT_T0);
  switch (t) {
    case 0: _tile_loadd(4, xq + b * k, K); _tile_loadd(6, w, 64); _tile_zero(0); _tile_dpbsud(0, 4, 6); break;
    case 1: _tile_loadd(5, xq + b * k, K); _tile_loadd(7, w, 64); _tile_zero(1); _tile_dpbsud(1, 5, 7); break;
    case 2: _tile_loadd(4, xq + b * k, K); _tile_loadd(6, w, 64); _tile_zero(2); _tile_dpbsud(2, 4, 6); break;
    default: _tile_loadd(5, xq + b * k, K); _tile_loadd(7, w, 64); _tile_zero(3); _tile_dpbsud(3, 5, 7); break;
  }
}

inline void store_sums(int t, int32_t* sums) {
  switch (t) {
    case 0: _tile_stored(0, sums, 64); break;
    case 1: _tile_stored(1, sums, 64); break;
    case 2: _tile_stored(2, sums, 64); break;
    default: _tile_stored(3, sums, 64); break;
  }
}

// Rows [0, M) (M <= MB <= 16; the scratch holds MB rows) by column block cb, all of K; tiles: the column
// block's weights as 8-bit tiles, 512 bytes per block of 32 k. Q6_K (SCALES 3) goes by half-blocks, each
// into its own sums tile, so that each half meets its own scale as on the vector path.
template <int MB, int SCALES, typename OUT>
void amx_quant_tile(const Inputs& in, int64_t M, const uint8_t* tiles, const uint16_t* d, const void* mn, float mfac,
                    OUT* out, int64_t N, int64_t cb) {
  constexpr bool HALF = SCALES == 3;
  constexpr int64_t per = HALF ? 2 : 1, bytes = HALF ? 256 : 512;  // tile blocks per block of 32 k
  const int64_t K = in.K, blocks = K / 32, steps = blocks * per;
  const ColumnScales<SCALES> scales(d, mn, cb, blocks);
  alignas(64) int32_t sums[2][16][16];
  __m512 acc[MB], part[MB];  // part: Q6_K's super-block sums, as on the vector path
  for (int i = 0; i < MB; ++i) acc[i] = part[i] = _mm512_setzero_ps();
  for (int64_t h = 0; h < std::min<int64_t>(4, steps); ++h) issue_block<HALF>(int(h), in.xq, K, h, tiles + h * bytes);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t e = 0; e < per; ++e) {
      const int64_t h = b * per + e;
      store_sums(int(h & 3), &sums[e][0][0]);
      if (h + 4 < steps) issue_block<HALF>(int(h & 3), in.xq, K, h + 4, tiles + (h + 4) * bytes);
    }
    __m512 dw, mw;
    scales.at(b, mfac, dw, mw);
    for (int i = 0; i < MB; ++i) {
      const int64_t rb = i * blocks + b;
      const __m512i s0 = _mm512_load_si512(sums[0][i]);
      if (HALF) {
        const __m512i lo = _mm512_add_epi32(s0, _mm512_set1_epi32(in.halves[2 * rb]));
        const __m512i hi = _mm512_add_epi32(_mm512_load_si512(sums[1][i]), _mm512_set1_epi32(in.halves[2 * rb + 1]));
        part[i] = add_halves(part[i], lo, hi, dw, mw);
      } else {
        acc[i] = add_block<SCALES>(acc[i], SCALES == 0 ? _mm512_add_epi32(s0, _mm512_set1_epi32(in.off[rb])) : s0, dw,
                                   mw, in, rb);
      }
    }
    if (HALF && b % 8 == 7)
      for (int i = 0; i < MB; ++i) {
        acc[i] = _mm512_fmadd_ps(part[i], _mm512_set1_ps(in.dx[i * blocks + b]), acc[i]);
        part[i] = _mm512_setzero_ps();
      }
  }
  for (int i = 0; i < MB; ++i)
    if (i < M) store16(out + i * N + cb * 16, acc[i]);
}

// A column block's 4- or 6-bit weights (blocks of 256 or 384 bytes) as 8-bit tiles (512 bytes), once for
// all row tiles.
template <int BITS>
inline void unpack_tiles(const uint8_t* w, int64_t blocks, uint8_t* tiles) {
  constexpr int64_t bytes = BITS * 64;
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < blocks; ++b, w += bytes, tiles += 512) {
    for (int line = 0; line < bytes / 64; ++line)
      _mm_prefetch(reinterpret_cast<const char*>(w + QPF_BLOCKS * bytes + 64 * line), _MM_HINT_T0);
    if (BITS == 6) {
      __m512i wv[8];
      unpack6(w, wv);
      for (int r = 0; r < 8; ++r) _mm512_store_si512(tiles + 64 * r, wv[r]);
      continue;
    }
    for (int r = 0; r < 4; ++r) {
      const __m512i v = _mm512_loadu_si512(w + 64 * r);
      _mm512_store_si512(tiles + 64 * r, _mm512_and_si512(v, low));
      _mm512_store_si512(tiles + 64 * (r + 4), _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
    }
  }
}

// Tiles 0-3 (sums) and 4-5 (inputs) of `rows` rows, 6-7 one block of weights (half a block: 16 k).
inline void configure_quant_tiles(int64_t rows, bool half) {
  alignas(64) TileConfig cfg = {};
  cfg.palette_id = 1;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = uint8_t(rows), cfg.colsb[t] = 64;
  for (int t = 4; t < 6; ++t) cfg.rows[t] = uint8_t(rows), cfg.colsb[t] = half ? 16 : 32;
  for (int t = 6; t < 8; ++t) cfg.rows[t] = half ? 4 : 8, cfg.colsb[t] = 64;
  asm volatile("" : : "r"(&cfg) : "memory");  // g++ 12 dropped the stores above (the config reads 64 bytes)
  _tile_loadconfig(&cfg);
}

// All M rows: groups of 4 column blocks split among threads; per group, tiles of 16 rows one after the
// other, each through the group's 4 blocks: the weights come from memory once (4- and 6-bit ones unpacked
// once) and then from the core's cache, and each row tile's inputs are read once per 4 column blocks.
template <int BITS, int SCALES, typename OUT>
void amx_quant(const Inputs& in, int64_t M, const uint8_t* u, const uint16_t* d, const void* mn, float mfac, OUT* out,
               int64_t N) {
  constexpr int64_t G = 4;
  constexpr bool unpack = BITS != 8;
  const int64_t cblocks = N / 16, blocks = in.K / 32;
  at::parallel_for(0, (cblocks + G - 1) / G, 1, [&](int64_t g0, int64_t g1) {
    thread_local std::vector<uint8_t> unpacked;  // a group's tiles (4- and 6-bit weights), kept between calls
    if (unpack) unpacked.resize(G * blocks * 512 + 64);
    uint8_t* buffer =
        unpack ? reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(unpacked.data()) + 63) & ~uintptr_t(63)) : nullptr;
    int64_t configured = 0;
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t first = g * G, count = std::min<int64_t>(G, cblocks - first);
      const uint8_t* tiles[G];
      for (int64_t j = 0; j < count; ++j) {
        tiles[j] = u + (first + j) * blocks * BITS * 64;
        if (unpack) {
          unpack_tiles<BITS>(tiles[j], blocks, buffer + j * blocks * 512);
          tiles[j] = buffer + j * blocks * 512;
        }
      }
      for (int64_t m = 0; m < M; m += 16) {
        const int64_t rows = std::min<int64_t>(16, M - m);
        if (rows != configured) configure_quant_tiles(rows, SCALES == 3), configured = rows;
        const Inputs part = in.from(m);
        for (int64_t j = 0; j < count; ++j) {
          if (rows > 8)
            amx_quant_tile<16, SCALES>(part, rows, tiles[j], d, mn, mfac, out + m * N, N, first + j);
          else if (rows > 4)
            amx_quant_tile<8, SCALES>(part, rows, tiles[j], d, mn, mfac, out + m * N, N, first + j);
          else
            amx_quant_tile<4, SCALES>(part, rows, tiles[j], d, mn, mfac, out + m * N, N, first + j);
        }
      }
    }
    if (configured) _tile_release();
  });
}
#define HAVE_AMX_QUANT 1
#endif
#else
// Plain loops over the same layout, for CPUs without AVX512-VNNI.
template <int BITS, int SCALES, typename OUT>
void quant_rows(const Inputs& in, int64_t M, const uint8_t* u, const uint16_t* d, const void* mn, float mfac, OUT* out,
                int64_t N, int64_t cb) {
  const int64_t K = in.K, blocks = K / 32, bytes = BITS * 64;
  const uint16_t* mh = static_cast<const uint16_t*>(mn);
  const uint8_t* sb = static_cast<const uint8_t*>(mn);
  for (int64_t i = 0; i < M; ++i) {
    float acc[16] = {0};
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* w = u + (cb * blocks + b) * bytes;
      const int8_t* xb = in.xq + i * K + b * 32;
      const int64_t rb = i * blocks + b;
      int32_t isum[2][16] = {};  // SCALES 3: k 0-15, 16-31 apart
      for (int j = 0; j < 8; ++j)
        for (int c = 0; c < 16; ++c)
          for (int t = 0; t < 4; ++t) {
            int v = BITS == 8 ? w[j * 64 + 4 * c + t] : (w[(j & 3) * 64 + 4 * c + t] >> (j < 4 ? 0 : 4)) & 0x0F;
            if (BITS == 6) v |= ((w[256 + (j / 4) * 64 + 4 * c + t] >> (2 * (j % 4))) & 3) << 4;
            isum[SCALES == 3 && j >= 4][c] += v * int(xb[4 * j + t]);
          }
      for (int c = 0; c < 16; ++c) {
        if (SCALES == 3) {
          const float sd = half_to_float(d[(cb * blocks / 8 + b / 8) * 16 + c]);
          const int8_t* sc = reinterpret_cast<const int8_t*>(sb) + (cb * blocks + b) * 32;
          const float lo = float(isum[0][c] + in.halves[2 * rb]), hi = float(isum[1][c] + in.halves[2 * rb + 1]);
          acc[c] += (hi * (sd * float(sc[16 + c])) + lo * (sd * float(sc[c]))) * in.dx[rb];
          continue;
        }
        float dw, mw;
        if (SCALES == 2) {
          const uint16_t* sup = d + (cb * blocks / 8 + b / 8) * 32;
          dw = half_to_float(sup[c]) * float(sb[(cb * blocks + b) * 32 + c]);
          mw = -half_to_float(sup[16 + c]) * float(sb[(cb * blocks + b) * 32 + 16 + c]);
        } else {
          dw = half_to_float(d[(cb * blocks + b) * 16 + c]);
          mw = SCALES == 1 ? half_to_float(mh[(cb * blocks + b) * 16 + c]) : dw * mfac;
        }
        if (SCALES == 0) acc[c] += dw * in.dx[rb] * float(isum[0][c] + in.off[rb]);
        else acc[c] += dw * in.dx[rb] * float(isum[0][c]) + mw * in.cx[rb];
      }
    }
    for (int c = 0; c < 16; ++c) out[i * N + cb * 16 + c] = acc[c];
  }
}
#endif

// From how many rows gemm_quant takes the int8 tile path (where the CPU has one and Linux grants it); a
// runtime setting, as for the bf16 tiles (set_amx_quant_min_rows returns the previous value).
#ifndef AMX_QUANT_MIN_ROWS
#define AMX_QUANT_MIN_ROWS 16
#endif
int64_t amx_quant_min_rows = AMX_QUANT_MIN_ROWS;

int64_t set_amx_quant_min_rows(int64_t rows) { return std::exchange(amx_quant_min_rows, rows); }

// x (..., K) with M rows; u, d, m as laid out above (m empty: m = mfac * d); bits 4, 6 or 8 -> (..., N) in x's
// dtype. Any row count: decode steps (few rows) and prompt chunks (each tile of up to 8 rows re-reads the
// column block's weights from the core's cache).
at::Tensor gemm_quant(const at::Tensor& x, const at::Tensor& u, const at::Tensor& d, const at::Tensor& m,
                      int64_t bits, double mfac) {
  TORCH_CHECK(bits == 4 || bits == 6 || bits == 8, "gemm_quant: bits must be 4, 6 or 8");
  TORCH_CHECK(u.scalar_type() == at::kByte && u.dim() == 3 && u.size(2) == bits * 64 && u.is_contiguous(),
              "gemm_quant: u must be (N/16, K/32, bits * 64) uint8");
  const int64_t cblocks = u.size(0), blocks = u.size(1), N = cblocks * 16, K = blocks * 32;
  TORCH_CHECK(x.size(-1) == K, "gemm_quant: x's last dimension must be the weights' K");
  // m: empty (SCALES 0), fp16 per block (1), uint8 6-bit scales and minimums with fp16 super-blocks in d (2),
  // or int8 scales of the halves with an fp16 d per super-block (3, 6 bits)
  const int scales = m.numel() == 0 ? 0 : m.scalar_type() == at::kByte ? 2 : m.scalar_type() == at::kChar ? 3 : 1;
  TORCH_CHECK((scales == 3) == (bits == 6), "gemm_quant: 6-bit weights go with int8 half-block scales");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous()
              && d.numel() == (scales == 2 ? N * (blocks / 8) * 2 : scales == 3 ? N * (blocks / 8) : N * blocks),
              "gemm_quant: bad d");
  TORCH_CHECK(scales == 0 || (m.is_contiguous() && m.numel() == N * blocks * (scales >= 2 ? 2 : 1)
                              && (scales == 2   ? blocks % 8 == 0 && bits == 4
                                  : scales == 3 ? blocks % 8 == 0
                                                : m.scalar_type() == at::kHalf)),
              "gemm_quant: bad m");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "gemm_quant: bf16 or fp32 inputs");
  const int64_t M = x.numel() / K;
  auto xc = x.contiguous();
  // per-thread scratch for the quantized inputs, kept between calls (no allocation per decode step)
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> dx, cx;
  thread_local std::vector<int32_t> off, halves;
  const int64_t padded = (M + 15) / 16 * 16;  // the tile path reads whole tiles of rows (the rest unused)
  const int32_t moff = scales == 0 ? int32_t(mfac) : 0;  // m = mfac * d: -8 (4 bits) or -128 (8 bits)
  xq.resize(padded * K);
  dx.resize(padded * blocks);
  cx.resize(padded * blocks);
  off.resize(padded * blocks);
  halves.resize(2 * padded * blocks);
  auto quantize = [&](const auto* xp) {
    quantize_inputs(xp, M, K, scales == 3 ? 256 : 32, moff, xq.data(), dx.data(), cx.data(), off.data(), halves.data());
  };
  if (x.scalar_type() == at::kBFloat16) quantize(xc.data_ptr<at::BFloat16>());
  else quantize(xc.data_ptr<float>());
  auto out = out_like(xc, N);
  const uint8_t* up = u.data_ptr<uint8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr());
  const void* mp = scales ? m.data_ptr() : nullptr;
  const float mf = float(mfac);
  const Inputs in{xq.data(), dx.data(), cx.data(), off.data(), halves.data(), K};
  auto run = [&](auto* op) {
#ifdef HAVE_AMX_QUANT
    if (M >= amx_quant_min_rows && amx_ready()) {
      if (bits == 6) amx_quant<6, 3>(in, M, up, dp, mp, mf, op, N);
      else if (bits == 4 && scales == 2) amx_quant<4, 2>(in, M, up, dp, mp, mf, op, N);
      else if (bits == 4 && scales == 1) amx_quant<4, 1>(in, M, up, dp, mp, mf, op, N);
      else if (bits == 4) amx_quant<4, 0>(in, M, up, dp, mp, mf, op, N);
      else if (scales == 1) amx_quant<8, 1>(in, M, up, dp, mp, mf, op, N);
      else amx_quant<8, 0>(in, M, up, dp, mp, mf, op, N);
      return;
    }
#endif
    at::parallel_for(0, cblocks, 4, [&](int64_t c0, int64_t c1) {
      for (int64_t cb = c0; cb < c1; ++cb) {
        if (bits == 6) quant_rows<6, 3>(in, M, up, dp, mp, mf, op, N, cb);
        else if (bits == 4 && scales == 2) quant_rows<4, 2>(in, M, up, dp, mp, mf, op, N, cb);
        else if (bits == 4 && scales == 1) quant_rows<4, 1>(in, M, up, dp, mp, mf, op, N, cb);
        else if (bits == 4) quant_rows<4, 0>(in, M, up, dp, mp, mf, op, N, cb);
        else if (scales == 1) quant_rows<8, 1>(in, M, up, dp, mp, mf, op, N, cb);
        else quant_rows<8, 0>(in, M, up, dp, mp, mf, op, N, cb);
      }
    });
  };
  if (x.scalar_type() == at::kBFloat16) run(out.data_ptr<at::BFloat16>());
  else run(out.data_ptr<float>());
  return out;
}

// ---- Packing GGUF blocks into that layout (at load; llm/gguf.py) ----
// One block of 32 weights of one row, decoded: u unsigned, w = d * u + m.
struct Decoded {
  uint8_t u[32];
  float d, m;
  uint8_t scale, minimum;  // Q4_K: the block's 6-bit scale and minimum (d and m above: times the super-block's)
  uint16_t sd, smin;       // Q4_K: the super-block's fp16 d and dmin, as stored (Q6_K: d)
  int8_t halves[2];        // Q6_K: the int8 scales of the block's two halves
};

inline float read_half(const uint8_t* p) {
  uint16_t h;
  __builtin_memcpy(&h, p, 2);
  return half_to_float(h);
}

// GGUF types by the codes llm/gguf.py passes: 0 Q4_0, 1 Q4_1, 2 Q8_0, 3 Q4_K, 4 Q6_K
inline void decode_block(const uint8_t* row, int64_t b, int64_t kind, Decoded& out) {
  if (kind == 0 || kind == 1) {  // d (, m), 16 bytes: low nibbles are weights 0-15, high nibbles 16-31
    const uint8_t* blk = row + b * (kind == 0 ? 18 : 20);
    out.d = read_half(blk);
    out.m = kind == 0 ? -8.f * out.d : read_half(blk + 2);
    const uint8_t* qs = blk + (kind == 0 ? 2 : 4);
    for (int i = 0; i < 16; ++i) out.u[i] = qs[i] & 0xF, out.u[16 + i] = qs[i] >> 4;
  } else if (kind == 2) {  // d, 32 int8
    const uint8_t* blk = row + b * 34;
    out.d = read_half(blk);
    out.m = -128.f * out.d;
    for (int i = 0; i < 32; ++i) out.u[i] = uint8_t(int(int8_t(blk[2 + i])) + 128);
  } else if (kind == 3) {  // 256 weights: d, dmin, 12 bytes of 6-bit scales and minimums, 128 bytes of nibbles
    const uint8_t* blk = row + (b / 8) * 144;
    const int j = int(b % 8);
    const uint8_t* sc = blk + 4;
    int scale, minimum;
    if (j < 4) scale = sc[j] & 63, minimum = sc[j + 4] & 63;
    else scale = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), minimum = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
    out.d = read_half(blk) * float(scale);
    out.m = -read_half(blk + 2) * float(minimum);
    out.scale = uint8_t(scale), out.minimum = uint8_t(minimum);
    __builtin_memcpy(&out.sd, blk, 2);
    __builtin_memcpy(&out.smin, blk + 2, 2);
    const uint8_t* q = blk + 16 + 32 * (j / 2);  // 64 weights per 32 bytes: low nibbles first
    for (int l = 0; l < 32; ++l) out.u[l] = j % 2 ? q[l] >> 4 : q[l] & 0xF;
  } else {  // Q6_K, 256 weights: 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales, d
    const uint8_t* blk = row + (b / 8) * 210;
    const int j = int(b % 8), half = j / 4, quarter = j % 4;  // 128 weights per half, 32 per quarter
    const uint8_t* ql = blk + 64 * half;
    const uint8_t* qh = blk + 128 + 32 * half;
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192) + 8 * half;
    for (int l = 0; l < 32; ++l) {
      const int low = ql[l + 32 * (quarter & 1)];
      out.u[l] = uint8_t((quarter < 2 ? low & 0xF : low >> 4) | (((qh[l] >> (2 * quarter)) & 3) << 4));
    }
    out.halves[0] = sc[2 * quarter], out.halves[1] = sc[2 * quarter + 1];
    __builtin_memcpy(&out.sd, blk + 208, 2);
  }
}

// raw (rows, bytes per row) of `kind`, rows a multiple of 16, into u (rows/16, K/32, bits * 64), d and m
// ((rows/16, K/32, 16) fp16; m is written for Q4_1 only); Q4_K keeps its own scales: d (rows/16, K/256, 2,
// 16) fp16 super-block d and dmin, m (rows/16, K/32, 2, 16) uint8 scales and minimums (SCALES 2 above);
// Q6_K too: d (rows/16, K/256, 16) fp16, m (rows/16, K/32, 2, 16) int8 scales of the halves (SCALES 3).
void pack_gguf(const at::Tensor& raw, int64_t kind, int64_t k, const at::Tensor& u, const at::Tensor& d,
               const at::Tensor& m) {
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.dim() == 2 && raw.is_contiguous(), "pack_gguf: raw bytes");
  const int64_t rows = raw.size(0), row_bytes = raw.size(1), blocks = k / 32;
  const int64_t bits = kind <= 1 || kind == 3 ? 4 : kind == 4 ? 6 : 8;
  const bool has_min = kind == 1, super = kind == 3, six = kind == 4;
  TORCH_CHECK(rows % 16 == 0 && u.numel() == rows * blocks * bits * 4
              && d.numel() == (super ? rows * (blocks / 8) * 2 : six ? rows * (blocks / 8) : rows * blocks)
              && (!(super || six) || m.numel() == rows * blocks * 2) && (!has_min || m.numel() == rows * blocks),
              "pack_gguf: output sizes do not match");
  const uint8_t* rp = raw.data_ptr<uint8_t>();
  uint8_t* up = u.data_ptr<uint8_t>();
  uint16_t* dp = reinterpret_cast<uint16_t*>(d.data_ptr());
  uint16_t* mp = has_min ? reinterpret_cast<uint16_t*>(m.data_ptr()) : nullptr;
  uint8_t* sp = super ? m.data_ptr<uint8_t>() : six ? reinterpret_cast<uint8_t*>(m.data_ptr<int8_t>()) : nullptr;
  at::parallel_for(0, rows / 16, 1, [&](int64_t c0, int64_t c1) {
    Decoded blk;
    for (int64_t cb = c0; cb < c1; ++cb)
      for (int64_t c = 0; c < 16; ++c) {
        const uint8_t* row = rp + (cb * 16 + c) * row_bytes;
        for (int64_t b = 0; b < blocks; ++b) {
          decode_block(row, b, kind, blk);
          uint8_t* out = up + (cb * blocks + b) * bits * 64;
          if (bits == 8) {
            for (int j = 0; j < 8; ++j)
              for (int t = 0; t < 4; ++t) out[j * 64 + 4 * c + t] = blk.u[4 * j + t];
          } else {
            for (int j = 0; j < 4; ++j)
              for (int t = 0; t < 4; ++t)
                out[j * 64 + 4 * c + t] = (blk.u[4 * j + t] & 0xF) | ((blk.u[16 + 4 * j + t] & 0xF) << 4);
          }
          if (six) {  // the high 2 bits: vector h's bits 2i..2i+1 are those of vector 4h + i
            for (int h = 0; h < 2; ++h)
              for (int t = 0; t < 4; ++t) {
                uint8_t v = 0;
                for (int i = 0; i < 4; ++i) v |= uint8_t((blk.u[4 * (4 * h + i) + t] >> 4) << (2 * i));
                out[256 + h * 64 + 4 * c + t] = v;
              }
            sp[(cb * blocks + b) * 32 + c] = uint8_t(blk.halves[0]);
            sp[(cb * blocks + b) * 32 + 16 + c] = uint8_t(blk.halves[1]);
            if (b % 8 == 0) dp[(cb * blocks / 8 + b / 8) * 16 + c] = blk.sd;
            continue;
          }
          if (super) {
            sp[(cb * blocks + b) * 32 + c] = blk.scale;
            sp[(cb * blocks + b) * 32 + 16 + c] = blk.minimum;
            if (b % 8 == 0) {
              dp[(cb * blocks / 8 + b / 8) * 32 + c] = blk.sd;
              dp[(cb * blocks / 8 + b / 8) * 32 + 16 + c] = blk.smin;
            }
            continue;
          }
          dp[(cb * blocks + b) * 16 + c] = at::Half(blk.d).x;
          if (has_min) mp[(cb * blocks + b) * 16 + c] = at::Half(blk.m).x;
        }
      }
  });
}

}  // namespace

TORCH_LIBRARY(roofserve, m) {
  m.def("gemv_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("gemm_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("gemm_packed_bf16(Tensor x, Tensor wp) -> Tensor");
  m.def("set_amx_min_rows(int rows) -> int", &set_amx_min_rows);  // no tensors: a catch-all kernel
  m.def("set_amx_quant_min_rows(int rows) -> int", &set_amx_quant_min_rows);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor position, float scale) -> Tensor");
  m.def("slot_attention(Tensor q, Tensor k, Tensor v, Tensor slots, Tensor positions, float scale) -> Tensor");
  m.def("gemm_quant(Tensor x, Tensor u, Tensor d, Tensor m, int bits, float mfac) -> Tensor");
  m.def("pack_gguf(Tensor raw, int kind, int k, Tensor(a!) u, Tensor(b!) d, Tensor(c!) m) -> ()");
}
TORCH_LIBRARY_IMPL(roofserve, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("gemm_bf16", &gemm_bf16);
  m.impl("gemm_packed_bf16", &gemm_packed_bf16);
  m.impl("decode_attention", &decode_attention);
  m.impl("slot_attention", &slot_attention);
  m.impl("gemm_quant", &gemm_quant);
  m.impl("pack_gguf", &pack_gguf);
}
