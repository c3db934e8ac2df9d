"""The topology of a trainable sparse layer: fixed-capacity CSR by output neuron + CSC view.

A truly sparse layer stores only its active weights (``values [C]``, the trainable leaf)
and this integer topology (pure ``jax.numpy``; no Flax, usable from every layer):

* ``col [C]`` int16 (int32 when ``n_in > 32767``): input index of each slot;
* ``row_ptr [n_out + 1]`` int32: the slots of output neuron ``j`` are
  ``row_ptr[j] .. row_ptr[j+1] - 1``, ascending in ``col`` (CSR order: by ``(row, col)``);
  ``nnz = row_ptr[n_out] <= C``; slots ``>= nnz`` are padding (value 0, in no row);
* ``csc_ptr [n_in + 1]`` int32, ``csc_row [C]`` int16/int32, ``csc_slot [C]`` int32: the
  transposed view (the entries of input ``i``, ascending in row), used by ``dX``.

The dense kernel this stands for has Flax's layout ``kernel_shape`` (``[in, out]`` for
Dense, ``[*window, in, out]`` for Conv); its 2-D view ``[n_in, n_out]`` flattens every axis
but the last into the fan-in (``n_in = prod(kernel_shape[:-1])``).

Shapes never change when the topology does: a DST update (RigL, SET, SRigL; fixed nnz)
rewrites ``col``, ``row_ptr`` and the CSC view in place. The capacity ``C`` is the layer's
nnz budget; it exceeds the nnz only for SRigL's constant fan-in with neuron ablation,
where ``nnz = k · n_active <= floor(n_in · n_out · density)`` (``C - nnz < n_active``
padding slots). An ablated neuron is an empty row (``row_ptr[j] == row_ptr[j+1]``).

Memory per slot: 4 B value + 2 B ``col`` + 2 B ``csc_row`` + 4 B ``csc_slot`` (int16
indices), against 4 B per dense weight (+4 B per optimizer moment either way).

References: SparseProp (Nikdan et al. 2023, arXiv:2302.04852), Nerva (Wesselink et al.
2024, arXiv:2407.17437), SRigL (Lasby et al. 2024, arXiv:2305.02299).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

INT16_MAX = 32767
"""Largest dimension whose indices are stored as int16 (int32 above)."""

_MAX_DENSE = 2**31 - 1


def index_dtype(n: int) -> np.dtype:
  """The index dtype for ``n`` rows or columns: int16 when ``n <= 32767``, else int32."""
  return np.dtype(np.int16) if n <= INT16_MAX else np.dtype(np.int32)


def fan_in_shape(kernel_shape: Sequence[int]) -> tuple[int, int]:
  """``(n_in, n_out)`` of a Flax kernel shape (every axis but the last is fan-in)."""
  shape = tuple(int(d) for d in kernel_shape)
  if len(shape) < 2:
    raise ValueError(f"a sparse kernel needs ndim >= 2 ([..., in, out]), got shape {shape}.")
  return math.prod(shape[:-1]), shape[-1]


@dataclasses.dataclass(frozen=True)
class CSRTopology:
  """Integer topology of one sparse layer (a JAX pytree; ``kernel_shape`` is static).

  Attributes:
    col: ``[C]`` int16/int32 input index of each slot (0 for padding).
    row_ptr: ``[n_out + 1]`` int32 row pointers; ``row_ptr[-1]`` is the nnz.
    csc_ptr: ``[n_in + 1]`` int32 column pointers of the CSC view.
    csc_row: ``[C]`` int16/int32 output index of each CSC entry.
    csc_slot: ``[C]`` int32 slot (CSR position) of each CSC entry.
    kernel_shape: the dense kernel's shape (static), e.g. ``(in, out)``.
  """

  col: jax.Array
  row_ptr: jax.Array
  csc_ptr: jax.Array
  csc_row: jax.Array
  csc_slot: jax.Array
  kernel_shape: tuple[int, ...] = ()

  @property
  def n_in(self) -> int:
    """Fan-in size (product of every kernel axis but the last)."""
    return fan_in_shape(self.kernel_shape)[0]

  @property
  def n_out(self) -> int:
    """Number of output neurons."""
    return fan_in_shape(self.kernel_shape)[1]

  @property
  def capacity(self) -> int:
    """``C``: number of slots (static)."""
    return int(self.col.shape[0])

  @property
  def nnz(self) -> jax.Array:
    """Number of active slots (``row_ptr[-1]``; a traced scalar under jit)."""
    return self.row_ptr[-1]

  @property
  def nbytes(self) -> int:
    """Bytes of the integer arrays."""
    arrays = (self.col, self.row_ptr, self.csc_ptr, self.csc_row, self.csc_slot)
    return int(sum(a.size * np.dtype(a.dtype).itemsize for a in arrays))


jax.tree_util.register_dataclass(
  CSRTopology,
  data_fields=["col", "row_ptr", "csc_ptr", "csc_row", "csc_slot"],
  meta_fields=["kernel_shape"],
)


def _check_dense_size(n_in: int, n_out: int) -> None:
  if n_in * n_out > _MAX_DENSE:
    raise ValueError(
      f"a sparse layer of {n_in} x {n_out} weights has more than 2**31 - 1 positions; "
      "topology updates index the dense layer with int32, so it is not supported."
    )


def topology_from_mask(
  mask: jax.Array, capacity: int, kernel_shape: Sequence[int]
) -> tuple[CSRTopology, jax.Array]:
  """Builds the topology of a dense mask (jit-safe: ``capacity`` is static).

  Args:
    mask: bool, shaped ``kernel_shape`` or ``[n_in, n_out]``; at most ``capacity`` True.
    capacity: ``C``, the number of slots (extra slots are padding).
    kernel_shape: the dense kernel's shape.

  Returns:
    ``(topology, slot_of)``: the topology, and ``slot_of [n_in, n_out]`` int32, the slot of
    each active position (-1 elsewhere). Entries beyond ``capacity`` are dropped (callers
    pass masks with at most ``capacity`` True).
  """
  n_in, n_out = fan_in_shape(kernel_shape)
  _check_dense_size(n_in, n_out)
  m = jnp.asarray(mask).reshape(n_in, n_out).astype(bool)
  size = n_in * n_out
  # CSR: nonzeros of mask^T in row-major order, i.e. sorted by (row, col).
  (pos,) = jnp.nonzero(m.T.reshape(-1), size=capacity, fill_value=size)
  pos = pos.astype(jnp.int32)
  valid = pos < size
  row = jnp.where(valid, pos // n_in, n_out)
  col = jnp.where(valid, pos % n_in, 0)
  row_ptr = jnp.concatenate(
    [jnp.zeros((1,), jnp.int32), jnp.cumsum(jnp.sum(m, axis=0, dtype=jnp.int32))]
  )
  slots = jnp.arange(capacity, dtype=jnp.int32)
  slot_of = jnp.full((n_in, n_out), -1, jnp.int32).at[col, row].set(slots, mode="drop")
  # CSC: nonzeros of mask in row-major order, i.e. sorted by (col, row).
  (cpos,) = jnp.nonzero(m.reshape(-1), size=capacity, fill_value=size)
  cpos = cpos.astype(jnp.int32)
  cvalid = cpos < size
  ccol = jnp.where(cvalid, cpos // n_out, 0)
  crow = jnp.where(cvalid, cpos % n_out, 0)
  csc_slot = jnp.where(cvalid, slot_of[ccol, crow], 0)
  csc_ptr = jnp.concatenate(
    [jnp.zeros((1,), jnp.int32), jnp.cumsum(jnp.sum(m, axis=1, dtype=jnp.int32))]
  )
  topo = CSRTopology(
    col=col.astype(index_dtype(n_in)),
    row_ptr=row_ptr,
    csc_ptr=csc_ptr,
    csc_row=crow.astype(index_dtype(n_out)),
    csc_slot=csc_slot.astype(jnp.int32),
    kernel_shape=tuple(int(d) for d in kernel_shape),
  )
  return topo, slot_of


def slot_rows(topology: CSRTopology) -> jax.Array:
  """int32 ``[C]``: the output neuron of each slot (``n_out`` for padding slots)."""
  slots = jnp.arange(topology.capacity, dtype=jnp.int32)
  return (jnp.searchsorted(topology.row_ptr, slots, side="right") - 1).astype(jnp.int32)


def scatter_slots(per_slot: jax.Array, topology: CSRTopology, fill=0) -> jax.Array:
  """The ``[n_in, n_out]`` dense array with ``per_slot[p]`` at each active slot's position.

  Padding slots are dropped; every other position holds ``fill``.
  """
  n_in, n_out = topology.n_in, topology.n_out
  rows = slot_rows(topology)
  cols = topology.col.astype(jnp.int32)
  dense = jnp.full((n_in, n_out), fill, per_slot.dtype)
  return dense.at[cols, rows].set(per_slot, mode="drop")


def dense_mask(topology: CSRTopology) -> jax.Array:
  """bool ``[n_in, n_out]``: the layer's mask."""
  return scatter_slots(jnp.ones((topology.capacity,), bool), topology, False)


def dense_kernel(values: jax.Array, topology: CSRTopology) -> jax.Array:
  """The dense kernel (``kernel_shape``) with the layer's values, 0 elsewhere."""
  return scatter_slots(values, topology).reshape(topology.kernel_shape)


def gather_slots(dense: jax.Array, topology: CSRTopology) -> jax.Array:
  """``[C]``: ``dense[col, row]`` of each slot (0 for padding); ``dense`` is 2-D or kernel-shaped."""
  d = jnp.asarray(dense).reshape(topology.n_in, topology.n_out)
  rows = slot_rows(topology)
  valid = rows < topology.n_out
  out = d[topology.col.astype(jnp.int32), jnp.minimum(rows, topology.n_out - 1)]
  return jnp.where(valid, out, jnp.zeros_like(out))


def previous_slots(old: CSRTopology, new: CSRTopology) -> jax.Array:
  """int32 ``[C]``: for each slot of ``new``, the slot of ``old`` holding the same weight
  (-1 for new weights and padding)."""
  old_slot = scatter_slots(jnp.arange(old.capacity, dtype=jnp.int32), old, -1)
  rows = slot_rows(new)
  valid = rows < new.n_out
  prev = old_slot[new.col.astype(jnp.int32), jnp.minimum(rows, new.n_out - 1)]
  return jnp.where(valid, prev, -1)


def rebuild(new_mask: jax.Array, old: CSRTopology) -> tuple[CSRTopology, jax.Array]:
  """The topology of ``new_mask`` (same capacity) and :func:`previous_slots` from ``old``."""
  new, _ = topology_from_mask(new_mask, old.capacity, old.kernel_shape)
  return new, previous_slots(old, new)


class TopologyOps(NamedTuple):
  """The dense views a topology update needs (pure XLA here; native C++ on the CPU).

  Attributes:
    to_dense: ``(per_slot [C], topology) -> [n_in, n_out]`` (0 at inactive positions).
    mask: ``topology -> bool [n_in, n_out]``.
    rebuild: ``(new_mask [n_in, n_out], old topology) -> (new topology, previous slots)``.
  """

  to_dense: Callable[[jax.Array, CSRTopology], jax.Array]
  mask: Callable[[CSRTopology], jax.Array]
  rebuild: Callable[[jax.Array, CSRTopology], tuple[CSRTopology, jax.Array]]


XLA_OPS = TopologyOps(to_dense=scatter_slots, mask=dense_mask, rebuild=rebuild)
"""Pure-XLA topology ops (every backend and dtype)."""
