"""N:M sparse matmul ``y = x @ W``: the public entry points, dispatch and ``custom_vjp``.

``W`` is an :class:`~sparsejax._src.formats.nm_format.NMSparse` ``[K, Nout]`` kernel
(groups of M consecutive rows along the contraction axis K, ``"kn"`` layout). The
forward, the input gradient ``dy @ W^T`` and the values gradient
``compress(x^T @ dy)`` (an SDDMM) are each a Pallas kernel
(:mod:`sparsejax._src.kernels.nm_pallas`, launched by
:mod:`sparsejax._src.kernels.nm_launch`) or a pure-JAX reference; this module picks
one per platform and ties them together with a ``custom_vjp``.

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

This module does not import ``jax.experimental.pallas``. ``lax.platform_dependent``
traces every branch, so the first trace of :func:`nm_matmul` (on any platform)
imports it through :mod:`~sparsejax._src.kernels.nm_launch`; ``import sparsejax``
alone does not.

Index checks: the raw ``NMSparse`` constructor does not validate. When
``nms.indices`` is a concrete array, every entry point checks that each index is in
``[0, m)`` and strictly increasing within its group, and raises ``ValueError``
otherwise. Under ``jit`` (traced indices) no check is possible: an index outside
``[0, m)`` matches no slot of the compare + select decompression, so its value is
silently dropped. Build kernels with ``nm_compress`` or ``make_nm_sparse`` (which
validates) to be safe.

Hardware status: see :mod:`sparsejax._src.kernels.nm_pallas` (verified in interpret
mode on CPU; the GPU/TPU kernels lower but were never compiled or run on hardware).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax._src.formats.nm_format import NMSparse, decompress_unchecked, nm_take
from sparsejax._src.kernels.nm_launch import (
  KernelConfig,
  check_operands,
  check_options,
  kernel_supported,
  launch,
)

# ``x as x`` marks a re-export: the direct kernel entry points live in nm_launch.
from sparsejax._src.kernels.nm_launch import nm_matmul_dv_kernel as nm_matmul_dv_kernel
from sparsejax._src.kernels.nm_launch import nm_matmul_dx_kernel as nm_matmul_dx_kernel
from sparsejax._src.kernels.nm_launch import nm_matmul_fwd_kernel as nm_matmul_fwd_kernel

__all__ = [
  "nm_matmul",
  "nm_matmul_dense_grad",
  "nm_matmul_dv_kernel",
  "nm_matmul_dx_kernel",
  "nm_matmul_fwd_kernel",
  "nm_matmul_reference",
]

_NT = (((1,), (1,)), ((), ()))  # a [p, r] . b [q, r] -> [p, q]
_TN = (((0,), (0,)), ((), ()))  # a [r, p] . b [r, q] -> [p, q]


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
  check_operands(x, nms, "nm_matmul_reference")
  return jnp.matmul(x, decompress_unchecked(nms), preferred_element_type=None)


def _dx_reference(dy: jax.Array, v: jax.Array, nms: NMSparse) -> jax.Array:
  """Reference ``dy @ W^T`` (f32 accumulation) with ``values = v``."""
  w = decompress_unchecked(nms.replace(values=v))
  return lax.dot_general(dy, w, _NT, preferred_element_type=jnp.float32).astype(dy.dtype)


def _dv_reference(x: jax.Array, dy: jax.Array, nms: NMSparse) -> jax.Array:
  """Reference values gradient ``compress(x^T @ dy)`` (f32 accumulation)."""
  dw = lax.dot_general(x, dy, _TN, preferred_element_type=jnp.float32)
  return nm_take(dw, nms).astype(nms.values.dtype)


def _fwd_reference(x: jax.Array, v: jax.Array, nms: NMSparse) -> jax.Array:
  """Reference forward ``x @ W`` (f32 accumulation) with ``values = v``."""
  w = decompress_unchecked(nms.replace(values=v))
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

  def config(self, target: str) -> KernelConfig:
    """The :class:`KernelConfig` for ``target`` (GPU defaults to the ``"loop"`` schedule)."""
    schedule = self.schedule
    if target == "gpu" and schedule is None:
      schedule = "loop"
    return KernelConfig(target, schedule, self.block_m, self.block_n, self.block_k)


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
  """Forward ``x @ W`` on ``[B, K]`` operands, dispatched by platform."""
  return _dispatch(
    ds,
    lambda cfg, x, v, i: launch("fwd", (x, v, i), nms, cfg, x.dtype),
    lambda x, v, i: _fwd_reference(x, v, _rebuild(nms, v, i)),
    x,
    nms.values,
    nms.indices,
  )


def _backward_dx(dy, nms: NMSparse, ds: _Dispatch) -> jax.Array:
  """Input gradient ``dy @ W^T``, dispatched by platform."""
  return _dispatch(
    ds,
    lambda cfg, dy, v, i: launch("dx", (dy, v, i), nms, cfg, dy.dtype),
    lambda dy, v, i: _dx_reference(dy, v, _rebuild(nms, v, i)),
    dy,
    nms.values,
    nms.indices,
  )


def _backward_dv(x, dy, nms: NMSparse, ds: _Dispatch) -> jax.Array:
  """Values gradient ``compress(x^T @ dy)``, dispatched by platform."""
  return _dispatch(
    ds,
    lambda cfg, x, dy, i: launch("dv", (x, dy, i), nms, cfg, nms.values.dtype),
    lambda x, dy, i: _dv_reference(x, dy, _rebuild(nms, nms.values, i)),
    x,
    dy,
    nms.indices,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _nm_matmul_2d(x: jax.Array, nms: NMSparse, ds: _Dispatch) -> jax.Array:
  """``x @ W`` on ``[B, K]`` operands with the custom VJP below."""
  return _forward(x, nms, ds)


def _nm_matmul_2d_fwd(x, nms, ds):
  """Custom-VJP forward: saves ``x`` and ``nms`` as residuals."""
  return _forward(x, nms, ds), (x, nms)


def _nm_matmul_2d_bwd(ds, res, dy):
  """Custom-VJP backward: ``dx`` and ``dvalues`` kernels; no index cotangent."""
  x, nms = res
  dx = _backward_dx(dy, nms, ds)
  dv = _backward_dv(x, dy, nms, ds)
  # Integer indices get no cotangent (None -> symbolic zero / float0).
  return dx, nms.replace(values=dv, indices=None)


_nm_matmul_2d.defvjp(_nm_matmul_2d_fwd, _nm_matmul_2d_bwd)


def _prepare(x: jax.Array, nms: NMSparse, fn: str) -> tuple[jax.Array, NMSparse, tuple[int, ...]]:
  """Checks the operands; returns ``x`` as ``[B, K]`` and both in the promoted dtype.

  Args:
    x: ``[..., K]`` activations.
    nms: the compressed kernel.
    fn: the public function named in error messages.

  Returns:
    ``(x2, nms_cast, lead)``: the 2-D activations, ``nms`` with cast values, and the
    leading shape of ``x``.
  """
  check_operands(x, nms, fn)
  dtype = jnp.result_type(x.dtype, nms.values.dtype)
  lead = tuple(x.shape[:-1])
  x2 = x.astype(dtype).reshape(-1, nms.shape[0])
  return x2, nms.replace(values=nms.values.astype(dtype)), lead


def _make_dispatch(interpret, schedule, block_m, block_n, block_k) -> _Dispatch:
  """Validates the options and returns the static :class:`_Dispatch`."""
  check_options(schedule, block_m, block_n, block_k)
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
  x2, nmsc, lead = _prepare(x, nms, "nm_matmul")
  nout = nms.shape[1]
  if not kernel_supported(nmsc, x2.shape[0], x2.dtype):
    return jnp.matmul(x2, decompress_unchecked(nmsc)).reshape(lead + (nout,))
  return _nm_matmul_2d(x2, nmsc, ds).reshape(lead + (nout,))


# ---------------------------------------------------------------------------
# Dense-gradient probe (for RigL-style regrowth on compressed weights)
# ---------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _nm_matmul_probe_2d(x, nms, probe, ds):
  """``x @ W`` whose VJP also returns the dense gradient as ``probe``'s cotangent."""
  del probe
  return _forward(x, nms, ds)


def _probe_fwd(x, nms, probe, ds):
  """Probe forward: saves ``x``, ``nms`` and a zero of the probe's dtype."""
  return _forward(x, nms, ds), (x, nms, jnp.zeros((), probe.dtype))


def _probe_bwd(ds, res, dy):
  """Probe backward: ``dx`` kernel, dense ``x^T dy`` for the probe, dvalues taken from it."""
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
  x2, nmsc, lead = _prepare(x, nms, "nm_matmul_dense_grad")
  nout = nms.shape[1]
  if not kernel_supported(nmsc, x2.shape[0], x2.dtype):
    # Forward value W (probe - stop_gradient(probe) == 0); gradient x^T dy.
    w = decompress_unchecked(nmsc) + (probe - lax.stop_gradient(probe)).astype(nmsc.values.dtype)
    return jnp.matmul(x2, w).reshape(lead + (nout,))
  return _nm_matmul_probe_2d(x2, nmsc, probe, ds).reshape(lead + (nout,))
