"""Drop-and-grow: one DST mask update on one array, unstructured or per group.

:func:`drop_and_grow` (RigL/SET: layer-wise drop, growth anywhere) and
:func:`grouped_drop_and_grow` (SRigL's constant fan-in, N:M: layer-wise drop, growth back
to an exact count per group), built on the exact selections of ``selection.py``. On a
one-device CPU process each is one native call (``native_select``: the counts and every
selection of the update in one custom call, the same result as the XLA program); the XLA
programs serve several devices and accelerators.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax._src.primitives import native_select, score_form, selection


def drop_and_grow(
  mask: jax.Array,
  drop_scores: score_form.Scores,
  grow_scores: score_form.Scores,
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
    drop_scores: scores shaped like ``mask``; higher means more worth keeping. An array
      or a ``score_form.ScoreForm`` (the native kernel then reads ``|w|``, ``|g|`` or
      the hash in place).
    grow_scores: scores shaped like ``mask``; higher means more worth growing.
    n_drop: number of entries to drop; clipped to ``[0, nnz(mask)]`` (more than nnz
      cannot be dropped, so the layer never grows).
    n_grow: number of entries to grow; default ``n_drop`` (nnz preserved, as in RigL). A
      smaller count shrinks the layer (gradual pruning: ``n_grow=0``; GraNet).

  Returns:
    ``(new_mask, kept)``: the new bool mask and the kept subset of the old mask
    (``new_mask & ~kept`` are the grown entries, some possibly regrown).
  """
  selection.check_count("n_drop", n_drop)
  if n_grow is not None:
    selection.check_count("n_grow", n_grow)
  mask = mask.astype(bool)
  return selection.native_or_xla(  # native: the count and both selections in one call
    lambda: native_select.drop_and_grow(mask, drop_scores, grow_scores, n_drop, n_grow),
    lambda: _drop_and_grow_xla(mask, drop_scores, grow_scores, n_drop, n_grow),
  )


def _drop_and_grow_xla(mask, drop_scores, grow_scores, n_drop, n_grow):
  """:func:`drop_and_grow` as an XLA program (any backend, any sharding)."""
  nnz = selection.count_true(mask)
  n_drop = jnp.clip(jnp.asarray(n_drop, jnp.int32), 0, nnz)
  if n_grow is None:
    n_grow = n_drop
  else:
    n_grow = jnp.maximum(jnp.asarray(n_grow, jnp.int32), 0)
  drop_scores, grow_scores = score_form.as_array(drop_scores), score_form.as_array(grow_scores)
  kept = selection.topk_mask(drop_scores, nnz - n_drop, candidates=mask)
  grown = selection.topk_mask(grow_scores, n_grow, candidates=~kept)
  return kept | grown, kept


def grouped_drop_and_grow(
  mask: jax.Array,
  drop_scores: score_form.Scores,
  grow_scores: score_form.Scores,
  n_drop: jax.Array | int,
  per_group: jax.Array | int,
  *,
  axis: int,
  cap: bool = True,
  eligible: jax.Array | None = None,
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
    drop_scores: shaped like ``mask`` (an array or a ``score_form.ScoreForm``).
    grow_scores: shaped like ``mask`` (likewise).
    n_drop: number of active entries dropped layer-wide before regrowth (clipped to
      ``[0, nnz(mask)]``).
    per_group: target count per group: a scalar or an int array with ``axis`` reduced
      to size 1 (0 for a group that must become empty, e.g. an ablated neuron).
    axis: the group axis.
    cap: cut over-full groups to ``per_group`` (a per-group selection, run only when some
      group is over-full). Pass False only when no group can hold more than ``per_group``
      kept entries (e.g. a fixed N:M or fan-in count).
    eligible: optional bool array (broadcastable to ``mask``): only eligible active
      entries may be kept (e.g. not in an ablated neuron); the others are dropped first.

  Returns:
    ``(new_mask, kept)`` as in :func:`drop_and_grow`.
  """
  selection.check_count("n_drop", n_drop)
  mask = mask.astype(bool)
  axis = axis % mask.ndim

  def native():  # the counts, the drop, the cap and the per-column growth in one call
    groups = jnp.broadcast_to(jnp.asarray(per_group, jnp.int32), (1, mask.shape[1]))
    keepable = None if eligible is None else mask & eligible
    return native_select.grouped_drop_and_grow(
      mask, drop_scores, grow_scores, n_drop, groups, keepable, cap=cap
    )

  return selection.native_or_xla(
    native,
    lambda: _grouped_drop_and_grow_xla(
      mask, drop_scores, grow_scores, n_drop, per_group, axis, cap, eligible
    ),
    # Columns of a 2-D array (the fan-in view); short slices (N:M groups) are ranked.
    eligible=mask.ndim == 2 and axis == 0 and not selection.ranks_pairwise(mask.shape[0]),
  )


def _grouped_drop_and_grow_xla(
  mask, drop_scores, grow_scores, n_drop, per_group, axis, cap, eligible
):
  """:func:`grouped_drop_and_grow` as an XLA program (any backend, any sharding)."""
  drop_scores, grow_scores = score_form.as_array(drop_scores), score_form.as_array(grow_scores)
  nnz = selection.count_true(mask)
  n_drop = jnp.clip(jnp.asarray(n_drop, jnp.int32), 0, nnz)
  keepable = mask if eligible is None else mask & eligible
  kept = selection.topk_mask(drop_scores, nnz - n_drop, candidates=keepable)
  n_kept = selection.count_true(kept, axis=axis)
  if cap:
    per_group = jnp.asarray(per_group, jnp.int32)
    # Usually no group is over-full (k shrinks only when a neuron revives): the per-group
    # selection runs only when one is.
    kept = lax.cond(
      jnp.any(n_kept > per_group),
      lambda: selection.topk_mask(drop_scores, per_group, axis=axis, candidates=kept),
      lambda: kept,
    )
    n_kept = jnp.minimum(n_kept, jnp.maximum(per_group, 0))
  grown = selection.topk_mask(grow_scores, per_group - n_kept, axis=axis, candidates=~kept)
  return kept | grown, kept
