// Copyright 2026 The sparsejax Authors. Licensed under the Apache License 2.0.
//
// Exact top-k selection on the CPU, exposed to JAX through the XLA FFI: the native twin
// of the XLA path in sparsejax/_src/primitives/selection.py (`_select_2d`), with the
// same result bit for bit.
//
//   sparsejax_select(scores f32 [L, G], candidates pred [L, G] or [0], k s32 [1, 1] or
//                    [1, G], words u32 [2]) -> pred [L, G]
//   sparsejax_drop_grow(drop f32 [..], grow f32 [..], mask pred [..], counts s32 [2],
//                    words u32 [4]) -> (new pred [..], kept pred [..]):
//                    `drop_grow.drop_and_grow`, two whole-array selections and the count
//                    of the mask in one call
//   sparsejax_count(mask pred [L, G]) -> s32 [1, 1] or [1, G]: `selection.count_true`
//   sparsejax_grouped_drop_grow(drop, grow f32 [L, G], mask, keepable pred [L, G],
//                    per_group s32 [1, G], n_drop s32 [1], words u32 [4]) -> (new, kept):
//                    `drop_grow.grouped_drop_and_grow` along axis 0 (SRigL's update)
//   sparsejax_ablate(weights, grads f32 [L, G], counts s32 [2]) -> pred [G]:
//                    `ablation.neurons_to_ablate` (SRigL's neuron ablation)
//   sparsejax_ablated_drop_grow(drop, grow f32 [L, G], mask pred [L, G], weights, grads
//                    f32 [L, G], n_drop s32 [1], words u32 [4]) -> (new, kept):
//                    `ablation.ablated_drop_and_grow` (SRigL's update of an ablating layer)
//   sparsejax_leaf_keys(key u32 [2], count s32 [], indices u32 [L]) -> u32 [L, 2, 2]:
//                    `step.leaf_keys`' threefry derivation of every leaf's keys
//
// Every score argument has a mode attribute (`score_form.py`): kValues reads the float32
// buffer, kMagnitude its absolute values, kHash SET's keyed hash of the flat index from two
// of `words` (the buffer is then empty), kKeyedHash the same hash with the words drawn from
// a raw threefry key held in `words` (jax.random.bits(key, (2,))). A mask update reads |w|,
// |g| or the hash this way without a float32 copy of every score in XLA's temporaries.
//
// Scores map to order-preserving uint32 keys (larger score, larger key; -0.0 as +0.0);
// a non-candidate (and the one NaN pattern whose key is 0) gets key 0 and is never
// selected. `per_column == 0`: the k largest keys of the whole array, ties at the
// threshold taken in row-major (flat index) order. `per_column == 1`: the k[j] largest
// keys of every column j, ties taken in row order. k <= 0 selects nothing; k above the
// number of candidates selects every candidate.
//
// Whole array: two 16-bit histogram passes find the threshold key t and how many keys
// equal to t are taken (`need`); the write pass is one comparison plus a running count of
// the ties, which is what ranks them by index. No copy of the keys is made (they are
// recomputed in each pass: a few integer ops per entry).
// Per column: columns are processed in blocks of 64: the block's keys are transposed into
// a [64, L] scratch (so each column is contiguous), each column's threshold is found by
// four 8-bit histogram passes over its L keys, then the block is written row by row.
//
// Threads: XLA's intra-op pool (at most 8, `threads` > 0 caps it), for arrays of at least
// 64K entries; the result does not depend on the number of threads.

#include <Python.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "ffi_common.h"

namespace ffi = xla::ffi;

namespace sparsejax_select {
namespace {

constexpr uint32_t kSign = 0x80000000u;
constexpr int64_t kColumnBlock = 64;
constexpr int64_t kBins = 1 << 16;
constexpr int64_t kMinParallel = 1 << 16;  // entries; below, one thread
constexpr int64_t kMaxThreads = 8;         // whole-array histograms: 256 KiB per thread

inline uint32_t Key(float score) {
  uint32_t bits;
  std::memcpy(&bits, &score, sizeof(bits));
  if (bits == kSign) bits = 0;  // -0.0 ties with +0.0
  return (bits & kSign) ? ~bits : (bits | kSign);
}

// Which entries may be selected: all (p == nullptr), those with p[i] true, or (invert)
// those with p[i] false.
struct Candidates {
  const bool* p = nullptr;
  bool invert = false;
};

// How a selection reads its scores (score_form.py): the float32 values of a buffer, their
// magnitudes (|x|: the sign bit cleared, as jnp.abs), or SET's keyed hash of the flat index
// (criteria `random`: two rounds of the MurmurHash3 finalizer, 24 bits, as float32 in
// [0, 1)). The last two need no float copy of the scores.
enum ScoreMode : int64_t { kValues = 0, kMagnitude = 1, kHash = 2, kKeyedHash = 3 };

inline uint32_t Fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}

// Threefry-2x32, 20 rounds (Salmon et al. 2011), as JAX computes it: the two output words
// of counter (x0, x1) under key (k0, k1).
void Threefry2x32(uint32_t k0, uint32_t k1, uint32_t& x0, uint32_t& x1) {
  static constexpr int kRotations[2][4] = {{13, 15, 26, 6}, {17, 29, 16, 24}};
  const uint32_t ks[3] = {k0, k1, k0 ^ k1 ^ 0x1BD11BDAu};
  x0 += ks[0];
  x1 += ks[1];
  for (int i = 0; i < 5; ++i) {
    for (const int r : kRotations[i % 2]) {
      x0 += x1;
      x1 = ((x1 << r) | (x1 >> (32 - r))) ^ x0;
    }
    x0 += ks[(i + 1) % 3];
    x1 += ks[(i + 2) % 3] + static_cast<uint32_t>(i + 1);
  }
}

// jax.random.bits(key, (2,), uint32) of a raw threefry key under the partitionable
// threefry (the default): word i is the xor of the outputs of counter (0, i).
void KeyBits(uint32_t k0, uint32_t k1, uint32_t& w0, uint32_t& w1) {
  uint32_t a0 = 0, a1 = 0, b0 = 0, b1 = 1;
  Threefry2x32(k0, k1, a0, a1);
  Threefry2x32(k0, k1, b0, b1);
  w0 = a0 ^ a1;
  w1 = b0 ^ b1;
}

struct Scores {
  const float* values = nullptr;
  int64_t mode = kValues;
  uint32_t word0 = 0, word1 = 0;

  // The order key of entry i (see Key). Magnitudes and hashes are non-negative, so their
  // keys are their float bits with the sign bit set; a hash's 24-bit value m stands for the
  // float m / 2^24, whose key order (and ties) is m's order: m with the sign bit set keeps
  // both without the float.
  inline uint32_t KeyOf(int64_t i) const {
    if (mode == kHash) {
      const uint32_t x = Fmix32(Fmix32(static_cast<uint32_t>(i) * 0x9E3779B9u ^ word0) ^ word1);
      return (x >> 8) | kSign;
    }
    if (mode == kMagnitude) {
      uint32_t bits;
      std::memcpy(&bits, values + i, sizeof(bits));
      return bits | kSign;  // |v|: the sign bit cleared, then set as every positive key's
    }
    return Key(values[i]);
  }
};

inline uint32_t KeyAt(const Scores& scores, Candidates cands, int64_t i) {
  return (cands.p != nullptr && cands.p[i] == cands.invert) ? 0u : scores.KeyOf(i);
}

// The largest digit d with count(digit >= d) >= need, scanning bins from the top; returns
// d and subtracts the count strictly above it from `need`. Requires need <= sum(hist).
inline uint32_t TopDigit(const uint32_t* hist, int64_t n_bins, int64_t& need) {
  int64_t above = 0;
  int64_t d = n_bins - 1;
  for (; d > 0; --d) {
    if (above + hist[d] >= need) break;
    above += hist[d];
  }
  need -= above;
  return static_cast<uint32_t>(d);
}

using sparsejax_ffi::ParallelFor;

// Sums `parts` histograms of `bins` bins each into `merged`; returns the total count.
int64_t Merge(const std::vector<uint32_t>& hist, int64_t parts, int64_t bins,
              std::vector<uint32_t>& merged) {
  std::fill(merged.begin(), merged.end(), 0u);
  int64_t total = 0;
  for (int64_t p = 0; p < parts; ++p) {
    for (int64_t b = 0; b < bins; ++b) merged[b] += hist[p * bins + b];
  }
  for (int64_t b = 0; b < bins; ++b) total += merged[b];
  return total;
}

// ---------------------------------------------------------------------------------------
// Whole array: the flat range is split into one contiguous part per thread; each part
// keeps its own histograms, so the part's count of keys equal to the threshold (its bin
// of the second histogram) ranks its ties after those of the parts before it.
// ---------------------------------------------------------------------------------------

void SelectWhole(ffi::ThreadPool& pool, int64_t n_threads, const Scores& scores,
                 Candidates cands, int64_t n, int64_t k, bool* out) {
  if (k <= 0) {
    std::fill(out, out + n, false);
    return;
  }
  const int64_t parts = std::max<int64_t>(1, std::min(n_threads, n / kMinParallel));
  const auto begin = [&](int64_t p) { return n * p / parts; };
  std::vector<uint32_t> hist(static_cast<size_t>(parts * kBins), 0), merged(kBins);
  ParallelFor(pool, parts, parts, [&](int64_t p) {
    uint32_t* h = hist.data() + p * kBins;
    for (int64_t i = begin(p); i < begin(p + 1); ++i) {
      const uint32_t key = KeyAt(scores, cands, i);
      if (key != 0) ++h[key >> 16];
    }
  });
  if (k >= Merge(hist, parts, kBins, merged)) {  // every candidate
    ParallelFor(pool, parts, parts, [&](int64_t p) {
      for (int64_t i = begin(p); i < begin(p + 1); ++i) out[i] = KeyAt(scores, cands, i) != 0;
    });
    return;
  }
  int64_t need = k;
  const uint32_t hi = TopDigit(merged.data(), kBins, need);
  std::fill(hist.begin(), hist.end(), 0u);
  ParallelFor(pool, parts, parts, [&](int64_t p) {
    uint32_t* h = hist.data() + p * kBins;
    for (int64_t i = begin(p); i < begin(p + 1); ++i) {
      const uint32_t key = KeyAt(scores, cands, i);
      if (key != 0 && (key >> 16) == hi) ++h[key & 0xFFFFu];
    }
  });
  Merge(hist, parts, kBins, merged);
  const uint32_t lo = TopDigit(merged.data(), kBins, need);
  const uint32_t threshold = (hi << 16) | lo;
  ParallelFor(pool, parts, parts, [&](int64_t p) {
    int64_t taken = 0;  // ties at the threshold before this part: the first `need` are kept
    for (int64_t q = 0; q < p; ++q) taken += hist[q * kBins + lo];
    for (int64_t i = begin(p); i < begin(p + 1); ++i) {
      const uint32_t key = KeyAt(scores, cands, i);
      out[i] = key > threshold || (key == threshold && taken++ < need);
    }
  });
}

// ---------------------------------------------------------------------------------------
// Per column, in blocks of 64 columns (each thread takes a contiguous range of blocks,
// with its own scratch): the block's keys are transposed into a [64, L] scratch while
// the top byte of every key is counted; each column then keeps only the keys in its
// threshold's top-byte bucket (usually a handful) for the three remaining 8-bit digits;
// the block is written row by row, ties taken in row order.
// ---------------------------------------------------------------------------------------

// Threshold of one column from its top-byte histogram and keys: k <= 0 gives (max, 0),
// nothing; k >= #candidates gives (0, 0), every candidate.
void ColumnThreshold(const uint32_t* keys, int64_t rows, const std::array<uint32_t, 256>& top,
                     int64_t k, uint32_t* bucket, uint32_t& threshold, int64_t& need) {
  int64_t total = 0;
  for (const uint32_t count : top) total += count;
  if (k <= 0 || k >= total) {
    threshold = k <= 0 ? 0xFFFFFFFFu : 0u;
    need = 0;
    return;
  }
  need = k;
  uint32_t prefix = TopDigit(top.data(), 256, need) << 24;
  int64_t m = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t key = keys[r];
    if (key != 0 && (key >> 24) == (prefix >> 24)) bucket[m++] = key;
  }
  std::array<uint32_t, 256> hist;
  uint32_t high_mask = 0xFF000000u;
  for (int shift = 16; shift >= 0; shift -= 8) {
    hist.fill(0);
    for (int64_t i = 0; i < m; ++i) {
      if ((bucket[i] & high_mask) == prefix) ++hist[(bucket[i] >> shift) & 0xFFu];
    }
    prefix |= TopDigit(hist.data(), 256, need) << shift;
    high_mask |= 0xFFu << shift;
  }
  threshold = prefix;
}

void SelectColumns(ffi::ThreadPool& pool, int64_t n_threads, const Scores& scores,
                   Candidates cands, int64_t rows, int64_t cols, const int32_t* k, bool* out) {
  const int64_t n_blocks = (cols + kColumnBlock - 1) / kColumnBlock;
  const int64_t parts =
      rows * cols < kMinParallel ? 1 : std::max<int64_t>(1, std::min(n_threads, n_blocks));
  ParallelFor(pool, parts, parts, [&](int64_t p) {
    std::vector<uint32_t> keys(static_cast<size_t>(kColumnBlock * rows));
    std::vector<uint32_t> bucket(static_cast<size_t>(rows));
    std::vector<std::array<uint32_t, 256>> top(kColumnBlock);
    uint32_t threshold[kColumnBlock];
    int64_t need[kColumnBlock], taken[kColumnBlock];
    for (int64_t block = n_blocks * p / parts; block < n_blocks * (p + 1) / parts; ++block) {
      const int64_t j0 = block * kColumnBlock;
      const int64_t nb = std::min(kColumnBlock, cols - j0);
      for (int64_t c = 0; c < nb; ++c) top[c].fill(0);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < nb; ++c) {
          const uint32_t key = KeyAt(scores, cands, r * cols + j0 + c);
          keys[c * rows + r] = key;
          if (key != 0) ++top[c][key >> 24];
        }
      }
      for (int64_t c = 0; c < nb; ++c) {
        ColumnThreshold(keys.data() + c * rows, rows, top[c], k[j0 + c], bucket.data(),
                        threshold[c], need[c]);
        taken[c] = 0;
      }
      for (int64_t r = 0; r < rows; ++r) {
        bool* row_out = out + r * cols + j0;
        for (int64_t c = 0; c < nb; ++c) {
          const uint32_t key = keys[c * rows + r];
          row_out[c] =
              key != 0 && (key > threshold[c] || (key == threshold[c] && taken[c]++ < need[c]));
        }
      }
    }
  });
}

int64_t ThreadCount(ffi::ThreadPool& pool, int64_t threads) {
  int64_t n_threads = std::max<int64_t>(1, pool.num_threads());
  if (threads > 0) n_threads = std::min(n_threads, threads);
  return std::min(n_threads, kMaxThreads);
}

// The Scores of a kernel's score argument: `values` holds n floats (kValues, kMagnitude)
// or none (kHash, whose two words are words[2 slot], words[2 slot + 1]).
ffi::Error MakeScores(const char* what, const ffi::Buffer<ffi::F32>& values, int64_t mode,
                      const ffi::Buffer<ffi::U32>& words, int64_t slot, int64_t n,
                      Scores& out) {
  const int64_t size = static_cast<int64_t>(values.element_count());
  if (mode == kValues || mode == kMagnitude) {
    if (size != n) return ffi::Error::InvalidArgument(std::string(what) + ": scores size");
    out = Scores{values.typed_data(), mode, 0u, 0u};
    return ffi::Error::Success();
  }
  if ((mode != kHash && mode != kKeyedHash) ||
      static_cast<int64_t>(words.element_count()) < 2 * slot + 2) {
    return ffi::Error::InvalidArgument(std::string(what) + ": score mode or hash words");
  }
  out = Scores{nullptr, kHash, words.typed_data()[2 * slot], words.typed_data()[2 * slot + 1]};
  if (mode == kKeyedHash) KeyBits(out.word0, out.word1, out.word0, out.word1);
  return ffi::Error::Success();
}

// The drop (words 0-1) and grow (words 2-3) Scores of a drop-and-grow kernel.
ffi::Error MakeDropGrowScores(const std::string& what, const ffi::Buffer<ffi::F32>& drop_values,
                              int64_t drop_mode, const ffi::Buffer<ffi::F32>& grow_values,
                              int64_t grow_mode, const ffi::Buffer<ffi::U32>& words, int64_t n,
                              Scores& drop, Scores& grow) {
  if (auto e = MakeScores((what + " drop").c_str(), drop_values, drop_mode, words, 0, n, drop);
      e.failure()) {
    return e;
  }
  return MakeScores((what + " grow").c_str(), grow_values, grow_mode, words, 1, n, grow);
}

ffi::Error SelectImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> values,
                      ffi::Buffer<ffi::PRED> candidates, ffi::Buffer<ffi::S32> k,
                      ffi::Buffer<ffi::U32> words, ffi::ResultBuffer<ffi::PRED> out,
                      int64_t per_column, int64_t mode, int64_t threads) {
  const auto dims = out->dimensions();
  if (dims.size() != 2) {
    return ffi::Error::InvalidArgument("sparsejax_select: scores must be 2-D [L, G]");
  }
  const int64_t rows = dims[0], cols = dims[1], n = rows * cols;
  Scores scores;
  if (auto e = MakeScores("sparsejax_select", values, mode, words, 0, n, scores); e.failure()) {
    return e;
  }
  Candidates cands;
  if (candidates.element_count() != 0) {
    if (static_cast<int64_t>(candidates.element_count()) != n) {
      return ffi::Error::InvalidArgument("sparsejax_select: candidates must match scores");
    }
    cands.p = candidates.typed_data();
  }
  const int64_t groups = per_column ? cols : 1;
  if (static_cast<int64_t>(k.element_count()) != groups) {
    return ffi::Error::InvalidArgument("sparsejax_select: k must hold one count per group");
  }
  if (n == 0) return ffi::Error::Success();
  bool* dst = out->typed_data();
  const int64_t n_threads = ThreadCount(pool, threads);
  if (per_column) {
    SelectColumns(pool, n_threads, scores, cands, rows, cols, k.typed_data(), dst);
  } else {
    SelectWhole(pool, n_threads, scores, cands, n, k.typed_data()[0], dst);
  }
  return ffi::Error::Success();
}

// The number of true entries of m[0..n), in `parts` contiguous parts (one per thread).
int64_t CountTrue(ffi::ThreadPool& pool, int64_t parts, const bool* m, int64_t n) {
  std::vector<int64_t> part_count(static_cast<size_t>(parts), 0);
  ParallelFor(pool, parts, parts, [&](int64_t p) {
    int64_t c = 0;
    for (int64_t i = n * p / parts; i < n * (p + 1) / parts; ++i) c += m[i] ? 1 : 0;
    part_count[p] = c;
  });
  int64_t total = 0;
  for (int64_t c : part_count) total += c;
  return total;
}

// The number of true entries of every column of m [rows, cols], into dst [cols]: column
// ranges per thread, rows streamed in order.
void CountColumns(ffi::ThreadPool& pool, int64_t n_threads, const bool* m, int64_t rows,
                  int64_t cols, int32_t* dst) {
  std::fill(dst, dst + cols, 0);
  const int64_t parts = std::max<int64_t>(1, std::min(n_threads, rows * cols / kMinParallel));
  ParallelFor(pool, parts, parts, [&](int64_t p) {
    const int64_t c0 = cols * p / parts, c1 = cols * (p + 1) / parts;
    for (int64_t r = 0; r < rows; ++r) {
      const bool* row = m + r * cols;
      for (int64_t c = c0; c < c1; ++c) dst[c] += row[c] ? 1 : 0;
    }
  });
}

// One unstructured drop-and-grow (drop_grow.drop_and_grow): nnz = count(mask); n_drop is
// clipped to [0, nnz]; kept = the nnz - n_drop highest drop scores among the mask's
// entries; grown = the n_grow highest grow scores among the entries not kept (n_grow:
// n_drop after clipping when `grow_default`, else max(n_grow, 0)); new = kept | grown.
ffi::Error DropGrowImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> drop_values,
                        ffi::Buffer<ffi::F32> grow_values, ffi::Buffer<ffi::PRED> mask,
                        ffi::Buffer<ffi::S32> counts, ffi::Buffer<ffi::U32> words,
                        ffi::ResultBuffer<ffi::PRED> new_mask, ffi::ResultBuffer<ffi::PRED> kept,
                        int64_t grow_default, int64_t drop_mode, int64_t grow_mode,
                        int64_t threads) {
  const int64_t n = static_cast<int64_t>(mask.element_count());
  Scores drop, grow;
  if (auto e = MakeDropGrowScores("sparsejax_drop_grow", drop_values, drop_mode,
                                  grow_values, grow_mode, words, n, drop, grow);
      e.failure()) {
    return e;
  }
  if (counts.element_count() != 2) {
    return ffi::Error::InvalidArgument("sparsejax_drop_grow: counts must be [n_drop, n_grow]");
  }
  if (n == 0) return ffi::Error::Success();
  const int64_t n_threads = ThreadCount(pool, threads);
  const bool* m = mask.typed_data();
  const int64_t parts = std::max<int64_t>(1, std::min(n_threads, n / kMinParallel));
  const int64_t nnz = CountTrue(pool, parts, m, n);
  const int64_t n_drop = std::clamp<int64_t>(counts.typed_data()[0], 0, nnz);
  const int64_t n_grow =
      grow_default ? n_drop : std::max<int64_t>(counts.typed_data()[1], 0);
  bool* k = kept->typed_data();
  bool* out = new_mask->typed_data();
  SelectWhole(pool, n_threads, drop, Candidates{m, false}, n, nnz - n_drop, k);
  SelectWhole(pool, n_threads, grow, Candidates{k, true}, n, n_grow, out);
  ParallelFor(pool, parts, parts, [&](int64_t p) {
    for (int64_t i = n * p / parts; i < n * (p + 1) / parts; ++i) out[i] = out[i] || k[i];
  });
  return ffi::Error::Success();
}

// The grouped update of a [rows, cols] mask m with nnz true entries (see
// GroupedDropGrowImpl): kept = the nnz - n_drop highest drop scores among keep_from; with
// `cap`, over-full columns cut to k_group[c]; each column grows back to k_group[c].
// keep_from may alias out: only the drop selection reads it, before out is written.
void GroupedUpdate(ffi::ThreadPool& pool, int64_t n_threads, const Scores& drop,
                   const Scores& grow, const bool* m, const bool* keep_from,
                   const int32_t* k_group, int64_t nnz, int64_t n_drop_in, bool cap,
                   int64_t rows, int64_t cols, bool* kept, bool* out) {
  const int64_t n = rows * cols;
  const int64_t parts = std::max<int64_t>(1, std::min(n_threads, n / kMinParallel));
  const int64_t n_drop = std::clamp<int64_t>(n_drop_in, 0, nnz);
  SelectWhole(pool, n_threads, drop, Candidates{keep_from, false}, n, nnz - n_drop, kept);
  std::vector<int32_t> n_kept(static_cast<size_t>(cols)), grow_k(static_cast<size_t>(cols));
  CountColumns(pool, n_threads, kept, rows, cols, n_kept.data());
  if (cap) {
    bool over = false;
    for (int64_t c = 0; c < cols; ++c) over = over || n_kept[c] > k_group[c];
    // In place: a block of columns is read whole into scratch before it is written.
    if (over) SelectColumns(pool, n_threads, drop, Candidates{kept, false}, rows, cols, k_group,
                            kept);
    for (int64_t c = 0; c < cols; ++c) {
      n_kept[c] = std::min(n_kept[c], std::max<int32_t>(k_group[c], 0));
    }
  }
  for (int64_t c = 0; c < cols; ++c) grow_k[c] = k_group[c] - n_kept[c];
  SelectColumns(pool, n_threads, grow, Candidates{kept, true}, rows, cols, grow_k.data(), out);
  ParallelFor(pool, parts, parts, [&](int64_t p) {
    for (int64_t i = n * p / parts; i < n * (p + 1) / parts; ++i) out[i] = out[i] || kept[i];
  });
}

// SRigL's ablation rule (ablation.neurons_to_ablate) on [rows, cols] weights w and
// gradients g: the salient entries are the n_keep largest |w| and the n_drop largest |g|
// (whole array, ties by flat index); a column (neuron) is ablated when it holds fewer
// salient entries than min(threshold, the (min_neurons + 1)-th largest column count).
// Requires 0 <= min_neurons < cols; by_weight and by_grad are [rows, cols] scratch.
void Ablated(ffi::ThreadPool& pool, int64_t n_threads, const float* w, const float* g,
             int64_t rows, int64_t cols, int64_t n_keep, int64_t n_drop, int64_t threshold,
             int64_t min_neurons, bool* by_weight, bool* by_grad, bool* out) {
  const int64_t n = rows * cols;
  std::vector<int32_t> salient(static_cast<size_t>(cols), 0);
  if (n > 0) {
    SelectWhole(pool, n_threads, Scores{w, kMagnitude}, Candidates{}, n, n_keep, by_weight);
    SelectWhole(pool, n_threads, Scores{g, kMagnitude}, Candidates{}, n, n_drop, by_grad);
    const int64_t parts = std::max<int64_t>(1, std::min(n_threads, n / kMinParallel));
    ParallelFor(pool, parts, parts, [&](int64_t p) {  // column ranges per thread
      const int64_t c0 = cols * p / parts, c1 = cols * (p + 1) / parts;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = c0; c < c1; ++c) {
          salient[c] += (by_weight[r * cols + c] || by_grad[r * cols + c]) ? 1 : 0;
        }
      }
    });
  }
  std::vector<int32_t> order(salient);
  std::nth_element(order.begin(), order.begin() + min_neurons, order.end(),
                   std::greater<int32_t>());
  const int64_t limit = std::min<int64_t>(threshold, order[min_neurons]);
  for (int64_t c = 0; c < cols; ++c) out[c] = salient[c] < limit;
}

// One drop-and-grow with an exact count per column (drop_grow.grouped_drop_and_grow,
// axis 0): kept = the nnz - n_drop highest drop scores among `keepable` (the mask, or the
// mask's eligible entries); with `cap`, columns holding more than per_group[c] kept
// entries are cut to their per_group[c] highest drop scores; each column then grows its
// highest grow scores among the entries not kept, up to per_group[c]; new = kept | grown.
ffi::Error GroupedDropGrowImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> drop_values,
                               ffi::Buffer<ffi::F32> grow_values, ffi::Buffer<ffi::PRED> mask,
                               ffi::Buffer<ffi::PRED> keepable, ffi::Buffer<ffi::S32> per_group,
                               ffi::Buffer<ffi::S32> n_drop_in, ffi::Buffer<ffi::U32> words,
                               ffi::ResultBuffer<ffi::PRED> new_mask,
                               ffi::ResultBuffer<ffi::PRED> kept_out, int64_t cap,
                               int64_t drop_mode, int64_t grow_mode, int64_t threads) {
  const auto dims = mask.dimensions();
  if (dims.size() != 2) {
    return ffi::Error::InvalidArgument("sparsejax_grouped_drop_grow: mask must be [L, G]");
  }
  const int64_t rows = dims[0], cols = dims[1], n = rows * cols;
  Scores drop, grow;
  if (auto e = MakeDropGrowScores("sparsejax_grouped_drop_grow", drop_values, drop_mode,
                                  grow_values, grow_mode, words, n, drop, grow);
      e.failure()) {
    return e;
  }
  if ((keepable.element_count() != 0 && static_cast<int64_t>(keepable.element_count()) != n) ||
      static_cast<int64_t>(per_group.element_count()) != cols || n_drop_in.element_count() != 1) {
    return ffi::Error::InvalidArgument(
        "sparsejax_grouped_drop_grow: keepable [L, G], per_group [1, G], n_drop [1]");
  }
  if (n == 0) return ffi::Error::Success();
  const int64_t n_threads = ThreadCount(pool, threads);
  const bool* m = mask.typed_data();
  const int64_t parts = std::max<int64_t>(1, std::min(n_threads, n / kMinParallel));
  GroupedUpdate(pool, n_threads, drop, grow, m,
                keepable.element_count() != 0 ? keepable.typed_data() : m,
                per_group.typed_data(), CountTrue(pool, parts, m, n), n_drop_in.typed_data()[0],
                cap != 0, rows, cols, kept_out->typed_data(), new_mask->typed_data());
  return ffi::Error::Success();
}

// SRigL's ablation rule (ablation.neurons_to_ablate) on [L, G] weights and gradients: the
// salient entries are the n_keep largest |w| and the n_drop largest |g| (whole array, ties
// by flat index); a column (neuron) is ablated when it holds fewer salient entries than
// min(threshold, the (min_neurons + 1)-th largest column count).
ffi::Error AblateImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> weights,
                      ffi::Buffer<ffi::F32> grads, ffi::Buffer<ffi::S32> counts,
                      ffi::ResultBuffer<ffi::PRED> ablated, int64_t threshold,
                      int64_t min_neurons, int64_t threads) {
  const auto dims = weights.dimensions();
  if (dims.size() != 2 || grads.element_count() != weights.element_count() ||
      counts.element_count() != 2 ||
      static_cast<int64_t>(ablated->element_count()) != (dims.size() == 2 ? dims[1] : -1)) {
    return ffi::Error::InvalidArgument(
        "sparsejax_ablate: weights and grads [L, G], counts [n_keep, n_drop], out [G]");
  }
  const int64_t rows = dims[0], cols = dims[1];
  if (cols == 0) return ffi::Error::Success();
  if (min_neurons < 0 || min_neurons >= cols) {
    return ffi::Error::InvalidArgument("sparsejax_ablate: min_neurons must be in [0, G)");
  }
  const int64_t n = rows * cols;
  std::unique_ptr<bool[]> by_weight(new bool[n]), by_grad(new bool[n]);
  Ablated(pool, ThreadCount(pool, threads), weights.typed_data(), grads.typed_data(), rows,
          cols, counts.typed_data()[0], counts.typed_data()[1], threshold, min_neurons,
          by_weight.get(), by_grad.get(), ablated->typed_data());
  return ffi::Error::Success();
}

// SRigL's whole update of an ablating layer (ablation.ablated_drop_and_grow) on [L, G]:
// nnz = count(mask); the ablation rule with n_keep = nnz - n_drop; every active neuron's
// target is budget // (active neurons), an ablated neuron's 0; the grouped update with the
// cap, whose layer-wise drop keeps only entries of active neurons.
ffi::Error AblatedDropGrowImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> drop_values,
                               ffi::Buffer<ffi::F32> grow_values, ffi::Buffer<ffi::PRED> mask,
                               ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::F32> grads,
                               ffi::Buffer<ffi::S32> n_drop_in, ffi::Buffer<ffi::U32> words,
                               ffi::ResultBuffer<ffi::PRED> new_mask,
                               ffi::ResultBuffer<ffi::PRED> kept_out, int64_t drop_mode,
                               int64_t grow_mode, int64_t threshold, int64_t min_neurons,
                               int64_t budget, int64_t threads) {
  const auto dims = mask.dimensions();
  if (dims.size() != 2) {
    return ffi::Error::InvalidArgument("sparsejax_ablated_drop_grow: mask must be [L, G]");
  }
  const int64_t rows = dims[0], cols = dims[1], n = rows * cols;
  Scores drop, grow;
  if (auto e = MakeDropGrowScores("sparsejax_ablated_drop_grow", drop_values, drop_mode,
                                  grow_values, grow_mode, words, n, drop, grow);
      e.failure()) {
    return e;
  }
  if (static_cast<int64_t>(weights.element_count()) != n ||
      static_cast<int64_t>(grads.element_count()) != n || n_drop_in.element_count() != 1) {
    return ffi::Error::InvalidArgument(
        "sparsejax_ablated_drop_grow: weights and grads [L, G], n_drop [1]");
  }
  if (n == 0) return ffi::Error::Success();
  if (min_neurons < 0 || min_neurons >= cols) {
    return ffi::Error::InvalidArgument(
        "sparsejax_ablated_drop_grow: min_neurons must be in [0, G)");
  }
  const int64_t n_threads = ThreadCount(pool, threads);
  const bool* m = mask.typed_data();
  const int64_t parts = std::max<int64_t>(1, std::min(n_threads, n / kMinParallel));
  const int64_t nnz = CountTrue(pool, parts, m, n);
  const int64_t n_drop = n_drop_in.typed_data()[0];
  // The outputs serve as scratch: the salient selections, then the keepable entries (read
  // by the drop selection into `kept` before the growth writes `new_mask`).
  bool* kept = kept_out->typed_data();
  bool* out = new_mask->typed_data();
  std::unique_ptr<bool[]> ablated(new bool[cols]);
  Ablated(pool, n_threads, weights.typed_data(), grads.typed_data(), rows, cols, nnz - n_drop,
          n_drop, threshold, min_neurons, out, kept, ablated.get());
  int64_t n_active = 0;
  for (int64_t c = 0; c < cols; ++c) n_active += ablated[c] ? 0 : 1;
  std::vector<int32_t> per_neuron(static_cast<size_t>(cols));
  for (int64_t c = 0; c < cols; ++c) {
    per_neuron[c] = ablated[c] ? 0 : static_cast<int32_t>(budget / std::max<int64_t>(n_active, 1));
  }
  bool* keepable = out;  // the mask's entries in active neurons
  ParallelFor(pool, parts, parts, [&](int64_t p) {  // row ranges per thread
    for (int64_t r = rows * p / parts; r < rows * (p + 1) / parts; ++r) {
      for (int64_t c = 0; c < cols; ++c) keepable[r * cols + c] = m[r * cols + c] && !ablated[c];
    }
  });
  GroupedUpdate(pool, n_threads, drop, grow, m, keepable, per_neuron.data(), nnz, n_drop, true,
                rows, cols, kept, out);
  return ffi::Error::Success();
}

// The DST step's per-leaf criterion keys (step.leaf_keys) of a raw threefry key, as JAX's
// partitionable threefry derives them: out[j] = split(fold_in(fold_in(key, count), idx[j]))
// ([L, 2, 2]: two keys of two words per leaf).
ffi::Error LeafKeysImpl(ffi::Buffer<ffi::U32> key, ffi::Buffer<ffi::S32> count,
                        ffi::Buffer<ffi::U32> indices, ffi::ResultBuffer<ffi::U32> out) {
  const int64_t n = static_cast<int64_t>(indices.element_count());
  if (key.element_count() != 2 || count.element_count() != 1 ||
      static_cast<int64_t>(out->element_count()) != 4 * n) {
    return ffi::Error::InvalidArgument(
        "sparsejax_leaf_keys: key [2], count [], indices [L], out [L, 2, 2]");
  }
  uint32_t s0 = 0, s1 = static_cast<uint32_t>(count.typed_data()[0]);  // fold_in(key, count)
  Threefry2x32(key.typed_data()[0], key.typed_data()[1], s0, s1);
  uint32_t* dst = out->typed_data();
  for (int64_t j = 0; j < n; ++j) {
    uint32_t l0 = 0, l1 = indices.typed_data()[j];  // fold_in(step key, index)
    Threefry2x32(s0, s1, l0, l1);
    for (uint32_t half = 0; half < 2; ++half) {  // split: counters (0, 0) and (0, 1)
      uint32_t o0 = 0, o1 = half;
      Threefry2x32(l0, l1, o0, o1);
      dst[4 * j + 2 * half] = o0;
      dst[4 * j + 2 * half + 1] = o1;
    }
  }
  return ffi::Error::Success();
}

// Counts of true entries of a bool [L, G]: in total (s32 [1, 1]) or per column ([1, G]).
ffi::Error CountImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::PRED> mask,
                     ffi::ResultBuffer<ffi::S32> out, int64_t per_column) {
  const auto dims = mask.dimensions();
  if (dims.size() != 2) {
    return ffi::Error::InvalidArgument("sparsejax_count: mask must be 2-D [L, G]");
  }
  const int64_t rows = dims[0], cols = dims[1], n = rows * cols;
  const bool* m = mask.typed_data();
  int32_t* dst = out->typed_data();
  const int64_t n_threads = ThreadCount(pool, 0);
  if (per_column) {
    CountColumns(pool, n_threads, m, rows, cols, dst);
    return ffi::Error::Success();
  }
  const int64_t parts = std::max<int64_t>(1, std::min(n_threads, n / kMinParallel));
  dst[0] = static_cast<int32_t>(CountTrue(pool, parts, m, n));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace sparsejax_select

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsejaxSelect, sparsejax_select::SelectImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scores [L, G] or [0]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // candidates or [0]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // k [1, 1] or [1, G]
                                  .Arg<ffi::Buffer<ffi::U32>>()   // hash words [2] or [0]
                                  .Ret<ffi::Buffer<ffi::PRED>>()  // selected [L, G]
                                  .Attr<int64_t>("per_column")
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsejaxDropGrow, sparsejax_select::DropGrowImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // drop scores [..] or [0]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // grow scores [..] or [0]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask [..]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // [n_drop, n_grow]
                                  .Arg<ffi::Buffer<ffi::U32>>()   // hash words [4] or [0]
                                  .Ret<ffi::Buffer<ffi::PRED>>()  // new mask [..]
                                  .Ret<ffi::Buffer<ffi::PRED>>()  // kept [..]
                                  .Attr<int64_t>("grow_default")
                                  .Attr<int64_t>("drop_mode")
                                  .Attr<int64_t>("grow_mode")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsejaxCount, sparsejax_select::CountImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask [L, G]
                                  .Ret<ffi::Buffer<ffi::S32>>()   // [1, 1] or [1, G]
                                  .Attr<int64_t>("per_column"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsejaxGroupedDropGrow, sparsejax_select::GroupedDropGrowImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // drop scores [L, G] or [0]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // grow scores [L, G] or [0]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask [L, G]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // keepable [L, G] or [0]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // per_group [1, G]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // n_drop [1]
                                  .Arg<ffi::Buffer<ffi::U32>>()   // hash words [4] or [0]
                                  .Ret<ffi::Buffer<ffi::PRED>>()  // new mask [L, G]
                                  .Ret<ffi::Buffer<ffi::PRED>>()  // kept [L, G]
                                  .Attr<int64_t>("cap")
                                  .Attr<int64_t>("drop_mode")
                                  .Attr<int64_t>("grow_mode")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsejaxAblate, sparsejax_select::AblateImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // weights [L, G]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // grads [L, G]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // [n_keep, n_drop]
                                  .Ret<ffi::Buffer<ffi::PRED>>()  // ablated [G]
                                  .Attr<int64_t>("threshold")
                                  .Attr<int64_t>("min_neurons")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsejaxAblatedDropGrow, sparsejax_select::AblatedDropGrowImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // drop scores [L, G] or [0]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // grow scores [L, G] or [0]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask [L, G]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // weights [L, G]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // grads [L, G]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // n_drop [1]
                                  .Arg<ffi::Buffer<ffi::U32>>()   // hash words [4]
                                  .Ret<ffi::Buffer<ffi::PRED>>()  // new mask [L, G]
                                  .Ret<ffi::Buffer<ffi::PRED>>()  // kept [L, G]
                                  .Attr<int64_t>("drop_mode")
                                  .Attr<int64_t>("grow_mode")
                                  .Attr<int64_t>("threshold")
                                  .Attr<int64_t>("min_neurons")
                                  .Attr<int64_t>("budget")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparsejaxLeafKeys, sparsejax_select::LeafKeysImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U32>>()   // key [2]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // count []
                                  .Arg<ffi::Buffer<ffi::U32>>()   // leaf indices [L]
                                  .Ret<ffi::Buffer<ffi::U32>>());  // keys [L, 2, 2]

static PyObject* Registrations(PyObject*, PyObject*) {
  return sparsejax_ffi::RegistrationDict(
      {{"sparsejax_select", reinterpret_cast<void*>(&SparsejaxSelect)},
       {"sparsejax_drop_grow", reinterpret_cast<void*>(&SparsejaxDropGrow)},
       {"sparsejax_count", reinterpret_cast<void*>(&SparsejaxCount)},
       {"sparsejax_grouped_drop_grow", reinterpret_cast<void*>(&SparsejaxGroupedDropGrow)},
       {"sparsejax_ablate", reinterpret_cast<void*>(&SparsejaxAblate)},
       {"sparsejax_ablated_drop_grow", reinterpret_cast<void*>(&SparsejaxAblatedDropGrow)},
       {"sparsejax_leaf_keys", reinterpret_cast<void*>(&SparsejaxLeafKeys)}});
}

static PyMethodDef kMethods[] = {
    {"registrations", Registrations, METH_NOARGS,
     "Dict of XLA FFI target name -> PyCapsule holding the handler."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_select_native",
                              "Native XLA FFI CPU kernel: exact top-k selection.", -1, kMethods};

PyMODINIT_FUNC PyInit__select_native(void) { return PyModule_Create(&kModule); }
