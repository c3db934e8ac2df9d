"""Pallas kernel bodies and the ``pallas_call`` builder of the N:M matmul.

This module is imported lazily, by :mod:`sparsejax._src.kernels.nm_launch`, the first
time a Pallas kernel is traced: importing ``sparsejax`` does not load
``jax.experimental.pallas``. The public entry points live in
:mod:`sparsejax._src.kernels.nm_matmul`. Design (``docs/KERNELS.md`` §2, §6):

* **Forward** ``y = x @ W``: every kernel instance decompresses a
  ``[bk, bn]`` tile of ``W`` from ``values``/``indices`` with compare + select
  (``where(idx == slot, value, acc)`` over the N slots; no gathers, which no
  Pallas backend lowers well) and feeds it to a dense ``jnp.dot`` with f32
  accumulation.
* **dX** ``dy @ W^T``: the same tile decompression, contracted over Nout.
* **dValues** ``compress(x^T @ dy)``: an SDDMM. The dense ``[bk, bn]`` tile
  of ``x^T dy`` is accumulated in f32 over the batch, then the kept entries are
  picked with compare + select + sum and written in compressed layout.
  ``indices`` get no cotangent.

Two schedules implement the reductions (K for the forward, Nout for dX, the
batch for dValues):

* ``"grid"`` (TPU, and the default in interpret mode): the reduction is the
  last, sequential grid axis and the accumulator is an f32 VMEM scratch that is
  initialised at the first and written out at the last step.
* ``"loop"`` (GPU): Pallas' Triton backend runs grid programs in parallel and
  has no scratch memory, so the grid covers output tiles only and the
  reduction is a ``lax.fori_loop`` inside the kernel with a register
  accumulator (the pattern of ``jax.experimental.pallas.ops.gpu.attention``).
  Tiles are read with strided ``pl.ds`` loads, so every loaded array has a
  power-of-2 size as Triton requires.

All six kernels (three products x two schedules) go through one builder,
:func:`pallas_matmul`, which derives the grid, block specs, scratch and output
shape from a small table (:data:`_PRODUCTS`) naming each operand's axes.

Hardware status (read before relying on the compiled paths): every kernel
and both schedules were run and checked against the reference in interpret
mode on CPU (jax 0.10.2). The ``"loop"`` kernels were lowered to Triton IR for
``cuda`` from a CPU machine (``jax.export``, see ``tests/nm_kernels_test.py``;
the Triton modules also passed the MLIR verifier in a one-off check) and the
``"grid"`` kernels to Mosaic MLIR for ``tpu``, but **none of them has been
compiled by Triton/Mosaic or run on a GPU or TPU**: Triton's own compilation
passes (shared memory, register pressure) and Mosaic's layout passes (e.g.
strided int8 loads) are untested, and the block sizes are untuned. On a
GPU, fp32 kernel dots use Triton's TF32 input precision (the lowering maps
``Precision.DEFAULT`` to TF32), so expect ~1e-3 relative error against an
exact fp32 reference there.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

if TYPE_CHECKING:
  from sparsejax._src.kernels.nm_launch import KernelConfig, Plan

__all__ = ["pallas_matmul"]

_GPU_COMPILER_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=3)
_TPU_DIMENSION_SEMANTICS = ("parallel", "parallel", "arbitrary")

_NT = (((1,), (1,)), ((), ()))  # a [p, r] . b [q, r] -> [p, q]
_TN = (((0,), (0,)), ((), ()))  # a [r, p] . b [r, q] -> [p, q]


# ---------------------------------------------------------------------------
# Tile (de)compression, compare + select only
# ---------------------------------------------------------------------------


def _load_slot(ref: Any, row0: Any, j: int, g: int, n: int, cols: Any) -> jax.Array:
  """Rows ``row0 + j, row0 + j + n, ...`` (slot j of g groups): ``[g, bn]``."""
  return ref[pl.ds(row0 + j, g, stride=n), cols]


def _dense_tile(
  v_ref: Any, i_ref: Any, row0: Any, cols: Any, *, g: int, n: int, m: int, dtype: Any
) -> jax.Array:
  """Decompresses ``g`` groups (``g*n`` compressed rows) to a dense ``[g*m, bn]`` tile."""
  slot = lax.broadcasted_iota(jnp.int32, (1, m, 1), 1)
  w = None
  for j in range(n):
    vj = _load_slot(v_ref, row0, j, g, n, cols).astype(dtype)
    ij = _load_slot(i_ref, row0, j, g, n, cols).astype(jnp.int32)
    prev = jnp.zeros((), dtype) if w is None else w
    w = jnp.where(ij[:, None, :] == slot, vj[:, None, :], prev)
  return w.reshape(g * m, w.shape[-1])


def _store_compressed(
  dw: jax.Array, i_ref: Any, o_ref: Any, row0: Any, cols: Any, *, g: int, n: int, m: int
) -> None:
  """Writes the kept entries of a dense f32 ``[g*m, bn]`` tile in compressed layout."""
  dw3 = dw.reshape(g, m, dw.shape[-1])
  slot = lax.broadcasted_iota(jnp.int32, (1, m, 1), 1)
  for j in range(n):
    ij = _load_slot(i_ref, row0, j, g, n, cols).astype(jnp.int32)
    picked = jnp.sum(jnp.where(ij[:, None, :] == slot, dw3, 0.0), axis=1)
    o_ref[pl.ds(row0 + j, g, stride=n), cols] = picked.astype(o_ref.dtype)


# ---------------------------------------------------------------------------
# "grid" schedule kernels (sequential reduction grid axis + f32 scratch)
# ---------------------------------------------------------------------------


def _grid_reduce(
  acc_ref: Any, o_ref: Any, update: Callable[[], jax.Array], emit: Callable[[], None] | None = None
) -> None:
  """One step of a reduction over the last grid axis into the f32 scratch ``acc_ref``.

  Zeroes the accumulator at the first step, adds ``update()`` at every step and, at the
  last step, calls ``emit()`` to write the output block (default: ``acc_ref`` cast to
  ``o_ref.dtype``).
  """
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  acc_ref[...] += update()

  @pl.when(step == pl.num_programs(2) - 1)
  def _emit():
    if emit is None:
      o_ref[...] = acc_ref[...].astype(o_ref.dtype)
    else:
      emit()


def _fwd_grid_kernel(x_ref, v_ref, i_ref, o_ref, acc_ref, *, n: int, m: int) -> None:
  """Forward, ``"grid"`` schedule: one ``[bm, bn]`` output block, K on grid axis 2."""

  def update():
    x = x_ref[...]
    w = _dense_tile(v_ref, i_ref, 0, slice(None), g=x.shape[1] // m, n=n, m=m, dtype=x.dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32)

  _grid_reduce(acc_ref, o_ref, update)


def _dx_grid_kernel(dy_ref, v_ref, i_ref, o_ref, acc_ref, *, n: int, m: int) -> None:
  """dX, ``"grid"`` schedule: one ``[bm, bk]`` output block, Nout on grid axis 2."""

  def update():
    dy = dy_ref[...]
    g = o_ref.shape[1] // m
    w = _dense_tile(v_ref, i_ref, 0, slice(None), g=g, n=n, m=m, dtype=dy.dtype)
    return lax.dot_general(dy, w, _NT, preferred_element_type=jnp.float32)

  _grid_reduce(acc_ref, o_ref, update)


def _dv_grid_kernel(x_ref, dy_ref, i_ref, o_ref, acc_ref, *, n: int, m: int) -> None:
  """dValues, ``"grid"`` schedule: one ``[bk*n/m, bn]`` block, batch on grid axis 2."""

  def update():
    return lax.dot_general(x_ref[...], dy_ref[...], _TN, preferred_element_type=jnp.float32)

  def emit():
    g = acc_ref.shape[0] // m
    _store_compressed(acc_ref[...], i_ref, o_ref, 0, slice(None), g=g, n=n, m=m)

  _grid_reduce(acc_ref, o_ref, update, emit)


# ---------------------------------------------------------------------------
# "loop" schedule kernels (parallel grid over outputs, in-kernel reduction)
#
# ``block`` is the block of the reduction axis (bk for the forward, bn for dX, bm
# for dValues) and ``steps`` the number of blocks the loop runs over.
# ---------------------------------------------------------------------------


def _fwd_loop_kernel(x_ref, v_ref, i_ref, o_ref, *, n: int, m: int, block: int, steps: int) -> None:
  """Forward, ``"loop"`` schedule: one ``[bm, bn]`` output block, loop over K."""
  bk = block
  bkc, g = bk * n // m, bk // m

  def body(kk, acc):
    x = x_ref[:, pl.ds(pl.multiple_of(kk * bk, bk), bk)]
    row0 = kk * bkc
    w = _dense_tile(v_ref, i_ref, row0, slice(None), g=g, n=n, m=m, dtype=x.dtype)
    return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _dx_loop_kernel(dy_ref, v_ref, i_ref, o_ref, *, n: int, m: int, block: int, steps: int) -> None:
  """dX, ``"loop"`` schedule: one ``[bm, bk]`` output block, loop over Nout."""
  bn = block
  g = o_ref.shape[1] // m

  def body(jj, acc):
    cols = pl.ds(pl.multiple_of(jj * bn, bn), bn)
    dy = dy_ref[:, cols]
    w = _dense_tile(v_ref, i_ref, 0, cols, g=g, n=n, m=m, dtype=dy.dtype)
    return acc + lax.dot_general(dy, w, _NT, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _dv_loop_kernel(x_ref, dy_ref, i_ref, o_ref, *, n: int, m: int, block: int, steps: int) -> None:
  """dValues, ``"loop"`` schedule: one ``[bk*n/m, bn]`` block, loop over the batch."""
  bm, bk = block, x_ref.shape[1]

  def body(bb, acc):
    rows = pl.ds(pl.multiple_of(bb * bm, bm), bm)
    return acc + lax.dot_general(
      x_ref[rows, :], dy_ref[rows, :], _TN, preferred_element_type=jnp.float32
    )

  acc = lax.fori_loop(0, steps, body, jnp.zeros((bk, o_ref.shape[1]), jnp.float32))
  _store_compressed(acc, i_ref, o_ref, 0, slice(None), g=bk // m, n=n, m=m)


# ---------------------------------------------------------------------------
# The one pallas_call builder
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Product:
  """One of the three products, described by the axes of its operands.

  Axis letters: ``"b"`` batch, ``"k"`` contraction, ``"n"`` output features, and
  ``"c"`` the compressed contraction rows of ``values``/``indices`` (``k * n/m``;
  it shares the grid axis of ``"k"``).

  Attributes:
    name: the ``pallas_call`` name.
    operands: the two axes of every input, in call order.
    out: the two axes of the output.
    reduce: the reduction axis (the last grid axis of the ``"grid"`` schedule, the
      in-kernel loop of the ``"loop"`` schedule).
    grid_kernel: the ``"grid"`` schedule kernel body.
    loop_kernel: the ``"loop"`` schedule kernel body.
  """

  name: str
  operands: tuple[str, ...]
  out: str
  reduce: str
  grid_kernel: Callable[..., None]
  loop_kernel: Callable[..., None]


_PRODUCTS = {
  # y [b, n] = x [b, k] @ W (values/indices [c, n]), reduce over k.
  "fwd": _Product(
    "nm_matmul_fwd", ("bk", "cn", "cn"), "bn", "k", _fwd_grid_kernel, _fwd_loop_kernel
  ),
  # dx [b, k] = dy [b, n] @ W^T, reduce over n.
  "dx": _Product("nm_matmul_dx", ("bn", "cn", "cn"), "bk", "n", _dx_grid_kernel, _dx_loop_kernel),
  # dvalues [c, n] = compress(x [b, k]^T @ dy [b, n]), reduce over b.
  "dv": _Product(
    "nm_matmul_dvalues", ("bk", "bn", "cn"), "cn", "b", _dv_grid_kernel, _dv_loop_kernel
  ),
}


def _call_kwargs(cfg: KernelConfig, schedule: str) -> dict[str, Any]:
  """Backend keyword arguments of ``pl.pallas_call`` (interpret flag or compiler params)."""
  if cfg.target == "interpret":
    return {"interpret": True}
  if cfg.target == "gpu":
    if schedule != "loop":
      raise ValueError(
        "schedule='grid' is not supported on GPU: Pallas' Triton backend has no "
        "scratch memory and runs grid programs in parallel; use schedule='loop'."
      )
    return {"compiler_params": _GPU_COMPILER_PARAMS}
  if schedule == "grid":
    return {"compiler_params": pltpu.CompilerParams(dimension_semantics=_TPU_DIMENSION_SEMANTICS)}
  return {"compiler_params": pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))}


def _block_spec(axes: str, grid_axes: Sequence[str], sizes: dict[str, tuple[int, int]]):
  """The ``BlockSpec`` of an operand with the given axes.

  An axis on the grid gets its block and follows its grid index; an axis off the grid
  (the reduction axis of the ``"loop"`` schedule) is loaded whole, at block index 0.
  """
  on_grid = [a.replace("c", "k") in grid_axes for a in axes]
  block = tuple(sizes[a][0] if g else sizes[a][1] for a, g in zip(axes, on_grid, strict=True))
  pos = tuple(
    grid_axes.index(a.replace("c", "k")) if g else None for a, g in zip(axes, on_grid, strict=True)
  )

  def index_map(*grid_idx):
    return tuple(0 if q is None else grid_idx[q] for q in pos)

  return pl.BlockSpec(block, index_map)


def _pad2(a: jax.Array, rows: int, cols: int) -> jax.Array:
  """Zero-pads a 2-D array at the end of both axes to ``[rows, cols]``."""
  if a.shape == (rows, cols):
    return a
  return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def pallas_matmul(
  product: str,
  operands: Sequence[jax.Array],
  *,
  n: int,
  m: int,
  dims: tuple[int, int, int],
  p: Plan,
  cfg: KernelConfig,
  out_dtype: Any,
) -> jax.Array:
  """Runs one N:M product (``"fwd"``, ``"dx"`` or ``"dv"``) as a ``pallas_call``.

  The operands are zero-padded to the plan's padded sizes (padding ``values`` copies
  the weights), the kernel runs on the padded problem and the output is sliced back.

  Args:
    product: which product, a key of :data:`_PRODUCTS`.
    operands: the unpadded 2-D inputs, in the order of ``_PRODUCTS[product].operands``
      (``x, values, indices``; ``dy, values, indices``; ``x, dy, indices``).
    n: kept entries per group.
    m: group size.
    dims: the unpadded problem size ``(B, K, Nout)``.
    p: block sizes and padded sizes (:class:`~sparsejax._src.kernels.nm_launch.Plan`).
    cfg: target, schedule and block settings.
    out_dtype: dtype of the output.

  Returns:
    ``[B, Nout]`` (fwd), ``[B, K]`` (dx) or ``[K*n/m, Nout]`` (dv) in ``out_dtype``.
  """
  prod = _PRODUCTS[product]
  schedule = cfg.resolved_schedule()
  kwargs = _call_kwargs(cfg, schedule)
  sizes = {  # axis -> (block, padded extent)
    "b": (p.bm, p.b_pad),
    "k": (p.bk, p.k_pad),
    "c": (p.bk * n // m, p.k_pad * n // m),
    "n": (p.bn, p.n_pad),
  }
  b, k, nout = dims
  logical = {"b": b, "k": k, "c": k * n // m, "n": nout}  # axis -> unpadded extent
  grid_axes = tuple(a.replace("c", "k") for a in prod.out)
  if schedule == "grid":
    grid_axes += (prod.reduce,)
    kernel = functools.partial(prod.grid_kernel, n=n, m=m)
    acc = tuple(sizes[a.replace("c", "k")][0] for a in prod.out)
    kwargs["scratch_shapes"] = [pltpu.VMEM(acc, jnp.float32)]
  else:
    block, extent = sizes[prod.reduce]
    kernel = functools.partial(prod.loop_kernel, n=n, m=m, block=block, steps=extent // block)
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct(tuple(sizes[a][1] for a in prod.out), out_dtype),
    grid=tuple(sizes[a][1] // sizes[a][0] for a in grid_axes),
    in_specs=[_block_spec(axes, grid_axes, sizes) for axes in prod.operands],
    out_specs=_block_spec(prod.out, grid_axes, sizes),
    name=prod.name,
    **kwargs,
  )(*(_pad2(a, sizes[r][1], sizes[c][1]) for (r, c), a in zip(prod.operands, operands)))
  rows, cols = prod.out
  return out[: logical[rows], : logical[cols]]


def __getattr__(name: str) -> Any:
  """Serves the entry points that moved to :mod:`sparsejax._src.kernels.nm_matmul`.

  ``nm_matmul``, ``nm_matmul_dense_grad``, ``nm_matmul_reference`` and the direct
  ``nm_matmul_*_kernel`` entry points used to live here; importing them from this
  module keeps working (and loads Pallas, which importing ``nm_matmul`` does not).
  """
  if name.startswith("nm_matmul"):
    from sparsejax._src.kernels import nm_matmul as nm_matmul_module

    return getattr(nm_matmul_module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
