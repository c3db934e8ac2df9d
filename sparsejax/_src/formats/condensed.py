"""Condensed constant-fan-in format (SRigL) and its fast inference matmul.

SRigL (Lasby et al., "Dynamic Sparse Training with Structured Sparsity", ICLR 2024,
https://arxiv.org/abs/2305.02299) trains masks in which every *active* output neuron
keeps the same number ``k`` of inputs (constant fan-in), and may ablate whole neurons.
Such a layer can be stored "condensed": per active neuron, its ``k`` kept weights and
the ``k`` input indices they read.

Format (:class:`Condensed`, a pytree):

* ``values  [n_active, k]`` floating: kept weights, row ``r`` belongs to output
  neuron ``active[r]``, in ascending input order.
* ``indices [n_active, k]`` int16 when the fan-in size ``K <= 32767``, else int32:
  input indices, sorted ascending per row.
* ``active  [n_active]`` int32: sorted indices of the active output neurons (those
  with any kept weight).
* ``bias [out_features]`` or ``None``: the layer's bias, for *all* outputs.
* ``dense [in_features, out_features]`` or ``None``: an optional pre-masked dense copy
  (``condense(..., keep_dense=True)``) for the large-batch dense path.
* static ``in_features`` (``K``, the product of all kernel axes but the last),
  ``out_features`` (``N``) and ``kernel_shape``.

Output convention: outputs keep the **full width** ``N``. An ablated neuron (all-zero
mask column) outputs only its bias, exactly like the masked dense layer
``x @ (kernel * mask) + bias``, so the next layer needs no re-indexing. (SRigL's
reference code instead drops ablated neurons *and their bias* from the output and
shrinks the next layer's input; that is exact only if the bias is zero or folded into
the next layer.)

Kernel layouts follow Flax: ``[in, out]`` for ``Dense`` and ``[kh, kw, in, out]`` for
``Conv``; the fan-in axis is the row-major flattening of all axes but the last, so a
conv layer condenses to ``[K = kh*kw*in, out]`` and :func:`condensed_matmul` takes
patches flattened in ``(kh, kw, in)`` order.

Inference paths (:func:`condensed_matmul`, chosen at trace time from static shapes):

* ``"native"``: fused C++ kernel through the XLA FFI (CPU, float32), built by
  ``setup.py``. SIMD gathers at batch 1-2, transposed batch tiles above. On the 2-core
  dev machine it beat dense at every batch measured (1 to 1024) at 70-99% sparsity
  (see ``benchmarks/RESULTS.md``).
* ``"gather"``: XLA ``take`` + ``einsum`` (the only pure-XLA formulation that beats
  dense, at batch 1-2 on >= 80%-sparse layers; the literal SRigL gather-multiply-sum is
  much slower).
* ``"dense"``: ``x @ W`` on the pre-masked dense copy (``keep_dense=True``), or on a
  copy scattered inside the computation when none is stored (correct, but pays a
  scatter per call).
* ``"auto"``: native when it is built, the backend is the CPU, inputs are float32 and
  the density is <= 35%; else gather for batch <= 2 at density <= 20%; else dense.

``condensed_matmul`` is meant for inference; the gather and dense paths are
differentiable, the native path is not (``ffi_call`` has no differentiation rule).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src.kernels import condensed_native

__all__ = [
  "Condensed",
  "NotConstantFanInError",
  "condense",
  "condensed_matmul",
  "condensed_nbytes",
  "select_condensed_method",
  "uncondense",
]

logger = logging.getLogger("sparsejax.condensed")

Method = Literal["auto", "native", "gather", "dense"]
_METHODS = ("auto", "native", "gather", "dense")

INT16_MAX_FAN_IN = 32767
"""Largest fan-in size ``K`` stored with int16 indices (int32 above)."""

# Dispatch thresholds, measured by benchmarks/condensed_inference.py on the 2-core dev
# machine (Xeon, AVX-512, jax 0.10.2; figures in benchmarks/RESULTS.md).
# XLA gather + einsum beats dense only at tiny batches (it materialises [B, n_active, k])
# and only on sparse layers (batch 1: 0.9-1.2x at 80% sparsity, 2x at 90%, 0.5x at 70%).
_GATHER_MAX_BATCH = 2
_GATHER_MAX_DENSITY = 0.2
# The native kernel beat dense at every batch measured (1 to 1024) at 70-99% sparsity;
# at 50% it is about even (0.8-1.5x), so above this density dense is taken.
_NATIVE_MAX_DENSITY = 0.35

_warned_fallback = False


class NotConstantFanInError(ValueError):
  """Raised by :func:`condense` when the active neurons' fan-ins differ."""


@dataclasses.dataclass(frozen=True)
class Condensed:
  """A constant-fan-in sparse layer in condensed form (SRigL); a JAX pytree.

  Build it with :func:`condense`; see the module docstring for the format.

  Attributes:
    values: ``[n_active, k]`` kept weights (kernel dtype).
    indices: ``[n_active, k]`` int16/int32 input indices, ascending per row.
    active: ``[n_active]`` int32 sorted output indices of the active neurons.
    bias: ``[out_features]`` or ``None``.
    dense: ``[in_features, out_features]`` pre-masked kernel or ``None``.
    in_features: ``K``, the fan-in size (static).
    out_features: ``N``, the number of outputs (static).
    kernel_shape: original kernel shape, e.g. ``(in, out)`` or ``(kh, kw, in, out)``
      (static).
  """

  values: jax.Array
  indices: jax.Array
  active: jax.Array
  bias: jax.Array | None
  dense: jax.Array | None
  in_features: int
  out_features: int
  kernel_shape: tuple[int, ...]

  @property
  def fan_in(self) -> int:
    """``k``, the number of kept inputs of every active neuron."""
    return int(self.values.shape[1])

  @property
  def n_active(self) -> int:
    """Number of active (non-ablated) output neurons."""
    return int(self.values.shape[0])

  @property
  def density(self) -> float:
    """Fraction of kept kernel entries, ``n_active * k / (K * N)``."""
    return self.n_active * self.fan_in / (self.in_features * self.out_features)

  @property
  def dtype(self) -> jnp.dtype:
    """dtype of the weights."""
    return self.values.dtype


jax.tree_util.register_dataclass(
  Condensed,
  data_fields=["values", "indices", "active", "bias", "dense"],
  meta_fields=["in_features", "out_features", "kernel_shape"],
)


def _concrete(name: str, a: jax.typing.ArrayLike) -> np.ndarray:
  """Returns ``a`` as a host array; raises if it is a tracer (shapes depend on its values)."""
  if isinstance(a, jax.core.Tracer):
    raise ValueError(
      f"condense needs a concrete `{name}` (its output shapes depend on the mask "
      "values); call it outside jax.jit / grad / vmap"
    )
  return np.asarray(a)


def condense(
  kernel: jax.typing.ArrayLike,
  mask: jax.typing.ArrayLike,
  bias: jax.typing.ArrayLike | None = None,
  *,
  keep_dense: bool = False,
) -> Condensed:
  """Condenses a masked constant-fan-in kernel (SRigL format).

  Runs on concrete arrays (NumPy does the variable-size parts); not traceable.

  Args:
    kernel: ``[in, out]`` (Dense) or ``[kh, kw, in, out]`` (Conv) floating kernel in
      Flax layout. Any rank >= 2 works: fan-in is over all axes but the last.
    mask: same shape as ``kernel``, bool or uint8 (any dtype; nonzero = kept).
    bias: optional ``[out]`` floating bias; kept for all outputs.
    keep_dense: also store the pre-masked dense kernel ``[K, out]`` (the fastest
      path at large batch when the native kernel is unavailable; costs
      ``K * out * itemsize`` bytes).

  Returns:
    The :class:`Condensed` layer. ``uncondense(condense(kernel, mask))`` equals
    ``kernel * mask`` exactly.

  Raises:
    ValueError: naming the argument, if ``kernel`` is not floating or has rank < 2,
      ``mask`` has another shape or keeps nothing, ``bias`` has the wrong shape or
      dtype, or an input is a tracer.
    NotConstantFanInError: (a ``ValueError``) if the active neurons' fan-ins differ;
      the message lists the distinct fan-ins found.

  Example:
    >>> import numpy as np, sparsejax
    >>> kernel = np.arange(12, dtype=np.float32).reshape(4, 3)
    >>> mask = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]], bool)
    >>> c = sparsejax.condense(kernel, mask)
    >>> c.values.shape, c.active.tolist(), c.indices.tolist()
    ((2, 2), [0, 1], [[0, 1], [1, 2]])
  """
  k_np = _concrete("kernel", kernel)
  m_np = _concrete("mask", mask)
  if k_np.ndim < 2:
    raise ValueError(
      f"kernel must have rank >= 2 ([in, out] or [kh, kw, in, out]), got shape {k_np.shape}"
    )
  if not jnp.issubdtype(k_np.dtype, jnp.floating):
    raise ValueError(f"kernel must be floating point, got dtype {k_np.dtype}")
  if m_np.shape != k_np.shape:
    raise ValueError(f"mask shape {m_np.shape} does not match kernel shape {k_np.shape}")
  if m_np.dtype.kind not in "biuf":
    raise ValueError(f"mask must be bool or integer (uint8), got dtype {m_np.dtype}")
  kernel_shape = tuple(int(d) for d in k_np.shape)
  n_out = kernel_shape[-1]
  n_in = math.prod(kernel_shape[:-1])
  if bias is not None:
    b_np = _concrete("bias", bias)
    if b_np.shape != (n_out,):
      raise ValueError(f"bias must have shape ({n_out},), got {b_np.shape}")
    if not jnp.issubdtype(b_np.dtype, jnp.floating):
      raise ValueError(f"bias must be floating point, got dtype {b_np.dtype}")

  keep_t = m_np.reshape(n_in, n_out).astype(bool).T  # [N, K]
  fan_ins = keep_t.sum(axis=1)
  active = np.flatnonzero(keep_t.any(axis=1)).astype(np.int32)
  if active.size == 0:
    raise ValueError("mask keeps no entry (all zeros); nothing to condense")
  distinct, counts = np.unique(fan_ins[active], return_counts=True)
  if distinct.size != 1:
    pairs = list(zip(distinct.tolist(), counts.tolist(), strict=True))
    shown = ", ".join(f"{f} ({c} neurons)" for f, c in pairs[:10])
    if distinct.size > 10:
      shown += f", ... ({distinct.size} distinct)"
    raise NotConstantFanInError(
      "mask is not constant fan-in: every active output neuron must keep the same "
      f"number of inputs, found fan-ins {shown}"
    )
  k = int(distinct[0])
  # nonzero() is row-major, so the indices of each row come out sorted ascending.
  _, cols = np.nonzero(keep_t[active])
  idx = cols.reshape(active.size, k)
  index_dtype = np.int16 if n_in <= INT16_MAX_FAN_IN else np.int32
  w_t = k_np.reshape(n_in, n_out).T  # [N, K]
  values = np.take_along_axis(w_t[active], idx, axis=1)
  dense = None
  if keep_dense:
    dense = jnp.asarray(np.where(keep_t.T, k_np.reshape(n_in, n_out), 0).astype(k_np.dtype))
  return Condensed(
    values=jnp.asarray(values),
    indices=jnp.asarray(idx.astype(index_dtype)),
    active=jnp.asarray(active),
    bias=None if bias is None else jnp.asarray(b_np),
    dense=dense,
    in_features=n_in,
    out_features=n_out,
    kernel_shape=kernel_shape,
  )


def _scatter_dense(c: Condensed) -> jax.Array:
  """``[K, N]`` masked dense kernel scattered from ``c`` (traceable)."""
  w_t = jnp.zeros((c.out_features, c.in_features), c.values.dtype)
  w_t = w_t.at[c.active[:, None], c.indices.astype(jnp.int32)].set(
    c.values, unique_indices=True, indices_are_sorted=True
  )
  return w_t.T


def uncondense(c: Condensed) -> jax.Array:
  """Returns the masked dense kernel with the original shape (``kernel * mask``).

  Traceable (a scatter); uses the stored dense copy when there is one.

  Args:
    c: a :class:`Condensed` layer.

  Returns:
    ``c.kernel_shape`` array of ``c.dtype``, zero outside the kept entries.
  """
  w = c.dense if c.dense is not None else _scatter_dense(c)
  return w.reshape(c.kernel_shape)


def condensed_nbytes(c: Condensed) -> int:
  """True in-memory size of ``c`` in bytes.

  ``values + indices + active (+ bias) (+ dense copy)``: ``n_active * k * (b + ib) +
  4 * n_active (+ N * b) (+ K * N * b)``, with ``b`` bytes per value and ``ib`` = 2
  (int16) or 4 (int32) bytes per index (KERNELS.md §5).
  """
  return int(sum(leaf.nbytes for leaf in jax.tree.leaves(c)))


def _native_ok(c: Condensed, x_dtype: jnp.dtype) -> tuple[bool, str]:
  """Whether the native kernel can run ``c`` on ``x_dtype`` inputs, and if not, why."""
  if jax.default_backend() != "cpu":
    return False, f"the default backend is {jax.default_backend()!r}, not cpu"
  if x_dtype != jnp.float32 or c.values.dtype != jnp.float32:
    return False, f"it needs float32 inputs and values (got {x_dtype}, {c.values.dtype})"
  if not condensed_native.native_available():
    return False, condensed_native.native_unavailable_reason()
  return True, ""


def select_condensed_method(
  c: Condensed, batch: int, x_dtype: jnp.dtype = jnp.float32
) -> Literal["native", "gather", "dense"]:
  """Returns the path ``condensed_matmul(..., method="auto")`` takes.

  Decided from static information only (shapes, dtypes, backend, whether the native
  kernel is built), so the same decision is taken at trace time under ``jit``.

  Args:
    c: the condensed layer.
    batch: number of rows, i.e. the product of the leading dims of ``x``.
    x_dtype: dtype of ``x``.

  Returns:
    ``"native"``, ``"gather"`` or ``"dense"``.
  """
  global _warned_fallback
  ok, why = _native_ok(c, jnp.dtype(x_dtype))
  density = c.density
  if ok and batch > 0 and density <= _NATIVE_MAX_DENSITY:
    return "native"
  if (
    not ok
    and not _warned_fallback
    and jax.default_backend() == "cpu"
    and jnp.dtype(x_dtype) == jnp.float32
    and c.values.dtype == jnp.float32
  ):
    _warned_fallback = True
    logger.warning(
      "sparsejax: native condensed CPU kernel unavailable (%s); using the XLA "
      "path, about 2-3x slower at batch 1. Reinstall sparsejax with a C++17 "
      "compiler to build it.",
      why,
    )
  if 0 < batch <= _GATHER_MAX_BATCH and density <= _GATHER_MAX_DENSITY:
    return "gather"
  return "dense"


def _gather_matmul(x2: jax.Array, c: Condensed) -> jax.Array:
  """The ``"gather"`` path: ``take`` the kept inputs, contract with the values."""
  # [B, n_active, k] gather then a batched dot (XLA turns the einsum into a dot;
  # gather-multiply-sum lowers to a slow reduce fusion, KERNELS.md §4).
  g = jnp.take(x2, c.indices, axis=1, mode="clip")
  y_act = jnp.einsum("brk,rk->br", g, c.values)
  return _expand(y_act, c)


def _expand(y_act: jax.Array, c: Condensed) -> jax.Array:
  """Places ``[B, n_active]`` outputs at ``active`` in ``[B, N]`` and adds the bias."""
  if c.n_active == c.out_features:  # `active` is sorted and unique, so it is arange(N).
    y = y_act
  else:
    y = jnp.zeros((y_act.shape[0], c.out_features), y_act.dtype)
    y = y.at[:, c.active].set(y_act, unique_indices=True, indices_are_sorted=True)
  if c.bias is not None:
    y = y + c.bias
  return y


def _dense_matmul(x2: jax.Array, c: Condensed) -> jax.Array:
  """The ``"dense"`` path: the stored dense copy, or one scattered in the call."""
  w = c.dense if c.dense is not None else _scatter_dense(c)
  y = x2 @ w
  if c.bias is not None:
    y = y + c.bias
  return y


def condensed_matmul(
  x: jax.typing.ArrayLike, c: Condensed, *, method: Method = "auto"
) -> jax.Array:
  """Computes ``x @ (kernel * mask) (+ bias)`` from a condensed layer.

  Leading dims of ``x`` are flattened into one batch of ``B`` rows, and the path is
  chosen at trace time from static shapes (see :func:`select_condensed_method`):

  * ``"native"``: fused C++ kernel (CPU, float32; built at install time).
  * ``"gather"``: XLA gather + einsum (beats dense only at ``B <= 2``).
  * ``"dense"``: ``x @ W`` on the stored pre-masked copy (``keep_dense=True``), else on
    a copy scattered per call.
  * ``"auto"``: ``"native"`` if usable and the density is <= 35%, else ``"gather"``
    for ``B <= 2`` at density <= 20%, else ``"dense"``.

  Outputs keep the full width ``N``: ablated neurons output only their bias.

  Args:
    x: ``[..., K]`` activations, ``K = c.in_features`` (for a conv layer: patches
      flattened in ``(kh, kw, in)`` order).
    c: the condensed layer.
    method: ``"auto"``, ``"native"``, ``"gather"`` or ``"dense"``.

  Returns:
    ``[..., N]`` array, ``N = c.out_features``, dtype ``result_type(x, c.values)``.

  Raises:
    ValueError: if ``x`` has the wrong last dimension or ``method`` is unknown, or
      ``method="native"`` gets non-float32 inputs.
    RuntimeError: if ``method="native"`` and the kernel is not built or the backend
      is not the CPU.

  Example:
    >>> import numpy as np, jax.numpy as jnp, sparsejax
    >>> kernel = np.ones((4, 2), np.float32)
    >>> mask = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], bool)
    >>> c = sparsejax.condense(kernel, mask, bias=np.array([10.0, 20.0], np.float32))
    >>> sparsejax.condensed_matmul(jnp.arange(4.0), c).tolist()
    [12.0, 24.0]
  """
  if method not in _METHODS:
    raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
  x = jnp.asarray(x)
  if x.ndim < 1 or x.shape[-1] != c.in_features:
    raise ValueError(f"x must have shape [..., {c.in_features}] (in_features), got {x.shape}")
  lead = x.shape[:-1]
  batch = math.prod(lead)
  x2 = x.reshape(batch, c.in_features)
  if method == "auto":
    method = select_condensed_method(c, batch, x.dtype)
  if method == "native":
    ok, why = _native_ok(c, x.dtype)
    if not ok:
      if "float32" in why:
        raise ValueError(f"method='native' is unusable: {why}")
      raise RuntimeError(f"method='native' is unusable: {why}")
    y = condensed_native.native_matmul(x2, c.values, c.indices, c.active, c.bias, c.out_features)
  elif method == "gather":
    y = _gather_matmul(x2, c)
  else:
    y = _dense_matmul(x2, c)
  return y.reshape(*lead, c.out_features)
