"""The native CPU twins of the mask update's primitives (XLA FFI calls).

``sparsejax/_src/kernels/csrc/select_ffi.cc`` is compiled at install time by
``setup.py`` into ``sparsejax._src.primitives._select_native``. Its exact top-k computes
exactly what ``selection._select_2d`` computes (same keys, same thresholds, ties by
index; the tests compare the two on every strategy), as one custom call; so do its fused
twins of ``drop_and_grow``, ``grouped_drop_and_grow``, SRigL's ablation rule and
ablating update, ``count_true`` and the leaf-key derivation. A mask update on the CPU
then compiles to a few dozen XLA kernels instead of several hundred (most of its compile
time and compile-time memory), one selection runs 1.4-4.6x faster, and built-in scores
are read in place (``score_form``: no float copy of a layer) (benchmarks/RESULTS.md).

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

from sparsejax._src.primitives import native_ext, score_form

TARGET = "sparsejax_select"
DROP_GROW_TARGET = "sparsejax_drop_grow"
COUNT_TARGET = "sparsejax_count"
GROUPED_TARGET = "sparsejax_grouped_drop_grow"
ABLATE_TARGET = "sparsejax_ablate"
LEAF_KEYS_TARGET = "sparsejax_leaf_keys"
ABLATED_TARGET = "sparsejax_ablated_drop_grow"

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
  scores: score_form.Scores,
  k: jax.Array,
  candidates: jax.Array | None,
  *,
  per_column: bool,
  threads: int = 0,
) -> jax.Array:
  """``selection._select_2d`` as one FFI call (CPU only: callers wrap it in
  ``lax.platform_dependent``).

  Args:
    scores: ``[L, G]`` float scores (cast to float32, as the XLA path does), or a
      ``score_form.ScoreForm`` of that shape (read in place or computed by the kernel).
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
  form = score_form.as_form(scores)
  (buffer,), words, (mode,) = score_form.native_operands(form)
  call = jax.ffi.ffi_call(
    TARGET, jax.ShapeDtypeStruct(form.shape, jnp.bool_), vmap_method="sequential"
  )
  cands = jnp.zeros((0,), jnp.bool_) if candidates is None else candidates.astype(jnp.bool_)
  return call(
    buffer,
    cands,
    k.astype(jnp.int32),
    words,
    per_column=np.int64(1 if per_column else 0),
    mode=np.int64(mode),
    threads=np.int64(threads),
  )


def drop_and_grow(
  mask: jax.Array,
  drop_scores: score_form.Scores,
  grow_scores: score_form.Scores,
  n_drop: jax.Array,
  n_grow: jax.Array | None,
  *,
  threads: int = 0,
) -> tuple[jax.Array, jax.Array]:
  """``drop_grow.drop_and_grow`` as one FFI call (CPU only: callers wrap it in
  ``lax.platform_dependent``): the count of the mask and both selections.

  Args:
    mask: bool array.
    drop_scores, grow_scores: scores shaped like ``mask`` (cast to float32), or their
      ``score_form.ScoreForm``.
    n_drop: int32 scalar (clipped to ``[0, nnz]`` in the kernel).
    n_grow: int32 scalar (negative grows nothing), or None for ``n_drop`` after clipping.
    threads: as in :func:`select_2d`.

  Returns:
    ``(new_mask, kept)``, bool arrays shaped like ``mask``.
  """
  _EXT.require()
  (drop, grow), words, (drop_mode, grow_mode) = score_form.native_operands(
    score_form.as_form(drop_scores), score_form.as_form(grow_scores)
  )
  out = jax.ShapeDtypeStruct(mask.shape, jnp.bool_)
  call = jax.ffi.ffi_call(DROP_GROW_TARGET, (out, out), vmap_method="sequential")
  grow_count = jnp.int32(0) if n_grow is None else n_grow
  counts = jnp.stack([jnp.asarray(n_drop, jnp.int32), jnp.asarray(grow_count, jnp.int32)])
  new, kept = call(
    drop,
    grow,
    mask.astype(jnp.bool_),
    counts,
    words,
    grow_default=np.int64(1 if n_grow is None else 0),
    drop_mode=np.int64(drop_mode),
    grow_mode=np.int64(grow_mode),
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
  drop_scores: score_form.Scores,
  grow_scores: score_form.Scores,
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
    drop_scores, grow_scores: ``[L, G]`` scores (cast to float32), or their
      ``score_form.ScoreForm``.
    n_drop: int32 scalar (clipped to ``[0, nnz]`` in the kernel).
    per_group: int32 ``[1, G]`` target count of every column.
    keepable: bool ``[L, G]`` (the mask's eligible entries), or None for the mask.
    cap: cut over-full columns to ``per_group`` first.
    threads: as in :func:`select_2d`.

  Returns:
    ``(new_mask, kept)``, bool ``[L, G]``.
  """
  _EXT.require()
  (drop, grow), words, (drop_mode, grow_mode) = score_form.native_operands(
    score_form.as_form(drop_scores), score_form.as_form(grow_scores)
  )
  out = jax.ShapeDtypeStruct(mask.shape, jnp.bool_)
  call = jax.ffi.ffi_call(GROUPED_TARGET, (out, out), vmap_method="sequential")
  cands = jnp.zeros((0,), jnp.bool_) if keepable is None else keepable.astype(jnp.bool_)
  return call(
    drop,
    grow,
    mask.astype(jnp.bool_),
    cands,
    per_group.astype(jnp.int32),
    jnp.reshape(jnp.asarray(n_drop, jnp.int32), (1,)),
    words,
    cap=np.int64(1 if cap else 0),
    drop_mode=np.int64(drop_mode),
    grow_mode=np.int64(grow_mode),
    threads=np.int64(threads),
  )


def ablate(
  weights: jax.Array,
  grads: jax.Array,
  counts: jax.Array,
  threshold: int,
  min_neurons: int,
  *,
  threads: int = 0,
) -> jax.Array:
  """``ablation.neurons_to_ablate`` as one FFI call (CPU only: callers wrap it in
  ``lax.platform_dependent``): both salient selections, the per-neuron counts and the
  rule.

  Args:
    weights, grads: ``[fan_in, n_out]`` (cast to float32; their magnitudes are read).
    counts: int32 ``[2]``: ``n_keep`` (largest ``|w|``) and ``n_drop`` (largest ``|g|``).
    threshold: the ablation threshold ``max(1, int(gamma_sal · f))``.
    min_neurons: a neuron is ablated only below the ``(min_neurons + 1)``-th largest
      count (``0 <= min_neurons < n_out``).
    threads: as in :func:`select_2d`.

  Returns:
    bool ``[n_out]``: the neurons to ablate.
  """
  _EXT.require()
  call = jax.ffi.ffi_call(
    ABLATE_TARGET, jax.ShapeDtypeStruct(weights.shape[1:], jnp.bool_), vmap_method="sequential"
  )
  return call(
    weights.astype(jnp.float32),
    grads.astype(jnp.float32),
    counts.astype(jnp.int32),
    threshold=np.int64(threshold),
    min_neurons=np.int64(min_neurons),
    threads=np.int64(threads),
  )


def leaf_keys(key: jax.Array, count: jax.Array, indices: jax.Array) -> jax.Array:
  """``split(fold_in(fold_in(key, count), i))`` of every index ``i`` as one FFI call (CPU
  only: callers wrap it in ``lax.platform_dependent``), for a raw threefry key under the
  partitionable threefry (``threefry.supported``).

  Args:
    key: uint32 ``[2]``.
    count: int32 scalar.
    indices: uint32 ``[L]``.

  Returns:
    uint32 ``[L, 2, 2]``.
  """
  _EXT.require()
  out = jax.ShapeDtypeStruct((indices.shape[0], 2, 2), jnp.uint32)
  call = jax.ffi.ffi_call(LEAF_KEYS_TARGET, out, vmap_method="sequential")
  return call(key.astype(jnp.uint32), jnp.asarray(count, jnp.int32), indices.astype(jnp.uint32))


def ablated_drop_and_grow(
  mask: jax.Array,
  drop_scores: score_form.Scores,
  grow_scores: score_form.Scores,
  n_drop: jax.Array,
  weights: jax.Array,
  grads: jax.Array,
  threshold: int,
  min_neurons: int,
  budget: int,
  *,
  threads: int = 0,
) -> tuple[jax.Array, jax.Array]:
  """``ablation.ablated_drop_and_grow`` as one FFI call (CPU only: callers wrap it in
  ``lax.platform_dependent``): the ablation rule, the per-neuron targets and the grouped
  update with the cap.

  Args:
    mask: bool ``[fan_in, n_out]``.
    drop_scores, grow_scores: ``[fan_in, n_out]`` scores or their score forms.
    n_drop: int32 scalar.
    weights, grads: ``[fan_in, n_out]`` (cast to float32; their magnitudes are read).
    threshold, min_neurons: the ablation rule's constants (see :func:`ablate`).
    budget: the layer's nnz budget, shared by its active neurons.
    threads: as in :func:`select_2d`.

  Returns:
    ``(new_mask, kept)``, bool ``[fan_in, n_out]``.
  """
  _EXT.require()
  (drop, grow), words, (drop_mode, grow_mode) = score_form.native_operands(
    score_form.as_form(drop_scores), score_form.as_form(grow_scores)
  )
  out = jax.ShapeDtypeStruct(mask.shape, jnp.bool_)
  call = jax.ffi.ffi_call(ABLATED_TARGET, (out, out), vmap_method="sequential")
  return call(
    drop,
    grow,
    mask.astype(jnp.bool_),
    weights.astype(jnp.float32),
    grads.astype(jnp.float32),
    jnp.reshape(jnp.asarray(n_drop, jnp.int32), (1,)),
    words,
    drop_mode=np.int64(drop_mode),
    grow_mode=np.int64(grow_mode),
    threshold=np.int64(threshold),
    min_neurons=np.int64(min_neurons),
    budget=np.int64(budget),
    threads=np.int64(threads),
  )
