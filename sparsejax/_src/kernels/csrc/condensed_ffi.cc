// Copyright 2026 The sparsejax Authors. Licensed under the Apache License 2.0.
//
// Native CPU kernel for the condensed constant-fan-in (SRigL) format, exposed
// to JAX through the XLA FFI.
//
//   y[b, n]          = bias[n]                          for every output n
//   y[b, active[r]] += sum_j values[r, j] * x[b, indices[r, j]]
//
// Shapes: x [B, K] f32, values [R, k] f32, indices [R, k] s16 or s32 (each in
// [0, K); trusted, not checked: sparsejax.condense guarantees it), active [R]
// s32 (each in [0, N); checked), bias [N] or [0] f32, y [B, N] f32.
//
// Two formulations, chosen per call (attribute `mode`):
//   * "gather" (mode 1): per batch row, an 8-lane AVX2 SIMD gather of
//     x[b, indices[r, j]] multiplied by 8 consecutive values. Best at batch
//     1-2: every value is read once; memory bound (6 bytes per kept weight).
//   * "tiled"  (mode 2): x is transposed once into batch tiles xt [T, K, TW]
//     (TW <= 64 lanes, zero padded); then for each tile, neuron r and input j
//     a broadcast of values[r, j] is multiplied by the contiguous lanes
//     xt[t, indices[r, j], :] (the tile's accumulators live in registers).
//     No gathers: one contiguous load + FMA per non-zero weight and 16 batch
//     lanes. Tiles are the outer loop, so one tile of x (K * 256 bytes) stays
//     in L2 while the weights stream through once per tile. At most 1024 rows
//     are transposed at a time (kSuperBatch), bounding the scratch memory.
//   * mode 0 picks gather for B <= kGatherMaxBatch, tiled otherwise; mode 3 is
//     the gather path with 16-wide AVX-512 gathers (default gathers are 8-wide
//     AVX2 ones, see SelectKernel).
//
// The ISA (attribute `isa`: -1 auto, 0 portable C++, 1 AVX2+FMA, 2 AVX-512F) is
// dispatched at run time with __builtin_cpu_supports, so the library builds
// without -march flags and runs on any x86-64 (and, portable path only, on
// other architectures).
//
// Threading: output neurons are split into chunks handed out through an atomic
// counter to the calling thread and to helpers scheduled on XLA's intra-op
// thread pool (ffi::ThreadPool). The caller only waits for chunks that a
// helper has already claimed, so the call cannot deadlock even if no helper
// ever runs (e.g. the pool is busy or absent).

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>

#include "xla/ffi/api/ffi.h"
#include "ffi_common.h"

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 reports false positives inside the AVX-512 intrinsic headers
// (_mm512_undefined_* placeholders) once they are inlined here.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPARSEJAX_X86 1
#else
#define SPARSEJAX_X86 0
#endif

namespace ffi = xla::ffi;

namespace sparsejax {
namespace {

constexpr int64_t kGatherMaxBatch = 2;
// Below this many multiply-adds a call runs on the calling thread only.
constexpr int64_t kMinParallelWork = 1 << 16;
// The tiled path transposes at most this many batch rows of x at a time.
constexpr int64_t kSuperBatch = 1024;

enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

int DetectIsa() {
#if SPARSEJAX_X86 && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kPortable;
}

int SupportedIsa() {
  static const int isa = DetectIsa();
  return isa;
}

struct Problem {
  const float* x;        // [B, K]
  const float* xt;       // [n_tiles, K, TW] (tiled mode only)
  const float* values;   // [R, k]
  const void* indices;   // [R, k]
  const int32_t* active; // [R]
  const float* bias;     // [N] or nullptr
  float* y;              // [B, N]
  int64_t B, K, R, k, N;
  int64_t TW;       // batch lanes per tile (multiple of the SIMD width, <= 64)
  int64_t n_tiles;  // ceil(B / TW)
};

inline float BiasAt(const Problem& p, int64_t col) { return p.bias ? p.bias[col] : 0.0f; }

// ----------------------------------------------------------------------------
// Portable C++ (any architecture; also the reference for the SIMD paths).
// ----------------------------------------------------------------------------

template <typename IdxT>
void GatherPortable(const Problem& p, int64_t /*tile*/, int64_t r0, int64_t r1) {
  const IdxT* idx = static_cast<const IdxT*>(p.indices);
  for (int64_t r = r0; r < r1; ++r) {
    const float* v = p.values + r * p.k;
    const IdxT* ix = idx + r * p.k;
    const int64_t col = p.active[r];
    for (int64_t b = 0; b < p.B; ++b) {
      const float* xr = p.x + b * p.K;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
      int64_t j = 0;
      for (; j + 4 <= p.k; j += 4) {
        a0 += v[j] * xr[ix[j]];
        a1 += v[j + 1] * xr[ix[j + 1]];
        a2 += v[j + 2] * xr[ix[j + 2]];
        a3 += v[j + 3] * xr[ix[j + 3]];
      }
      for (; j < p.k; ++j) a0 += v[j] * xr[ix[j]];
      p.y[b * p.N + col] = ((a0 + a1) + (a2 + a3)) + BiasAt(p, col);
    }
  }
}

// One batch tile of NV * 16 lanes for one neuron; fixed trip counts let the
// compiler keep the accumulators in (baseline SIMD) registers.
template <typename IdxT, int NV>
inline void TilePortable(const Problem& p, const float* base, const float* v, const IdxT* ix,
                         float* out) {
  constexpr int L = 16 * NV;
  float acc[L];
  for (int t = 0; t < L; ++t) acc[t] = 0.f;
  for (int64_t j = 0; j < p.k; ++j) {
    const float w = v[j];
    const float* px = base + static_cast<int64_t>(ix[j]) * p.TW;
#pragma GCC unroll 64
    for (int t = 0; t < L; ++t) acc[t] += w * px[t];
  }
  for (int t = 0; t < L; ++t) out[t] = acc[t];
}

template <typename IdxT>
void TiledPortable(const Problem& p, int64_t tile, int64_t r0, int64_t r1) {
  const IdxT* idx = static_cast<const IdxT*>(p.indices);
  const int64_t b0 = tile * p.TW;
  const int64_t nb = std::min(p.TW, p.B - b0);
  const float* base = p.xt + tile * p.K * p.TW;
  const int64_t nv = (nb + 15) / 16;
  alignas(64) float out[64];
  for (int64_t r = r0; r < r1; ++r) {
    const float* v = p.values + r * p.k;
    const IdxT* ix = idx + r * p.k;
    switch (nv) {
      case 1: TilePortable<IdxT, 1>(p, base, v, ix, out); break;
      case 2: TilePortable<IdxT, 2>(p, base, v, ix, out); break;
      case 3: TilePortable<IdxT, 3>(p, base, v, ix, out); break;
      default: TilePortable<IdxT, 4>(p, base, v, ix, out); break;
    }
    const int64_t col = p.active[r];
    const float bb = BiasAt(p, col);
    for (int64_t t = 0; t < nb; ++t) p.y[(b0 + t) * p.N + col] = out[t] + bb;
  }
}

#if SPARSEJAX_X86 && defined(__GNUC__)

// ----------------------------------------------------------------------------
// AVX2 + FMA.
// ----------------------------------------------------------------------------

#define SPARSEJAX_AVX2 __attribute__((target("avx2,fma")))

SPARSEJAX_AVX2 inline __m256i LoadIdx8(const int16_t* p) {
  return _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
SPARSEJAX_AVX2 inline __m256i LoadIdx8(const int32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

SPARSEJAX_AVX2 inline float HSum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  lo = _mm_add_ss(lo, sh);
  return _mm_cvtss_f32(lo);
}

template <typename IdxT>
SPARSEJAX_AVX2 void GatherAvx2(const Problem& p, int64_t /*tile*/, int64_t r0, int64_t r1) {
  const IdxT* idx = static_cast<const IdxT*>(p.indices);
  for (int64_t r = r0; r < r1; ++r) {
    const float* v = p.values + r * p.k;
    const IdxT* ix = idx + r * p.k;
    const int64_t col = p.active[r];
    for (int64_t b = 0; b < p.B; ++b) {
      const float* xr = p.x + b * p.K;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 16 <= p.k; j += 16) {
        const __m256 g0 = _mm256_i32gather_ps(xr, LoadIdx8(ix + j), 4);
        const __m256 g1 = _mm256_i32gather_ps(xr, LoadIdx8(ix + j + 8), 4);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j), g0, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j + 8), g1, a1);
      }
      for (; j + 8 <= p.k; j += 8) {
        const __m256 g0 = _mm256_i32gather_ps(xr, LoadIdx8(ix + j), 4);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j), g0, a0);
      }
      float s = HSum256(_mm256_add_ps(a0, a1));
      for (; j < p.k; ++j) s += v[j] * xr[ix[j]];
      p.y[b * p.N + col] = s + BiasAt(p, col);
    }
  }
}

// One batch tile of NV * 8 lanes for one neuron, U independent FMA chains.
template <typename IdxT, int NV>
SPARSEJAX_AVX2 inline void TileAvx2(const Problem& p, const float* base, const float* v,
                                    const IdxT* ix, float* out) {
  constexpr int U = NV >= 4 ? 1 : (NV == 1 ? 4 : 2);
  __m256 acc[U][NV];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t) acc[u][t] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + U <= p.k; j += U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const __m256 w = _mm256_broadcast_ss(v + j + u);
      const float* px = base + static_cast<int64_t>(ix[j + u]) * p.TW;
#pragma GCC unroll 8
      for (int t = 0; t < NV; ++t)
        acc[u][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(px + 8 * t), acc[u][t]);
    }
  }
  for (; j < p.k; ++j) {
    const __m256 w = _mm256_broadcast_ss(v + j);
    const float* px = base + static_cast<int64_t>(ix[j]) * p.TW;
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t)
      acc[0][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(px + 8 * t), acc[0][t]);
  }
#pragma GCC unroll 8
  for (int t = 0; t < NV; ++t) {
    __m256 s = acc[0][t];
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[u][t]);
    _mm256_storeu_ps(out + 8 * t, s);
  }
}

template <typename IdxT>
SPARSEJAX_AVX2 void TiledAvx2(const Problem& p, int64_t tile, int64_t r0, int64_t r1) {
  const IdxT* idx = static_cast<const IdxT*>(p.indices);
  const int64_t b0 = tile * p.TW;
  const int64_t nb = std::min(p.TW, p.B - b0);
  const float* base = p.xt + tile * p.K * p.TW;
  const int64_t nv = (nb + 7) / 8;
  alignas(64) float out[64];
  for (int64_t r = r0; r < r1; ++r) {
    const float* v = p.values + r * p.k;
    const IdxT* ix = idx + r * p.k;
    switch (nv) {
      case 1: TileAvx2<IdxT, 1>(p, base, v, ix, out); break;
      case 2: TileAvx2<IdxT, 2>(p, base, v, ix, out); break;
      case 3:
      case 4: TileAvx2<IdxT, 4>(p, base, v, ix, out); break;
      default: TileAvx2<IdxT, 8>(p, base, v, ix, out); break;
    }
    const int64_t col = p.active[r];
    const float bb = BiasAt(p, col);
    for (int64_t t = 0; t < nb; ++t) p.y[(b0 + t) * p.N + col] = out[t] + bb;
  }
}

// ----------------------------------------------------------------------------
// AVX-512F.
// ----------------------------------------------------------------------------

#define SPARSEJAX_AVX512 __attribute__((target("avx512f")))

SPARSEJAX_AVX512 inline __m512i LoadIdx16(const int16_t* p) {
  return _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
SPARSEJAX_AVX512 inline __m512i LoadIdx16(const int32_t* p) { return _mm512_loadu_si512(p); }

template <typename IdxT>
SPARSEJAX_AVX512 void GatherAvx512(const Problem& p, int64_t /*tile*/, int64_t r0, int64_t r1) {
  const IdxT* idx = static_cast<const IdxT*>(p.indices);
  const int64_t k = p.k;
  const int64_t rem = k % 16;
  const __mmask16 tail_mask = static_cast<__mmask16>((1u << rem) - 1u);
  alignas(64) int32_t tail_idx[16];
  for (int64_t r = r0; r < r1; ++r) {
    const float* v = p.values + r * k;
    const IdxT* ix = idx + r * k;
    const int64_t col = p.active[r];
    __m512i tail_vidx = _mm512_setzero_si512();
    __m512 tail_v = _mm512_setzero_ps();
    if (rem) {
      std::memset(tail_idx, 0, sizeof(tail_idx));
      for (int64_t t = 0; t < rem; ++t) tail_idx[t] = static_cast<int32_t>(ix[k - rem + t]);
      tail_vidx = _mm512_load_si512(tail_idx);
      tail_v = _mm512_maskz_loadu_ps(tail_mask, v + k - rem);
    }
    for (int64_t b = 0; b < p.B; ++b) {
      const float* xr = p.x + b * p.K;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int64_t j = 0;
      for (; j + 32 <= k; j += 32) {
        const __m512 g0 = _mm512_i32gather_ps(LoadIdx16(ix + j), xr, 4);
        const __m512 g1 = _mm512_i32gather_ps(LoadIdx16(ix + j + 16), xr, 4);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(v + j), g0, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(v + j + 16), g1, a1);
      }
      if (j + 16 <= k) {
        const __m512 g0 = _mm512_i32gather_ps(LoadIdx16(ix + j), xr, 4);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(v + j), g0, a0);
      }
      if (rem) {
        const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), tail_mask, tail_vidx, xr, 4);
        a1 = _mm512_fmadd_ps(tail_v, g, a1);
      }
      p.y[b * p.N + col] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + BiasAt(p, col);
    }
  }
}

// One batch tile of NV * 16 lanes for one neuron, U independent FMA chains.
template <typename IdxT, int NV>
SPARSEJAX_AVX512 inline void TileAvx512(const Problem& p, const float* base, const float* v,
                                        const IdxT* ix, float* out) {
  constexpr int U = NV >= 4 ? 2 : (NV == 1 ? 4 : 2);
  __m512 acc[U][NV];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t) acc[u][t] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + U <= p.k; j += U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const __m512 w = _mm512_set1_ps(v[j + u]);
      const float* px = base + static_cast<int64_t>(ix[j + u]) * p.TW;
#pragma GCC unroll 8
      for (int t = 0; t < NV; ++t)
        acc[u][t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(px + 16 * t), acc[u][t]);
    }
  }
  for (; j < p.k; ++j) {
    const __m512 w = _mm512_set1_ps(v[j]);
    const float* px = base + static_cast<int64_t>(ix[j]) * p.TW;
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t)
      acc[0][t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(px + 16 * t), acc[0][t]);
  }
#pragma GCC unroll 8
  for (int t = 0; t < NV; ++t) {
    __m512 s = acc[0][t];
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[u][t]);
    _mm512_storeu_ps(out + 16 * t, s);
  }
}

template <typename IdxT>
SPARSEJAX_AVX512 void TiledAvx512(const Problem& p, int64_t tile, int64_t r0, int64_t r1) {
  const IdxT* idx = static_cast<const IdxT*>(p.indices);
  const int64_t b0 = tile * p.TW;
  const int64_t nb = std::min(p.TW, p.B - b0);
  const float* base = p.xt + tile * p.K * p.TW;
  const int64_t nv = (nb + 15) / 16;
  alignas(64) float out[64];
  for (int64_t r = r0; r < r1; ++r) {
    const float* v = p.values + r * p.k;
    const IdxT* ix = idx + r * p.k;
    switch (nv) {
      case 1: TileAvx512<IdxT, 1>(p, base, v, ix, out); break;
      case 2: TileAvx512<IdxT, 2>(p, base, v, ix, out); break;
      case 3: TileAvx512<IdxT, 3>(p, base, v, ix, out); break;
      default: TileAvx512<IdxT, 4>(p, base, v, ix, out); break;
    }
    const int64_t col = p.active[r];
    const float bb = BiasAt(p, col);
    for (int64_t t = 0; t < nb; ++t) p.y[(b0 + t) * p.N + col] = out[t] + bb;
  }
}

#endif  // SPARSEJAX_X86 && defined(__GNUC__)

// fn(problem, batch tile, first row, end row).
using RowFn = void (*)(const Problem&, int64_t, int64_t, int64_t);

// The gather path uses 8-wide AVX2 gathers even when AVX-512 is available: on the
// Sapphire Rapids dev machine they ran 10-20% faster than 16-wide AVX-512 gathers
// (standalone batch-1 4096x4096 90% microbenchmark); mode 3 keeps the AVX-512
// gather selectable for re-measuring on other CPUs.
template <typename IdxT>
RowFn SelectKernel(int isa, int64_t mode, bool tiled) {
#if SPARSEJAX_X86 && defined(__GNUC__)
  if (tiled) {
    if (isa >= kAvx512) return &TiledAvx512<IdxT>;
    if (isa >= kAvx2) return &TiledAvx2<IdxT>;
  } else {
    if (isa >= kAvx512 && mode == 3) return &GatherAvx512<IdxT>;
    if (isa >= kAvx2) return &GatherAvx2<IdxT>;
  }
#else
  (void)mode;
#endif
  (void)isa;
  return tiled ? &TiledPortable<IdxT> : &GatherPortable<IdxT>;
}

// Lanes of one SIMD register in the tiled path (TW is a multiple of this).
int64_t TileLanes(int isa) { return isa >= kAvx512 ? 16 : (isa >= kAvx2 ? 8 : 16); }

struct Aligned {
  float* ptr = nullptr;
  explicit Aligned(size_t n) {
    const size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;  // a multiple of the alignment
    ptr = static_cast<float*>(std::aligned_alloc(64, bytes > 0 ? bytes : 64));
  }
  ~Aligned() { std::free(ptr); }
  Aligned(const Aligned&) = delete;
  Aligned& operator=(const Aligned&) = delete;
};

// Transposes x [B, K] into tiles [T, K, TW] (zero padded), 64 inputs at a time
// to keep both sides cache friendly.
void TransposeTiles(const Problem& p, float* xt) {
  for (int64_t tile = 0; tile < p.n_tiles; ++tile) {
    const int64_t b0 = tile * p.TW;
    const int64_t nb = std::min(p.TW, p.B - b0);
    float* tt = xt + tile * p.K * p.TW;
    for (int64_t k0 = 0; k0 < p.K; k0 += 64) {
      const int64_t k1 = std::min(p.K, k0 + 64);
      if (nb < p.TW) {
        for (int64_t kk = k0; kk < k1; ++kk)
          std::memset(tt + kk * p.TW + nb, 0, sizeof(float) * (p.TW - nb));
      }
      for (int64_t b = 0; b < nb; ++b) {
        const float* xr = p.x + (b0 + b) * p.K;
        for (int64_t kk = k0; kk < k1; ++kk) tt[kk * p.TW + b] = xr[kk];
      }
    }
  }
}

// Runs fn over all (tile, row chunk) pairs on the caller and n_threads - 1
// helpers from XLA's intra-op pool.
void RunParallel(ffi::ThreadPool& pool, const Problem& p, RowFn fn, int64_t n_threads) {
  if (p.R * p.k * p.B < kMinParallelWork) n_threads = 1;
  // A few chunks per thread balances load when a core is shared.
  int64_t per_tile = std::min<int64_t>(p.R, n_threads == 1 ? 1 : 8 * n_threads);
  const int64_t chunk_rows = (p.R + per_tile - 1) / per_tile;
  per_tile = (p.R + chunk_rows - 1) / chunk_rows;
  sparsejax_ffi::ParallelFor(pool, n_threads, per_tile * p.n_tiles, [&](int64_t c) {
    const int64_t r0 = (c % per_tile) * chunk_rows;
    fn(p, c / per_tile, r0, std::min(p.R, r0 + chunk_rows));
  });
}

std::string DimsToString(ffi::AnyBuffer::Dimensions d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

ffi::Error CondensedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> values, ffi::AnyBuffer indices,
                               ffi::Buffer<ffi::S32> active, ffi::Buffer<ffi::F32> bias,
                               ffi::ResultBuffer<ffi::F32> y, int64_t mode, int64_t isa,
                               int64_t threads) {
  const auto xd = x.dimensions();
  const auto vd = values.dimensions();
  const auto id = indices.dimensions();
  const auto ad = active.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || vd.size() != 2 || id.size() != 2 || ad.size() != 1 || yd.size() != 2) {
    return ffi::Error::InvalidArgument("sparsejax_condensed_matmul: expected x [B, K], values "
                                       "[R, k], indices [R, k], active [R], y [B, N]");
  }
  const int64_t B = xd[0], K = xd[1], R = vd[0], k = vd[1], N = yd[1];
  if (id[0] != R || id[1] != k || ad[0] != R || yd[0] != B || R > N) {
    return ffi::Error::InvalidArgument(
        "sparsejax_condensed_matmul: inconsistent shapes x" + DimsToString(xd) + " values" +
        DimsToString(vd) + " indices" + DimsToString(id) + " active" + DimsToString(ad) + " y" +
        DimsToString(yd));
  }
  const bool idx16 = indices.element_type() == ffi::DataType::S16;
  if (!idx16 && indices.element_type() != ffi::DataType::S32) {
    return ffi::Error::InvalidArgument("sparsejax_condensed_matmul: indices must be int16 or int32");
  }
  const int64_t nbias = static_cast<int64_t>(bias.element_count());
  if (nbias != 0 && nbias != N) {
    return ffi::Error::InvalidArgument("sparsejax_condensed_matmul: bias must have N or 0 entries");
  }
  const int32_t* act = active.typed_data();
  for (int64_t r = 0; r < R; ++r) {
    if (act[r] < 0 || act[r] >= N) {
      return ffi::Error::InvalidArgument("sparsejax_condensed_matmul: active index " +
                                         std::to_string(act[r]) + " out of range [0, " +
                                         std::to_string(N) + ")");
    }
  }

  Problem p;
  p.x = x.typed_data();
  p.xt = nullptr;
  p.values = values.typed_data();
  p.indices = indices.untyped_data();
  p.active = act;
  p.bias = nbias ? bias.typed_data() : nullptr;
  p.y = y->typed_data();
  p.B = B;
  p.K = K;
  p.R = R;
  p.k = k;
  p.N = N;
  p.TW = 0;
  p.n_tiles = 1;

  // Every output starts at its bias (ablated neurons keep only the bias).
  if (R < N || B == 0) {
    for (int64_t b = 0; b < B; ++b) {
      float* yr = p.y + b * N;
      if (p.bias) {
        std::memcpy(yr, p.bias, sizeof(float) * N);
      } else {
        std::memset(yr, 0, sizeof(float) * N);
      }
    }
  }
  if (B == 0 || R == 0) return ffi::Error::Success();
  if (k == 0) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t r = 0; r < R; ++r) p.y[b * N + act[r]] = BiasAt(p, act[r]);
    return ffi::Error::Success();
  }

  const int use_isa = isa < 0 ? SupportedIsa() : std::min<int>(static_cast<int>(isa), SupportedIsa());
  const bool tiled = mode == 2 || (mode == 0 && B > kGatherMaxBatch);

  const RowFn fn =
      idx16 ? SelectKernel<int16_t>(use_isa, mode, tiled) : SelectKernel<int32_t>(use_isa, mode, tiled);
  int64_t n_threads = static_cast<int64_t>(pool.num_threads());
  if (n_threads < 1) n_threads = 1;
  if (threads > 0) n_threads = std::min(n_threads, threads);

  if (!tiled) {
    p.n_tiles = 1;
    RunParallel(pool, p, fn, n_threads);
    return ffi::Error::Success();
  }
  // Tiled: at most kSuperBatch rows at a time, so the transposed copy of x stays
  // small (K * kSuperBatch floats) whatever the batch.
  const int64_t lanes = TileLanes(use_isa);
  const int64_t max_rows = std::min(B, kSuperBatch);
  const int64_t max_tw = std::min<int64_t>(64, ((max_rows + lanes - 1) / lanes) * lanes);
  const int64_t max_tiles = (max_rows + max_tw - 1) / max_tw;
  Aligned xt(static_cast<size_t>(max_tiles * K * max_tw));
  if (xt.ptr == nullptr) {
    return ffi::Error::Internal("sparsejax_condensed_matmul: out of memory for the x tiles");
  }
  for (int64_t s0 = 0; s0 < B; s0 += kSuperBatch) {
    Problem q = p;
    q.B = std::min(kSuperBatch, B - s0);
    q.x = p.x + s0 * K;
    q.y = p.y + s0 * N;
    q.TW = std::min<int64_t>(64, ((q.B + lanes - 1) / lanes) * lanes);
    q.n_tiles = (q.B + q.TW - 1) / q.TW;
    TransposeTiles(q, xt.ptr);
    q.xt = xt.ptr;
    RunParallel(pool, q, fn, n_threads);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace sparsejax

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsejaxCondensedMatmul, sparsejax::CondensedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // values
                                  .Arg<ffi::AnyBuffer>()         // indices
                                  .Arg<ffi::Buffer<ffi::S32>>()  // active
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("threads"));

// ----------------------------------------------------------------------------
// Python module: hands the handler to jax.ffi.register_ffi_target.
// ----------------------------------------------------------------------------

static PyObject* Registrations(PyObject*, PyObject*) {
  return sparsejax_ffi::RegistrationDict(
      {{"sparsejax_condensed_matmul", reinterpret_cast<void*>(&SparsejaxCondensedMatmul)}});
}

static PyObject* CpuIsa(PyObject*, PyObject*) {
  static const char* names[] = {"portable", "avx2", "avx512"};
  return PyUnicode_FromString(names[sparsejax::SupportedIsa()]);
}

static PyMethodDef kMethods[] = {
    {"registrations", Registrations, METH_NOARGS,
     "Dict of XLA FFI target name -> PyCapsule holding the handler."},
    {"cpu_isa", CpuIsa, METH_NOARGS,
     "Best SIMD level detected at run time: 'avx512', 'avx2' or 'portable'."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_condensed_native",
                              "Native XLA FFI CPU kernel for sparsejax condensed layers.", -1,
                              kMethods};

PyMODINIT_FUNC PyInit__condensed_native(void) { return PyModule_Create(&kModule); }
