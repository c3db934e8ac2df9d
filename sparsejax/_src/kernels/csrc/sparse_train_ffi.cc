// Copyright 2026 The sparsejax Authors. Licensed under the Apache License 2.0.
//
// Native CPU kernels for TRAINING fixed-capacity CSR sparse layers, exposed to JAX through
// the XLA FFI (design: shared docs SPARSE_TRAINING.md; SparseProp arXiv:2302.04852 and
// Nerva arXiv:2407.17437 for the prior art).
//
// Topology of a layer with kernel W [n_in, n_out] (CSR by output neuron, capacity C):
//   values   [C] f32     value of slot p (the trainable leaf)
//   col      [C] s16|s32 input index of slot p
//   row_ptr  [n_out+1] s32: the slots of output j are row_ptr[j] .. row_ptr[j+1]-1;
//            nnz = row_ptr[n_out] <= C; slots >= nnz are padding (value 0, in no row)
//   csc_ptr  [n_in+1] s32, csc_row [C] s16|s32, csc_slot [C] s32: the transposed view
//            (entries of input i are csc_ptr[i] .. csc_ptr[i+1]-1), used by dX
//
// Activations are FEATURE-MAJOR: the JAX binding requests the physical layout "feature
// major, batch minor" for x [B, n_in], y [B, n_out], dy and dx (ffi_call input_layouts),
// so element (b, i) lives at i*B + b and consecutive layers exchange no transposes.
//
//   sparsejax_sparse_fwd:  y[b, j]  = sum_{p in row j} values[p] * x[b, col[p]]
//   sparsejax_sparse_bwd:  dx[b, i] = sum_{q in column i} values[csc_slot[q]] * dy[b, csc_row[q]]
//                          dv[p]    = sum_b dy[b, row(p)] * x[b, col[p]]   (0 for padding slots)
//                          db[j]    = sum_b dy[b, j]                      (the bias gradient)
//
// Kernels (no gathers, no atomics, no scratch memory; results do not depend on the
// number of threads):
//   * forward and dX: for one batch tile of TW lanes and one output row, TW/16 zmm
//     accumulators; per nonzero a broadcast of its value, then one contiguous load + FMA
//     per 16 batch lanes of the source row; rows of upcoming nonzeros are prefetched.
//   * dV (SDDMM): 16 slots of a row at a time, one accumulator each, streaming dy's row
//     and the 16 x rows 16 lanes at a time; the 16 accumulators are reduced by a
//     transpose-add tree into one vector of 16 sums, stored contiguously.
// ISA (attribute `isa`: -1 auto, 0 portable C++, 1 AVX2+FMA, 2 AVX-512F) is chosen at run
// time with __builtin_cpu_supports; the library builds without -march flags.
//
// Threading: output rows (dX: input rows) are split into chunks of about equal nnz; the
// (tile, chunk) items are claimed from an atomic counter by the calling thread and by
// helpers scheduled on XLA's intra-op pool (ffi::ThreadPool). The caller never waits for
// an item nobody claimed, so the call cannot deadlock when the pool is busy. Below
// kMinParallelWork multiply-adds everything runs on the calling thread (thread wake-ups
// cost more than the work).
//
// Inputs are validated on every call (row_ptr / csc_ptr monotone, every index in range):
// an O(nnz) integer scan, small next to the O(nnz * B) arithmetic.

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "ffi_common.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SJ_X86 1
#else
#define SJ_X86 0
#endif

namespace ffi = xla::ffi;

namespace sparsejax_train {
namespace {

constexpr int64_t kMinParallelWork = 1 << 17;  // multiply-adds
constexpr int64_t kPrefetch = 8;               // nonzeros ahead

enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

int DetectIsa() {
#if SJ_X86 && defined(__GNUC__)
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

// ---------------------------------------------------------------------------------------
// Problems.
// ---------------------------------------------------------------------------------------

// Row-wise accumulation dst[r, :] = sum_{q in ptr[r]..ptr[r+1]} w(q) * src[idx[q], :],
// with w(q) = values[q] (forward) or values[slot[q]] (dX over the CSC view).
template <typename IdxT>
struct Spmm {
  const float* src;       // [n_src, B] (feature-major)
  const float* values;    // [C]
  const IdxT* idx;        // [C]
  const int32_t* slot;    // [C] or nullptr (direct)
  const int32_t* ptr;     // [n_dst + 1]
  float* dst;             // [n_dst, B]
  int64_t B;
  int64_t nnz;            // ptr[n_dst]
};

// dv[p] = sum_b dy[row, b] * x[col[p], b] for the slots of rows r0..r1.
template <typename IdxT>
struct Sddmm {
  const float* x;         // [n_in, B]
  const float* dy;        // [n_out, B]
  const IdxT* col;        // [C]
  const int32_t* ptr;     // [n_out + 1]
  float* dv;              // [C]
  float* db;              // [n_out]: the bias gradient, sum_b dy[row, b]
  int64_t B;
};

// ---------------------------------------------------------------------------------------
// Portable C++ (any architecture; also the reference for the SIMD paths).
// ---------------------------------------------------------------------------------------

template <typename IdxT>
void SpmmPortable(const Spmm<IdxT>& a, int64_t b0, int64_t nb, int64_t r0, int64_t r1) {
  float acc[64];
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t t = 0; t < nb; ++t) acc[t] = 0.f;
    for (int64_t q = a.ptr[r]; q < a.ptr[r + 1]; ++q) {
      const float w = a.slot ? a.values[a.slot[q]] : a.values[q];
      const float* s = a.src + static_cast<int64_t>(a.idx[q]) * a.B + b0;
      for (int64_t t = 0; t < nb; ++t) acc[t] += w * s[t];
    }
    float* d = a.dst + r * a.B + b0;
    for (int64_t t = 0; t < nb; ++t) d[t] = acc[t];
  }
}

template <typename IdxT>
void SddmmPortable(const Sddmm<IdxT>& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* dy = a.dy + r * a.B;
    float b0 = 0.f, b1 = 0.f;
    for (int64_t b = 0; b + 1 < a.B; b += 2) {
      b0 += dy[b];
      b1 += dy[b + 1];
    }
    if (a.B % 2) b0 += dy[a.B - 1];
    a.db[r] = b0 + b1;
    for (int64_t p = a.ptr[r]; p < a.ptr[r + 1]; ++p) {
      const float* x = a.x + static_cast<int64_t>(a.col[p]) * a.B;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      int64_t b = 0;
      for (; b + 4 <= a.B; b += 4) {
        s0 += dy[b] * x[b];
        s1 += dy[b + 1] * x[b + 1];
        s2 += dy[b + 2] * x[b + 2];
        s3 += dy[b + 3] * x[b + 3];
      }
      for (; b < a.B; ++b) s0 += dy[b] * x[b];
      a.dv[p] = (s0 + s1) + (s2 + s3);
    }
  }
}

#if SJ_X86 && defined(__GNUC__)

// ---------------------------------------------------------------------------------------
// AVX-512F.
// ---------------------------------------------------------------------------------------

#define SJ_AVX512 __attribute__((target("avx512f")))

// One row of one batch tile (NV vectors of 16 lanes; the last one masked by `last`), with
// U independent accumulator sets so that short tiles still hide the FMA latency.
template <typename IdxT, int NV>
SJ_AVX512 inline void SpmmRowAvx512(const Spmm<IdxT>& a, const float* base, __mmask16 last,
                                    int64_t q0, int64_t q1, float* out) {
  constexpr int U = NV >= 4 ? 1 : (NV == 1 ? 4 : 2);
  __m512 acc[U][NV];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t) acc[u][t] = _mm512_setzero_ps();
  const int64_t B = a.B;
  int64_t q = q0;
  for (; q + U <= q1; q += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const int64_t qq = q + u;
      if (qq + kPrefetch < a.nnz) {
        const float* pf = base + static_cast<int64_t>(a.idx[qq + kPrefetch]) * B;
#pragma GCC unroll 8
        for (int t = 0; t < NV; ++t) _mm_prefetch(reinterpret_cast<const char*>(pf + 16 * t), _MM_HINT_T0);
        if (a.slot && qq + 2 * kPrefetch < a.nnz)
          _mm_prefetch(reinterpret_cast<const char*>(a.values + a.slot[qq + 2 * kPrefetch]), _MM_HINT_T0);
      }
      const __m512 w = _mm512_set1_ps(a.slot ? a.values[a.slot[qq]] : a.values[qq]);
      const float* s = base + static_cast<int64_t>(a.idx[qq]) * B;
#pragma GCC unroll 8
      for (int t = 0; t < NV - 1; ++t)
        acc[u][t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(s + 16 * t), acc[u][t]);
      acc[u][NV - 1] =
          _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(last, s + 16 * (NV - 1)), acc[u][NV - 1]);
    }
  }
  for (; q < q1; ++q) {
    const __m512 w = _mm512_set1_ps(a.slot ? a.values[a.slot[q]] : a.values[q]);
    const float* s = base + static_cast<int64_t>(a.idx[q]) * B;
#pragma GCC unroll 8
    for (int t = 0; t < NV - 1; ++t)
      acc[0][t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(s + 16 * t), acc[0][t]);
    acc[0][NV - 1] =
        _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(last, s + 16 * (NV - 1)), acc[0][NV - 1]);
  }
#pragma GCC unroll 8
  for (int t = 0; t < NV; ++t) {
    __m512 v = acc[0][t];
#pragma GCC unroll 4
    for (int u = 1; u < U; ++u) v = _mm512_add_ps(v, acc[u][t]);
    if (t < NV - 1) {
      _mm512_storeu_ps(out + 16 * t, v);
    } else {
      _mm512_mask_storeu_ps(out + 16 * t, last, v);
    }
  }
}

template <typename IdxT>
SJ_AVX512 void SpmmAvx512(const Spmm<IdxT>& a, int64_t b0, int64_t nb, int64_t r0, int64_t r1) {
  const int64_t nv = (nb + 15) / 16;
  const int64_t rem = nb - 16 * (nv - 1);
  const __mmask16 last = static_cast<__mmask16>(rem >= 16 ? 0xFFFF : (1u << rem) - 1u);
  const float* base = a.src + b0;
  for (int64_t r = r0; r < r1; ++r) {
    float* out = a.dst + r * a.B + b0;
    const int64_t q0 = a.ptr[r], q1 = a.ptr[r + 1];
    switch (nv) {
      case 1: SpmmRowAvx512<IdxT, 1>(a, base, last, q0, q1, out); break;
      case 2: SpmmRowAvx512<IdxT, 2>(a, base, last, q0, q1, out); break;
      case 3: SpmmRowAvx512<IdxT, 3>(a, base, last, q0, q1, out); break;
      case 4: SpmmRowAvx512<IdxT, 4>(a, base, last, q0, q1, out); break;
      case 5: SpmmRowAvx512<IdxT, 5>(a, base, last, q0, q1, out); break;
      case 6: SpmmRowAvx512<IdxT, 6>(a, base, last, q0, q1, out); break;
      case 7: SpmmRowAvx512<IdxT, 7>(a, base, last, q0, q1, out); break;
      default: SpmmRowAvx512<IdxT, 8>(a, base, last, q0, q1, out); break;
    }
  }
}

// 16 vectors -> one vector whose lane s is the sum of the lanes of v[s].
SJ_AVX512 inline __m512 Reduce16Avx512(__m512 v[16]) {
  __m512 a[8], b[4], c[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)
    b[j] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * j], a[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a[2 * j], a[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
#pragma GCC unroll 2
  for (int k = 0; k < 2; ++k)
    c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

template <typename IdxT>
SJ_AVX512 void SddmmAvx512(const Sddmm<IdxT>& a, int64_t r0, int64_t r1) {
  const int64_t B = a.B;
  const int64_t nfull = B / 16;
  const int64_t rem = B % 16;
  const __mmask16 rmask = static_cast<__mmask16>((1u << rem) - 1u);
  for (int64_t r = r0; r < r1; ++r) {
    const float* dy = a.dy + r * B;
    const int64_t p1 = a.ptr[r + 1];
    {
      __m512 s = _mm512_setzero_ps();
      for (int64_t c = 0; c < nfull; ++c) s = _mm512_add_ps(s, _mm512_loadu_ps(dy + 16 * c));
      if (rem) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(rmask, dy + 16 * nfull));
      a.db[r] = _mm512_reduce_add_ps(s);
    }
    for (int64_t p = a.ptr[r]; p < p1; p += 16) {
      const int64_t g = std::min<int64_t>(16, p1 - p);
      const float* xs[16];
#pragma GCC unroll 16
      for (int s = 0; s < 16; ++s)
        xs[s] = a.x + static_cast<int64_t>(a.col[p + (s < g ? s : 0)]) * B;
      __m512 acc[16];
#pragma GCC unroll 16
      for (int s = 0; s < 16; ++s) acc[s] = _mm512_setzero_ps();
      for (int64_t c = 0; c < nfull; ++c) {
        const __m512 d = _mm512_loadu_ps(dy + 16 * c);
#pragma GCC unroll 16
        for (int s = 0; s < 16; ++s)
          acc[s] = _mm512_fmadd_ps(d, _mm512_loadu_ps(xs[s] + 16 * c), acc[s]);
      }
      if (rem) {
        const __m512 d = _mm512_maskz_loadu_ps(rmask, dy + 16 * nfull);
#pragma GCC unroll 16
        for (int s = 0; s < 16; ++s)
          acc[s] = _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(rmask, xs[s] + 16 * nfull), acc[s]);
      }
      const __m512 sums = Reduce16Avx512(acc);
      _mm512_mask_storeu_ps(a.dv + p, static_cast<__mmask16>(g >= 16 ? 0xFFFF : (1u << g) - 1u),
                            sums);
    }
  }
}

// ---------------------------------------------------------------------------------------
// AVX2 + FMA.
// ---------------------------------------------------------------------------------------

#define SJ_AVX2 __attribute__((target("avx2,fma")))

SJ_AVX2 inline __m256i LaneMask8(int64_t n) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), iota);
}

template <typename IdxT, int NV>
SJ_AVX2 inline void SpmmRowAvx2(const Spmm<IdxT>& a, const float* base, __m256i last,
                                int64_t q0, int64_t q1, float* out) {
  constexpr int U = NV >= 4 ? 1 : (NV == 1 ? 4 : 2);
  __m256 acc[U][NV];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t) acc[u][t] = _mm256_setzero_ps();
  const int64_t B = a.B;
  int64_t q = q0;
  for (; q + U <= q1; q += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const int64_t qq = q + u;
      if (qq + kPrefetch < a.nnz) {
        const float* pf = base + static_cast<int64_t>(a.idx[qq + kPrefetch]) * B;
#pragma GCC unroll 8
        for (int t = 0; t < NV; t += 2) _mm_prefetch(reinterpret_cast<const char*>(pf + 8 * t), _MM_HINT_T0);
        if (a.slot && qq + 2 * kPrefetch < a.nnz)
          _mm_prefetch(reinterpret_cast<const char*>(a.values + a.slot[qq + 2 * kPrefetch]), _MM_HINT_T0);
      }
      const __m256 w = _mm256_set1_ps(a.slot ? a.values[a.slot[qq]] : a.values[qq]);
      const float* s = base + static_cast<int64_t>(a.idx[qq]) * B;
#pragma GCC unroll 8
      for (int t = 0; t < NV - 1; ++t)
        acc[u][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(s + 8 * t), acc[u][t]);
      acc[u][NV - 1] =
          _mm256_fmadd_ps(w, _mm256_maskload_ps(s + 8 * (NV - 1), last), acc[u][NV - 1]);
    }
  }
  for (; q < q1; ++q) {
    const __m256 w = _mm256_set1_ps(a.slot ? a.values[a.slot[q]] : a.values[q]);
    const float* s = base + static_cast<int64_t>(a.idx[q]) * B;
#pragma GCC unroll 8
    for (int t = 0; t < NV - 1; ++t)
      acc[0][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(s + 8 * t), acc[0][t]);
    acc[0][NV - 1] =
        _mm256_fmadd_ps(w, _mm256_maskload_ps(s + 8 * (NV - 1), last), acc[0][NV - 1]);
  }
#pragma GCC unroll 8
  for (int t = 0; t < NV; ++t) {
    __m256 v = acc[0][t];
#pragma GCC unroll 4
    for (int u = 1; u < U; ++u) v = _mm256_add_ps(v, acc[u][t]);
    if (t < NV - 1) {
      _mm256_storeu_ps(out + 8 * t, v);
    } else {
      _mm256_maskstore_ps(out + 8 * t, last, v);
    }
  }
}

template <typename IdxT>
SJ_AVX2 void SpmmAvx2(const Spmm<IdxT>& a, int64_t b0, int64_t nb, int64_t r0, int64_t r1) {
  const int64_t nv = (nb + 7) / 8;
  const __m256i last = LaneMask8(nb - 8 * (nv - 1));
  const float* base = a.src + b0;
  for (int64_t r = r0; r < r1; ++r) {
    float* out = a.dst + r * a.B + b0;
    const int64_t q0 = a.ptr[r], q1 = a.ptr[r + 1];
    switch (nv) {
      case 1: SpmmRowAvx2<IdxT, 1>(a, base, last, q0, q1, out); break;
      case 2: SpmmRowAvx2<IdxT, 2>(a, base, last, q0, q1, out); break;
      case 3: SpmmRowAvx2<IdxT, 3>(a, base, last, q0, q1, out); break;
      case 4: SpmmRowAvx2<IdxT, 4>(a, base, last, q0, q1, out); break;
      case 5: SpmmRowAvx2<IdxT, 5>(a, base, last, q0, q1, out); break;
      case 6: SpmmRowAvx2<IdxT, 6>(a, base, last, q0, q1, out); break;
      case 7: SpmmRowAvx2<IdxT, 7>(a, base, last, q0, q1, out); break;
      default: SpmmRowAvx2<IdxT, 8>(a, base, last, q0, q1, out); break;
    }
  }
}

// The sum of the 8 lanes of v, in lane 0.
SJ_AVX2 inline __m256 Reduce8Avx2Sum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm256_castps128_ps256(lo);
}

// 8 vectors -> one vector whose lane s is the sum of the lanes of v[s].
SJ_AVX2 inline __m256 Reduce8Avx2(__m256 v[8]) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]);
  const __m256 t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]);
  const __m256 t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1);
  const __m256 u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

template <typename IdxT>
SJ_AVX2 void SddmmAvx2(const Sddmm<IdxT>& a, int64_t r0, int64_t r1) {
  const int64_t B = a.B;
  const int64_t nfull = B / 8;
  const int64_t rem = B % 8;
  const __m256i rmask = LaneMask8(rem);
  for (int64_t r = r0; r < r1; ++r) {
    const float* dy = a.dy + r * B;
    const int64_t p1 = a.ptr[r + 1];
    {
      __m256 s = _mm256_setzero_ps();
      for (int64_t c = 0; c < nfull; ++c) s = _mm256_add_ps(s, _mm256_loadu_ps(dy + 8 * c));
      if (rem) s = _mm256_add_ps(s, _mm256_maskload_ps(dy + 8 * nfull, rmask));
      __m256 t = Reduce8Avx2Sum(s);
      a.db[r] = _mm256_cvtss_f32(t);
    }
    for (int64_t p = a.ptr[r]; p < p1; p += 8) {
      const int64_t g = std::min<int64_t>(8, p1 - p);
      const float* xs[8];
#pragma GCC unroll 8
      for (int s = 0; s < 8; ++s) xs[s] = a.x + static_cast<int64_t>(a.col[p + (s < g ? s : 0)]) * B;
      __m256 acc[8];
#pragma GCC unroll 8
      for (int s = 0; s < 8; ++s) acc[s] = _mm256_setzero_ps();
      for (int64_t c = 0; c < nfull; ++c) {
        const __m256 d = _mm256_loadu_ps(dy + 8 * c);
#pragma GCC unroll 8
        for (int s = 0; s < 8; ++s) acc[s] = _mm256_fmadd_ps(d, _mm256_loadu_ps(xs[s] + 8 * c), acc[s]);
      }
      if (rem) {
        const __m256 d = _mm256_maskload_ps(dy + 8 * nfull, rmask);
#pragma GCC unroll 8
        for (int s = 0; s < 8; ++s)
          acc[s] = _mm256_fmadd_ps(d, _mm256_maskload_ps(xs[s] + 8 * nfull, rmask), acc[s]);
      }
      _mm256_maskstore_ps(a.dv + p, LaneMask8(g), Reduce8Avx2(acc));
    }
  }
}

#endif  // SJ_X86 && defined(__GNUC__)

// ---------------------------------------------------------------------------------------
// Dispatch and threading.
// ---------------------------------------------------------------------------------------

template <typename IdxT>
using SpmmFn = void (*)(const Spmm<IdxT>&, int64_t, int64_t, int64_t, int64_t);
template <typename IdxT>
using SddmmFn = void (*)(const Sddmm<IdxT>&, int64_t, int64_t);

template <typename IdxT>
SpmmFn<IdxT> SelectSpmm(int isa) {
#if SJ_X86 && defined(__GNUC__)
  if (isa >= kAvx512) return &SpmmAvx512<IdxT>;
  if (isa >= kAvx2) return &SpmmAvx2<IdxT>;
#endif
  (void)isa;
  return &SpmmPortable<IdxT>;
}

template <typename IdxT>
SddmmFn<IdxT> SelectSddmm(int isa) {
#if SJ_X86 && defined(__GNUC__)
  if (isa >= kAvx512) return &SddmmAvx512<IdxT>;
  if (isa >= kAvx2) return &SddmmAvx2<IdxT>;
#endif
  (void)isa;
  return &SddmmPortable<IdxT>;
}

int64_t Lanes(int isa) { return isa >= kAvx512 ? 16 : (isa >= kAvx2 ? 8 : 16); }

using sparsejax_ffi::ParallelFor;

// Splits rows 0..n_rows into at most n_chunks ranges of about equal nnz (and >= 1 row).
std::vector<int64_t> ChunkRows(const int32_t* ptr, int64_t n_rows, int64_t n_chunks) {
  std::vector<int64_t> bounds{0};
  if (n_rows <= 0) {
    bounds.push_back(0);
    return bounds;
  }
  n_chunks = std::max<int64_t>(1, std::min(n_chunks, n_rows));
  const int64_t total = static_cast<int64_t>(ptr[n_rows]) - ptr[0];
  for (int64_t c = 1; c < n_chunks; ++c) {
    const int64_t target = ptr[0] + (total * c) / n_chunks;
    int64_t r = std::lower_bound(ptr, ptr + n_rows, target) - ptr;
    r = std::min<int64_t>(std::max<int64_t>(r, bounds.back() + 1), n_rows - (n_chunks - c));
    bounds.push_back(r);
  }
  bounds.push_back(n_rows);
  return bounds;
}

struct Threads {
  int64_t n = 1;
};

Threads PickThreads(ffi::ThreadPool& pool, int64_t threads, int64_t work) {
  Threads t;
  t.n = std::max<int64_t>(1, pool.num_threads());
  if (threads > 0) t.n = std::min(t.n, threads);
  if (work < kMinParallelWork) t.n = 1;
  return t;
}

// dst[r, :] for every row and batch tile (tiles of at most `tile` lanes, outermost).
template <typename IdxT>
void RunSpmm(ffi::ThreadPool& pool, const Spmm<IdxT>& a, int64_t n_rows, int isa, int64_t tile,
             int64_t threads) {
  if (a.B == 0 || n_rows == 0) return;
  const Threads th = PickThreads(pool, threads, (a.nnz + n_rows) * a.B);
  const int64_t lanes = Lanes(isa);
  int64_t tw = tile > 0 ? tile : 64;
  tw = std::max(lanes, std::min<int64_t>(128, (tw / lanes) * lanes));
  const int64_t n_tiles = (a.B + tw - 1) / tw;
  tw = ((a.B + n_tiles - 1) / n_tiles + lanes - 1) / lanes * lanes;  // balanced tiles
  const std::vector<int64_t> bounds = ChunkRows(a.ptr, n_rows, th.n == 1 ? 1 : 8 * th.n);
  const int64_t n_chunks = static_cast<int64_t>(bounds.size()) - 1;
  const SpmmFn<IdxT> fn = SelectSpmm<IdxT>(isa);
  ParallelFor(pool, th.n, n_tiles * n_chunks, [&, tw](int64_t item) {
    const int64_t t = item / n_chunks, c = item % n_chunks;
    const int64_t b0 = t * tw, nb = std::min(tw, a.B - b0);
    if (nb > 0) fn(a, b0, nb, bounds[c], bounds[c + 1]);
  });
}

template <typename IdxT>
void RunSddmm(ffi::ThreadPool& pool, const Sddmm<IdxT>& a, int64_t n_rows, int isa,
              int64_t threads) {
  if (n_rows == 0) return;
  const int64_t nnz = a.ptr[n_rows];
  const Threads th = PickThreads(pool, threads, nnz * a.B);
  const std::vector<int64_t> bounds = ChunkRows(a.ptr, n_rows, th.n == 1 ? 1 : 8 * th.n);
  const int64_t n_chunks = static_cast<int64_t>(bounds.size()) - 1;
  const SddmmFn<IdxT> fn = SelectSddmm<IdxT>(isa);
  ParallelFor(pool, th.n, n_chunks, [&](int64_t c) { fn(a, bounds[c], bounds[c + 1]); });
}

// ---------------------------------------------------------------------------------------
// Validation.
// ---------------------------------------------------------------------------------------

std::string Dims(ffi::AnyBuffer::Dimensions d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

// ptr [n+1] monotone from 0 with ptr[n] <= cap; empty string when valid.
std::string CheckPtr(const char* name, const int32_t* ptr, int64_t n, int64_t cap) {
  if (ptr[0] != 0) return std::string(name) + "[0] must be 0, got " + std::to_string(ptr[0]);
  for (int64_t i = 0; i < n; ++i) {
    if (ptr[i + 1] < ptr[i]) {
      return std::string(name) + " must be non-decreasing; " + name + "[" + std::to_string(i + 1) +
             "] = " + std::to_string(ptr[i + 1]) + " < " + std::to_string(ptr[i]);
    }
  }
  if (ptr[n] > cap) {
    return std::string(name) + "[-1] = " + std::to_string(ptr[n]) + " exceeds the capacity " +
           std::to_string(cap);
  }
  return "";
}

template <typename T>
std::string CheckRange(const char* name, const T* idx, int64_t n, int64_t limit) {
  for (int64_t i = 0; i < n; ++i) {
    if (idx[i] < 0 || static_cast<int64_t>(idx[i]) >= limit) {
      return std::string(name) + "[" + std::to_string(i) + "] = " +
             std::to_string(static_cast<int64_t>(idx[i])) + " is out of range [0, " +
             std::to_string(limit) + ")";
    }
  }
  return "";
}

std::string CheckIndex(const char* name, const ffi::AnyBuffer& b, int64_t n, int64_t limit) {
  if (b.element_type() == ffi::DataType::S16) {
    return CheckRange(name, static_cast<const int16_t*>(b.untyped_data()), n, limit);
  }
  return CheckRange(name, static_cast<const int32_t*>(b.untyped_data()), n, limit);
}

bool IsIndexType(const ffi::AnyBuffer& b) {
  return b.element_type() == ffi::DataType::S16 || b.element_type() == ffi::DataType::S32;
}

int UseIsa(int64_t isa) {
  return isa < 0 ? SupportedIsa() : std::min<int>(static_cast<int>(isa), SupportedIsa());
}

ffi::Error Invalid(const std::string& where, const std::string& what) {
  return ffi::Error::InvalidArgument("sparsejax " + where + ": " + what);
}

// ---------------------------------------------------------------------------------------
// Handlers.
// ---------------------------------------------------------------------------------------

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> values,
                       ffi::AnyBuffer col, ffi::Buffer<ffi::S32> row_ptr,
                       ffi::ResultBuffer<ffi::F32> y, int64_t isa, int64_t threads,
                       int64_t tile) {
  const auto xd = x.dimensions(), vd = values.dimensions(), cd = col.dimensions();
  const auto rd = row_ptr.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || vd.size() != 1 || cd.size() != 1 || rd.size() != 1 || yd.size() != 2) {
    return Invalid("sparse forward", "expected x [B, n_in], values [C], col [C], row_ptr "
                                     "[n_out + 1], y [B, n_out]");
  }
  const int64_t B = xd[0], n_in = xd[1], C = vd[0], n_out = yd[1];
  if (cd[0] != C || rd[0] != n_out + 1 || yd[0] != B) {
    return Invalid("sparse forward", "inconsistent shapes x" + Dims(xd) + " values" + Dims(vd) +
                                         " col" + Dims(cd) + " row_ptr" + Dims(rd) + " y" + Dims(yd));
  }
  if (!IsIndexType(col)) return Invalid("sparse forward", "col must be int16 or int32");
  const int32_t* ptr = row_ptr.typed_data();
  std::string err = CheckPtr("row_ptr", ptr, n_out, C);
  if (err.empty()) err = CheckIndex("col", col, ptr[n_out], n_in);
  if (!err.empty()) return Invalid("sparse forward", err);
  const int use = UseIsa(isa);
  if (col.element_type() == ffi::DataType::S16) {
    Spmm<int16_t> a{x.typed_data(), values.typed_data(), static_cast<const int16_t*>(col.untyped_data()),
                    nullptr, ptr, y->typed_data(), B, ptr[n_out]};
    RunSpmm(pool, a, n_out, use, tile, threads);
  } else {
    Spmm<int32_t> a{x.typed_data(), values.typed_data(), static_cast<const int32_t*>(col.untyped_data()),
                    nullptr, ptr, y->typed_data(), B, ptr[n_out]};
    RunSpmm(pool, a, n_out, use, tile, threads);
  }
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                        ffi::Buffer<ffi::F32> values, ffi::AnyBuffer col,
                        ffi::Buffer<ffi::S32> row_ptr, ffi::Buffer<ffi::S32> csc_ptr,
                        ffi::AnyBuffer csc_row, ffi::Buffer<ffi::S32> csc_slot,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dv,
                        ffi::ResultBuffer<ffi::F32> db, int64_t isa, int64_t threads, int64_t tile,
                        int64_t need_dx) {
  const auto xd = x.dimensions(), yd = dy.dimensions(), vd = values.dimensions();
  if (xd.size() != 2 || yd.size() != 2 || vd.size() != 1 || col.dimensions().size() != 1 ||
      row_ptr.dimensions().size() != 1 || csc_ptr.dimensions().size() != 1 ||
      csc_row.dimensions().size() != 1 || csc_slot.dimensions().size() != 1 ||
      dv->dimensions().size() != 1 || dx->dimensions().size() != 2) {
    return Invalid("sparse backward", "expected x [B, n_in], dy [B, n_out], 1-D topology arrays");
  }
  const int64_t B = xd[0], n_in = xd[1], n_out = yd[1], C = vd[0];
  if (yd[0] != B || col.dimensions()[0] != C || row_ptr.dimensions()[0] != n_out + 1 ||
      csc_ptr.dimensions()[0] != n_in + 1 || csc_row.dimensions()[0] != C ||
      csc_slot.dimensions()[0] != C || dv->dimensions()[0] != C || db->element_count() != n_out ||
      (need_dx && (dx->dimensions()[0] != B || dx->dimensions()[1] != n_in))) {
    return Invalid("sparse backward", "inconsistent shapes x" + Dims(xd) + " dy" + Dims(yd) +
                                          " values" + Dims(vd) + " dx" + Dims(dx->dimensions()));
  }
  if (!IsIndexType(col) || !IsIndexType(csc_row)) {
    return Invalid("sparse backward", "col and csc_row must be int16 or int32");
  }
  const int32_t* rptr = row_ptr.typed_data();
  const int32_t* cptr = csc_ptr.typed_data();
  std::string err = CheckPtr("row_ptr", rptr, n_out, C);
  if (err.empty()) err = CheckIndex("col", col, rptr[n_out], n_in);
  if (err.empty() && need_dx) {
    err = CheckPtr("csc_ptr", cptr, n_in, C);
    if (err.empty() && cptr[n_in] != rptr[n_out]) {
      err = "csc_ptr[-1] = " + std::to_string(cptr[n_in]) + " differs from row_ptr[-1] = " +
            std::to_string(rptr[n_out]) + " (the CSC view is stale)";
    }
    if (err.empty()) err = CheckIndex("csc_row", csc_row, cptr[n_in], n_out);
    if (err.empty()) err = CheckRange("csc_slot", csc_slot.typed_data(), cptr[n_in], rptr[n_out]);
  }
  if (!err.empty()) return Invalid("sparse backward", err);
  const int use = UseIsa(isa);
  const int64_t nnz = rptr[n_out];
  float* dvp = dv->typed_data();
  if (C > nnz) std::memset(dvp + nnz, 0, sizeof(float) * (C - nnz));
  if (need_dx) {
    if (csc_row.element_type() == ffi::DataType::S16) {
      Spmm<int16_t> a{dy.typed_data(), values.typed_data(),
                      static_cast<const int16_t*>(csc_row.untyped_data()), csc_slot.typed_data(),
                      cptr, dx->typed_data(), B, cptr[n_in]};
      RunSpmm(pool, a, n_in, use, tile, threads);
    } else {
      Spmm<int32_t> a{dy.typed_data(), values.typed_data(),
                      static_cast<const int32_t*>(csc_row.untyped_data()), csc_slot.typed_data(),
                      cptr, dx->typed_data(), B, cptr[n_in]};
      RunSpmm(pool, a, n_in, use, tile, threads);
    }
  }
  if (B == 0) {
    std::memset(dvp, 0, sizeof(float) * nnz);
    std::memset(db->typed_data(), 0, sizeof(float) * n_out);
    return ffi::Error::Success();
  }
  if (col.element_type() == ffi::DataType::S16) {
    Sddmm<int16_t> a{x.typed_data(), dy.typed_data(), static_cast<const int16_t*>(col.untyped_data()),
                     rptr, dvp, db->typed_data(), B};
    RunSddmm(pool, a, n_out, use, threads);
  } else {
    Sddmm<int32_t> a{x.typed_data(), dy.typed_data(), static_cast<const int32_t*>(col.untyped_data()),
                     rptr, dvp, db->typed_data(), B};
    RunSddmm(pool, a, n_out, use, threads);
  }
  return ffi::Error::Success();
}


// ---------------------------------------------------------------------------------------
// Topology kernels (DST update steps only): dense views and the rebuild after a mask update.
// ---------------------------------------------------------------------------------------

template <typename RowT>
void CscToDense(const float* values, const int32_t* cptr, const RowT* crow, const int32_t* cslot,
                int64_t i0, int64_t i1, int64_t n_out, float* dense) {
  for (int64_t i = i0; i < i1; ++i) {
    float* d = dense + i * n_out;
    std::memset(d, 0, sizeof(float) * n_out);
    for (int32_t q = cptr[i]; q < cptr[i + 1]; ++q) d[crow[q]] = values ? values[cslot[q]] : 1.0f;
  }
}

template <typename RowT>
void CscToMask(const int32_t* cptr, const RowT* crow, int64_t i0, int64_t i1, int64_t n_out,
               bool* mask) {
  for (int64_t i = i0; i < i1; ++i) {
    bool* m = mask + i * n_out;
    std::memset(m, 0, n_out);
    for (int32_t q = cptr[i]; q < cptr[i + 1]; ++q) m[crow[q]] = true;
  }
}

std::string CheckCsc(const ffi::Buffer<ffi::S32>& csc_ptr, const ffi::AnyBuffer& csc_row,
                     const ffi::Buffer<ffi::S32>& csc_slot, int64_t n_in, int64_t n_out) {
  const int64_t C = csc_slot.dimensions()[0];
  if (csc_ptr.dimensions()[0] != n_in + 1 || csc_row.dimensions()[0] != C) {
    return "inconsistent CSC shapes";
  }
  if (!IsIndexType(csc_row)) return "csc_row must be int16 or int32";
  const int32_t* cptr = csc_ptr.typed_data();
  std::string err = CheckPtr("csc_ptr", cptr, n_in, C);
  if (err.empty()) err = CheckIndex("csc_row", csc_row, cptr[n_in], n_out);
  if (err.empty()) err = CheckRange("csc_slot", csc_slot.typed_data(), cptr[n_in], C);
  return err;
}

// dense [n_in, n_out] = the per-slot values at their positions (0 elsewhere); parallel
// over input rows (each thread writes its own rows: no false sharing).
ffi::Error ToDenseImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> values,
                       ffi::Buffer<ffi::S32> csc_ptr, ffi::AnyBuffer csc_row,
                       ffi::Buffer<ffi::S32> csc_slot, ffi::ResultBuffer<ffi::F32> dense) {
  const auto dd = dense->dimensions();
  if (dd.size() != 2 || values.dimensions().size() != 1 ||
      values.dimensions()[0] != csc_slot.dimensions()[0]) {
    return Invalid("csr to dense", "expected values [C] and dense [n_in, n_out]");
  }
  const int64_t n_in = dd[0], n_out = dd[1];
  const std::string err = CheckCsc(csc_ptr, csc_row, csc_slot, n_in, n_out);
  if (!err.empty()) return Invalid("csr to dense", err);
  const Threads th = PickThreads(pool, 0, n_in * n_out);
  const std::vector<int64_t> b = ChunkRows(csc_ptr.typed_data(), n_in, th.n == 1 ? 1 : 4 * th.n);
  const int64_t nc = static_cast<int64_t>(b.size()) - 1;
  ParallelFor(pool, th.n, nc, [&](int64_t c) {
    if (csc_row.element_type() == ffi::DataType::S16) {
      CscToDense(values.typed_data(), csc_ptr.typed_data(),
                 static_cast<const int16_t*>(csc_row.untyped_data()), csc_slot.typed_data(), b[c],
                 b[c + 1], n_out, dense->typed_data());
    } else {
      CscToDense(values.typed_data(), csc_ptr.typed_data(),
                 static_cast<const int32_t*>(csc_row.untyped_data()), csc_slot.typed_data(), b[c],
                 b[c + 1], n_out, dense->typed_data());
    }
  });
  return ffi::Error::Success();
}

ffi::Error ToMaskImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> csc_ptr, ffi::AnyBuffer csc_row,
                      ffi::Buffer<ffi::S32> csc_slot, ffi::ResultBuffer<ffi::PRED> mask) {
  const auto md = mask->dimensions();
  if (md.size() != 2) return Invalid("csr mask", "expected mask [n_in, n_out]");
  const int64_t n_in = md[0], n_out = md[1];
  const std::string err = CheckCsc(csc_ptr, csc_row, csc_slot, n_in, n_out);
  if (!err.empty()) return Invalid("csr mask", err);
  const Threads th = PickThreads(pool, 0, n_in * n_out);
  const std::vector<int64_t> b = ChunkRows(csc_ptr.typed_data(), n_in, th.n == 1 ? 1 : 4 * th.n);
  const int64_t nc = static_cast<int64_t>(b.size()) - 1;
  bool* out = reinterpret_cast<bool*>(mask->untyped_data());
  ParallelFor(pool, th.n, nc, [&](int64_t c) {
    if (csc_row.element_type() == ffi::DataType::S16) {
      CscToMask(csc_ptr.typed_data(), static_cast<const int16_t*>(csc_row.untyped_data()), b[c],
                b[c + 1], n_out, out);
    } else {
      CscToMask(csc_ptr.typed_data(), static_cast<const int32_t*>(csc_row.untyped_data()), b[c],
                b[c + 1], n_out, out);
    }
  });
  return ffi::Error::Success();
}

#if SJ_X86 && defined(__GNUC__)
// Bit t of the result is set when m[t] != 0 (32 bytes).
__attribute__((target("avx2"))) inline uint32_t NonzeroBits32(const uint8_t* m) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m));
  return ~static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, _mm256_setzero_si256())));
}
#endif

// Calls fn(j) for every j < n with m[j] != 0, in increasing order.
template <typename Fn>
inline void ForEachTrue(const uint8_t* m, int64_t n, bool simd, Fn&& fn) {
  int64_t j = 0;
#if SJ_X86 && defined(__GNUC__)
  if (simd) {
    for (; j + 32 <= n; j += 32) {
      uint32_t bits = NonzeroBits32(m + j);
      while (bits) {
        fn(j + __builtin_ctz(bits));
        bits &= bits - 1;
      }
    }
  }
#else
  (void)simd;
#endif
  for (; j < n; ++j)
    if (m[j]) fn(j);
}

template <typename ColT, typename RowT>
std::string Rebuild(const uint8_t* mask, int64_t n_in, int64_t n_out, int64_t C,
                    const ColT* old_col, const int32_t* old_ptr, ColT* col, int32_t* row_ptr,
                    int32_t* csc_ptr, RowT* csc_row, int32_t* csc_slot, int32_t* prev) {
  const bool simd = SupportedIsa() >= kAvx2;
  std::vector<int32_t> count(n_out, 0);
  csc_ptr[0] = 0;
  for (int64_t i = 0; i < n_in; ++i) {
    int32_t in_row = 0;
    ForEachTrue(mask + i * n_out, n_out, simd, [&](int64_t j) {
      ++count[j];
      ++in_row;
    });
    csc_ptr[i + 1] = csc_ptr[i] + in_row;
    if (csc_ptr[i + 1] > C) {
      return "the new mask has more than " + std::to_string(C) + " active weights (the capacity)";
    }
  }
  row_ptr[0] = 0;
  for (int64_t j = 0; j < n_out; ++j) row_ptr[j + 1] = row_ptr[j] + count[j];
  const int32_t nnz = row_ptr[n_out];
  std::vector<int32_t> next(row_ptr, row_ptr + n_out);
  for (int64_t i = 0; i < n_in; ++i) {
    int32_t q = csc_ptr[i];
    ForEachTrue(mask + i * n_out, n_out, simd, [&](int64_t j) {
      const int32_t slot = next[j]++;
      col[slot] = static_cast<ColT>(i);
      csc_row[q] = static_cast<RowT>(j);
      csc_slot[q] = slot;
      ++q;
    });
  }
  for (int64_t p = nnz; p < C; ++p) {
    col[p] = 0;
    csc_row[p] = 0;
    csc_slot[p] = 0;
    prev[p] = -1;
  }
  // Old slot of each new slot: merge the old and new rows (both ascending in col).
  for (int64_t j = 0; j < n_out; ++j) {
    int32_t a = old_ptr[j];
    const int32_t a1 = old_ptr[j + 1];
    for (int32_t p = row_ptr[j]; p < row_ptr[j + 1]; ++p) {
      while (a < a1 && old_col[a] < col[p]) ++a;
      prev[p] = (a < a1 && old_col[a] == col[p]) ? a : -1;
    }
  }
  return "";
}

// From the new mask [n_in, n_out] and the old CSR (col, row_ptr): the new topology and,
// per new slot, the old slot of the same weight (-1 for grown slots and padding).
ffi::Error RebuildImpl(ffi::Buffer<ffi::PRED> mask, ffi::AnyBuffer old_col,
                       ffi::Buffer<ffi::S32> old_row_ptr, ffi::Result<ffi::AnyBuffer> col,
                       ffi::ResultBuffer<ffi::S32> row_ptr, ffi::ResultBuffer<ffi::S32> csc_ptr,
                       ffi::Result<ffi::AnyBuffer> csc_row, ffi::ResultBuffer<ffi::S32> csc_slot,
                       ffi::ResultBuffer<ffi::S32> prev) {
  const auto md = mask.dimensions();
  if (md.size() != 2) return Invalid("csr rebuild", "expected mask [n_in, n_out]");
  const int64_t n_in = md[0], n_out = md[1], C = old_col.dimensions()[0];
  if (old_row_ptr.dimensions()[0] != n_out + 1 || col->dimensions()[0] != C ||
      row_ptr->dimensions()[0] != n_out + 1 || csc_ptr->dimensions()[0] != n_in + 1 ||
      csc_row->dimensions()[0] != C || csc_slot->dimensions()[0] != C || prev->dimensions()[0] != C ||
      col->element_type() != old_col.element_type() || !IsIndexType(old_col) ||
      !IsIndexType(*csc_row)) {
    return Invalid("csr rebuild", "inconsistent shapes or dtypes");
  }
  std::string err = CheckPtr("row_ptr", old_row_ptr.typed_data(), n_out, C);
  if (err.empty()) err = CheckIndex("col", old_col, old_row_ptr.typed_data()[n_out], n_in);
  if (!err.empty()) return Invalid("csr rebuild", err);
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.untyped_data());
  const bool c16 = old_col.element_type() == ffi::DataType::S16;
  const bool r16 = csc_row->element_type() == ffi::DataType::S16;
  const int32_t* optr = old_row_ptr.typed_data();
  auto run = [&](auto col_tag, auto row_tag) {
    using ColT = decltype(col_tag);
    using RowT = decltype(row_tag);
    return Rebuild<ColT, RowT>(m, n_in, n_out, C, static_cast<const ColT*>(old_col.untyped_data()),
                               optr, static_cast<ColT*>(col->untyped_data()), row_ptr->typed_data(),
                               csc_ptr->typed_data(), static_cast<RowT*>(csc_row->untyped_data()),
                               csc_slot->typed_data(), prev->typed_data());
  };
  if (c16 && r16) err = run(int16_t{}, int16_t{});
  if (c16 && !r16) err = run(int16_t{}, int32_t{});
  if (!c16 && r16) err = run(int32_t{}, int16_t{});
  if (!c16 && !r16) err = run(int32_t{}, int32_t{});
  if (!err.empty()) return Invalid("csr rebuild", err);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace sparsejax_train

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsejaxSparseForward, sparsejax_train::ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (feature-major)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // values
                                  .Arg<ffi::AnyBuffer>()         // col
                                  .Arg<ffi::Buffer<ffi::S32>>()  // row_ptr
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y (feature-major)
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("tile"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsejaxSparseBackward, sparsejax_train::BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (feature-major)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy (feature-major)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // values
                                  .Arg<ffi::AnyBuffer>()         // col
                                  .Arg<ffi::Buffer<ffi::S32>>()  // row_ptr
                                  .Arg<ffi::Buffer<ffi::S32>>()  // csc_ptr
                                  .Arg<ffi::AnyBuffer>()         // csc_row
                                  .Arg<ffi::Buffer<ffi::S32>>()  // csc_slot
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx (feature-major)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Ret<ffi::Buffer<ffi::F32>>()  // db (bias gradient)
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("tile")
                                  .Attr<int64_t>("need_dx"));


XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsejaxCsrToDense, sparsejax_train::ToDenseImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // values [C]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // csc_ptr
                                  .Arg<ffi::AnyBuffer>()         // csc_row
                                  .Arg<ffi::Buffer<ffi::S32>>()  // csc_slot
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dense [n_in, n_out]

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsejaxCsrMask, sparsejax_train::ToMaskImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // csc_ptr
                                  .Arg<ffi::AnyBuffer>()         // csc_row
                                  .Arg<ffi::Buffer<ffi::S32>>()  // csc_slot
                                  .Ret<ffi::Buffer<ffi::PRED>>());  // mask [n_in, n_out]

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsejaxCsrRebuild, sparsejax_train::RebuildImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // new mask [n_in, n_out]
                                  .Arg<ffi::AnyBuffer>()          // old col
                                  .Arg<ffi::Buffer<ffi::S32>>()   // old row_ptr
                                  .Ret<ffi::AnyBuffer>()          // col
                                  .Ret<ffi::Buffer<ffi::S32>>()   // row_ptr
                                  .Ret<ffi::Buffer<ffi::S32>>()   // csc_ptr
                                  .Ret<ffi::AnyBuffer>()          // csc_row
                                  .Ret<ffi::Buffer<ffi::S32>>()   // csc_slot
                                  .Ret<ffi::Buffer<ffi::S32>>());  // prev (old slot or -1)

// ---------------------------------------------------------------------------------------
// Python module: hands the handlers to jax.ffi.register_ffi_target.
// ---------------------------------------------------------------------------------------

static PyObject* Registrations(PyObject*, PyObject*) {
  return sparsejax_ffi::RegistrationDict({
      {"sparsejax_sparse_fwd", reinterpret_cast<void*>(&SparsejaxSparseForward)},
      {"sparsejax_sparse_bwd", reinterpret_cast<void*>(&SparsejaxSparseBackward)},
      {"sparsejax_csr_to_dense", reinterpret_cast<void*>(&SparsejaxCsrToDense)},
      {"sparsejax_csr_mask", reinterpret_cast<void*>(&SparsejaxCsrMask)},
      {"sparsejax_csr_rebuild", reinterpret_cast<void*>(&SparsejaxCsrRebuild)},
  });
}

static PyObject* CpuIsa(PyObject*, PyObject*) {
  static const char* names[] = {"portable", "avx2", "avx512"};
  return PyUnicode_FromString(names[sparsejax_train::SupportedIsa()]);
}

static PyMethodDef kMethods[] = {
    {"registrations", Registrations, METH_NOARGS,
     "Dict of XLA FFI target name -> PyCapsule holding the handler."},
    {"cpu_isa", CpuIsa, METH_NOARGS,
     "Best SIMD level detected at run time: 'avx512', 'avx2' or 'portable'."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_sparse_train_native",
                              "Native XLA FFI CPU kernels for sparsejax sparse training.", -1,
                              kMethods};

PyMODINIT_FUNC PyInit__sparse_train_native(void) { return PyModule_Create(&kModule); }
