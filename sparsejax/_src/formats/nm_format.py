"""Compressed N:M sparse weight format: masks, compression, packed metadata.

An N:M sparse weight keeps at most N non-zeros in every group of M consecutive
entries along the contraction axis. sparsejax stores a logical dense kernel
``W: [K, Nout]`` (Flax ``Dense`` layout, K = contraction / fan-in axis, groups
of M consecutive rows along axis 0) in the ``"kn"`` layout:

* ``values: [K*N/M, Nout]``: row ``g*N + j`` holds the j-th kept entry (in
  ascending position) of group ``g`` of every column.
* ``indices: [K*N/M, Nout]``, ``int8``: the position in ``[0, M)`` of that
  entry inside its group; strictly increasing within a group.

In memory the indices are held as ``int8`` (one byte each, simple to use in
kernels). Their *stored* size is counted as packed metadata: 2 bits per index
for ``M <= 4`` and 4 bits for ``M <= 16`` (:func:`pack_indices`), so that
:attr:`NMSparse.nbytes` reports the true compressed size, e.g. 2:4 in
bfloat16 is 56.25% of the dense bfloat16 bytes (the same 9/16 as PyTorch's
semi-structured format).

Reference for the format and its memory formulas: ``docs/KERNELS.md`` §5–§6.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "NMSparse",
  "index_bits",
  "is_nm_sparse",
  "make_nm_sparse",
  "nm_compress",
  "nm_decompress",
  "nm_mask",
  "nm_take",
  "nm_nbytes",
  "pack_indices",
  "unpack_indices",
]

#: The only layout implemented so far: values/indices ``[K*N/M, Nout]``.
LAYOUT_KN = "kn"
_LAYOUTS = (LAYOUT_KN,)
#: Indices are int8, so a group can have at most 128 positions.
_MAX_M = 128
_INDEX_DTYPE = jnp.int8


# ---------------------------------------------------------------------------
# Small validation helpers
# ---------------------------------------------------------------------------


def _is_tracer(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def _as_int(value: Any, name: str) -> int:
  """Returns ``value`` as a Python int or raises a TypeError naming it."""
  if isinstance(value, bool):
    raise TypeError(f"{name} must be an int; got bool {value!r}.")
  try:
    return operator.index(value)
  except TypeError:
    raise TypeError(
      f"{name} must be an int; got {value!r} of type {type(value).__name__}."
    ) from None


def _check_nm(n: Any, m: Any) -> tuple[int, int]:
  """Validates an N:M pair and returns it as Python ints."""
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
  return math.prod(shape[:-1])


def _check_weight(w: Any, m: int, name: str, fn: str) -> None:
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
# The pytree record
# ---------------------------------------------------------------------------


@flax.struct.dataclass
class NMSparse:
  """A compressed N:M sparse ``[K, Nout]`` kernel (a JAX pytree).

  Leaves are ``values`` and ``indices``; ``n``, ``m``, ``shape`` and ``layout``
  are static (part of the tree structure), so an ``NMSparse`` can be passed
  through ``jax.jit``, ``jax.grad`` (w.r.t. ``values``) and Optax.

  Build one with :func:`nm_compress` (from a dense kernel) or
  :func:`make_nm_sparse` (from arrays, validated). The raw constructor does
  not validate, because JAX rebuilds pytrees with placeholder leaves.

  Attributes:
    values: ``[K*N/M, Nout]`` floating array; row ``g*N + j`` is the j-th kept
      entry (ascending position) of group ``g``.
    indices: ``[K*N/M, Nout]`` int8 array of positions in ``[0, M)``,
      strictly increasing within each group. Held as int8 in memory; counted
      as packed 2/4-bit metadata by :attr:`nbytes`.
    n: kept entries per group (N).
    m: group size (M).
    shape: the logical dense shape ``(K, Nout)``.
    layout: ``"kn"`` (the only layout implemented).
  """

  values: jax.Array
  indices: jax.Array
  n: int = flax.struct.field(pytree_node=False)
  m: int = flax.struct.field(pytree_node=False)
  shape: tuple[int, int] = flax.struct.field(pytree_node=False)
  layout: str = flax.struct.field(pytree_node=False, default=LAYOUT_KN)

  @property
  def dtype(self) -> jnp.dtype:
    """The dtype of ``values`` (and of the decompressed kernel)."""
    return jnp.dtype(self.values.dtype)

  @property
  def density(self) -> float:
    """Fraction of kept entries, ``n / m``."""
    return self.n / self.m

  @property
  def nbytes(self) -> int:
    """True compressed size in bytes: values + packed metadata.

    The metadata is counted as :func:`pack_indices` stores it (2 bits per
    index for M <= 4, 4 bits for M <= 16, uint8 words), even though
    ``indices`` is held as int8 in memory. See :func:`nm_nbytes`.
    """
    return nm_nbytes(self)

  @property
  def dense_nbytes(self) -> int:
    """Bytes of the equivalent dense ``[K, Nout]`` kernel in ``values.dtype``."""
    return math.prod(self.shape) * self.dtype.itemsize

  def todense(self) -> jax.Array:
    """Returns the dense ``[K, Nout]`` kernel (:func:`nm_decompress`)."""
    return nm_decompress(self)


def make_nm_sparse(
  values: jax.Array,
  indices: jax.Array,
  n: int,
  m: int,
  shape: Sequence[int],
  *,
  layout: str = LAYOUT_KN,
) -> NMSparse:
  """Builds a validated :class:`NMSparse` from its arrays.

  Structural checks (N:M pair, shapes, dtypes, layout) always run. Value
  checks (indices in ``[0, m)`` and strictly increasing inside each group) run
  only when ``indices`` is a concrete array, not a tracer inside ``jit``.

  Args:
    values: ``[K*n/m, Nout]`` floating array of kept entries.
    indices: ``[K*n/m, Nout]`` integer array of in-group positions; cast to int8.
    n: kept entries per group, ``1 <= n <= m``.
    m: group size, ``1 <= m <= 128``.
    shape: logical dense shape ``(K, Nout)`` with ``K % m == 0``.
    layout: storage layout; only ``"kn"`` is implemented.

  Returns:
    The :class:`NMSparse` record (indices as int8).

  Raises:
    TypeError: if ``n``/``m`` are not ints, ``values`` is not floating or
      ``indices`` is not an integer array.
    ValueError: for an invalid N:M pair, shape, layout or index values.

  Example:
    >>> import jax.numpy as jnp
    >>> v = jnp.array([[1.0], [2.0]])
    >>> i = jnp.array([[0], [3]], jnp.int8)
    >>> make_nm_sparse(v, i, 2, 4, (4, 1)).todense()[:, 0]
    Array([1., 0., 0., 2.], dtype=float32)
  """
  n, m = _check_nm(n, m)
  if layout not in _LAYOUTS:
    raise ValueError(f"layout must be one of {_LAYOUTS}; got layout={layout!r}.")
  try:
    shape = tuple(_as_int(d, "shape[i]") for d in shape)
  except TypeError:
    raise TypeError(f"shape must be a sequence of 2 ints (K, Nout); got {shape!r}.") from None
  if len(shape) != 2 or min(shape) < 0:
    raise ValueError(f"shape must be 2 non-negative ints (K, Nout); got shape={shape}.")
  k, nout = shape
  if k % m:
    raise ValueError(
      f"shape[0] (K, the contraction size) must be divisible by m; got K={k}, m={m}."
    )
  values = jnp.asarray(values) if not _is_tracer(values) else values
  indices = jnp.asarray(indices) if not _is_tracer(indices) else indices
  if not jnp.issubdtype(values.dtype, jnp.floating):
    raise TypeError(
      f"values must have a floating dtype (float32, bfloat16, float16, ...); "
      f"got values.dtype={values.dtype}."
    )
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise TypeError(
      f"indices must have an integer dtype (int8 preferred); got indices.dtype={indices.dtype}."
    )
  expected = (k * n // m, nout)
  if tuple(values.shape) != expected:
    raise ValueError(
      f"values.shape must be (K*n/m, Nout) = {expected} for shape={shape}, n={n}, m={m}; "
      f"got values.shape={tuple(values.shape)}."
    )
  if tuple(indices.shape) != tuple(values.shape):
    raise ValueError(
      f"indices.shape must equal values.shape={tuple(values.shape)}; "
      f"got indices.shape={tuple(indices.shape)}."
    )
  if not _is_tracer(indices) and indices.size:
    _check_index_values(np.asarray(indices), n, m)
  return NMSparse(
    values=values, indices=indices.astype(_INDEX_DTYPE), n=n, m=m, shape=shape, layout=layout
  )


def _check_index_values(idx: np.ndarray, n: int, m: int) -> None:
  lo, hi = int(idx.min()), int(idx.max())
  if lo < 0 or hi >= m:
    raise ValueError(f"indices must lie in [0, m) = [0, {m}); got values in [{lo}, {hi}].")
  if n > 1:
    g = idx.astype(np.int32).reshape(-1, n, idx.shape[-1])
    bad = np.argwhere(np.diff(g, axis=1) <= 0)
    if bad.size:
      grp, j, col = (int(v) for v in bad[0])
      raise ValueError(
        "indices must be strictly increasing within each group of n rows; "
        f"group {grp}, column {col} holds {g[grp, :, col].tolist()} (n={n}, m={m})."
      )


# ---------------------------------------------------------------------------
# Masks
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
  keep = _group_ranks(jnp.abs(_group_view(w, m))) < n
  return keep.reshape(w.shape)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _mask_static(w: jax.Array, n: int, m: int) -> jax.Array:
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
  """
  n, m = _check_nm(n, m)
  _check_weight(w, m, "w", "is_nm_sparse")
  return _is_nm_sparse(w, n, m)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _is_nm_sparse(w: jax.Array, n: int, m: int) -> jax.Array:
  counts = jnp.sum(_group_view(w, m) != 0, axis=1)
  return jnp.all(counts <= n)


# ---------------------------------------------------------------------------
# Compression
# ---------------------------------------------------------------------------


def nm_compress(w: jax.Array, n: int, m: int, *, mask: jax.Array | None = None) -> NMSparse:
  """Compresses a dense ``[K, Nout]`` kernel to N:M (values + int8 indices).

  Without ``mask`` the n largest-magnitude entries of every group of m rows
  are kept (:func:`nm_mask`). With ``mask``, exactly the masked entries are
  kept; the mask must have exactly n True entries per group (checked when it
  is concrete; under ``jit`` a group with fewer keeps zero-valued extra slots
  and a group with more keeps its n lowest positions). Exact round trip:
  ``nm_decompress(nm_compress(w * mask, n, m)) == w * mask``.

  Args:
    w: ``[K, Nout]`` floating kernel, ``K % m == 0``. Conv kernels must be
      reshaped first: ``w.reshape(-1, w.shape[-1])``.
    n: entries kept per group.
    m: group size.
    mask: optional bool ``[K, Nout]`` with n True entries per group.

  Returns:
    An :class:`NMSparse` with ``values: [K*n/m, Nout]`` in ``w.dtype``.

  Raises:
    TypeError: if ``w`` is not floating or ``n``/``m`` are not ints.
    ValueError: for an invalid N:M pair, a non-2-D or non-divisible ``w``, or
      a mask of the wrong shape or count.

  Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([[0.1], [-3.0], [2.0], [0.5]])
    >>> nms = nm_compress(w, 2, 4)
    >>> nms.values[:, 0], nms.indices[:, 0]
    (Array([-3.,  2.], dtype=float32), Array([1, 2], dtype=int8))
  """
  n, m = _check_nm(n, m)
  if w.ndim != 2:
    raise ValueError(
      f"nm_compress: w must be a 2-D [K, Nout] kernel; got w.shape={tuple(w.shape)}. "
      "Flatten conv kernels first with w.reshape(-1, w.shape[-1])."
    )
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(f"nm_compress: w must have a floating dtype; got w.dtype={w.dtype}.")
  _check_weight(w, m, "w", "nm_compress")
  if mask is None:
    values, indices = _compress_magnitude(w, n, m)
  else:
    if tuple(mask.shape) != tuple(w.shape):
      raise ValueError(
        f"nm_compress: mask.shape must equal w.shape={tuple(w.shape)}; "
        f"got mask.shape={tuple(mask.shape)}."
      )
    if not _is_tracer(mask):
      counts = _group_view(np.asarray(mask).astype(bool), m).sum(axis=1)
      if counts.size and (counts.min() != n or counts.max() != n):
        g, c = (int(v) for v in np.argwhere(counts != n)[0])
        raise ValueError(
          f"nm_compress: mask must keep exactly n={n} of every m={m} entries along "
          f"axis 0; group {g} (rows {g * m}..{g * m + m - 1}), column {c} keeps "
          f"{int(counts[g, c])} (counts range over [{counts.min()}, {counts.max()}])."
        )
    values, indices = _compress_masked(w, mask, n, m)
  return NMSparse(values=values, indices=indices, n=n, m=m, shape=tuple(w.shape))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _compress_magnitude(w: jax.Array, n: int, m: int) -> tuple[jax.Array, jax.Array]:
  k, nout = w.shape
  w3 = _group_view(w, m)  # [G, M, C]
  pos = _topn_positions(jnp.abs(w3), n)  # [G, n, C]
  vals = jnp.take_along_axis(w3, pos, axis=1)
  g = k // m
  return vals.reshape(g * n, nout), pos.reshape(g * n, nout).astype(_INDEX_DTYPE)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _compress_masked(w: jax.Array, mask: jax.Array, n: int, m: int) -> tuple[jax.Array, jax.Array]:
  k, nout = w.shape
  w3 = _group_view(w, m)
  mask3 = _group_view(mask, m).astype(bool)
  # Pad groups with too few kept entries with their lowest unkept slots
  # (value forced to 0), then take the n lowest selected positions.
  deficit = n - jnp.sum(mask3, axis=1, keepdims=True)
  fill = (~mask3) & (jnp.cumsum(~mask3, axis=1) <= deficit)
  sel = mask3 | fill
  slot = jnp.arange(m, dtype=jnp.int32)[None, :, None]
  pos = jnp.sort(jnp.where(sel, slot, m + slot), axis=1)[:, :n, :]
  vals = jnp.take_along_axis(w3, pos, axis=1)
  vals = jnp.where(jnp.take_along_axis(mask3, pos, axis=1), vals, jnp.zeros((), w.dtype))
  g = k // m
  return vals.reshape(g * n, nout), pos.reshape(g * n, nout).astype(_INDEX_DTYPE)


def nm_decompress(nms: NMSparse) -> jax.Array:
  """Expands an :class:`NMSparse` to its dense ``[K, Nout]`` kernel.

  Uses compare + select only (no scatter), exactly like the Pallas kernels.

  Args:
    nms: the compressed kernel.

  Returns:
    ``[K, Nout]`` array in ``nms.values.dtype`` with zeros at pruned entries.
  """
  return _decompress(nms.values, nms.indices, nms.n, nms.m, tuple(nms.shape))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _decompress(
  values: jax.Array, indices: jax.Array, n: int, m: int, shape: tuple[int, int]
) -> jax.Array:
  k, nout = shape
  g = k // m
  v3 = values.reshape(g, n, nout)
  i3 = indices.reshape(g, n, nout).astype(jnp.int32)
  slots = jnp.arange(m, dtype=jnp.int32)[None, :, None]
  dense = jnp.zeros((g, m, nout), values.dtype)
  for j in range(n):
    dense = jnp.where(i3[:, j : j + 1, :] == slots, v3[:, j : j + 1, :], dense)
  return dense.reshape(k, nout)


def nm_take(dense: jax.Array, like: NMSparse) -> jax.Array:
  """Entries of a dense ``[K, Nout]`` array at the kept positions of ``like``.

  This is the compression half of an SDDMM: ``nm_take(x.T @ dy, nms)`` is the
  gradient of ``x @ nms.todense()`` with respect to ``nms.values``.

  Args:
    dense: ``[K, Nout]`` array, same logical shape as ``like``.
    like: the :class:`NMSparse` whose ``indices`` select the entries.

  Returns:
    ``[K*N/M, Nout]`` array in ``dense.dtype``, laid out like ``like.values``.

  Raises:
    ValueError: if ``dense.shape != like.shape``.
  """
  if tuple(dense.shape) != tuple(like.shape):
    raise ValueError(
      f"nm_take: dense.shape must equal like.shape={tuple(like.shape)}; "
      f"got dense.shape={tuple(dense.shape)}."
    )
  return _take(dense, like.indices, like.n, like.m)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _take(dense: jax.Array, indices: jax.Array, n: int, m: int) -> jax.Array:
  k, nout = dense.shape
  g = k // m
  pos = indices.reshape(g, n, nout).astype(jnp.int32)
  out = jnp.take_along_axis(dense.reshape(g, m, nout), pos, axis=1)
  return out.reshape(g * n, nout)


# ---------------------------------------------------------------------------
# Packed metadata
# ---------------------------------------------------------------------------


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
  in_dt = jnp.dtype(packed.dtype)
  udt = _WORD_DTYPES[in_dt]
  per_word = in_dt.itemsize * 8 // bits
  words = packed.shape[0]
  u = jax.lax.bitcast_convert_type(packed, udt) if in_dt != jnp.dtype(udt) else packed
  mask = udt((1 << bits) - 1)
  slots = [(u >> udt(s * bits)) & mask for s in range(per_word)]
  out = jnp.stack(slots, axis=1).reshape((words * per_word,) + tuple(packed.shape[1:]))
  return out[:num_rows].astype(dtype)


def _packed_index_nbytes(num_rows: int, num_cols: int, m: int) -> int:
  per_word = 8 // index_bits(m)  # uint8 words
  return -(-num_rows // per_word) * num_cols


def nm_nbytes(tree: Any) -> int:
  """True stored size in bytes of an :class:`NMSparse` or a pytree.

  For an :class:`NMSparse`: ``values`` bytes + packed index bytes (2 bits per
  index for M <= 4, 4 bits for M <= 16, rounded up to whole uint8 words per
  column, exactly the size of ``pack_indices(indices, m)``). Indices are held
  as int8 in memory; this counts what a packed checkpoint would store. For
  M > 16 the int8 bytes are counted. Other array leaves of a pytree count
  their plain ``nbytes``.

  For a ``[K, Nout]`` kernel with b bytes per value this is
  ``K*Nout*(n/m)*(b + bits/8)``; 2:4 bfloat16 = 56.25% of dense bfloat16, 1:8
  bfloat16 = 15.6% (``docs/KERNELS.md`` §5).

  Args:
    tree: an :class:`NMSparse`, an array, or a pytree containing either
      (``jax.ShapeDtypeStruct`` leaves work too).

  Returns:
    The size in bytes (a Python int).
  """

  def leaf_bytes(x: Any) -> int:
    if isinstance(x, NMSparse):
      rows, cols = x.values.shape
      vbytes = rows * cols * jnp.dtype(x.values.dtype).itemsize
      if x.m <= 16:
        return vbytes + _packed_index_nbytes(rows, cols, x.m)
      return vbytes + rows * cols
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    return 0

  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, NMSparse))
  return sum(leaf_bytes(x) for x in leaves)
