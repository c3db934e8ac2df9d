"""Exact top-k on the host (NumPy): the twin of :func:`selection.topk_mask` for concrete arrays.

Used where compiling a selection program would cost more than running it: the initial
random masks that ``tx.init`` draws outside ``jit`` (``transforms/pruning.py``).
"""

from __future__ import annotations

import numpy as np

_SIGN_BIT = np.uint32(0x80000000)


def topk_mask_host(scores: np.ndarray, k: int, axis: int | None = None) -> np.ndarray:
  """:func:`selection.topk_mask` with an integer ``k``, in NumPy on the host.

  The same selection, bit for bit: the scores' float32 order keys (``-0.0`` ties ``+0.0``),
  the ``k`` largest of the whole array (``axis=None``) or of every slice along ``axis``,
  ties by index, in ``O(n)`` (a partition, no sort). For concrete arrays outside ``jit``
  (initial masks), where compiling a selection program would cost more than running it.

  Args:
    scores: float array of any shape (no NaN).
    k: how many entries to select, in all or per slice (clipped to ``[0, n]``, ``n`` the
      size of the array or of the axis).
    axis: None for the whole array, else the axis along which each slice keeps ``k``.

  Returns:
    A bool NumPy array shaped like ``scores``.
  """
  bits = np.ascontiguousarray(scores, np.float32).view(np.uint32)
  keys = np.where(bits == _SIGN_BIT, np.uint32(0), bits)  # -0.0 ties +0.0
  flip = keys >> np.uint32(31)  # order keys: negatives all bits flipped, else the sign set
  flip *= np.uint32(0x7FFFFFFF)
  flip |= _SIGN_BIT
  keys ^= flip
  del flip
  return topk_keys_host(keys, k, axis)


def topk_keys_host(keys: np.ndarray, k: int, axis: int | None = None) -> np.ndarray:
  """:func:`topk_mask_host` of unsigned integer order keys (larger key, higher score).

  Slices along ``axis`` are selected a block of slices at a time, so the temporaries
  (the partition's copy, the tie counts) stay a fraction of the array.

  Args:
    keys: unsigned integer array of any shape.
    k: as in :func:`topk_mask_host`.
    axis: as in :func:`topk_mask_host`.

  Returns:
    A bool NumPy array shaped like ``keys``.
  """
  shape = np.shape(keys)
  if axis is None:
    view = keys.reshape(-1, 1)
  else:
    view = np.moveaxis(keys, axis, 0).reshape(shape[axis], -1)
  n, groups = view.shape
  k = int(min(max(k, 0), n))
  out = np.empty(view.shape, bool)
  block = max(1, _BLOCK_ENTRIES // max(n, 1))
  for g0 in range(0, groups, block):
    _select_block(view[:, g0 : g0 + block], k, out[:, g0 : g0 + block])
  if axis is None:
    return out.reshape(shape)
  moved = (shape[axis],) + tuple(d for i, d in enumerate(shape) if i != axis % len(shape))
  return np.moveaxis(out.reshape(moved), 0, axis)


_BLOCK_ENTRIES = 1 << 16  # entries of the slices selected together


def _select_block(keys: np.ndarray, k: int, out: np.ndarray) -> None:
  """The ``k`` largest keys of every column of ``keys [n, g]`` into ``out``, ties by row."""
  n = keys.shape[0]
  if k == n or k == 0:
    out[...] = k == n
    return
  threshold = np.partition(keys, n - k, axis=0)[n - k]
  np.greater(keys, threshold, out=out)
  need = k - np.count_nonzero(out, axis=0)  # per column: ties to take, lowest row first
  if keys.shape[1] == 1:
    out[np.flatnonzero(keys[:, 0] == threshold)[: int(need[0])], 0] = True
  else:
    ties = keys == threshold
    out |= ties & (np.cumsum(ties, axis=0, dtype=np.int32) <= need)
