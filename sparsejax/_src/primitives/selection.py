"""Exact top-k selection primitives (pure, per array, jit-safe).

All selections are *exact*: they select precisely ``k`` entries (or all candidates when
fewer exist), with ties broken by the lowest index along the selection axis. ``k`` may be a
traced value (dynamic), so mask updates whose counts depend on a drop-fraction schedule
compile once.

Implementation: a radix select on the order-preserving integer image of the float scores,
never a sort. The strategy is chosen statically from the shapes:

* short slices (N:M groups, ``len <= 16``): each entry is ranked by pairwise comparison
  with the other entries of its slice (``len`` elementwise passes);
* otherwise, when the bins fit: 16-bit (few slices) or 8-bit histogram passes (two or
  four scatter-adds into ``2**16`` or 256 bins per slice) find the k-th largest key
  exactly;
* otherwise: a 32-step bitwise binary search of counting passes.

Ties at the threshold are broken by index with one cumulative sum, only when they
straddle the threshold (``lax.cond``). Cost is O(n) per selection with no ``n log n``
sort, which is what makes mask updates of 4096² layers cheap (see
``benchmarks/mask_update.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_SIGN_BIT = jnp.uint32(0x80000000)


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
  scores: jax.Array,
  k: jax.Array | int,
  *,
  axis: int | None = None,
  candidates: jax.Array | None = None,
) -> jax.Array:
  """Selects the ``k`` highest-scoring entries, exactly, with index tie-breaking.

  Args:
    scores: float array of any shape.
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
  scores = jnp.asarray(scores)
  _check_count("k", k)
  if axis is None:
    flat = topk_mask(
      scores.reshape(-1),
      jnp.reshape(jnp.asarray(k, jnp.int32), (1,)),
      axis=0,
      candidates=None if candidates is None else candidates.reshape(-1),
    )
    return flat.reshape(scores.shape)

  axis = axis % scores.ndim
  keys = _ordered_keys(scores)
  if candidates is not None:
    # Non-candidates get key 0, below every real number's key (>= 0x007FFFFF), and are
    # never counted: every threshold found below is >= 1 whenever k >= 1.
    keys = jnp.where(candidates, keys, jnp.uint32(0))
  reduced_shape = scores.shape[:axis] + (1,) + scores.shape[axis + 1 :]
  k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), reduced_shape)
  group_len = scores.shape[axis]
  n_groups = scores.size // max(group_len, 1)
  if group_len <= _PAIRWISE_MAX:
    return _select_by_rank(keys, k, axis)
  if n_groups * (1 << 16) <= _HISTOGRAM_MAX_BINS:
    threshold, n_above, n_at = _threshold_by_histogram(keys, k, axis, width=16)
  elif n_groups * (1 << 8) <= _HISTOGRAM_MAX_BINS:
    threshold, n_above, n_at = _threshold_by_histogram(keys, k, axis, width=8)
  else:
    threshold, n_above, n_at = _threshold_by_bits(keys, k, axis)
  above = keys > threshold
  at = (keys == threshold) & (threshold != 0) & (k >= 1)
  need = k - n_above

  def break_ties():
    rank = _cumsum(at, axis)  # 1-based rank among the ties, in index order
    return above | (at & (rank <= need))

  return lax.cond(jnp.all(n_at <= need), lambda: above | at, break_ties)


def _check_count(name: str, k) -> None:
  """Rejects non-integer counts (``k=2.5`` must not silently mean 2)."""
  if isinstance(k, bool) or (isinstance(k, float) and not float(k).is_integer()):
    raise TypeError(f"`{name}` must be an integer count, got {k!r}.")
  if isinstance(k, float):
    return
  dtype = getattr(k, "dtype", None)
  if dtype is not None and not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"`{name}` must be an integer count (an int or int array), got dtype {dtype}.")


# Static strategy thresholds (see topk_mask).
_PAIRWISE_MAX = 16
_HISTOGRAM_MAX_BINS = 1 << 24


def _count(selected: jax.Array, axis: int) -> jax.Array:
  return jnp.sum(selected, axis=axis, keepdims=True, dtype=jnp.int32)


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


def _group_ids(shape: tuple[int, ...], axis: int) -> jax.Array | int:
  """int32 id of each entry's slice along ``axis`` (row-major over the other axes)."""
  gid: jax.Array | int = 0
  stride = 1
  for d in reversed(range(len(shape))):
    if d == axis:
      continue
    gid = gid + lax.broadcasted_iota(jnp.int32, shape, d) * stride
    stride *= shape[d]
  return gid


def _threshold_by_histogram(keys: jax.Array, k: jax.Array, axis: int, width: int):
  """k-th largest key per slice by radix select with ``width``-bit histogram passes.

  ``32 // width`` passes, each a scatter-add of every entry into ``2**width`` bins of its
  slice. Returns ``(threshold, n_above, n_at)`` in the reduced (keepdims) shape;
  ``threshold`` is 0 when ``k`` exceeds the number of candidates (everything above 0, i.e.
  every candidate, is then selected) and the largest key when ``k <= 0``.
  """
  reduced_shape = k.shape
  n_bins = 1 << width
  n_groups = keys.size // keys.shape[axis]
  gid = _group_ids(keys.shape, axis)
  hist_shape = reduced_shape + (n_bins,)

  def histogram(digit, match):
    bins = (gid * n_bins + digit.astype(jnp.int32)).reshape(-1)
    flat = (
      jnp.zeros((n_groups * n_bins,), jnp.int32)
      .at[bins]
      .add(match.reshape(-1).astype(jnp.int32), mode="promise_in_bounds")
    )
    return flat.reshape(hist_shape)

  prefix = jnp.zeros(reduced_shape, jnp.uint32)
  need = k
  total = n_at = None
  for d in range(32 // width):
    shift = 32 - width * (d + 1)
    digit = (keys >> shift) & jnp.uint32(n_bins - 1)
    if d == 0:
      match = keys != 0
    else:
      match = (keys >> (shift + width)) == (prefix >> (shift + width))
    hist = histogram(digit, match)
    if d == 0:
      total = jnp.sum(hist, axis=-1)
      need = jnp.clip(need, 0, total)
    # at_least[v] = count(digit >= v) among matching entries (non-increasing in v).
    at_least = jnp.flip(jnp.cumsum(jnp.flip(hist, -1), axis=-1), -1)
    v = jnp.maximum(jnp.sum(at_least >= need[..., None], axis=-1, dtype=jnp.int32) - 1, 0)
    next_v = jnp.minimum(v + 1, n_bins - 1)[..., None]
    above_v = jnp.where(v < n_bins - 1, jnp.take_along_axis(at_least, next_v, -1)[..., 0], 0)
    need = need - above_v
    n_at = jnp.take_along_axis(hist, v[..., None], -1)[..., 0]
    prefix = prefix | (v.astype(jnp.uint32) << shift)
  valid = (k >= 1) & (total >= k)
  # k <= 0: nothing is above the largest key; k > total: every candidate is above 0.
  threshold = jnp.where(valid, prefix, jnp.where(k >= 1, jnp.uint32(0), jnp.uint32(0xFFFFFFFF)))
  n_above = jnp.where(valid, k - need, jnp.where(k >= 1, total, 0))
  n_at = jnp.where(valid, n_at, 0)
  return threshold, n_above, n_at


def _threshold_by_bits(keys: jax.Array, k: jax.Array, axis: int):
  """k-th largest key per slice with 32 counting passes (bitwise binary search)."""
  reduced_shape = k.shape

  def body(i, threshold):
    bit = jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
    trial = threshold | bit
    return jnp.where(_count(keys >= trial, axis) >= k, trial, threshold)

  threshold = lax.fori_loop(0, 32, body, jnp.zeros(reduced_shape, jnp.uint32))
  n_above = _count(keys > threshold, axis)
  n_at = _count((keys == threshold) & (threshold != 0), axis)
  return threshold, n_above, n_at


def _cumsum(x: jax.Array, axis: int) -> jax.Array:
  """int32 inclusive cumsum; blocked for long 1-D arrays (XLA:CPU's scan is superlinear)."""
  n = x.shape[axis]
  block = 1024
  if x.ndim == 1 and n > 4 * block and n % block == 0:
    rows = x.reshape(-1, block).astype(jnp.int32)
    within = jnp.cumsum(rows, axis=1)
    offsets = _cumsum(within[:, -1], 0) - within[:, -1]
    return (within + offsets[:, None]).reshape(n)
  return jnp.cumsum(x, axis=axis, dtype=jnp.int32)


def drop_and_grow(
  mask: jax.Array,
  drop_scores: jax.Array,
  grow_scores: jax.Array,
  n_drop: jax.Array | int,
  n_grow: jax.Array | int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One unstructured drop-and-grow on one array (nnz preserved unless ``n_grow`` says).

  Drops the ``n_drop`` active entries with the lowest ``drop_scores`` (only active entries
  can be dropped), then grows ``n_drop`` entries with the highest ``grow_scores`` among all
  entries that were not kept (so an entry dropped in this very step may be regrown: it then
  keeps its value and optimizer state). Reference: RigL, Evci et al. 2020,
  https://arxiv.org/abs/1911.11134 (``_get_update_op`` in google-research/rigl), with
  drop restricted to active weights and ties broken by lowest flat index.

  Args:
    mask: bool array, the current mask.
    drop_scores: scores shaped like ``mask``; higher means more worth keeping.
    grow_scores: scores shaped like ``mask``; higher means more worth growing.
    n_drop: number of entries to drop; clipped to ``[0, nnz(mask)]`` (more than nnz
      cannot be dropped, so the layer never grows).
    n_grow: number of entries to grow; default ``n_drop`` (nnz preserved, as in RigL). A
      smaller count shrinks the layer (gradual pruning: ``n_grow=0``; GraNet).

  Returns:
    ``(new_mask, kept)``: the new bool mask and the kept subset of the old mask
    (``new_mask & ~kept`` are the grown entries, some possibly regrown).
  """
  _check_count("n_drop", n_drop)
  mask = mask.astype(bool)
  nnz = jnp.sum(mask, dtype=jnp.int32)
  n_drop = jnp.clip(jnp.asarray(n_drop, jnp.int32), 0, nnz)
  if n_grow is None:
    n_grow = n_drop
  else:
    _check_count("n_grow", n_grow)
    n_grow = jnp.maximum(jnp.asarray(n_grow, jnp.int32), 0)
  kept = topk_mask(drop_scores, nnz - n_drop, candidates=mask)
  grown = topk_mask(grow_scores, n_grow, candidates=~kept)
  return kept | grown, kept


def grouped_drop_and_grow(
  mask: jax.Array,
  drop_scores: jax.Array,
  grow_scores: jax.Array,
  n_drop: jax.Array | int,
  per_group: jax.Array | int,
  *,
  axis: int,
  cap: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """Drop-and-grow with an exact per-group count (N:M groups, constant fan-in neurons).

  Drop is global over the array by ``drop_scores`` (layer-wise magnitude, as SRigL's
  ``_get_drop_mask``); kept entries of a group that holds more than ``per_group`` are cut
  to the ``per_group`` highest ``drop_scores`` (by score, index tie-break: not an unstable
  sort). Each group then grows its highest ``grow_scores`` among its non-kept entries until
  it holds exactly ``per_group``. Reference: SRigL, Lasby et al. 2024,
  https://arxiv.org/abs/2305.02299.

  Args:
    mask: bool array; groups are the 1-D slices along ``axis``.
    drop_scores: shaped like ``mask``.
    grow_scores: shaped like ``mask``.
    n_drop: number of active entries dropped layer-wide before regrowth (clipped to
      ``[0, nnz(mask)]``).
    per_group: target count per group: a scalar or an int array with ``axis`` reduced
      to size 1 (0 for a group that must become empty, e.g. an ablated neuron).
    axis: the group axis.
    cap: cut over-full groups to ``per_group``. Pass False only when no group can hold
      more than ``per_group`` kept entries (e.g. a fixed N:M or fan-in count): it saves
      one selection pass.

  Returns:
    ``(new_mask, kept)`` as in :func:`drop_and_grow`.
  """
  _check_count("n_drop", n_drop)
  mask = mask.astype(bool)
  nnz = jnp.sum(mask, dtype=jnp.int32)
  n_drop = jnp.clip(jnp.asarray(n_drop, jnp.int32), 0, nnz)
  kept = topk_mask(drop_scores, nnz - n_drop, candidates=mask)
  if cap:
    kept = topk_mask(drop_scores, per_group, axis=axis, candidates=kept)
  n_kept = jnp.sum(kept, axis=axis, keepdims=True, dtype=jnp.int32)
  grown = topk_mask(grow_scores, per_group - n_kept, axis=axis, candidates=~kept)
  return kept | grown, kept
