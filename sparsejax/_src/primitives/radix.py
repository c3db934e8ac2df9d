"""The threshold search of an exact selection: the k-th largest key, chunk by chunk.

Used by ``selection.py``, which chooses the strategy and the column chunks. ``chunk(i)``
returns the uint32 order-preserving keys ``[L, cols]`` of column chunk ``i`` (0 for an
entry that is not a candidate); ``k`` is ``[1, 1]`` (one group: the whole array) or
``[1, G]`` (one group per column).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax


def col_slice(x: jax.Array, i, cols: int) -> jax.Array:
  """Column chunk ``i`` (``cols`` wide) of ``x``; ``x`` itself when it is one chunk."""
  if cols == x.shape[1]:
    return x
  return lax.dynamic_slice_in_dim(x, i * cols, cols, axis=1)


def for_chunks(n_chunks: int, body: Callable, init):
  """``body(i, carry)`` over the chunks: a ``fori_loop``, or one call for one chunk."""
  if n_chunks == 1:
    return body(0, init)
  return lax.fori_loop(0, n_chunks, body, init)


def threshold_by_histogram(chunk: Callable, n_chunks: int, k: jax.Array):
  """The ``k``-th largest key of a whole array with two 16-bit histogram passes.

  ``chunk(i)`` returns the uint32 keys of column chunk ``i`` (0 = not a candidate); ``k``
  is ``[1, 1]``. Both passes run in one ``fori_loop`` over the digit position (the first
  also counts the candidates), so the program holds one pass body.

  Returns ``(threshold, n_above, n_at)``, each shaped like ``k``: ``threshold`` is 0 when
  ``k`` exceeds the number of candidates (everything above 0, i.e. every candidate, is
  then selected) and ``0xFFFFFFFF`` when ``k <= 0`` (nothing is above it); ``n_at`` counts
  the candidates equal to a valid threshold.
  """
  width, n_bins = 16, 1 << 16

  def one_pass(d, carry):
    prefix, need, total, _ = carry
    first = d == 0
    shift = jnp.where(first, jnp.uint32(16), jnp.uint32(0))

    def add_chunk(i, hist):
      keys = chunk(i)
      digit = (keys >> shift) & jnp.uint32(n_bins - 1)
      match = jnp.where(first, keys != 0, (keys >> width) == (prefix >> width))
      return hist.at[digit.astype(jnp.int32).reshape(-1)].add(
        match.reshape(-1).astype(jnp.int32), mode="promise_in_bounds"
      )

    hist = for_chunks(n_chunks, add_chunk, jnp.zeros((n_bins,), jnp.int32)).reshape(1, 1, -1)
    total = jnp.where(first, jnp.sum(hist, axis=-1, dtype=jnp.int32), total)
    need = jnp.where(first, jnp.clip(need, 0, total), need)
    # at_least[v] = count(digit >= v) among matching entries (non-increasing in v).
    at_least = jnp.flip(jnp.cumsum(jnp.flip(hist, -1), axis=-1, dtype=jnp.int32), -1)
    v = jnp.maximum(jnp.sum(at_least >= need[..., None], axis=-1, dtype=jnp.int32) - 1, 0)
    next_v = jnp.minimum(v + 1, n_bins - 1)[..., None]
    above_v = jnp.where(v < n_bins - 1, jnp.take_along_axis(at_least, next_v, -1)[..., 0], 0)
    n_at = jnp.take_along_axis(hist, v[..., None], -1)[..., 0]
    return prefix | (v.astype(jnp.uint32) << shift), need - above_v, total, n_at

  zeros = jnp.zeros(k.shape, jnp.int32)
  init = (jnp.zeros(k.shape, jnp.uint32), k, zeros, zeros)
  prefix, need, total, n_at = lax.fori_loop(0, 2, one_pass, init)
  valid = (k >= 1) & (total >= k)
  # k <= 0: nothing is above the largest key; k > total: every candidate is above 0.
  threshold = jnp.where(valid, prefix, jnp.where(k >= 1, jnp.uint32(0), jnp.uint32(0xFFFFFFFF)))
  n_above = jnp.where(valid, k - need, jnp.where(k >= 1, total, 0))
  n_at = jnp.where(valid, n_at, 0)
  return threshold, n_above, n_at


def threshold_by_counting(
  chunk: Callable, n_chunks: int, cols: int, k: jax.Array, per_column: bool
):
  """The ``k``-th largest key of every column (``k`` ``[1, G]``) or of all (``[1, 1]``)
  with 32 counting passes (a bitwise binary search), then one pass counting the keys
  above and at the threshold.

  Returns ``(threshold, n_above, n_at)``, each shaped like ``k``: ``threshold`` is 0 when
  ``k`` exceeds the number of candidates (everything above 0, i.e. every candidate, is
  then selected) and ``0xFFFFFFFF`` when ``k <= 0`` (nothing is above it); ``n_at`` counts
  the candidates equal to a valid threshold.
  """

  def count(predicate, ref, n_out: int) -> tuple[jax.Array, ...]:
    """Per column (or total) counts of ``predicate(keys, ref)`` (a tuple of ``n_out``
    bool arrays); ``ref`` is shaped like ``k``."""

    def add(i, acc):
      keys = chunk(i)
      if not per_column:
        hits = predicate(keys, ref)
        return tuple(a + jnp.sum(h, dtype=jnp.int32).reshape(1, 1) for a, h in zip(acc, hits))
      hits = predicate(keys, col_slice(ref, i, cols))
      parts = [jnp.sum(h, axis=0, keepdims=True, dtype=jnp.int32) for h in hits]
      if n_chunks == 1:
        return tuple(parts)
      return tuple(lax.dynamic_update_slice_in_dim(a, p, i * cols, 1) for a, p in zip(acc, parts))

    return for_chunks(n_chunks, add, (jnp.zeros(k.shape, jnp.int32),) * n_out)

  def body(i, threshold):
    bit = jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
    trial = threshold | bit
    (n_at_least,) = count(lambda keys, t: (keys >= t,), trial, 1)
    return jnp.where(n_at_least >= k, trial, threshold)

  threshold = lax.fori_loop(0, 32, body, jnp.zeros(k.shape, jnp.uint32))
  n_above, n_at = count(lambda keys, t: (keys > t, (keys == t) & (t != 0)), threshold, 2)
  return threshold, n_above, n_at
