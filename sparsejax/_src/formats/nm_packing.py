"""Packed N:M metadata: 2- or 4-bit in-group indices in integer words.

The compressed N:M format (:mod:`sparsejax._src.formats.nm_format`) holds its indices as
int8 in memory, one byte each, because kernels read them most simply that way. Stored (in a
checkpoint, or counted by :attr:`NMSparse.nbytes`), an index needs only ``index_bits(m)``
bits: 2 for ``M <= 4`` and 4 for ``M <= 16``. :func:`pack_indices` and
:func:`unpack_indices` convert between the two along axis 0 (``docs/KERNELS.md`` §5).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src.primitives.nm_mask import _as_int, _is_tracer

__all__ = ["index_bits", "pack_indices", "unpack_indices"]


def index_bits(m: int) -> int:
  """Bits per packed index: 2 for ``m <= 4``, 4 for ``m <= 16``.

  Args:
    m: group size.

  Returns:
    2 or 4.

  Raises:
    ValueError: if ``m > 16`` (packing is not supported) or ``m < 1``.
  """
  m = _as_int(m, "m")
  if m < 1:
    raise ValueError(f"m must be >= 1; got m={m}.")
  if m <= 4:
    return 2
  if m <= 16:
    return 4
  raise ValueError(
    f"packed indices support m <= 16 (2 bits for m <= 4, 4 bits for m <= 16); got m={m}."
  )


_WORD_DTYPES = {
  jnp.dtype(jnp.uint8): jnp.uint8,
  jnp.dtype(jnp.int8): jnp.uint8,
  jnp.dtype(jnp.uint16): jnp.uint16,
  jnp.dtype(jnp.int16): jnp.uint16,
  jnp.dtype(jnp.uint32): jnp.uint32,
  jnp.dtype(jnp.int32): jnp.uint32,
}


def _unsigned_word(word_dtype: Any, name: str) -> tuple[jnp.dtype, Any]:
  """Returns ``(dtype, unsigned counterpart)`` for an 8/16/32-bit integer word dtype.

  Raises:
    TypeError: for any other dtype (``name`` is the argument named in the message).
  """
  dt = jnp.dtype(word_dtype)
  if dt not in _WORD_DTYPES:
    raise TypeError(f"{name} must be an 8/16/32-bit integer dtype (e.g. uint8 or int32); got {dt}.")
  return dt, _WORD_DTYPES[dt]


def pack_indices(indices: jax.Array, m: int, *, word_dtype: Any = jnp.uint8) -> jax.Array:
  """Packs small in-group indices into integer words along axis 0.

  Word ``w`` holds rows ``w*P .. w*P + P - 1`` of the same column, row
  ``w*P + s`` in bits ``[s*b, (s+1)*b)``, with ``b = index_bits(m)`` and
  ``P = word_bits / b``. Rows are zero-padded up to a multiple of P.

  Args:
    indices: ``[R, ...]`` integer array with values in ``[0, m)``.
    m: group size, ``m <= 16``.
    word_dtype: an 8/16/32-bit integer dtype; uint8 (default) or int32 are the
      usual choices (signed words are bit-cast, so the sign bit is used).

  Returns:
    ``[ceil(R/P), ...]`` array of ``word_dtype``.

  Raises:
    ValueError: if ``m > 16`` or (for concrete input) an index is out of range.
    TypeError: for a non-integer ``indices`` or an unsupported ``word_dtype``.
  """
  bits = index_bits(m)
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise TypeError(f"indices must have an integer dtype; got indices.dtype={indices.dtype}.")
  if indices.ndim < 1:
    raise ValueError(f"indices must have ndim >= 1; got shape {tuple(indices.shape)}.")
  if not _is_tracer(indices) and indices.size:
    host = np.asarray(indices)
    lo, hi = int(host.min()), int(host.max())
    if lo < 0 or hi >= m:
      raise ValueError(f"indices must lie in [0, m) = [0, {m}); got values in [{lo}, {hi}].")
  out_dt, _ = _unsigned_word(word_dtype, "word_dtype")
  return _pack(indices, bits, out_dt)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _pack(indices: jax.Array, bits: int, out_dt: jnp.dtype) -> jax.Array:
  """Jitted body of :func:`pack_indices`."""
  udt = _WORD_DTYPES[out_dt]
  per_word = out_dt.itemsize * 8 // bits
  rows = indices.shape[0]
  padded = -(-rows // per_word) * per_word
  u = indices.astype(udt)
  if padded != rows:
    u = jnp.pad(u, [(0, padded - rows)] + [(0, 0)] * (indices.ndim - 1))
  u = u.reshape((padded // per_word, per_word) + tuple(indices.shape[1:]))
  shifts = (jnp.arange(per_word, dtype=udt) * bits).reshape((1, per_word) + (1,) * (u.ndim - 2))
  words = jnp.sum(u << shifts, axis=1, dtype=udt)  # disjoint bit fields: sum == or
  return jax.lax.bitcast_convert_type(words, out_dt) if out_dt != jnp.dtype(udt) else words


def unpack_indices(packed: jax.Array, m: int, num_rows: int, *, dtype: Any = jnp.int8) -> jax.Array:
  """Inverse of :func:`pack_indices`.

  Args:
    packed: ``[W, ...]`` words produced by :func:`pack_indices` (its dtype
      selects the word size).
    m: group size used when packing, ``m <= 16``.
    num_rows: number of index rows R before padding,
      ``(W-1)*P < R <= W*P`` (or 0 when W is 0).
    dtype: integer dtype of the result.

  Returns:
    ``[num_rows, ...]`` indices of ``dtype``.

  Raises:
    ValueError: if ``m > 16`` or ``num_rows`` does not match ``packed``.
    TypeError: for an unsupported ``packed`` dtype.
  """
  bits = index_bits(m)
  in_dt, _ = _unsigned_word(packed.dtype, "packed.dtype")
  per_word = in_dt.itemsize * 8 // bits
  num_rows = _as_int(num_rows, "num_rows")
  words = packed.shape[0]
  if not (max(words - 1, 0) * per_word < num_rows <= words * per_word or num_rows == words == 0):
    raise ValueError(
      f"num_rows must be in ({max(words - 1, 0) * per_word}, {words * per_word}] for "
      f"{words} words of {per_word} indices each; got num_rows={num_rows}."
    )
  return _unpack(packed, bits, num_rows, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _unpack(packed: jax.Array, bits: int, num_rows: int, dtype: jnp.dtype) -> jax.Array:
  """Jitted body of :func:`unpack_indices`."""
  in_dt = jnp.dtype(packed.dtype)
  udt = _WORD_DTYPES[in_dt]
  per_word = in_dt.itemsize * 8 // bits
  words = packed.shape[0]
  u = jax.lax.bitcast_convert_type(packed, udt) if in_dt != jnp.dtype(udt) else packed
  mask = udt((1 << bits) - 1)
  slots = [(u >> udt(s * bits)) & mask for s in range(per_word)]
  out = jnp.stack(slots, axis=1).reshape((words * per_word,) + tuple(packed.shape[1:]))
  return out[:num_rows].astype(dtype)


def packed_index_nbytes(num_rows: int, num_cols: int, m: int) -> int:
  """Bytes of ``pack_indices(indices, m)`` for ``[num_rows, num_cols]`` indices (uint8 words).

  Args:
    num_rows: index rows R.
    num_cols: index columns.
    m: group size, ``m <= 16``.

  Returns:
    ``ceil(R / P) * num_cols`` with ``P = 8 / index_bits(m)`` indices per byte.
  """
  per_word = 8 // index_bits(m)
  return -(-num_rows // per_word) * num_cols
