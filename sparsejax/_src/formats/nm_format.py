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

The mask itself (:func:`nm_mask`, :func:`is_nm_sparse`) lives in layer 1
(:mod:`sparsejax._src.primitives.nm_mask`) and the bit packing in
:mod:`sparsejax._src.formats.nm_packing`; both are re-exported here. This module
imports no Flax.

Reference for the format and its memory formulas: ``docs/KERNELS.md`` §5–§6.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# ``x as x`` marks a re-export: older imports of these names from here keep working.
from sparsejax._src.formats.nm_packing import index_bits as index_bits
from sparsejax._src.formats.nm_packing import pack_indices as pack_indices
from sparsejax._src.formats.nm_packing import packed_index_nbytes
from sparsejax._src.formats.nm_packing import unpack_indices as unpack_indices
from sparsejax._src.primitives.nm_mask import _as_int as _as_int
from sparsejax._src.primitives.nm_mask import _check_nm as _check_nm
from sparsejax._src.primitives.nm_mask import _check_weight, _group_view, _topn_positions
from sparsejax._src.primitives.nm_mask import _is_tracer as _is_tracer
from sparsejax._src.primitives.nm_mask import is_nm_sparse as is_nm_sparse
from sparsejax._src.primitives.nm_mask import nm_mask as nm_mask

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
_INDEX_DTYPE = jnp.int8


# ---------------------------------------------------------------------------
# The pytree record
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
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
  n: int
  m: int
  shape: tuple[int, int]
  layout: str = LAYOUT_KN

  def replace(self, **updates: Any) -> NMSparse:
    """A copy with fields replaced, e.g. ``values=v`` (not validated, like the constructor)."""
    return dataclasses.replace(self, **updates)

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


jax.tree_util.register_dataclass(
  NMSparse,
  data_fields=["values", "indices"],
  meta_fields=["n", "m", "shape", "layout"],
)


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
    _check_index_values(np.asarray(indices), n, m, "indices")
  return NMSparse(
    values=values, indices=indices.astype(_INDEX_DTYPE), n=n, m=m, shape=shape, layout=layout
  )


def _check_index_values(idx: np.ndarray, n: int, m: int, name: str) -> None:
  """Checks concrete ``[K*n/m, Nout]`` indices: in ``[0, m)``, strictly increasing per group.

  Args:
    idx: the indices, on the host.
    n: kept entries per group.
    m: group size.
    name: the argument named in error messages (e.g. ``"nms.indices"``).

  Raises:
    ValueError: naming ``name``, the allowed range and the first offending group.
  """
  lo, hi = int(idx.min()), int(idx.max())
  if lo < 0 or hi >= m:
    raise ValueError(f"{name} must lie in [0, m) = [0, {m}); got values in [{lo}, {hi}].")
  if n > 1:
    g = idx.astype(np.int32).reshape(-1, n, idx.shape[-1])
    bad = np.argwhere(np.diff(g, axis=1) <= 0)
    if bad.size:
      grp, j, col = (int(v) for v in bad[0])
      raise ValueError(
        f"{name} must be strictly increasing within each group of n rows; "
        f"group {grp}, column {col} holds {g[grp, :, col].tolist()} (n={n}, m={m})."
      )


def check_concrete_indices(nms: NMSparse, fn: str) -> None:
  """Validates the index values of a concrete :class:`NMSparse` (no-op under ``jit``).

  The raw constructor does not validate, and out-of-range indices would silently
  decompress to zeros (compare + select matches no slot). This runs the value checks
  of :func:`make_nm_sparse` on ``nms.indices`` when they are a concrete array: each
  index in ``[0, m)`` and strictly increasing within its group. Traced indices (inside
  ``jit``, ``grad``, ``vmap``) cannot be checked and are passed through.

  Args:
    nms: the compressed kernel.
    fn: the public function named in the error message.

  Raises:
    ValueError: if concrete indices are out of range or not strictly increasing.
  """
  idx = nms.indices
  if _is_tracer(idx) or not hasattr(idx, "size") or not idx.size:
    return
  try:
    _check_index_values(np.asarray(idx), nms.n, nms.m, "nms.indices")
  except ValueError as e:
    raise ValueError(f"{fn}: {e}") from None


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
  """Jitted :func:`nm_compress` without a mask: keep the n largest per group."""
  k, nout = w.shape
  w3 = _group_view(w, m)  # [G, M, C]
  pos = _topn_positions(jnp.abs(w3), n)  # [G, n, C]
  vals = jnp.take_along_axis(w3, pos, axis=1)
  g = k // m
  return vals.reshape(g * n, nout), pos.reshape(g * n, nout).astype(_INDEX_DTYPE)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _compress_masked(w: jax.Array, mask: jax.Array, n: int, m: int) -> tuple[jax.Array, jax.Array]:
  """Jitted :func:`nm_compress` with a mask: keep the masked entries."""
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
  Concrete indices are checked first (:func:`check_concrete_indices`); under ``jit``
  they are not, and an index outside ``[0, m)`` matches no slot, so its value is
  dropped (decompresses to zero).

  Args:
    nms: the compressed kernel.

  Returns:
    ``[K, Nout]`` array in ``nms.values.dtype`` with zeros at pruned entries.

  Raises:
    ValueError: if concrete ``nms.indices`` lie outside ``[0, m)`` or are not
      strictly increasing within a group.
  """
  check_concrete_indices(nms, "nm_decompress")
  return decompress_unchecked(nms)


def decompress_unchecked(nms: NMSparse) -> jax.Array:
  """:func:`nm_decompress` without the index check (for callers that already ran it)."""
  return _decompress(nms.values, nms.indices, nms.n, nms.m, tuple(nms.shape))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _decompress(
  values: jax.Array, indices: jax.Array, n: int, m: int, shape: tuple[int, int]
) -> jax.Array:
  """Jitted :func:`nm_decompress` on the raw arrays (compare + select)."""
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
  """Jitted :func:`nm_take`: gather the kept positions of every group."""
  k, nout = dense.shape
  g = k // m
  pos = indices.reshape(g, n, nout).astype(jnp.int32)
  out = jnp.take_along_axis(dense.reshape(g, m, nout), pos, axis=1)
  return out.reshape(g * n, nout)


# ---------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------


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
        return vbytes + packed_index_nbytes(rows, cols, x.m)
      return vbytes + rows * cols
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    return 0

  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, NMSparse))
  return sum(leaf_bytes(x) for x in leaves)
