r"""Exact top-k selection primitives (pure, per array, jit-safe).

All selections are *exact*: they select precisely ``k`` entries (or all candidates when
fewer exist), with ties broken by the lowest index along the selection axis. ``k`` may be a
traced value (dynamic), so mask updates whose counts depend on a drop-fraction schedule
compile once.

Implementation: a radix select on the order-preserving integer image of the float scores,
never a sort. The strategy is chosen statically from the shapes:

* short slices (N:M groups, ``len <= 16``): each entry is ranked by pairwise comparison
  with the other entries of its slice (``len`` elementwise passes);
* a whole array of at least ``2**16`` entries: two 16-bit histogram passes (scatter-adds
  into ``2**16`` bins) find the k-th largest key exactly;
* per-slice selections (per neuron) and small arrays: a 32-step bitwise binary search of
  counting passes (a vectorised comparison and a sum per pass; on the CPU several times
  cheaper than per-slice histograms, whose scatter-adds run one entry at a time).

Ties at the threshold are broken by index: when some entries tied at a threshold must be
left out, the pass that writes the mask ranks the tied entries with a running count (the
lowest indices win); otherwise it is one comparison with the threshold. Large arrays are
processed in column chunks (about 256K entries for histogram passes, 64K entries and at
least 64 columns for counting passes: ``fori_loop``\ s of passes, then of mask writes), so
a selection's temporaries stay a few MiB at most whatever the layer size: no full copy of
the keys, bins or a cumulative sum is materialised, and the program holds one pass body
per selection, its one-comparison write and one tie-ranking write. Cost is O(n) per
selection with no ``n log n`` sort, which is what makes mask updates of 4096² layers cheap
(see ``benchmarks/mask_update.py``).

On a one-device CPU process the whole selection is instead one native FFI call
(``native_select.py``, ``kernels/csrc/select_ffi.cc``) with the same result bit for bit: the
program then holds one custom call per selection rather than a few dozen XLA kernels,
which is most of a mask update's compile time and compile-time memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax._src.primitives import native_select, radix, score_form

_SIGN_BIT = np.uint32(0x80000000)  # NumPy: importing must not start a JAX backend

# Static strategy thresholds (see topk_mask).
_PAIRWISE_MAX = 16
# Whole-array selections of at least this many entries use 16-bit histogram passes; smaller
# arrays and per-slice selections use counting passes (benchmarks/RESULTS.md, 2026-11-30).
_HISTOGRAM_ABOVE = 1 << 16
# Arrays above _CHUNK_ABOVE entries are processed in column chunks of about _CHUNK entries
# (histogram passes) or _COUNT_CHUNK entries and at least _MIN_COUNT_COLS columns (counting
# passes, which reduce down the columns): the update's temporaries stay a few MiB, since
# XLA:CPU maps a step's temp buffer above 32 MiB afresh on every step.
_CHUNK = 1 << 18
_CHUNK_ABOVE = 1 << 18
_COUNT_CHUNK = 1 << 16
_MIN_COUNT_COLS = 64
_MAX_CHUNKS = 4096
_CUMSUM_BLOCK = 32
# Whole selections take the native CPU kernel where native_select.usable() (tests switch
# it off to check the XLA strategies against the same references).
_NATIVE = True


def ranks_pairwise(length: int) -> bool:
  """Whether :func:`topk_mask` ranks slices of this length pairwise (no selection call)."""
  return length <= _PAIRWISE_MAX


def native_or_xla(native: Callable[[], Any], xla: Callable[[], Any], *, eligible: bool = True):
  """``native()`` on a one-device CPU process with the native kernels (and ``eligible``),
  else ``xla()``; the two compute the same result.

  The native call holds one custom call where the XLA program holds dozens of kernels
  (most of a mask update's compile time and compile-time memory); with several devices an
  array may be sharded, and XLA would gather a custom call's operands, so the XLA program
  serves those, accelerators, and processes without the extension.
  """
  if eligible and _NATIVE and native_select.usable():
    return lax.platform_dependent(cpu=native, default=xla)
  return xla()


def _ordered_keys(scores: jax.Array) -> jax.Array:
  """Maps float scores to uint32 keys with the same order (larger score, larger key).

  -0.0 maps to the key of +0.0 (equal scores tie, and ties go by index). -inf maps above
  every NaN bit pattern with the sign bit set, and +NaN maps above +inf; callers that may
  see NaN must check for it (the DST wrapper skips such updates).
  """
  bits = lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.uint32)
  bits = jnp.where(bits == _SIGN_BIT, jnp.uint32(0), bits)  # -0.0 -> +0.0
  negative = (bits & _SIGN_BIT) != 0
  return jnp.where(negative, ~bits, bits | _SIGN_BIT)


def topk_mask(
  scores: score_form.Scores,
  k: jax.Array | int,
  *,
  axis: int | None = None,
  candidates: jax.Array | None = None,
) -> jax.Array:
  """Selects the ``k`` highest-scoring entries, exactly, with index tie-breaking.

  Args:
    scores: float array of any shape (or a ``score_form.ScoreForm``, which a whole-array
      selection of a 2-D or larger shape reads in place on the native path).
    k: number of entries to select. With ``axis=None`` a scalar (python int or traced
      int32); with an ``axis``, a scalar or an integer array broadcastable to ``scores``
      with that axis reduced to size 1 (``keepdims`` shape), giving one count per slice.
      Counts above the number of candidates select every candidate; counts ≤ 0 select
      nothing.
    axis: ``None`` selects over the whole (flattened) array; an integer selects
      independently within each 1-D slice along that axis (e.g. per neuron, per N:M group).
    candidates: optional bool array shaped like ``scores``; only candidates may be
      selected. Defaults to all entries.

  Returns:
    A bool array shaped like ``scores``: ``True`` at the selected entries. Among entries
    with equal scores, the one with the lower index (flat index, or index along ``axis``)
    is selected first.

  Example:
    >>> topk_mask(jnp.array([1., 3., 3., 0.]), 2)
    Array([False,  True,  True, False], dtype=bool)
  """
  check_count("k", k)
  if isinstance(scores, score_form.ScoreForm) and len(scores.shape) >= 2 and axis is None:
    # A whole-array selection of a form: the native kernel reads it in place.
    view = score_form.reshape(scores, (-1, scores.shape[-1]))
    cands = None if candidates is None else candidates.reshape(view.shape)
    k = jnp.reshape(jnp.asarray(k, jnp.int32), (1, 1))
    return _select_2d(view, k, cands, per_column=False).reshape(scores.shape)
  scores = score_form.as_array(scores)
  if axis is None:
    # One group over the whole array, on a free 2-D view [.., last axis] (no flattening
    # copy): rows are chunked, entries ranked by flat index for ties.
    view_shape = (-1, scores.shape[-1]) if scores.ndim >= 2 else (-1, 1)
    view = scores.reshape(view_shape)
    if view.shape[0] <= _PAIRWISE_MAX and view.shape[1] == 1:
      flat = topk_mask(
        scores.reshape(-1),
        jnp.reshape(jnp.asarray(k, jnp.int32), (1,)),
        axis=0,
        candidates=None if candidates is None else candidates.reshape(-1),
      )
      return flat.reshape(scores.shape)
    cands = None if candidates is None else candidates.reshape(view.shape)
    k = jnp.reshape(jnp.asarray(k, jnp.int32), (1, 1))
    return _select_2d(view, k, cands, per_column=False).reshape(scores.shape)
  axis = axis % scores.ndim
  reduced_shape = scores.shape[:axis] + (1,) + scores.shape[axis + 1 :]
  k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), reduced_shape)
  if scores.shape[axis] <= _PAIRWISE_MAX:
    keys = _ordered_keys(scores)
    if candidates is not None:
      keys = jnp.where(candidates, keys, jnp.uint32(0))
    return _select_by_rank(keys, k, axis)
  # The selection axis first, the other axes flattened: [L, G] (a copy only if axis != 0).
  moved = jnp.moveaxis(scores, axis, 0)
  view = moved.reshape(moved.shape[0], -1)
  cands = None
  if candidates is not None:
    cands = jnp.moveaxis(candidates, axis, 0).reshape(view.shape)
  selected = _select_2d(view, jnp.moveaxis(k, axis, 0).reshape(1, -1), cands, per_column=True)
  return jnp.moveaxis(selected.reshape(moved.shape), 0, axis)


def check_count(name: str, k) -> None:
  """Rejects non-integer counts (``k=2.5`` must not silently mean 2)."""
  if isinstance(k, bool) or (isinstance(k, float) and not float(k).is_integer()):
    raise TypeError(f"`{name}` must be an integer count, got {k!r}.")
  if isinstance(k, float):
    return
  dtype = getattr(k, "dtype", None)
  if dtype is not None and not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"`{name}` must be an integer count (an int or int array), got dtype {dtype}.")


def _select_by_rank(keys: jax.Array, k: jax.Array, axis: int) -> jax.Array:
  """Short slices (N:M groups): rank each entry by pairwise comparison, O(len) passes."""
  n = keys.shape[axis]
  position = lax.broadcasted_iota(jnp.int32, keys.shape, axis)
  rank = jnp.zeros(keys.shape, jnp.int32)
  for j in range(n):
    other = lax.slice_in_dim(keys, j, j + 1, axis=axis)
    beats = (other > keys) | ((other == keys) & (j < position))
    rank = rank + (beats & (other != 0)).astype(jnp.int32)
  return (keys != 0) & (rank < k)


def _chunk_cols(n_rows: int, n_cols: int, chunk: int | None = None, min_cols: int = 1) -> int:
  """Columns per chunk: all columns for small arrays, else the largest divisor of
  ``n_cols`` with at most ``chunk`` (default ``_CHUNK``) entries or ``min_cols`` columns
  per chunk (at least one column; all columns when that would need too many chunks).

  Chunks are column blocks so that a kernel sharded along its rows (FSDP along the input
  axis, the layout ``sj.sharding.fsdp_param_specs`` picks) keeps every chunk local: a
  dynamic slice along a sharded axis would gather the layer.
  """
  if n_rows * n_cols <= _CHUNK_ABOVE:
    return n_cols
  best = 1
  chunk = _CHUNK if chunk is None else chunk
  for c in range(1, max(1, min_cols, chunk // max(n_rows, 1)) + 1):
    if n_cols % c == 0:
      best = c
  return best if n_cols // best <= _MAX_CHUNKS else n_cols


def _cumsum_rows(x: jax.Array) -> jax.Array:
  """Inclusive int32 cumsum of a ``[n, c]`` array along axis 0.

  For bool arrays, in blocks of 32 rows: the within-block sums are one batched product
  with a triangular ones matrix (exact: the float32 sums are at most 32), then a short
  cumsum of the block totals. XLA:CPU lowers a long cumsum to a reduce-window, several
  times slower. Integer arrays (per-row counts, one column) take ``jnp.cumsum``.
  """
  n, c = x.shape
  block = _CUMSUM_BLOCK
  if n <= block or x.dtype != jnp.bool_:
    return jnp.cumsum(x, axis=0, dtype=jnp.int32)
  n_blocks = -(-n // block)
  padded = jnp.pad(x.astype(jnp.float32), ((0, n_blocks * block - n), (0, 0)))
  lower = jnp.tril(jnp.ones((block, block), jnp.float32))
  within = jnp.einsum(
    "ij,bjc->bic",
    lower,
    padded.reshape(n_blocks, block, c),
    precision=lax.Precision.HIGHEST,
    preferred_element_type=jnp.float32,
  ).astype(jnp.int32)
  totals = within[:, -1, :]
  before = jnp.cumsum(totals, axis=0, dtype=jnp.int32) - totals
  return (within + before[:, None, :]).reshape(n_blocks * block, c)[:n]


def count_true(mask: jax.Array, axis: int | None = None) -> jax.Array:
  """int32 count of True entries: in total (``axis=None``) or along ``axis`` (keepdims).

  Large masks are summed in column chunks, so no int32 copy of the whole mask is made (XLA
  on the CPU materialises the conversion in front of a reduction); on a one-device CPU
  process with the native extension, by one FFI call (``native_select.count_2d``).
  """
  if axis is not None and axis % max(mask.ndim, 1) != 0:
    return jnp.sum(mask, axis=axis, keepdims=True, dtype=jnp.int32)
  view = mask.reshape(mask.shape[0], -1) if mask.ndim >= 2 else mask.reshape(-1, 1)
  per_column = axis is not None
  total = native_or_xla(  # native: one custom call instead of a loop over chunks
    lambda: native_select.count_2d(view.astype(bool), per_column=per_column).reshape(
      (1, -1) if per_column else ()
    ),
    lambda: _count_true_xla(view, per_column),
    eligible=view.size > _CHUNK_ABOVE,
  )
  return total.reshape(()) if axis is None else total.reshape((1,) + mask.shape[1:])


def _count_true_xla(view: jax.Array, per_column: bool) -> jax.Array:
  """:func:`count_true` of a ``[L, G]`` view: a scalar, or ``[1, G]`` per column."""
  cols = _chunk_cols(*view.shape)
  n_chunks = view.shape[1] // cols
  if not per_column:

    def add(i, acc):
      return acc + jnp.sum(radix.col_slice(view, i, cols), dtype=jnp.int32)

    return radix.for_chunks(n_chunks, add, jnp.zeros((), jnp.int32))

  def put(i, acc):
    part = jnp.sum(radix.col_slice(view, i, cols), axis=0, keepdims=True, dtype=jnp.int32)
    return part if n_chunks == 1 else lax.dynamic_update_slice_in_dim(acc, part, i * cols, 1)

  return radix.for_chunks(n_chunks, put, jnp.zeros((1, view.shape[1]), jnp.int32))


def _select_2d(
  scores: score_form.Scores, k: jax.Array, candidates: jax.Array | None, *, per_column: bool
) -> jax.Array:
  """Top-``k`` of ``[L, G]`` scores: per column (``k`` is ``[1, G]``) or over the whole
  array (``per_column=False``, ``k`` is ``[1, 1]``, ties by row-major flat index).

  On a one-device CPU process with the native extension built, one FFI call computes it
  (``native_select``: the same result, a fraction of the compile time and memory);
  elsewhere (several devices, accelerators) the XLA program below does.
  """
  return native_or_xla(
    lambda: native_select.select_2d(scores, k, candidates, per_column=per_column),
    lambda: _select_2d_xla(score_form.as_array(scores), k, candidates, per_column=per_column),
  )


def _select_2d_xla(
  scores: jax.Array, k: jax.Array, candidates: jax.Array | None, *, per_column: bool
) -> jax.Array:
  """:func:`_select_2d` as an XLA program (any backend, any sharding).

  Loops over column chunks: the radix passes find each group's threshold key, then one
  pass writes the mask. When every entry tied at a threshold is selected (the usual case
  for real-valued scores) that pass is a single comparison; otherwise (a conditional) it
  ranks the tied entries by index with running counts, so ties need no extra radix passes
  and no full-size cumulative sum.
  """
  n_rows, n_cols = scores.shape
  by_histogram = not per_column and n_rows * n_cols >= _HISTOGRAM_ABOVE
  if by_histogram:
    cols = _chunk_cols(n_rows, n_cols)
  else:
    cols = _chunk_cols(n_rows, n_cols, _COUNT_CHUNK, _MIN_COUNT_COLS)
  n_chunks = n_cols // cols

  def chunk(i):
    cands = None if candidates is None else radix.col_slice(candidates, i, cols)
    return _keys(radix.col_slice(scores, i, cols), cands)

  if by_histogram:
    threshold, n_above, n_at = radix.threshold_by_histogram(chunk, n_chunks, k)
  else:
    threshold, n_above, n_at = radix.threshold_by_counting(chunk, n_chunks, cols, k, per_column)
  need = k - n_above  # how many of the entries tied at the threshold are selected
  tie_valid = (threshold != 0) & (k >= 1)

  def take_all_ties() -> jax.Array:
    # Every entry tied at the threshold is selected (n_at == need): one elementwise pass.
    keys = _keys(scores, candidates)
    return (keys > threshold) | ((keys == threshold) & tie_valid)

  def rank_ties() -> jax.Array:
    return _write_ranked(
      chunk, n_chunks, cols, scores.shape, threshold, need, tie_valid, per_column
    )

  # Real-valued scores rarely tie at the threshold: the running-count tie ranking (a
  # cumulative sum per chunk, most of a selection's cost) runs only when some group must
  # choose among tied entries.
  partial_ties = jnp.any(tie_valid & (n_at > need))
  return lax.cond(partial_ties, rank_ties, take_all_ties)


def _keys(scores: jax.Array, candidates: jax.Array | None) -> jax.Array:
  """Ordered keys; non-candidates get key 0, below every real number's key (>= 0x007FFFFF),
  and are never counted: every threshold found is >= 1 whenever k >= 1."""
  keys = _ordered_keys(scores)
  return keys if candidates is None else jnp.where(candidates, keys, jnp.uint32(0))


def _write_ranked(chunk, n_chunks, cols, shape, threshold, need, tie_valid, per_column):
  """The selected mask, tied entries ranked by index with running counts (chunk by chunk)."""
  n_rows = shape[0]

  def tied_in(i, keys):
    if per_column:
      return (keys == radix.col_slice(threshold, i, cols)) & radix.col_slice(tie_valid, i, cols)
    return (keys == threshold) & tie_valid

  if per_column:
    row_before = None
  else:  # ties rank in row-major order: count the ties of every row first (one pass)

    def count_rows(i, acc):
      return acc + jnp.sum(tied_in(i, chunk(i)), axis=1, keepdims=True, dtype=jnp.int32)

    per_row = radix.for_chunks(n_chunks, count_rows, jnp.zeros((n_rows, 1), jnp.int32))
    row_before = _cumsum_rows(per_row) - per_row

  def write(i, carry):
    out, seen = carry  # seen: ties in earlier chunks of the same row (flat order only)
    keys = chunk(i)
    tied = tied_in(i, keys)
    if per_column:  # index order along the column: rows
      rank = _cumsum_rows(tied)
      selected = (keys > radix.col_slice(threshold, i, cols)) | (
        tied & (rank <= radix.col_slice(need, i, cols))
      )
    else:  # row-major flat order: earlier rows, earlier chunks of the row, then columns
      rank = row_before + seen + jnp.cumsum(tied, axis=1, dtype=jnp.int32)
      seen = seen + jnp.sum(tied, axis=1, keepdims=True, dtype=jnp.int32)
      selected = (keys > threshold) | (tied & (rank <= need))
    if n_chunks == 1:
      return selected, seen
    return lax.dynamic_update_slice_in_dim(out, selected, i * cols, 1), seen

  init = (jnp.zeros(shape, bool), jnp.zeros((n_rows, 1), jnp.int32))
  out, _ = radix.for_chunks(n_chunks, write, init)
  return out
