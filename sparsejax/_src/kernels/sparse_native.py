"""Loader and XLA FFI calls of the native CPU training kernels for CSR sparse layers.

The kernels (``sparsejax/_src/kernels/csrc/sparse_train_ffi.cc``) are compiled at install
time by ``setup.py`` into ``sparsejax._src.kernels._sparse_train_native`` and called through
the XLA FFI. If the extension is missing (no C++ compiler at install time, another
platform, or ``SPARSEJAX_DISABLE_NATIVE=1``), :func:`native_available` is ``False`` and
:func:`sparsejax.sparse.sparse_matmul` uses the pure-XLA path.

Activations cross the FFI boundary **feature-major**: the calls request the physical
layout "feature major, batch minor" for ``x [B, n_in]``, ``y``, ``dy`` and ``dx``
(``ffi_call(input_layouts=..., output_layouts=...)``), so XLA keeps a chain of sparse
layers (with the elementwise ops between them) in that layout and transposes only where a
row-major consumer needs it.

Reference: SparseProp (Nikdan et al. 2023, arXiv:2302.04852) for the batch-minor layout.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src.primitives import native_ext
from sparsejax._src.transforms import sparse_topology
from sparsejax._src.transforms.sparse_topology import CSRTopology

__all__ = [
  "native_available",
  "native_backward",
  "native_cpu_isa",
  "native_forward",
  "native_mask",
  "native_rebuild",
  "native_to_dense",
  "native_unavailable_reason",
  "topology_ops",
]

logger = logging.getLogger("sparsejax.sparse")

FWD_TARGET = "sparsejax_sparse_fwd"
BWD_TARGET = "sparsejax_sparse_bwd"

ISAS = {"auto": -1, "portable": 0, "avx2": 1, "avx512": 2}

_FEATURE_MAJOR = (1, 0)  # major-to-minor: the feature axis is major, the batch minor.

_EXT = native_ext.NativeExtension(
  "sparsejax._src.kernels._sparse_train_native", "native sparse training kernels"
)


def native_available() -> bool:
  """Whether the native training kernels are built and registered with XLA."""
  return _EXT.load()


def native_unavailable_reason() -> str:
  """Why the native kernels are unavailable (empty string when they are available)."""
  return _EXT.reason


def native_cpu_isa() -> str | None:
  """The SIMD level the kernels use here (``"avx512"``, ``"avx2"``, ``"portable"``), or
  ``None`` when they are unavailable."""
  return None if _EXT.ext is None else _EXT.ext.cpu_isa()


def _attrs(isa: str, threads: int, tile: int) -> dict[str, np.int64]:
  if isa not in ISAS:
    raise ValueError(f"isa must be one of {sorted(ISAS)}, got {isa!r}")
  return dict(isa=np.int64(ISAS[isa]), threads=np.int64(threads), tile=np.int64(tile))


def _require() -> None:
  _EXT.require()


def native_forward(
  x: jax.Array,
  values: jax.Array,
  topology: CSRTopology,
  *,
  isa: str = "auto",
  threads: int = 0,
  tile: int = 0,
) -> jax.Array:
  """``y[b, j] = sum_{p in row j} values[p] · x[b, col[p]]`` on the CPU (no bias).

  Args:
    x: ``[B, n_in]`` float32.
    values: ``[C]`` float32.
    topology: the layer's :class:`CSRTopology`.
    isa: ``"auto"`` or a cap on the SIMD level (tests cover every path with it).
    threads: at most this many threads (0: XLA's intra-op pool).
    tile: batch lanes per tile (0: 64).

  Returns:
    ``[B, n_out]`` float32.
  """
  _require()
  call = jax.ffi.ffi_call(
    FWD_TARGET,
    jax.ShapeDtypeStruct((x.shape[0], topology.n_out), jnp.float32),
    vmap_method="sequential",
    input_layouts=[_FEATURE_MAJOR, None, None, None],
    output_layouts=_FEATURE_MAJOR,
  )
  return call(x, values, topology.col, topology.row_ptr, **_attrs(isa, threads, tile))


def native_backward(
  x: jax.Array,
  dy: jax.Array,
  values: jax.Array,
  topology: CSRTopology,
  *,
  need_dx: bool = True,
  isa: str = "auto",
  threads: int = 0,
  tile: int = 0,
) -> tuple[jax.Array | None, jax.Array, jax.Array]:
  """``dx = dy · Wᵀ`` over the CSC view and ``dv[p] = Σ_b dy[b, row(p)] · x[b, col(p)]``.

  One FFI call computes both (``dx`` only if ``need_dx``).

  Returns:
    ``(dx [B, n_in] or None, dv [C], db [n_out])``, float32; ``dv`` is 0 at padding
    slots; ``db = Σ_b dy[b, :]`` is the bias gradient (read from ``dy`` in the same pass).
  """
  _require()
  b = x.shape[0]
  dx_shape = (b, topology.n_in) if need_dx else (0, 0)
  call = jax.ffi.ffi_call(
    BWD_TARGET,
    (
      jax.ShapeDtypeStruct(dx_shape, jnp.float32),
      jax.ShapeDtypeStruct((topology.capacity,), jnp.float32),
      jax.ShapeDtypeStruct((topology.n_out,), jnp.float32),
    ),
    vmap_method="sequential",
    input_layouts=[_FEATURE_MAJOR, _FEATURE_MAJOR, None, None, None, None, None, None],
    output_layouts=[_FEATURE_MAJOR, None, None],
  )
  dx, dv, db = call(
    x,
    dy,
    values,
    topology.col,
    topology.row_ptr,
    topology.csc_ptr,
    topology.csc_row,
    topology.csc_slot,
    need_dx=np.int64(bool(need_dx)),
    **_attrs(isa, threads, tile),
  )
  return (dx if need_dx else None), dv, db


# ---------------------------------------------------------------------------------------
# Topology ops (DST update steps): dense views and the rebuild, in C++.
# ---------------------------------------------------------------------------------------


def native_to_dense(per_slot: jax.Array, topology: CSRTopology) -> jax.Array:
  """``[n_in, n_out]`` float32 with ``per_slot`` at the active positions (0 elsewhere)."""
  _require()
  call = jax.ffi.ffi_call(
    "sparsejax_csr_to_dense",
    jax.ShapeDtypeStruct((topology.n_in, topology.n_out), jnp.float32),
    vmap_method="sequential",
  )
  return call(per_slot, topology.csc_ptr, topology.csc_row, topology.csc_slot)


def native_mask(topology: CSRTopology) -> jax.Array:
  """bool ``[n_in, n_out]``: the active positions."""
  _require()
  call = jax.ffi.ffi_call(
    "sparsejax_csr_mask",
    jax.ShapeDtypeStruct((topology.n_in, topology.n_out), jnp.bool_),
    vmap_method="sequential",
  )
  return call(topology.csc_ptr, topology.csc_row, topology.csc_slot)


def native_rebuild(new_mask: jax.Array, old: CSRTopology) -> tuple[CSRTopology, jax.Array]:
  """The topology of ``new_mask`` (``[n_in, n_out]``, at most ``C`` True) and, per new slot,
  the old slot of the same weight (-1 for new weights and padding). One pass over the mask
  (a counting sort); rows ascend within each column of the CSC view."""
  _require()
  cap = old.capacity
  out = (
    jax.ShapeDtypeStruct((cap,), old.col.dtype),
    jax.ShapeDtypeStruct((old.n_out + 1,), jnp.int32),
    jax.ShapeDtypeStruct((old.n_in + 1,), jnp.int32),
    jax.ShapeDtypeStruct((cap,), old.csc_row.dtype),
    jax.ShapeDtypeStruct((cap,), jnp.int32),
    jax.ShapeDtypeStruct((cap,), jnp.int32),
  )
  call = jax.ffi.ffi_call("sparsejax_csr_rebuild", out, vmap_method="sequential")
  col, row_ptr, csc_ptr, csc_row, csc_slot, prev = call(
    new_mask.astype(jnp.bool_), old.col, old.row_ptr
  )
  new = CSRTopology(col, row_ptr, csc_ptr, csc_row, csc_slot, kernel_shape=old.kernel_shape)
  return new, prev


def _to_dense(per_slot: jax.Array, topology: CSRTopology) -> jax.Array:
  if per_slot.dtype != jnp.float32:
    return sparse_topology.scatter_slots(per_slot, topology)
  return native_to_dense(per_slot, topology)


def topology_ops() -> sparse_topology.TopologyOps:
  """The native topology ops on the CPU backend when built, else the pure-XLA ones."""
  if jax.default_backend() == "cpu" and native_available():
    return sparse_topology.TopologyOps(to_dense=_to_dense, mask=native_mask, rebuild=native_rebuild)
  return sparse_topology.XLA_OPS
