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
  shape = np.shape(scores)
  bits = np.ascontiguousarray(scores, np.float32).view(np.uint32)
  if axis is None:
    bits = bits.reshape(-1, 1)
  else:
    bits = np.moveaxis(bits, axis, 0).reshape(shape[axis], -1)
  keys = np.where(bits == _SIGN_BIT, np.uint32(0), bits)  # -0.0 ties +0.0
  flip = keys >> np.uint32(31)  # order keys: negatives all bits flipped, else the sign set
  flip *= np.uint32(0x7FFFFFFF)
  flip |= _SIGN_BIT
  keys ^= flip
  del flip
  n = keys.shape[0]
  k = int(min(max(k, 0), n))
  if k == n or k == 0:
    out = np.full(keys.shape, k == n)
  else:
    threshold = np.partition(keys, n - k, axis=0)[n - k]
    out = keys > threshold
    need = k - np.count_nonzero(out, axis=0)  # per slice: ties to take, lowest index first
    if axis is None:
      out[np.flatnonzero(keys == threshold)[: int(need[0])], 0] = True
    else:
      ties = keys == threshold
      out |= ties & (np.cumsum(ties, axis=0, dtype=np.int32) <= need)
  if axis is None:
    return out.reshape(shape)
  moved = (shape[axis],) + tuple(d for i, d in enumerate(shape) if i != axis % len(shape))
  return np.moveaxis(out.reshape(moved), 0, axis)
