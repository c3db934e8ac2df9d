"""Exact top-k selection primitives (pure, per array, jit-safe).

All selections are *exact*: they select precisely ``k`` entries (or all candidates when
fewer exist), with ties broken by the lowest index along the selection axis. ``k`` may be a
traced value (dynamic), so mask updates whose counts depend on a drop-fraction schedule
compile once.

Implementation: a radix select on the order-preserving integer image of the float scores.
Thirty-two counting passes find the k-th largest key without sorting, then one cumulative
sum breaks ties by index. Cost is O(32·n) with no ``n log n`` sort and no param-sized
index arrays, which is what makes mask updates of 4096² layers cheap (see
``benchmarks/mask_update.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_SIGN_BIT = jnp.uint32(0x80000000)


def _ordered_keys(scores: jax.Array) -> jax.Array:
  """Maps float scores to uint32 keys with the same order (larger score, larger key).

  -inf maps above every NaN bit pattern with the sign bit set, and +NaN maps above +inf;
  callers that may see NaN must check for it (the DST wrapper skips such updates).
  """
  bits = lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.uint32)
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
    # Non-candidates get key 0, below every real number's key (>= 0x007FFFFF); every
    # trial threshold below has a bit set, so they are never counted.
    keys = jnp.where(candidates, keys, jnp.uint32(0))
  reduced_shape = scores.shape[:axis] + (1,) + scores.shape[axis + 1 :]
  k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), reduced_shape)

  def count(selected):
    return jnp.sum(selected, axis=axis, keepdims=True, dtype=jnp.int32)

  # Largest threshold T with count(keys >= T) >= k: built one bit at a time, MSB first.
  def body(i, threshold):
    bit = jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
    trial = threshold | bit
    return jnp.where(count(keys >= trial) >= k, trial, threshold)

  threshold = lax.fori_loop(0, 32, body, jnp.zeros(reduced_shape, jnp.uint32))
  above = keys > threshold
  # threshold == 0 means k >= number of candidates: everything above 0 is selected.
  at = (keys == threshold) & (threshold != 0)
  need = k - count(above)

  def break_ties():
    rank = _cumsum(at, axis)  # 1-based rank among the ties, in index order
    return above | (at & (rank <= need))

  return lax.cond(jnp.all(count(at) <= need), lambda: above | at, break_ties)


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
) -> tuple[jax.Array, jax.Array]:
  """One unstructured drop-and-grow on one array, preserving nnz exactly.

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
    n_drop: number of entries to drop (and grow), ``0 <= n_drop <= nnz(mask)``.

  Returns:
    ``(new_mask, kept)``: the new bool mask (same nnz as ``mask``) and the kept subset of
    the old mask (``new_mask & ~kept`` are the grown entries, some possibly regrown).
  """
  mask = mask.astype(bool)
  nnz = jnp.sum(mask, dtype=jnp.int32)
  kept = topk_mask(drop_scores, nnz - n_drop, candidates=mask)
  grown = topk_mask(grow_scores, n_drop, candidates=~kept)
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
    n_drop: number of active entries dropped layer-wide before regrowth.
    per_group: target count per group: a scalar or an int array with ``axis`` reduced
      to size 1 (0 for a group that must become empty, e.g. an ablated neuron).
    axis: the group axis.
    cap: cut over-full groups to ``per_group``. Pass False only when no group can hold
      more than ``per_group`` kept entries (e.g. a fixed N:M or fan-in count): it saves
      one selection pass.

  Returns:
    ``(new_mask, kept)`` as in :func:`drop_and_grow`.
  """
  mask = mask.astype(bool)
  nnz = jnp.sum(mask, dtype=jnp.int32)
  kept = topk_mask(drop_scores, nnz - n_drop, candidates=mask)
  if cap:
    kept = topk_mask(drop_scores, per_group, axis=axis, candidates=kept)
  n_kept = jnp.sum(kept, axis=axis, keepdims=True, dtype=jnp.int32)
  grown = topk_mask(grow_scores, per_group - n_kept, axis=axis, candidates=~kept)
  return kept | grown, kept
