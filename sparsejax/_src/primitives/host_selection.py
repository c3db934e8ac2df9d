"""Exact top-k on the host (NumPy): the twin of :func:`selection.topk_mask` for concrete arrays.

Used where compiling a selection program would cost more than running it: the initial
random masks that ``tx.init`` draws outside ``jit`` (``transforms/pruning.py``).
"""

from __future__ import annotations

import numpy as np

_SIGN_BIT = np.uint32(0x80000000)


def topk_mask_host(scores: np.ndarray, k: int) -> np.ndarray:
  """:func:`selection.topk_mask` over the whole array (``axis=None``), in NumPy on the host.

  The same selection, bit for bit: the scores' float32 order keys (``-0.0`` ties ``+0.0``),
  the ``k`` largest with ties by flat index, in ``O(n)`` (a partition, no sort). For
  concrete arrays outside ``jit`` (initial masks), where compiling a selection program
  would cost more than running it.

  Args:
    scores: float array of any shape (no NaN).
    k: how many entries to select (clipped to ``[0, scores.size]``).

  Returns:
    A bool NumPy array shaped like ``scores``.
  """
  bits = np.ascontiguousarray(scores, np.float32).reshape(-1).view(np.uint32)
  bits = np.where(bits == _SIGN_BIT, np.uint32(0), bits)
  keys = np.where((bits & _SIGN_BIT) != 0, ~bits, bits | _SIGN_BIT)
  n, k = keys.size, int(min(max(k, 0), keys.size))
  out = np.zeros(n, bool)
  if k == n:
    out[:] = True
  elif k:
    threshold = np.partition(keys, n - k)[n - k]
    above = keys > threshold
    out[above] = True
    out[np.flatnonzero(keys == threshold)[: k - int(np.count_nonzero(above))]] = True
  return out.reshape(np.shape(scores))
