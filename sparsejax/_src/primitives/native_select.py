"""The native CPU twin of the exact top-k selection (an XLA FFI call).

``sparsejax/_src/kernels/csrc/select_ffi.cc`` is compiled at install time by
``setup.py`` into ``sparsejax._src.primitives._select_native``. It computes exactly what
``selection._select_2d`` computes (same keys, same thresholds, ties by index; the tests
compare the two on every strategy), as one custom call: a mask update on the CPU then
compiles to a few dozen XLA kernels instead of several hundred, which is most of its
compile time and of its compile-time memory, and one selection runs 1.4-4.6x faster
(benchmarks/RESULTS.md).

It is used only where it cannot change a program's memory layout: on a CPU process with
one device (``jax.device_count() == 1``). With several devices an array may be sharded,
and XLA would gather a custom call's operands onto every device; the XLA path keeps the
selection local to the shards there (docs/SHARDING.md). If the extension is missing (no
C++ compiler at install time, another platform, or ``SPARSEJAX_DISABLE_NATIVE=1``) the
XLA path is used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src.primitives import native_ext

TARGET = "sparsejax_select"
DROP_GROW_TARGET = "sparsejax_drop_grow"
COUNT_TARGET = "sparsejax_count"
GROUPED_TARGET = "sparsejax_grouped_drop_grow"

_EXT = native_ext.NativeExtension("sparsejax._src.primitives._select_native", "native selection")


def available() -> bool:
  """Whether the native selection is built and registered with XLA."""
  return _EXT.load()


def unavailable_reason() -> str:
  """Why the native selection is unavailable (empty string when it is available)."""
  return _EXT.reason


def usable() -> bool:
  """Whether selections traced now may take the native path: it is available and the
  process has one device (no array can be sharded)."""
  return _EXT.load() and jax.device_count() == 1


def select_2d(
  scores: jax.Array,
  k: jax.Array,
  candidates: jax.Array | None,
  *,
  per_column: bool,
  threads: int = 0,
) -> jax.Array:
  """``selection._select_2d`` as one FFI call (CPU only: callers wrap it in
  ``lax.platform_dependent``).

  Args:
    scores: ``[L, G]`` float scores (cast to float32, as the XLA path does).
    k: int32 ``[1, 1]`` (whole array) or ``[1, G]`` (per column).
    candidates: optional bool ``[L, G]``.
    per_column: select per column (ties by row) or over the whole array (ties by flat
      index).
    threads: at most this many threads (0: XLA's intra-op pool, at most 8). The result
      does not depend on it (the tests check).

  Returns:
    bool ``[L, G]``.
  """
  _EXT.require()
  call = jax.ffi.ffi_call(
    TARGET, jax.ShapeDtypeStruct(scores.shape, jnp.bool_), vmap_method="sequential"
  )
  cands = jnp.zeros((0,), jnp.bool_) if candidates is None else candidates.astype(jnp.bool_)
  return call(
    scores.astype(jnp.float32),
    cands,
    k.astype(jnp.int32),
    per_column=np.int64(1 if per_column else 0),
    threads=np.int64(threads),
  )


def drop_and_grow(
  mask: jax.Array,
  drop_scores: jax.Array,
  grow_scores: jax.Array,
  n_drop: jax.Array,
  n_grow: jax.Array | None,
  *,
  threads: int = 0,
) -> tuple[jax.Array, jax.Array]:
  """``drop_grow.drop_and_grow`` as one FFI call (CPU only: callers wrap it in
  ``lax.platform_dependent``): the count of the mask and both selections.

  Args:
    mask: bool array.
    drop_scores, grow_scores: scores shaped like ``mask`` (cast to float32).
    n_drop: int32 scalar (clipped to ``[0, nnz]`` in the kernel).
    n_grow: int32 scalar (negative grows nothing), or None for ``n_drop`` after clipping.
    threads: as in :func:`select_2d`.

  Returns:
    ``(new_mask, kept)``, bool arrays shaped like ``mask``.
  """
  _EXT.require()
  out = jax.ShapeDtypeStruct(mask.shape, jnp.bool_)
  call = jax.ffi.ffi_call(DROP_GROW_TARGET, (out, out), vmap_method="sequential")
  grow = jnp.int32(0) if n_grow is None else n_grow
  counts = jnp.stack([jnp.asarray(n_drop, jnp.int32), jnp.asarray(grow, jnp.int32)])
  new, kept = call(
    drop_scores.astype(jnp.float32),
    grow_scores.astype(jnp.float32),
    mask.astype(jnp.bool_),
    counts,
    grow_default=np.int64(1 if n_grow is None else 0),
    threads=np.int64(threads),
  )
  return new, kept


def count_2d(mask: jax.Array, *, per_column: bool) -> jax.Array:
  """``selection.count_true`` of a bool ``[L, G]`` as one FFI call (CPU only): int32
  ``[1, 1]`` (the total) or ``[1, G]`` (per column)."""
  _EXT.require()
  shape = (1, mask.shape[1] if per_column else 1)
  call = jax.ffi.ffi_call(
    COUNT_TARGET, jax.ShapeDtypeStruct(shape, jnp.int32), vmap_method="sequential"
  )
  return call(mask.astype(jnp.bool_), per_column=np.int64(1 if per_column else 0))


def grouped_drop_and_grow(
  mask: jax.Array,
  drop_scores: jax.Array,
  grow_scores: jax.Array,
  n_drop: jax.Array,
  per_group: jax.Array,
  keepable: jax.Array | None,
  *,
  cap: bool,
  threads: int = 0,
) -> tuple[jax.Array, jax.Array]:
  """``drop_grow.grouped_drop_and_grow`` along axis 0 of ``[L, G]`` as one FFI call (CPU
  only: callers wrap it in ``lax.platform_dependent``).

  Args:
    mask: bool ``[L, G]``; the groups are its columns.
    drop_scores, grow_scores: ``[L, G]`` scores (cast to float32).
    n_drop: int32 scalar (clipped to ``[0, nnz]`` in the kernel).
    per_group: int32 ``[1, G]`` target count of every column.
    keepable: bool ``[L, G]`` (the mask's eligible entries), or None for the mask.
    cap: cut over-full columns to ``per_group`` first.
    threads: as in :func:`select_2d`.

  Returns:
    ``(new_mask, kept)``, bool ``[L, G]``.
  """
  _EXT.require()
  out = jax.ShapeDtypeStruct(mask.shape, jnp.bool_)
  call = jax.ffi.ffi_call(GROUPED_TARGET, (out, out), vmap_method="sequential")
  cands = jnp.zeros((0,), jnp.bool_) if keepable is None else keepable.astype(jnp.bool_)
  return call(
    drop_scores.astype(jnp.float32),
    grow_scores.astype(jnp.float32),
    mask.astype(jnp.bool_),
    cands,
    per_group.astype(jnp.int32),
    jnp.reshape(jnp.asarray(n_drop, jnp.int32), (1,)),
    cap=np.int64(1 if cap else 0),
    threads=np.int64(threads),
  )
