"""Loader and JAX binding of the native CPU kernel for condensed (SRigL) layers.

The kernel (``sparsejax/_src/kernels/csrc/condensed_ffi.cc``) is compiled at install time by
``setup.py`` into the extension module ``sparsejax._src.kernels._condensed_native`` and called
through the XLA FFI (``jax.ffi.register_ffi_target`` / ``jax.ffi.ffi_call``). If the
extension is missing (no C++ compiler at install time, a platform it does not build on,
or ``SPARSEJAX_DISABLE_NATIVE=1``), :func:`native_available` returns ``False``, the
reason is kept in :func:`native_unavailable_reason`, and
:func:`sparsejax.condensed_matmul` falls back to the XLA path with a logged notice.

Reference: Lasby et al., "Dynamic Sparse Training with Structured Sparsity" (SRigL),
ICLR 2024, https://arxiv.org/abs/2305.02299.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src.primitives import native_ext

__all__ = [
  "FFI_TARGET",
  "native_available",
  "native_cpu_isa",
  "native_matmul",
  "native_unavailable_reason",
]

logger = logging.getLogger("sparsejax.condensed")

FFI_TARGET = "sparsejax_condensed_matmul"
"""Name under which the kernel is registered with XLA (platform ``cpu``)."""

_MODES = {"auto": 0, "gather": 1, "tiled": 2, "gather512": 3}
_ISAS = {"auto": -1, "portable": 0, "avx2": 1, "avx512": 2}

_EXT = native_ext.NativeExtension(
  "sparsejax._src.kernels._condensed_native", "native condensed kernel"
)


def native_available() -> bool:
  """Returns whether the native condensed kernel is built and registered with XLA."""
  return _EXT.load()


def native_unavailable_reason() -> str:
  """Returns why the native kernel is unavailable (empty string if it is available)."""
  return _EXT.reason


def native_cpu_isa() -> str | None:
  """Returns the SIMD level the kernel uses here: ``"avx512"``, ``"avx2"``,
  ``"portable"``, or ``None`` if the kernel is unavailable."""
  return None if _EXT.ext is None else _EXT.ext.cpu_isa()


def native_matmul(
  x: jax.Array,
  values: jax.Array,
  indices: jax.Array,
  active: jax.Array,
  bias: jax.Array | None,
  out_features: int,
  *,
  mode: str = "auto",
  isa: str = "auto",
  threads: int = 0,
) -> jax.Array:
  """Runs the native condensed matmul ``y = x @ W + bias`` on the CPU.

  Low-level entry point; most code should call :func:`sparsejax.condensed_matmul`.
  Inference only: the FFI call has no differentiation rule.

  Args:
    x: ``[B, K]`` float32 activations.
    values: ``[R, k]`` float32 kept weights of the ``R`` active output neurons.
    indices: ``[R, k]`` int16 or int32 input indices (each in ``[0, K)``, not
      checked: an out-of-range index reads out of bounds).
    active: ``[R]`` int32 output index of each condensed row (each in
      ``[0, out_features)``, checked).
    bias: ``[out_features]`` float32 or ``None``.
    out_features: ``N``, the full output width; neurons not in ``active`` output only
      their bias (or 0).
    mode: ``"gather"`` (SIMD gathers, 8-wide AVX2 ones; best at batch 1-2),
      ``"gather512"`` (16-wide AVX-512 gathers, for tuning), ``"tiled"`` (transposed
      batch tiles, best from batch 3 on) or ``"auto"`` (gather for B <= 2).
    isa: ``"auto"`` or a cap on the SIMD level (``"portable"``, ``"avx2"``,
      ``"avx512"``); used by tests to cover every code path.
    threads: at most this many threads (0: all of XLA's intra-op pool).

  Returns:
    ``[B, out_features]`` float32.

  Raises:
    RuntimeError: if the native kernel is unavailable.
    ValueError: on dtype or shape errors.
  """
  _EXT.require()
  if mode not in _MODES:
    raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
  if isa not in _ISAS:
    raise ValueError(f"isa must be one of {sorted(_ISAS)}, got {isa!r}")
  if x.ndim != 2:
    raise ValueError(f"x must be [B, K], got shape {x.shape}")
  if x.dtype != jnp.float32 or values.dtype != jnp.float32:
    raise ValueError(
      f"the native kernel needs float32 x and values, got x {x.dtype}, values {values.dtype}"
    )
  if indices.dtype not in (jnp.int16, jnp.int32):
    raise ValueError(f"indices must be int16 or int32, got {indices.dtype}")
  if bias is None:
    bias = jnp.zeros((0,), jnp.float32)
  call = jax.ffi.ffi_call(
    FFI_TARGET,
    jax.ShapeDtypeStruct((x.shape[0], out_features), jnp.float32),
    vmap_method="sequential",
  )
  return call(
    x,
    values,
    indices,
    active.astype(jnp.int32),
    bias.astype(jnp.float32),
    mode=np.int64(_MODES[mode]),
    isa=np.int64(_ISAS[isa]),
    threads=np.int64(threads),
  )
