"""The N:M magnitude mask and its validation helpers (pure jax/numpy, no Flax).

An N:M mask keeps at most N entries in every group of M consecutive entries along the
contraction axis, which is axis 0 of a Flax ``Dense`` kernel ``[K, Nout]``; conv kernels
``[kh, kw, in, out]`` are flattened to ``[kh*kw*in, out]``. This module holds the mask
itself (:func:`nm_mask`), the check :func:`is_nm_sparse`, and the small validation helpers
that the compressed format (``sparsejax/_src/formats/nm_format.py``) and the SR-STE
transformation (``sparsejax/_src/transforms/sr_ste.py``) share. It sits in layer 1 so that
both of its users import it from below.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["is_nm_sparse", "nm_mask"]

#: Indices are stored as int8 by the compressed format, so a group has at most 128 entries.
_MAX_M = 128


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------


def _is_tracer(x: Any) -> bool:
  """Whether ``x`` is a JAX tracer (an abstract value inside ``jit``/``grad``/``vmap``)."""
  return isinstance(x, jax.core.Tracer)


def _as_int(value: Any, name: str) -> int:
  """Returns ``value`` as a Python int.

  Args:
    value: an int-like value (``operator.index`` must accept it; bools are rejected).
    name: the argument name used in the error message.

  Returns:
    The value as a Python int.

  Raises:
    TypeError: if ``value`` is a bool or not int-like.
  """
  if isinstance(value, bool):
    raise TypeError(f"{name} must be an int; got bool {value!r}.")
  try:
    return operator.index(value)
  except TypeError:
    raise TypeError(
      f"{name} must be an int; got {value!r} of type {type(value).__name__}."
    ) from None


def _check_nm(n: Any, m: Any) -> tuple[int, int]:
  """Validates an N:M pair.

  Args:
    n: entries kept per group, ``1 <= n <= m``.
    m: group size, ``1 <= m <= 128``.

  Returns:
    ``(n, m)`` as Python ints.

  Raises:
    TypeError: if ``n`` or ``m`` is not an int.
    ValueError: if the pair is out of range.
  """
  m = _as_int(m, "m")
  n = _as_int(n, "n")
  if m < 1:
    raise ValueError(f"m must be >= 1 (group size); got m={m}.")
  if m > _MAX_M:
    raise ValueError(f"m must be <= {_MAX_M} because indices are stored as int8; got m={m}.")
  if n < 1:
    raise ValueError(f"n must be >= 1 (entries kept per group); got n={n}.")
  if n > m:
    raise ValueError(f"n must be <= m (keep n of every m entries); got n={n}, m={m}.")
  return n, m


def _contraction_size(shape: Sequence[int]) -> int:
  """The contraction (fan-in) size of a kernel shape: the product of all but the last axis."""
  return math.prod(shape[:-1])


def _check_weight(w: Any, m: int, name: str, fn: str) -> None:
  """Checks that ``w`` is a kernel whose contraction size is divisible by ``m``.

  Args:
    w: the array (anything with ``ndim`` and ``shape``).
    m: group size.
    name: the argument name used in error messages.
    fn: the public function name used in error messages.

  Raises:
    ValueError: if ``w.ndim < 2`` or its contraction size is not divisible by ``m``.
  """
  if w.ndim < 2:
    raise ValueError(
      f"{fn}: {name} must have ndim >= 2 (a [K, Nout] kernel or a conv kernel "
      f"[..., in, out]); got {name}.shape={tuple(w.shape)}."
    )
  k = _contraction_size(w.shape)
  if k % m:
    raise ValueError(
      f"{fn}: the contraction size of {name} (product of all but the last axis) "
      f"must be divisible by m; got {name}.shape={tuple(w.shape)} (K={k}) and m={m}."
    )


# ---------------------------------------------------------------------------
# Group views and ranks
# ---------------------------------------------------------------------------


def _group_view(w: jax.Array, m: int) -> jax.Array:
  """``[..., Nout]`` -> ``[G, M, Nout]`` with G = prod(shape[:-1]) / M."""
  nout = w.shape[-1]
  return w.reshape(_contraction_size(w.shape) // m, m, nout)


def _topn_positions(a3: jax.Array, n: int) -> jax.Array:
  """Positions of the n largest entries per group, ascending.

  Args:
    a3: ``[G, M, C]`` magnitudes.
    n: static number of entries to keep.

  Returns:
    ``[G, n, C]`` int32 positions in ``[0, M)``, ascending; ties in magnitude
    go to the lowest position (``lax.top_k`` semantics).
  """
  _, pos = jax.lax.top_k(jnp.swapaxes(a3, 1, 2), n)  # [G, C, n]
  return jnp.swapaxes(jnp.sort(pos, axis=-1), 1, 2).astype(jnp.int32)


def _group_ranks(a3: jax.Array) -> jax.Array:
  """Rank of every entry inside its group (0 = largest; ties by lowest index).

  Args:
    a3: ``[G, M, C]`` magnitudes.

  Returns:
    ``[G, M, C]`` int32 ranks.
  """
  order = jnp.argsort(-a3, axis=1, stable=True)
  return jnp.argsort(order, axis=1, stable=True).astype(jnp.int32)


# ---------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------


def nm_mask(w: jax.Array, n: int | jax.Array, m: int) -> jax.Array:
  """N:M magnitude mask: keep the n largest ``|w|`` in each group of m rows.

  Groups are m consecutive entries along the contraction axis, which is axis
  0 of a Flax ``Dense`` kernel ``[K, Nout]``. Conv kernels ``[kh, kw, in, out]``
  are flattened to ``[kh*kw*in, out]``, so groups are m consecutive input
  channels at one kernel tap when ``in % m == 0`` (the NVIDIA 2:4 convention).
  Ties in magnitude go to the lowest index.

  Args:
    w: ``[..., Nout]`` array with ndim >= 2 and ``prod(w.shape[:-1]) % m == 0``.
    n: entries kept per group. A Python int (uses ``lax.top_k``) or a traced
      int32 scalar (uses ranks; lets a schedule change n inside ``jit``).
    m: group size (static).

  Returns:
    A bool array of ``w.shape`` with exactly n True entries per group.

  Raises:
    TypeError, ValueError: for an invalid N:M pair or shape.

  Example:
    >>> import jax.numpy as jnp
    >>> nm_mask(jnp.array([[0.1], [-3.0], [2.0], [0.5]]), 2, 4)[:, 0]
    Array([False,  True,  True, False], dtype=bool)
  """
  dynamic_n = isinstance(n, jax.Array | np.ndarray) or _is_tracer(n)
  if dynamic_n:
    m = _as_int(m, "m")
    _check_nm(1, m)
  else:
    n, m = _check_nm(n, m)
  _check_weight(w, m, "w", "nm_mask")
  if dynamic_n:
    return _mask_dynamic(w, jnp.asarray(n, jnp.int32), m)
  return _mask_static(w, n, m)


@functools.partial(jax.jit, static_argnums=(2,))
def _mask_dynamic(w: jax.Array, n: jax.Array, m: int) -> jax.Array:
  """:func:`nm_mask` for a traced ``n``: keep the entries ranked below ``n``."""
  keep = _group_ranks(jnp.abs(_group_view(w, m))) < n
  return keep.reshape(w.shape)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _mask_static(w: jax.Array, n: int, m: int) -> jax.Array:
  """:func:`nm_mask` for a static ``n``: mark the ``lax.top_k`` positions."""
  a3 = jnp.abs(_group_view(w, m))
  if n == m:
    return jnp.ones(w.shape, bool)
  pos = _topn_positions(a3, n)  # [G, n, C]
  slots = jnp.arange(m, dtype=jnp.int32)[None, None, :, None]
  keep = jnp.any(pos[:, :, None, :] == slots, axis=1)
  return keep.reshape(w.shape)


def is_nm_sparse(w: jax.Array, n: int, m: int) -> jax.Array:
  """Whether every group of m rows of ``w`` has at most n non-zeros.

  Args:
    w: ``[..., Nout]`` array, groups along the flattened contraction axis.
    n: maximum non-zeros per group.
    m: group size.

  Returns:
    A scalar bool array.

  Raises:
    TypeError, ValueError: for an invalid N:M pair or shape.
  """
  n, m = _check_nm(n, m)
  _check_weight(w, m, "w", "is_nm_sparse")
  return _is_nm_sparse(w, n, m)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _is_nm_sparse(w: jax.Array, n: int, m: int) -> jax.Array:
  """Jitted body of :func:`is_nm_sparse`."""
  counts = jnp.sum(_group_view(w, m) != 0, axis=1)
  return jnp.all(counts <= n)
