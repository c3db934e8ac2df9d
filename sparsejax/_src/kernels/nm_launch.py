"""Block planning, padding and launch of the N:M Pallas kernels.

Between the public :func:`~sparsejax._src.kernels.nm_matmul.nm_matmul` and the kernel
bodies (:mod:`sparsejax._src.kernels.nm_pallas`) sit three steps, all here:

* **configure**: a :class:`KernelConfig` names the target (``"interpret"``, ``"gpu"``,
  ``"tpu"``), the schedule and any user block sizes;
* **plan**: :func:`plan` picks power-of-2 blocks for the batch, K and Nout axes (per-target
  defaults, preferring blocks that divide K and Nout so the weights are not padded) and
  the padded sizes;
* **launch**: :func:`launch` hands one product (forward, dX or dValues) and its plan to
  :func:`~sparsejax._src.kernels.nm_pallas.pallas_matmul`, which pads, runs one
  ``pallas_call`` and slices the result back. It imports ``nm_pallas`` (and with it
  ``jax.experimental.pallas``) on first use, so importing ``sparsejax`` does not.

It also holds the direct kernel entry points :func:`nm_matmul_fwd_kernel`,
:func:`nm_matmul_dx_kernel` and :func:`nm_matmul_dv_kernel` (no ``custom_vjp``; for tests
and benchmarks).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax._src.formats.nm_format import NMSparse, check_concrete_indices

__all__ = [
  "KernelConfig",
  "Plan",
  "launch",
  "nm_matmul_dv_kernel",
  "nm_matmul_dx_kernel",
  "nm_matmul_fwd_kernel",
]

SCHEDULES = ("grid", "loop")
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


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static (hashable) configuration of one kernel call.

  Attributes:
    target: ``"interpret"``, ``"gpu"`` or ``"tpu"``.
    schedule: ``"grid"``, ``"loop"`` or None (the target's default).
    block_m: user batch block or None.
    block_n: user output block or None.
    block_k: user contraction block or None.
  """

  target: str = "interpret"
  schedule: str | None = None
  block_m: int | None = None
  block_n: int | None = None
  block_k: int | None = None

  def resolved_schedule(self) -> str:
    """The schedule to run: the given one, else ``"loop"`` on GPU and ``"grid"`` elsewhere."""
    if self.schedule is not None:
      return self.schedule
    return "loop" if self.target == "gpu" else "grid"


def _is_pow2(v: int) -> bool:
  """Whether ``v`` is a positive power of 2."""
  return v > 0 and (v & (v - 1)) == 0


def _next_pow2(v: int) -> int:
  """The smallest power of 2 that is ``>= v`` (1 for ``v <= 1``)."""
  return 1 << max(v - 1, 0).bit_length()


def _round_up(v: int, b: int) -> int:
  """``v`` rounded up to a multiple of ``b``."""
  return -(-v // b) * b


def _choose_block(dim: int, user: int | None, pref: int, minimum: int, divisor: bool) -> int:
  """A power-of-2 block size for one axis.

  Args:
    dim: the axis length.
    user: a user-requested block (validated) or None.
    pref: preferred (maximum) block.
    minimum: smallest allowed block.
    divisor: prefer a block that divides ``dim`` (avoids padding weights).

  Returns:
    The block size.
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


def check_options(
  schedule: str | None, block_m: int | None, block_n: int | None, block_k: int | None
) -> None:
  """Validates the user's schedule and block sizes.

  Raises:
    TypeError: if a block is not an int (or None).
    ValueError: for an unknown schedule or a block that is not a power of 2.
  """
  if schedule is not None and schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES} or None; got {schedule!r}.")
  for name, value in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
      raise TypeError(f"{name} must be an int power of 2 or None; got {value!r}.")
    if value is not None and not _is_pow2(value):
      raise ValueError(f"{name} must be a power of 2; got {name}={value}.")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Block sizes and padded sizes for a ``[B, K] x [K, Nout]`` problem."""

  bm: int
  bn: int
  bk: int
  b_pad: int
  k_pad: int
  n_pad: int


def plan(cfg: KernelConfig, b: int, k: int, nout: int, m: int) -> Plan:
  """Chooses the blocks and padded sizes of one problem.

  Args:
    cfg: the target and any user blocks.
    b: batch size.
    k: contraction size.
    nout: output features.
    m: group size (``block_k`` must be a multiple of it).

  Returns:
    The :class:`Plan`.

  Raises:
    ValueError: if the contraction block is not a multiple of ``m``.
  """
  d = _DEFAULTS[cfg.target]
  bm = _choose_block(b, cfg.block_m, d.pref_m, d.min_m, divisor=False)
  bn = _choose_block(nout, cfg.block_n, d.pref_n, d.min_n, divisor=True)
  bk = _choose_block(k, cfg.block_k, max(d.pref_k, m), max(d.min_k, m), divisor=True)
  if bk % m:
    raise ValueError(f"block_k must be a multiple of m; got block_k={bk}, m={m}.")
  return Plan(bm, bn, bk, _round_up(b, bm), _round_up(k, bk), _round_up(nout, bn))


def kernel_supported(nms: NMSparse, batch: int, dtype: Any) -> bool:
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


def check_operands(x: jax.Array, nms: NMSparse, fn: str) -> None:
  """Validates ``x`` and ``nms`` for ``x @ nms`` (and concrete index values).

  Args:
    x: ``[..., K]`` activations.
    nms: the compressed kernel.
    fn: the public function named in index errors.

  Raises:
    TypeError: for a non-NMSparse ``nms`` or a non-floating ``x``.
    ValueError: for a shape mismatch, or concrete indices outside ``[0, m)`` or not
      strictly increasing within a group (not checkable under ``jit``).
  """
  if not isinstance(nms, NMSparse):
    raise TypeError(f"nms must be an NMSparse; got {type(nms).__name__}.")
  if x.ndim < 1 or x.shape[-1] != nms.shape[0]:
    raise ValueError(
      f"x.shape[-1] must equal K = nms.shape[0] = {nms.shape[0]}; got x.shape={tuple(x.shape)}."
    )
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must have a floating dtype; got x.dtype={x.dtype}.")
  check_concrete_indices(nms, fn)


# ---------------------------------------------------------------------------
# Launch (2-D, one target)
# ---------------------------------------------------------------------------


def launch(
  product: str, operands: tuple[jax.Array, ...], nms: NMSparse, cfg: KernelConfig, out_dtype: Any
) -> jax.Array:
  """Plans blocks and runs one product through the Pallas builder.

  Imports :mod:`~sparsejax._src.kernels.nm_pallas` (and with it
  ``jax.experimental.pallas``) on first use.

  Args:
    product: ``"fwd"`` (``x @ W``), ``"dx"`` (``dy @ W^T``) or ``"dv"``
      (``compress(x^T @ dy)``).
    operands: unpadded 2-D operands: ``(x, values, indices)``, ``(dy, values, indices)``
      or ``(x, dy, indices)``; the first one is ``[B, ...]``.
    nms: the compressed kernel (its static ``n``, ``m`` and ``shape`` are used).
    cfg: target, schedule and block settings.
    out_dtype: dtype of the result.

  Returns:
    ``[B, Nout]``, ``[B, K]`` or ``[K*n/m, Nout]``.
  """
  from sparsejax._src.kernels import nm_pallas

  dims = (operands[0].shape[0], *nms.shape)
  p = plan(cfg, *dims, nms.m)
  return nm_pallas.pallas_matmul(
    product, operands, n=nms.n, m=nms.m, dims=dims, p=p, cfg=cfg, out_dtype=out_dtype
  )


# ---------------------------------------------------------------------------
# Direct kernel entry points (no custom_vjp; for tests and benchmarks)
# ---------------------------------------------------------------------------


def _direct_config(
  interpret: bool,
  *,
  schedule: str | None = None,
  block_m: int | None = None,
  block_n: int | None = None,
  block_k: int | None = None,
) -> KernelConfig:
  """The config of a direct kernel call: interpret mode, or the default GPU/TPU backend.

  Raises:
    TypeError: for an unknown option.
    ValueError: for invalid options, or ``interpret=False`` off GPU/TPU.
  """
  check_options(schedule, block_m, block_n, block_k)
  if interpret:
    return KernelConfig("interpret", schedule, block_m, block_n, block_k)
  backend = jax.default_backend()
  if backend not in ("gpu", "tpu"):
    raise ValueError(
      f"compiled Pallas kernels need a GPU or TPU backend; got backend={backend!r}. "
      "Pass interpret=True to run them in interpret mode."
    )
  if backend == "gpu" and schedule is None:
    schedule = "loop"
  return KernelConfig(backend, schedule, block_m, block_n, block_k)


def _check_kernel_operands(nms: NMSparse, dtype: Any, batch: int, name: str) -> None:
  """Raises unless the Pallas kernels cover this problem (see :func:`kernel_supported`)."""
  if not kernel_supported(nms, batch, dtype):
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
  **options: Any,
) -> jax.Array:
  """Forward Pallas kernel ``x @ W`` on 2-D operands (not differentiable).

  Args:
    x: ``[B, K]`` activations, same dtype as ``nms.values``.
    nms: compressed ``[K, Nout]`` kernel.
    interpret: run in interpret mode (any backend); otherwise compiled for the
      default backend (GPU or TPU only).
    **options: ``schedule`` (``"grid"``/``"loop"`` or None, see
      :mod:`~sparsejax._src.kernels.nm_pallas`), ``block_m`` (batch), ``block_n``
      (output) and ``block_k`` (contraction, a multiple of m) blocks: powers of 2 or
      None for the target's defaults.

  Returns:
    ``[B, Nout]`` in ``x.dtype`` (f32 accumulation).

  Raises:
    TypeError, ValueError: for invalid operands or options, a problem the kernels do
      not cover (see :func:`kernel_supported`), or concrete invalid indices.
  """
  check_operands(x, nms, "nm_matmul_fwd_kernel")
  _check_kernel_operands(nms, x.dtype, x.shape[0], "nm_matmul_fwd_kernel")
  cfg = _direct_config(interpret, **options)
  return launch("fwd", (x, nms.values.astype(x.dtype), nms.indices), nms, cfg, x.dtype)


def nm_matmul_dx_kernel(
  dy: jax.Array,
  nms: NMSparse,
  *,
  interpret: bool = False,
  **options: Any,
) -> jax.Array:
  """Input-gradient Pallas kernel ``dy @ W^T`` on 2-D operands.

  Args:
    dy: ``[B, Nout]`` output cotangent.
    nms: compressed ``[K, Nout]`` kernel.
    interpret: as in :func:`nm_matmul_fwd_kernel`.
    **options: as in :func:`nm_matmul_fwd_kernel` (``block_n`` blocks the reduction).

  Returns:
    ``[B, K]`` in ``dy.dtype``.

  Raises:
    TypeError, ValueError: as :func:`nm_matmul_fwd_kernel`.
  """
  if dy.ndim != 2 or dy.shape[1] != nms.shape[1]:
    raise ValueError(f"dy must be [B, Nout={nms.shape[1]}]; got dy.shape={tuple(dy.shape)}.")
  check_concrete_indices(nms, "nm_matmul_dx_kernel")
  _check_kernel_operands(nms, dy.dtype, dy.shape[0], "nm_matmul_dx_kernel")
  cfg = _direct_config(interpret, **options)
  return launch("dx", (dy, nms.values.astype(dy.dtype), nms.indices), nms, cfg, dy.dtype)


def nm_matmul_dv_kernel(
  x: jax.Array,
  dy: jax.Array,
  nms: NMSparse,
  *,
  interpret: bool = False,
  **options: Any,
) -> jax.Array:
  """Values-gradient SDDMM Pallas kernel ``compress(x^T @ dy)`` on 2-D operands.

  Args:
    x: ``[B, K]`` activations.
    dy: ``[B, Nout]`` output cotangent, same dtype as ``x``.
    nms: compressed ``[K, Nout]`` kernel (only its indices are read).
    interpret: as in :func:`nm_matmul_fwd_kernel`.
    **options: as in :func:`nm_matmul_fwd_kernel` (``block_m`` blocks the reduction).

  Returns:
    ``[K*N/M, Nout]`` in ``nms.values.dtype`` (f32 accumulation), laid out like
    ``nms.values``.

  Raises:
    TypeError, ValueError: as :func:`nm_matmul_fwd_kernel`.
  """
  check_operands(x, nms, "nm_matmul_dv_kernel")
  if dy.shape != (x.shape[0], nms.shape[1]):
    raise ValueError(
      f"dy must be [B={x.shape[0]}, Nout={nms.shape[1]}]; got dy.shape={tuple(dy.shape)}."
    )
  _check_kernel_operands(nms, x.dtype, x.shape[0], "nm_matmul_dv_kernel")
  cfg = _direct_config(interpret, **options)
  return launch("dv", (x, dy.astype(x.dtype), nms.indices), nms, cfg, nms.values.dtype)
