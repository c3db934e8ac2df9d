"""N:M sparse matmul ``y = x @ W`` with Pallas kernels and a ``custom_vjp``.

``W`` is an :class:`~sparsejax._src.nm_format.NMSparse` ``[K, Nout]`` kernel
(groups of M consecutive rows along the contraction axis K, ``"kn"`` layout).
Design (``docs/KERNELS.md`` §2, §6):

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

Dispatch in :func:`nm_matmul`: ``interpret=True`` runs the Pallas kernels in
interpret mode on any backend (this is how the tests run them on CPU).
Otherwise ``lax.platform_dependent`` picks, at lowering time, the compiled
Pallas ``"loop"`` kernels on GPU (``cuda``/``rocm``, Triton backend, the
default of ``pl.pallas_call`` in jax 0.10.x), the ``"grid"`` kernels on TPU
(Mosaic), and the pure-JAX decompress-then-dot reference on CPU and other
platforms. On XLA:CPU that reference is the best N:M formulation from batch
~8 up but still slower than a dense matmul on pre-masked weights
(``docs/KERNELS.md`` §4, ``benchmarks/RESULTS.md``): on CPU, N:M storage
saves memory, not time. Shapes the kernels do not cover (M not a power of
two, an empty batch, a dtype other than float32/bfloat16/float16) use the
reference everywhere.

Hardware status (read before relying on the compiled paths): every kernel
and both schedules were run and checked against the reference in interpret
mode on CPU (jax 0.10.2). The ``"loop"`` kernels were lowered to Triton IR for
``cuda`` from a CPU machine (``jax.export``, see ``tests/nm_kernels_test.py``;
the Triton modules also passed the MLIR verifier in a one-off check) and the
``"grid"`` kernels to Mosaic MLIR for ``tpu``, but **none of them has been
compiled by Triton/Mosaic or run on a GPU or TPU**: Triton's own compilation
passes (shared memory, register pressure) and Mosaic's layout passes (e.g.
strided int8 loads) are untested, and the block sizes below are untuned. On a
GPU, fp32 kernel dots use Triton's TF32 input precision (the lowering maps
``Precision.DEFAULT`` to TF32), so expect ~1e-3 relative error against an
exact fp32 reference there.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from sparsejax._src.formats.nm_format import NMSparse, nm_decompress, nm_take

__all__ = [
  "nm_matmul",
  "nm_matmul_dense_grad",
  "nm_matmul_dv_kernel",
  "nm_matmul_dx_kernel",
  "nm_matmul_fwd_kernel",
  "nm_matmul_reference",
]

_SCHEDULES = ("grid", "loop")
_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class _BlockDefaults:
  """Preferred and minimum power-of-2 block sizes for one target."""

  pref_m: int
  min_m: int
  pref_n: int
  min_n: int
  pref_k: int
  min_k: int


# GPU (Triton): tl.dot needs every dimension >= 16; moderate tiles keep the
# decompressed [bk, bn] tile and the accumulator in registers. Untuned.
# TPU (Mosaic): lane dims multiples of 128, sublane dims of 8/16/32 (f32/bf16/
# int8 tiles). Untuned. Interpret: small tiles, fast to run on CPU.
_DEFAULTS = {
  "gpu": _BlockDefaults(pref_m=64, min_m=16, pref_n=128, min_n=16, pref_k=64, min_k=16),
  "tpu": _BlockDefaults(pref_m=256, min_m=32, pref_n=256, min_n=128, pref_k=512, min_k=256),
  "interpret": _BlockDefaults(pref_m=64, min_m=8, pref_n=128, min_n=8, pref_k=128, min_k=8),
}
_GPU_COMPILER_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=3)
_TPU_DIMENSION_SEMANTICS = ("parallel", "parallel", "arbitrary")


@dataclasses.dataclass(frozen=True)
class _KernelConfig:
  """Static (hashable) configuration of one kernel call."""

  target: str = "interpret"
  schedule: str | None = None
  block_m: int | None = None
  block_n: int | None = None
  block_k: int | None = None

  def resolved_schedule(self) -> str:
    if self.schedule is not None:
      return self.schedule
    return "loop" if self.target == "gpu" else "grid"


def _is_pow2(v: int) -> bool:
  return v > 0 and (v & (v - 1)) == 0


def _next_pow2(v: int) -> int:
  return 1 << max(v - 1, 0).bit_length()


def _round_up(v: int, b: int) -> int:
  return -(-v // b) * b


def _choose_block(dim: int, user: int | None, pref: int, minimum: int, divisor: bool) -> int:
  """A power-of-2 block size for one axis.

  Args:
    dim: the axis length.
    user: a user-requested block (validated) or None.
    pref: preferred (maximum) block.
    minimum: smallest allowed block.
    divisor: prefer a block that divides ``dim`` (avoids padding weights).
  """
  if user is not None:
    return user
  if divisor:
    b = pref
    while b >= minimum:
      if dim % b == 0:
        return b
      b //= 2
  return min(pref, max(minimum, _next_pow2(dim)))


def _check_block(name: str, value: int | None) -> None:
  if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
    raise TypeError(f"{name} must be an int power of 2 or None; got {value!r}.")
  if value is not None and not _is_pow2(value):
    raise ValueError(f"{name} must be a power of 2; got {name}={value}.")


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Block sizes and padded sizes for a ``[B, K] x [K, Nout]`` problem."""

  bm: int
  bn: int
  bk: int
  b_pad: int
  k_pad: int
  n_pad: int


def _plan(cfg: _KernelConfig, b: int, k: int, nout: int, m: int) -> _Plan:
  d = _DEFAULTS[cfg.target]
  bm = _choose_block(b, cfg.block_m, d.pref_m, d.min_m, divisor=False)
  bn = _choose_block(nout, cfg.block_n, d.pref_n, d.min_n, divisor=True)
  bk = _choose_block(k, cfg.block_k, max(d.pref_k, m), max(d.min_k, m), divisor=True)
  if bk % m:
    raise ValueError(f"block_k must be a multiple of m; got block_k={bk}, m={m}.")
  return _Plan(bm, bn, bk, _round_up(b, bm), _round_up(k, bk), _round_up(nout, bn))


def _pad2(a: jax.Array, rows: int, cols: int) -> jax.Array:
  if a.shape == (rows, cols):
    return a
  return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def _kernel_supported(nms: NMSparse, batch: int, dtype: Any) -> bool:
  """Static check: can the Pallas kernels handle this problem?"""
  k, nout = nms.shape
  return (
    _is_pow2(nms.m)
    and batch > 0
    and k > 0
    and nout > 0
    and jnp.dtype(dtype) in _KERNEL_DTYPES
    and nms.layout == "kn"
  )


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


_NT = (((1,), (1,)), ((), ()))  # a [p, r] . b [q, r] -> [p, q]
_TN = (((0,), (0,)), ((), ()))  # a [r, p] . b [r, q] -> [p, q]


# ---------------------------------------------------------------------------
# "grid" schedule kernels (sequential reduction grid axis + f32 scratch)
# ---------------------------------------------------------------------------


def _fwd_grid_kernel(x_ref, v_ref, i_ref, o_ref, acc_ref, *, n: int, m: int) -> None:
  kk = pl.program_id(2)

  @pl.when(kk == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  x = x_ref[...]
  w = _dense_tile(v_ref, i_ref, 0, slice(None), g=x.shape[1] // m, n=n, m=m, dtype=x.dtype)
  acc_ref[...] += jnp.dot(x, w, preferred_element_type=jnp.float32)

  @pl.when(kk == pl.num_programs(2) - 1)
  def _emit():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _dx_grid_kernel(dy_ref, v_ref, i_ref, o_ref, acc_ref, *, n: int, m: int) -> None:
  jj = pl.program_id(2)

  @pl.when(jj == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  dy = dy_ref[...]
  bk = o_ref.shape[1]
  w = _dense_tile(v_ref, i_ref, 0, slice(None), g=bk // m, n=n, m=m, dtype=dy.dtype)
  acc_ref[...] += lax.dot_general(dy, w, _NT, preferred_element_type=jnp.float32)

  @pl.when(jj == pl.num_programs(2) - 1)
  def _emit():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _dv_grid_kernel(x_ref, dy_ref, i_ref, o_ref, acc_ref, *, n: int, m: int) -> None:
  bb = pl.program_id(2)

  @pl.when(bb == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  acc_ref[...] += lax.dot_general(x_ref[...], dy_ref[...], _TN, preferred_element_type=jnp.float32)

  @pl.when(bb == pl.num_programs(2) - 1)
  def _emit():
    bk = acc_ref.shape[0]
    _store_compressed(acc_ref[...], i_ref, o_ref, 0, slice(None), g=bk // m, n=n, m=m)


# ---------------------------------------------------------------------------
# "loop" schedule kernels (parallel grid over outputs, in-kernel reduction)
# ---------------------------------------------------------------------------


def _fwd_loop_kernel(x_ref, v_ref, i_ref, o_ref, *, n: int, m: int, bk: int, steps: int) -> None:
  bkc, g = bk * n // m, bk // m

  def body(kk, acc):
    x = x_ref[:, pl.ds(pl.multiple_of(kk * bk, bk), bk)]
    row0 = kk * bkc
    w = _dense_tile(v_ref, i_ref, row0, slice(None), g=g, n=n, m=m, dtype=x.dtype)
    return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _dx_loop_kernel(dy_ref, v_ref, i_ref, o_ref, *, n: int, m: int, bn: int, steps: int) -> None:
  g = o_ref.shape[1] // m

  def body(jj, acc):
    cols = pl.ds(pl.multiple_of(jj * bn, bn), bn)
    dy = dy_ref[:, cols]
    w = _dense_tile(v_ref, i_ref, 0, cols, g=g, n=n, m=m, dtype=dy.dtype)
    return acc + lax.dot_general(dy, w, _NT, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _dv_loop_kernel(
  x_ref, dy_ref, i_ref, o_ref, *, n: int, m: int, bm: int, bk: int, steps: int
) -> None:
  def body(bb, acc):
    rows = pl.ds(pl.multiple_of(bb * bm, bm), bm)
    return acc + lax.dot_general(
      x_ref[rows, :], dy_ref[rows, :], _TN, preferred_element_type=jnp.float32
    )

  acc = lax.fori_loop(0, steps, body, jnp.zeros((bk, o_ref.shape[1]), jnp.float32))
  _store_compressed(acc, i_ref, o_ref, 0, slice(None), g=bk // m, n=n, m=m)


# ---------------------------------------------------------------------------
# pallas_call wrappers on padded 2-D operands
# ---------------------------------------------------------------------------


def _call_kwargs(cfg: _KernelConfig, schedule: str) -> dict[str, Any]:
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


def _fwd_call(x, v, idx, *, n, m, p: _Plan, cfg: _KernelConfig, out_dtype) -> jax.Array:
  bm, bn, bk = p.bm, p.bn, p.bk
  bkc = bk * n // m
  kc = p.k_pad * n // m
  out_shape = jax.ShapeDtypeStruct((p.b_pad, p.n_pad), out_dtype)
  schedule = cfg.resolved_schedule()
  kw = _call_kwargs(cfg, schedule)
  if schedule == "grid":
    return pl.pallas_call(
      functools.partial(_fwd_grid_kernel, n=n, m=m),
      out_shape=out_shape,
      grid=(p.b_pad // bm, p.n_pad // bn, p.k_pad // bk),
      in_specs=[
        pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
        pl.BlockSpec((bkc, bn), lambda i, j, kk: (kk, j)),
        pl.BlockSpec((bkc, bn), lambda i, j, kk: (kk, j)),
      ],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
      name="nm_matmul_fwd",
      **kw,
    )(x, v, idx)
  return pl.pallas_call(
    functools.partial(_fwd_loop_kernel, n=n, m=m, bk=bk, steps=p.k_pad // bk),
    out_shape=out_shape,
    grid=(p.b_pad // bm, p.n_pad // bn),
    in_specs=[
      pl.BlockSpec((bm, p.k_pad), lambda i, j: (i, 0)),
      pl.BlockSpec((kc, bn), lambda i, j: (0, j)),
      pl.BlockSpec((kc, bn), lambda i, j: (0, j)),
    ],
    out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
    name="nm_matmul_fwd",
    **kw,
  )(x, v, idx)


def _dx_call(dy, v, idx, *, n, m, p: _Plan, cfg: _KernelConfig, out_dtype) -> jax.Array:
  bm, bn, bk = p.bm, p.bn, p.bk
  bkc = bk * n // m
  out_shape = jax.ShapeDtypeStruct((p.b_pad, p.k_pad), out_dtype)
  schedule = cfg.resolved_schedule()
  kw = _call_kwargs(cfg, schedule)
  if schedule == "grid":
    return pl.pallas_call(
      functools.partial(_dx_grid_kernel, n=n, m=m),
      out_shape=out_shape,
      grid=(p.b_pad // bm, p.k_pad // bk, p.n_pad // bn),
      in_specs=[
        pl.BlockSpec((bm, bn), lambda i, kk, j: (i, j)),
        pl.BlockSpec((bkc, bn), lambda i, kk, j: (kk, j)),
        pl.BlockSpec((bkc, bn), lambda i, kk, j: (kk, j)),
      ],
      out_specs=pl.BlockSpec((bm, bk), lambda i, kk, j: (i, kk)),
      scratch_shapes=[pltpu.VMEM((bm, bk), jnp.float32)],
      name="nm_matmul_dx",
      **kw,
    )(dy, v, idx)
  return pl.pallas_call(
    functools.partial(_dx_loop_kernel, n=n, m=m, bn=bn, steps=p.n_pad // bn),
    out_shape=out_shape,
    grid=(p.b_pad // bm, p.k_pad // bk),
    in_specs=[
      pl.BlockSpec((bm, p.n_pad), lambda i, kk: (i, 0)),
      pl.BlockSpec((bkc, p.n_pad), lambda i, kk: (kk, 0)),
      pl.BlockSpec((bkc, p.n_pad), lambda i, kk: (kk, 0)),
    ],
    out_specs=pl.BlockSpec((bm, bk), lambda i, kk: (i, kk)),
    name="nm_matmul_dx",
    **kw,
  )(dy, v, idx)


def _dv_call(x, dy, idx, *, n, m, p: _Plan, cfg: _KernelConfig, out_dtype) -> jax.Array:
  bm, bn, bk = p.bm, p.bn, p.bk
  bkc = bk * n // m
  out_shape = jax.ShapeDtypeStruct((p.k_pad * n // m, p.n_pad), out_dtype)
  schedule = cfg.resolved_schedule()
  kw = _call_kwargs(cfg, schedule)
  if schedule == "grid":
    return pl.pallas_call(
      functools.partial(_dv_grid_kernel, n=n, m=m),
      out_shape=out_shape,
      grid=(p.k_pad // bk, p.n_pad // bn, p.b_pad // bm),
      in_specs=[
        pl.BlockSpec((bm, bk), lambda kk, j, b: (b, kk)),
        pl.BlockSpec((bm, bn), lambda kk, j, b: (b, j)),
        pl.BlockSpec((bkc, bn), lambda kk, j, b: (kk, j)),
      ],
      out_specs=pl.BlockSpec((bkc, bn), lambda kk, j, b: (kk, j)),
      scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)],
      name="nm_matmul_dvalues",
      **kw,
    )(x, dy, idx)
  return pl.pallas_call(
    functools.partial(_dv_loop_kernel, n=n, m=m, bm=bm, bk=bk, steps=p.b_pad // bm),
    out_shape=out_shape,
    grid=(p.k_pad // bk, p.n_pad // bn),
    in_specs=[
      pl.BlockSpec((p.b_pad, bk), lambda kk, j: (0, kk)),
      pl.BlockSpec((p.b_pad, bn), lambda kk, j: (0, j)),
      pl.BlockSpec((bkc, bn), lambda kk, j: (kk, j)),
    ],
    out_specs=pl.BlockSpec((bkc, bn), lambda kk, j: (kk, j)),
    name="nm_matmul_dvalues",
    **kw,
  )(x, dy, idx)


# ---------------------------------------------------------------------------
# Padding front-ends (2-D, one target)
# ---------------------------------------------------------------------------


def _pad_compressed(a: jax.Array, nms: NMSparse, p: _Plan) -> jax.Array:
  return _pad2(a, p.k_pad * nms.n // nms.m, p.n_pad)


def _fwd_2d(x: jax.Array, v: jax.Array, idx: jax.Array, nms: NMSparse, cfg: _KernelConfig):
  b, k = x.shape
  nout = nms.shape[1]
  p = _plan(cfg, b, k, nout, nms.m)
  y = _fwd_call(
    _pad2(x, p.b_pad, p.k_pad),
    _pad_compressed(v, nms, p),
    _pad_compressed(idx, nms, p),
    n=nms.n,
    m=nms.m,
    p=p,
    cfg=cfg,
    out_dtype=x.dtype,
  )
  return y[:b, :nout]


def _dx_2d(dy: jax.Array, v: jax.Array, idx: jax.Array, nms: NMSparse, cfg: _KernelConfig):
  b, nout = dy.shape
  k = nms.shape[0]
  p = _plan(cfg, b, k, nout, nms.m)
  dx = _dx_call(
    _pad2(dy, p.b_pad, p.n_pad),
    _pad_compressed(v, nms, p),
    _pad_compressed(idx, nms, p),
    n=nms.n,
    m=nms.m,
    p=p,
    cfg=cfg,
    out_dtype=dy.dtype,
  )
  return dx[:b, :k]


def _dv_2d(x: jax.Array, dy: jax.Array, idx: jax.Array, nms: NMSparse, cfg: _KernelConfig):
  b, k = x.shape
  nout = dy.shape[1]
  p = _plan(cfg, b, k, nout, nms.m)
  dv = _dv_call(
    _pad2(x, p.b_pad, p.k_pad),
    _pad2(dy, p.b_pad, p.n_pad),
    _pad_compressed(idx, nms, p),
    n=nms.n,
    m=nms.m,
    p=p,
    cfg=cfg,
    out_dtype=nms.values.dtype,
  )
  return dv[: k * nms.n // nms.m, :nout]


# ---------------------------------------------------------------------------
# Direct kernel entry points (no custom_vjp; for tests and benchmarks)
# ---------------------------------------------------------------------------


def _direct_config(
  interpret: bool,
  schedule: str | None,
  block_m: int | None,
  block_n: int | None,
  block_k: int | None,
) -> _KernelConfig:
  if schedule is not None and schedule not in _SCHEDULES:
    raise ValueError(f"schedule must be one of {_SCHEDULES} or None; got {schedule!r}.")
  for name, val in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
    _check_block(name, val)
  if interpret:
    return _KernelConfig("interpret", schedule, block_m, block_n, block_k)
  backend = jax.default_backend()
  if backend not in ("gpu", "tpu"):
    raise ValueError(
      f"compiled Pallas kernels need a GPU or TPU backend; got backend={backend!r}. "
      "Pass interpret=True to run them in interpret mode."
    )
  if backend == "gpu" and schedule is None:
    schedule = "loop"
  return _KernelConfig(backend, schedule, block_m, block_n, block_k)


def _check_kernel_operands(nms: NMSparse, dtype: Any, batch: int, name: str) -> None:
  if not _kernel_supported(nms, batch, dtype):
    raise ValueError(
      f"{name}: the Pallas kernels need m a power of 2, a non-empty batch and float32/"
      f"bfloat16/float16 operands; got m={nms.m}, batch={batch}, dtype={jnp.dtype(dtype)}. "
      "Use nm_matmul (falls back to the reference) instead."
    )


def nm_matmul_fwd_kernel(
  x: jax.Array,
  nms: NMSparse,
  *,
  interpret: bool = False,
  schedule: str | None = None,
  block_m: int | None = None,
  block_n: int | None = None,
  block_k: int | None = None,
) -> jax.Array:
  """Forward Pallas kernel ``x @ W`` on 2-D operands (not differentiable).

  Args:
    x: ``[B, K]`` activations, same dtype as ``nms.values``.
    nms: compressed ``[K, Nout]`` kernel.
    interpret: run in interpret mode (any backend); otherwise compiled for the
      default backend (GPU or TPU only).
    schedule: ``"grid"``/``"loop"`` or None (see the module docstring).
    block_m: batch block (power of 2) or None.
    block_n: output block (power of 2) or None.
    block_k: contraction block (power of 2, multiple of m) or None.

  Returns:
    ``[B, Nout]`` in ``x.dtype`` (f32 accumulation).
  """
  _check_operands(x, nms)
  _check_kernel_operands(nms, x.dtype, x.shape[0], "nm_matmul_fwd_kernel")
  cfg = _direct_config(interpret, schedule, block_m, block_n, block_k)
  return _fwd_2d(x, nms.values.astype(x.dtype), nms.indices, nms, cfg)


def nm_matmul_dx_kernel(
  dy: jax.Array,
  nms: NMSparse,
  *,
  interpret: bool = False,
  schedule: str | None = None,
  block_m: int | None = None,
  block_n: int | None = None,
  block_k: int | None = None,
) -> jax.Array:
  """Input-gradient Pallas kernel ``dy @ W^T`` on 2-D operands.

  Args:
    dy: ``[B, Nout]`` output cotangent.
    nms: compressed ``[K, Nout]`` kernel.
    interpret: as in :func:`nm_matmul_fwd_kernel`.
    schedule: as in :func:`nm_matmul_fwd_kernel`.
    block_m: batch block or None.
    block_n: output block (the reduction axis here) or None.
    block_k: contraction block or None.

  Returns:
    ``[B, K]`` in ``dy.dtype``.
  """
  if dy.ndim != 2 or dy.shape[1] != nms.shape[1]:
    raise ValueError(f"dy must be [B, Nout={nms.shape[1]}]; got dy.shape={tuple(dy.shape)}.")
  _check_kernel_operands(nms, dy.dtype, dy.shape[0], "nm_matmul_dx_kernel")
  cfg = _direct_config(interpret, schedule, block_m, block_n, block_k)
  return _dx_2d(dy, nms.values.astype(dy.dtype), nms.indices, nms, cfg)


def nm_matmul_dv_kernel(
  x: jax.Array,
  dy: jax.Array,
  nms: NMSparse,
  *,
  interpret: bool = False,
  schedule: str | None = None,
  block_m: int | None = None,
  block_n: int | None = None,
  block_k: int | None = None,
) -> jax.Array:
  """Values-gradient SDDMM Pallas kernel ``compress(x^T @ dy)`` on 2-D operands.

  Args:
    x: ``[B, K]`` activations.
    dy: ``[B, Nout]`` output cotangent, same dtype as ``x``.
    nms: compressed ``[K, Nout]`` kernel (only its indices are read).
    interpret: as in :func:`nm_matmul_fwd_kernel`.
    schedule: as in :func:`nm_matmul_fwd_kernel`.
    block_m: batch block (the reduction axis here) or None.
    block_n: output block or None.
    block_k: contraction block or None.

  Returns:
    ``[K*N/M, Nout]`` in ``nms.values.dtype`` (f32 accumulation), laid out like
    ``nms.values``.
  """
  _check_operands(x, nms)
  if dy.shape != (x.shape[0], nms.shape[1]):
    raise ValueError(
      f"dy must be [B={x.shape[0]}, Nout={nms.shape[1]}]; got dy.shape={tuple(dy.shape)}."
    )
  _check_kernel_operands(nms, x.dtype, x.shape[0], "nm_matmul_dv_kernel")
  cfg = _direct_config(interpret, schedule, block_m, block_n, block_k)
  return _dv_2d(x, dy.astype(x.dtype), nms.indices, nms, cfg)


# ---------------------------------------------------------------------------
# References (pure jnp)
# ---------------------------------------------------------------------------


def nm_matmul_reference(x: jax.Array, nms: NMSparse) -> jax.Array:
  """Pure-JAX N:M matmul: decompress ``W`` (compare + select), then ``x @ W``.

  Differentiable by ordinary autodiff; the CPU path of :func:`nm_matmul` and
  the reference for the kernels.

  Args:
    x: ``[..., K]`` activations.
    nms: compressed ``[K, Nout]`` kernel.

  Returns:
    ``[..., Nout]`` in ``jnp.result_type(x, nms.values)``.
  """
  _check_operands(x, nms)
  return jnp.matmul(x, nm_decompress(nms), preferred_element_type=None)


def _dx_reference(dy: jax.Array, v: jax.Array, nms: NMSparse) -> jax.Array:
  w = nm_decompress(nms.replace(values=v))
  return lax.dot_general(dy, w, _NT, preferred_element_type=jnp.float32).astype(dy.dtype)


def _dv_reference(x: jax.Array, dy: jax.Array, nms: NMSparse) -> jax.Array:
  dw = lax.dot_general(x, dy, _TN, preferred_element_type=jnp.float32)
  return nm_take(dw, nms).astype(nms.values.dtype)


def _fwd_reference(x: jax.Array, v: jax.Array, nms: NMSparse) -> jax.Array:
  w = nm_decompress(nms.replace(values=v))
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


# ---------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Dispatch:
  """Static dispatch settings of one :func:`nm_matmul` call."""

  interpret: bool
  schedule: str | None = None
  block_m: int | None = None
  block_n: int | None = None
  block_k: int | None = None

  def config(self, target: str) -> _KernelConfig:
    schedule = self.schedule
    if target == "gpu" and schedule is None:
      schedule = "loop"
    return _KernelConfig(target, schedule, self.block_m, self.block_n, self.block_k)


def _dispatch(ds: _Dispatch, kernel_fn, reference_fn, *args):
  """Runs ``kernel_fn(cfg, *args)`` or the reference for the lowering platform."""
  if ds.interpret:
    return kernel_fn(ds.config("interpret"), *args)
  return lax.platform_dependent(
    *args,
    default=reference_fn,
    cuda=functools.partial(kernel_fn, ds.config("gpu")),
    rocm=functools.partial(kernel_fn, ds.config("gpu")),
    tpu=functools.partial(kernel_fn, ds.config("tpu")),
  )


def _rebuild(nms: NMSparse, v: jax.Array, i: jax.Array) -> NMSparse:
  """``nms`` with new leaves (keeps the static n, m, shape, layout)."""
  return nms.replace(values=v, indices=i)


def _forward(x, nms: NMSparse, ds: _Dispatch) -> jax.Array:
  return _dispatch(
    ds,
    lambda cfg, x, v, i: _fwd_2d(x, v, i, _rebuild(nms, v, i), cfg),
    lambda x, v, i: _fwd_reference(x, v, _rebuild(nms, v, i)),
    x,
    nms.values,
    nms.indices,
  )


def _backward_dx(dy, nms: NMSparse, ds: _Dispatch) -> jax.Array:
  return _dispatch(
    ds,
    lambda cfg, dy, v, i: _dx_2d(dy, v, i, _rebuild(nms, v, i), cfg),
    lambda dy, v, i: _dx_reference(dy, v, _rebuild(nms, v, i)),
    dy,
    nms.values,
    nms.indices,
  )


def _backward_dv(x, dy, nms: NMSparse, ds: _Dispatch) -> jax.Array:
  return _dispatch(
    ds,
    lambda cfg, x, dy, i: _dv_2d(x, dy, i, _rebuild(nms, nms.values, i), cfg),
    lambda x, dy, i: _dv_reference(x, dy, _rebuild(nms, nms.values, i)),
    x,
    dy,
    nms.indices,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _nm_matmul_2d(x: jax.Array, nms: NMSparse, ds: _Dispatch) -> jax.Array:
  return _forward(x, nms, ds)


def _nm_matmul_2d_fwd(x, nms, ds):
  return _forward(x, nms, ds), (x, nms)


def _nm_matmul_2d_bwd(ds, res, dy):
  x, nms = res
  dx = _backward_dx(dy, nms, ds)
  dv = _backward_dv(x, dy, nms, ds)
  # Integer indices get no cotangent (None -> symbolic zero / float0).
  return dx, nms.replace(values=dv, indices=None)


_nm_matmul_2d.defvjp(_nm_matmul_2d_fwd, _nm_matmul_2d_bwd)


def _check_operands(x: jax.Array, nms: NMSparse) -> None:
  if not isinstance(nms, NMSparse):
    raise TypeError(f"nms must be an NMSparse; got {type(nms).__name__}.")
  if x.ndim < 1 or x.shape[-1] != nms.shape[0]:
    raise ValueError(
      f"x.shape[-1] must equal K = nms.shape[0] = {nms.shape[0]}; got x.shape={tuple(x.shape)}."
    )
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must have a floating dtype; got x.dtype={x.dtype}.")


def _prepare(x: jax.Array, nms: NMSparse) -> tuple[jax.Array, NMSparse, tuple[int, ...]]:
  _check_operands(x, nms)
  dtype = jnp.result_type(x.dtype, nms.values.dtype)
  lead = tuple(x.shape[:-1])
  x2 = x.astype(dtype).reshape(-1, nms.shape[0])
  return x2, nms.replace(values=nms.values.astype(dtype)), lead


def _make_dispatch(interpret, schedule, block_m, block_n, block_k) -> _Dispatch:
  if schedule is not None and schedule not in _SCHEDULES:
    raise ValueError(f"schedule must be one of {_SCHEDULES} or None; got {schedule!r}.")
  for name, val in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
    _check_block(name, val)
  return _Dispatch(bool(interpret), schedule, block_m, block_n, block_k)


def nm_matmul(
  x: jax.Array,
  nms: NMSparse,
  interpret: bool | None = None,
  *,
  schedule: str | None = None,
  block_m: int | None = None,
  block_n: int | None = None,
  block_k: int | None = None,
) -> jax.Array:
  """N:M sparse matmul ``x @ W`` with a custom VJP, on Pallas kernels.

  Differentiable in ``x`` and ``nms.values``; ``nms.indices`` gets no
  cotangent (a float0 zero under ``jax.vjp``). Backward: ``dx = dy @ W^T``
  and ``dvalues = compress(x^T @ dy)`` (SDDMM), each its own kernel.

  Dispatch: ``interpret=True`` runs the Pallas kernels in interpret mode on any
  backend (slow; for tests). Otherwise, chosen at lowering time: compiled
  Pallas kernels on GPU (Triton, ``"loop"`` schedule) and TPU (Mosaic,
  ``"grid"`` schedule), the decompress-then-dot reference on CPU. Problems
  the kernels do not cover (M not a power of 2, empty batch, dtypes other
  than float32/bfloat16/float16) always use the reference. Batch, K and Nout
  are zero-padded to multiples of the blocks (padding ``values`` copies the
  weights, so prefer K and Nout that are multiples of the block sizes).

  Hardware status: verified in interpret mode on CPU only; the GPU and TPU
  kernels lower (Triton IR / Mosaic MLIR, checked from CPU) but were never
  compiled or run on a GPU or TPU. See the module docstring.

  Args:
    x: ``[..., K]`` floating activations; leading dims are flattened to a batch.
    nms: compressed ``[K, Nout]`` kernel (:func:`nm_compress`).
    interpret: run the Pallas kernels in interpret mode (``True``), or dispatch
      by platform (``None``/``False``).
    schedule: ``"grid"`` or ``"loop"`` (see the module docstring); None picks
      ``"loop"`` on GPU and ``"grid"`` elsewhere. ``"grid"`` is rejected on GPU.
    block_m: batch block (power of 2), or None for the target's default.
    block_n: output-feature block (power of 2), or None.
    block_k: contraction block (power of 2, multiple of m), or None.

  Returns:
    ``[..., Nout]`` in ``jnp.result_type(x, nms.values)``.

  Raises:
    TypeError: for a non-NMSparse ``nms`` or a non-floating ``x``.
    ValueError: for mismatched shapes or invalid block/schedule settings.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> w = jax.random.normal(jax.random.key(0), (64, 32))
    >>> nms = nm_compress(w, 2, 4)
    >>> x = jnp.ones((3, 64))
    >>> bool(jnp.allclose(nm_matmul(x, nms), x @ nms.todense(), atol=1e-4))
    True
  """
  ds = _make_dispatch(interpret, schedule, block_m, block_n, block_k)
  x2, nmsc, lead = _prepare(x, nms)
  nout = nms.shape[1]
  if not _kernel_supported(nmsc, x2.shape[0], x2.dtype):
    return nm_matmul_reference(x2, nmsc).reshape(lead + (nout,))
  return _nm_matmul_2d(x2, nmsc, ds).reshape(lead + (nout,))


# ---------------------------------------------------------------------------
# Dense-gradient probe (for RigL-style regrowth on compressed weights)
# ---------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _nm_matmul_probe_2d(x, nms, probe, ds):
  del probe
  return _forward(x, nms, ds)


def _probe_fwd(x, nms, probe, ds):
  return _forward(x, nms, ds), (x, nms, jnp.zeros((), probe.dtype))


def _probe_bwd(ds, res, dy):
  x, nms, probe_zero = res
  dx = _backward_dx(dy, nms, ds)
  dw = lax.dot_general(x, dy, _TN, preferred_element_type=jnp.float32)
  dv = nm_take(dw, nms).astype(nms.values.dtype)
  return dx, nms.replace(values=dv, indices=None), dw.astype(probe_zero.dtype)


_nm_matmul_probe_2d.defvjp(_probe_fwd, _probe_bwd)


def nm_matmul_dense_grad(
  x: jax.Array,
  nms: NMSparse,
  probe: jax.Array,
  interpret: bool | None = None,
  **kernel_options: Any,
) -> jax.Array:
  """:func:`nm_matmul` plus a dense-gradient probe for mask updates.

  The forward equals ``nm_matmul(x, nms)``; ``probe`` (a ``[K, Nout]`` array,
  normally zeros) is ignored in the forward and acts as a zero weight. Its
  cotangent is the dense gradient ``x^T @ dy`` at **all** positions, which
  RigL/SRigL regrowth needs every ΔT steps (``docs/KERNELS.md`` §2). The dense
  ``x^T dy`` is one plain XLA matmul; ``dvalues`` is taken from it, so no
  second SDDMM runs. Use it only in the mask-update step.

  Args:
    x: ``[..., K]`` activations.
    nms: compressed ``[K, Nout]`` kernel.
    probe: ``[K, Nout]`` floating array whose gradient is wanted.
    interpret: as in :func:`nm_matmul`.
    **kernel_options: ``schedule``/``block_*`` options of :func:`nm_matmul`.

  Returns:
    ``[..., Nout]``, identical to ``nm_matmul(x, nms)``.

  Raises:
    ValueError: if ``probe.shape != nms.shape``.
  """
  if tuple(probe.shape) != tuple(nms.shape):
    raise ValueError(
      f"probe.shape must equal nms.shape={tuple(nms.shape)}; got {tuple(probe.shape)}."
    )
  ds = _make_dispatch(
    interpret,
    kernel_options.pop("schedule", None),
    kernel_options.pop("block_m", None),
    kernel_options.pop("block_n", None),
    kernel_options.pop("block_k", None),
  )
  if kernel_options:
    raise TypeError(f"unexpected keyword arguments: {sorted(kernel_options)}.")
  x2, nmsc, lead = _prepare(x, nms)
  nout = nms.shape[1]
  if not _kernel_supported(nmsc, x2.shape[0], x2.dtype):
    # Forward value W (probe - stop_gradient(probe) == 0); gradient x^T dy.
    w = nm_decompress(nmsc) + (probe - lax.stop_gradient(probe)).astype(nmsc.values.dtype)
    return jnp.matmul(x2, w).reshape(lead + (nout,))
  return _nm_matmul_probe_2d(x2, nmsc, probe, ds).reshape(lead + (nout,))
