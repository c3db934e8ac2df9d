"""Trainable sparse format: fixed-capacity CSR (and its constant-fan-in special case).

:class:`SparseCSR` is one sparse layer as ``values [C]`` (the trainable leaf) plus its
integer :class:`~sparsejax.sparse.CSRTopology` (CSR by output neuron with a CSC view; see
``transforms/sparse_topology.py`` for the layout). Shapes are static under DST: RigL, SET
and static sparsity keep nnz, so ``C = nnz``; SRigL keeps a constant fan-in ``k`` per
active neuron and may ablate neurons, which changes ``k``: its capacity is the budget
``floor(size · density)``, and ``k · n_active <= C`` (at most ``n_active - 1`` padding
slots, i.e. < 0.1% of the values at 90% sparsity on a 4096² layer). The condensed
``[n_out, k]`` layout is this CSR with equal row lengths (:meth:`SparseCSR.fan_in_view`,
:meth:`SparseCSR.to_condensed`).

Conversions run on concrete arrays (the nnz decides the shapes): :meth:`SparseCSR.from_dense`
(kernel + mask), :meth:`SparseCSR.from_condensed` (the SRigL inference format),
:meth:`SparseCSR.to_dense`. Errors are clear: a non-floating dtype, a mask that does not
fit the capacity, or (``constant_fan_in=True``) a mask whose active neurons' fan-ins
differ raise ``ValueError`` / :class:`~sparsejax.condensed.NotConstantFanInError`;
:meth:`SparseCSR.validate` checks a topology's indices (out of range, unsorted pointers).

Memory (:func:`training_nbytes`): per slot 4 B value + 2 B col + 2 B csc_row + 4 B csc_slot
with int16 indices, plus 4 B per optimizer moment; dense training keeps 4 B per weight and
per moment. At 90% sparsity with Adam: ``0.1 · (12 + 8) / 12 ≈ 0.17`` of the dense bytes.

References: SRigL (Lasby et al. 2024, arXiv:2305.02299), SparseProp (arXiv:2302.04852).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src import base
from sparsejax._src.formats.condensed import Condensed, NotConstantFanInError
from sparsejax._src.primitives import selection
from sparsejax._src.transforms import sparse_topology as topo_lib
from sparsejax._src.transforms.sparse_topology import CSRTopology

__all__ = ["SparseCSR", "random_mask", "training_nbytes", "tree_nbytes"]

_FLOATS = ("float32", "bfloat16", "float16", "float64")


def _host(name: str, a: Any) -> np.ndarray:
  if isinstance(a, jax.core.Tracer):
    raise ValueError(
      f"SparseCSR needs a concrete `{name}` (its shapes depend on the mask); call it outside "
      "jax.jit / grad / vmap."
    )
  return np.asarray(a)


def random_mask(key: jax.Array, shape: Sequence[int], sparsity: float) -> jax.Array:
  """A uniformly random bool mask with exactly ``size - floor(size · sparsity)`` True."""
  base.check_sparsity("sparsity", sparsity)
  nnz = base.nnz_for_sparsity(base.shape_size(shape), float(sparsity))
  return selection.topk_mask(jax.random.uniform(key, tuple(shape)), nnz)


def _host_topology(
  m: np.ndarray, capacity: int, kernel_shape: Sequence[int]
) -> tuple[CSRTopology, np.ndarray]:
  """NumPy twin of ``topology_from_mask`` for concrete masks (fast on large layers).

  Returns the topology and the flat ``[n_out, n_in]`` positions of the active slots.
  """
  n_in, n_out = m.shape
  order = np.flatnonzero(m.T)  # sorted by (row, col): CSR order
  nnz = order.size
  col = np.zeros((capacity,), topo_lib.index_dtype(n_in))
  col[:nnz] = order % n_in
  row_ptr = np.concatenate([[0], np.cumsum(m.sum(axis=0))]).astype(np.int32)
  slot_of = np.full((n_in, n_out), -1, np.int32)
  slot_of[order % n_in, order // n_in] = np.arange(nnz, dtype=np.int32)
  cpos = np.flatnonzero(m)  # sorted by (col, row): CSC order
  csc_row = np.zeros((capacity,), topo_lib.index_dtype(n_out))
  csc_row[:nnz] = cpos % n_out
  csc_slot = np.zeros((capacity,), np.int32)
  csc_slot[:nnz] = slot_of.reshape(-1)[cpos]
  csc_ptr = np.concatenate([[0], np.cumsum(m.sum(axis=1))]).astype(np.int32)
  topo = CSRTopology(
    col=jnp.asarray(col),
    row_ptr=jnp.asarray(row_ptr),
    csc_ptr=jnp.asarray(csc_ptr),
    csc_row=jnp.asarray(csc_row),
    csc_slot=jnp.asarray(csc_slot),
    kernel_shape=tuple(int(d) for d in kernel_shape),
  )
  return topo, order


@dataclasses.dataclass(frozen=True)
class SparseCSR:
  """One trainable sparse layer: ``values [C]`` + :class:`CSRTopology` (a JAX pytree).

  Attributes:
    values: ``[C]`` floating weights (0 at padding slots).
    topology: the integer topology (``kernel_shape`` static).
  """

  values: jax.Array
  topology: CSRTopology

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    """Shape of the dense kernel this layer stands for."""
    return self.topology.kernel_shape

  @property
  def capacity(self) -> int:
    """``C``, the number of slots."""
    return self.topology.capacity

  @classmethod
  def from_dense(
    cls,
    kernel: Any,
    mask: Any | None = None,
    *,
    capacity: int | None = None,
    constant_fan_in: bool = False,
  ) -> SparseCSR:
    """Stores the masked entries of a dense kernel.

    Args:
      kernel: ``[..., in, out]`` floating kernel (Flax layout; every axis but the last
        is fan-in). float32 runs on the native kernels; bfloat16/float16/float64 on XLA.
      mask: same shape (nonzero = active); default: the nonzeros of ``kernel``.
      capacity: number of slots (default: nnz); must be ``>= nnz``.
      constant_fan_in: require every active neuron to keep the same number of inputs
        (the condensed/SRigL format).

    Returns:
      The layer; ``to_dense()`` equals ``kernel · mask``.

    Raises:
      ValueError: non-floating kernel, rank < 2, mask of another shape, capacity < nnz,
        a tracer input.
      NotConstantFanInError: ``constant_fan_in=True`` and the fan-ins differ.
    """
    k = _host("kernel", kernel)
    if str(k.dtype) not in _FLOATS:
      raise ValueError(
        f"SparseCSR: the kernel must be float32, bfloat16, float16 or float64, got {k.dtype}."
      )
    if k.ndim < 2:
      raise ValueError(f"SparseCSR: the kernel must have rank >= 2, got shape {k.shape}.")
    m = (k != 0) if mask is None else _host("mask", mask)
    if m.shape != k.shape:
      raise ValueError(f"SparseCSR: mask shape {m.shape} does not match kernel shape {k.shape}.")
    m = m.astype(bool)
    n_in, n_out = topo_lib.fan_in_shape(k.shape)
    fan_in = m.reshape(n_in, n_out).sum(axis=0)
    if constant_fan_in:
      distinct = np.unique(fan_in[fan_in > 0])
      if distinct.size > 1:
        raise NotConstantFanInError(
          f"the mask is not constant fan-in: active neurons keep {distinct[:8].tolist()} "
          "inputs; the condensed (SRigL) format needs one fan-in k for every active neuron."
        )
    nnz = int(fan_in.sum())
    capacity = nnz if capacity is None else int(capacity)
    if capacity < nnz:
      raise ValueError(f"SparseCSR: capacity {capacity} is below the mask's nnz {nnz}.")
    topo, order = _host_topology(m.reshape(n_in, n_out), capacity, k.shape)
    values = np.zeros((capacity,), k.dtype)
    values[: order.size] = k.reshape(n_in, n_out).T.reshape(-1)[order]
    return cls(jnp.asarray(values), topo)

  @classmethod
  def from_mask(cls, kernel: jax.Array, mask: jax.Array, capacity: int) -> SparseCSR:
    """Traceable :meth:`from_dense` (inside ``jit``/``eval_shape``): no checks on values.

    Args:
      kernel: ``[..., in, out]`` floating kernel.
      mask: bool, same shape, at most ``capacity`` True (extra entries are dropped).
      capacity: number of slots (static).
    """
    topo, _ = topo_lib.topology_from_mask(mask, int(capacity), tuple(kernel.shape))
    return cls(topo_lib.gather_slots(kernel, topo), topo)

  @classmethod
  def from_condensed(cls, condensed: Condensed, *, capacity: int | None = None) -> SparseCSR:
    """From the condensed inference format (:func:`sparsejax.condense`)."""
    dense = np.zeros((condensed.in_features, condensed.out_features), np.float32)
    dense = dense.astype(np.asarray(condensed.values).dtype)
    mask = np.zeros(dense.shape, bool)
    cols = np.asarray(condensed.indices, np.int64)
    rows = np.broadcast_to(np.asarray(condensed.active, np.int64)[:, None], cols.shape)
    dense[cols, rows] = np.asarray(condensed.values)
    mask[cols, rows] = True
    shape = condensed.kernel_shape
    return cls.from_dense(dense.reshape(shape), mask.reshape(shape), capacity=capacity)

  def to_dense(self) -> jax.Array:
    """The dense kernel (``kernel_shape``), 0 at inactive positions."""
    return topo_lib.dense_kernel(self.values, self.topology)

  def mask(self) -> jax.Array:
    """bool kernel-shaped mask of the active slots."""
    return topo_lib.dense_mask(self.topology).reshape(self.kernel_shape)

  def fan_in_view(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The condensed view ``(values [R, k], col [R, k], active [R])`` of a constant-fan-in
    layer (``R`` active neurons; host arrays).

    Raises:
      NotConstantFanInError: the active neurons' fan-ins differ.
    """
    row_ptr = _host("row_ptr", self.topology.row_ptr)
    counts = np.diff(row_ptr)
    active = np.nonzero(counts)[0].astype(np.int32)
    distinct = np.unique(counts[active])
    if distinct.size > 1:
      raise NotConstantFanInError(
        f"the layer is not constant fan-in: its neurons keep {distinct[:8].tolist()} inputs."
      )
    k = int(distinct[0]) if distinct.size else 0
    n = k * active.size
    values = np.asarray(self.values)[:n].reshape(active.size, k)
    col = np.asarray(self.topology.col)[:n].reshape(active.size, k)
    return jnp.asarray(values), jnp.asarray(col), jnp.asarray(active)

  def to_condensed(self, bias: Any | None = None) -> Condensed:
    """The condensed inference layer (:class:`~sparsejax.Condensed`) of a constant-fan-in
    layer, e.g. to serve a model trained with SRigL.

    Raises:
      NotConstantFanInError: the active neurons' fan-ins differ.
    """
    values, col, active = self.fan_in_view()
    n_in, n_out = self.topology.n_in, self.topology.n_out
    return Condensed(
      values=values,
      indices=col.astype(topo_lib.index_dtype(n_in)),
      active=active,
      bias=None if bias is None else jnp.asarray(bias),
      dense=None,
      in_features=n_in,
      out_features=n_out,
      kernel_shape=self.kernel_shape,
    )

  def validate(self) -> None:
    """Checks the topology on the host (pointers, index ranges, the CSC view).

    Raises:
      ValueError: naming the array and the first bad entry.
    """
    t = self.topology
    n_in, n_out, cap = t.n_in, t.n_out, t.capacity
    row_ptr, csc_ptr = _host("row_ptr", t.row_ptr), _host("csc_ptr", t.csc_ptr)
    for name, ptr, n in (("row_ptr", row_ptr, n_out), ("csc_ptr", csc_ptr, n_in)):
      if ptr.shape != (n + 1,) or ptr[0] != 0 or np.any(np.diff(ptr) < 0) or ptr[-1] > cap:
        raise ValueError(
          f"SparseCSR: {name} must be [{n + 1}] non-decreasing from 0 up to at most the "
          f"capacity {cap}."
        )
    nnz = int(row_ptr[-1])
    if int(csc_ptr[-1]) != nnz:
      raise ValueError(f"SparseCSR: the CSC view holds {csc_ptr[-1]} entries, the CSR {nnz}.")
    for name, arr, limit in (
      ("col", t.col, n_in),
      ("csc_row", t.csc_row, n_out),
      ("csc_slot", t.csc_slot, nnz),
    ):
      a = _host(name, arr)[:nnz].astype(np.int64)
      bad = np.nonzero((a < 0) | (a >= limit))[0]
      if bad.size:
        raise ValueError(f"SparseCSR: {name}[{bad[0]}] = {a[bad[0]]} is out of range [0, {limit}).")
    if self.values.shape != (cap,):
      raise ValueError(f"SparseCSR: values has shape {self.values.shape}, expected ({cap},).")


jax.tree_util.register_dataclass(SparseCSR, data_fields=["values", "topology"], meta_fields=[])


def tree_nbytes(tree: Any) -> int:
  """Bytes of every array leaf of ``tree``."""
  return int(
    sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))
  )


def training_nbytes(params: Any, opt_state: Any, topologies: Any = None) -> int:
  """Bytes of the weights, the optimizer state and (for sparse layers) the topologies."""
  return tree_nbytes(params) + tree_nbytes(opt_state) + tree_nbytes(topologies)
