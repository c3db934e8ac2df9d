"""Inference layers on the condensed constant-fan-in format (SRigL).

* :class:`CondensedDense`: a Flax NNX module holding a :class:`~sparsejax.Condensed`
  layer, built from a trained kernel + mask (:meth:`CondensedDense.from_dense`) or an
  ``nnx.Linear`` (:meth:`CondensedDense.from_linear`).
* :func:`condense_params`: maps a params pytree + masks pytree to the same tree in
  which every constant-fan-in ``{"kernel", "bias"}`` layer is replaced by a
  :class:`~sparsejax.Condensed`; :func:`condensed_dense_apply` runs one such layer
  (condensed or still dense).

Outputs keep the full width (ablated neurons output their bias), so condensed and
dense layers can be mixed freely. Inference only: the buffers are not ``nnx.Param``
and the native path has no gradient.

Reference: Lasby et al., "Dynamic Sparse Training with Structured Sparsity" (SRigL),
ICLR 2024, https://arxiv.org/abs/2305.02299.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from sparsejax._src.formats.condensed import (
  Condensed,
  Method,
  NotConstantFanInError,
  condense,
  condensed_matmul,
)

__all__ = [
  "condensed_conv",
  "CondensedBuffer",
  "CondensedDense",
  "condense_params",
  "condensed_dense_apply",
]


class CondensedBuffer(nnx.Variable):
  """Non-trainable storage of a :class:`CondensedDense` layer (values, indices, ...).

  A separate Variable type, so ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` ignores it
  and ``nnx.state(model, CondensedBuffer)`` selects it.
  """


class CondensedDense(nnx.Module):
  """Dense layer stored in condensed constant-fan-in form, for inference.

  Computes ``x @ (kernel * mask) + bias`` with :func:`sparsejax.condensed_matmul`
  (the path is chosen per call from the static batch size; see
  ``select_condensed_method``). Input ``[..., in_features]``, output
  ``[..., out_features]`` (full width: ablated neurons output only their bias).

  Attributes:
    values: ``CondensedBuffer`` ``[n_active, k]``.
    indices: ``CondensedBuffer`` ``[n_active, k]`` int16/int32.
    active: ``CondensedBuffer`` ``[n_active]`` int32.
    bias: ``CondensedBuffer`` ``[out_features]`` or ``None``.
    dense: ``CondensedBuffer`` ``[in_features, out_features]`` or ``None``.
    in_features, out_features, kernel_shape: static layer sizes.
    method: ``"auto"``, ``"native"``, ``"gather"`` or ``"dense"``.

  Example:
    >>> import numpy as np, jax.numpy as jnp
    >>> from flax import nnx
    >>> from sparsejax._src.integration.condensed_layers import CondensedDense
    >>> linear = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    >>> mask = np.zeros((8, 4), bool); mask[:2] = True   # fan-in 2 for every output
    >>> layer = CondensedDense.from_linear(linear, mask)
    >>> layer(jnp.ones((3, 8))).shape
    (3, 4)
  """

  def __init__(self, condensed: Condensed, *, method: Method = "auto"):
    """Wraps a condensed layer.

    Args:
      condensed: the layer, from :func:`sparsejax.condense`.
      method: path for :func:`sparsejax.condensed_matmul`.
    """
    self.values = CondensedBuffer(condensed.values)
    self.indices = CondensedBuffer(condensed.indices)
    self.active = CondensedBuffer(condensed.active)
    self.bias = None if condensed.bias is None else CondensedBuffer(condensed.bias)
    self.dense = None if condensed.dense is None else CondensedBuffer(condensed.dense)
    self.in_features = condensed.in_features
    self.out_features = condensed.out_features
    self.kernel_shape = condensed.kernel_shape
    self.method = method

  @classmethod
  def from_dense(
    cls,
    kernel: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
    bias: jax.typing.ArrayLike | None = None,
    *,
    keep_dense: bool = False,
    method: Method = "auto",
  ) -> CondensedDense:
    """Builds the layer from a ``[in, out]`` kernel, its mask and an optional bias.

    Raises:
      ValueError: as :func:`sparsejax.condense` (e.g. the mask is not constant
        fan-in).
    """
    return cls(condense(kernel, mask, bias, keep_dense=keep_dense), method=method)

  @classmethod
  def from_linear(
    cls,
    linear: nnx.Linear,
    mask: jax.typing.ArrayLike,
    *,
    keep_dense: bool = False,
    method: Method = "auto",
  ) -> CondensedDense:
    """Builds the layer from a trained ``nnx.Linear`` and its ``[in, out]`` mask."""
    bias = None if linear.bias is None else linear.bias[...]
    return cls.from_dense(linear.kernel[...], mask, bias, keep_dense=keep_dense, method=method)

  @property
  def condensed(self) -> Condensed:
    """The layer as a :class:`~sparsejax.Condensed` pytree."""
    return Condensed(
      values=self.values[...],
      indices=self.indices[...],
      active=self.active[...],
      bias=None if self.bias is None else self.bias[...],
      dense=None if self.dense is None else self.dense[...],
      in_features=self.in_features,
      out_features=self.out_features,
      kernel_shape=self.kernel_shape,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the layer: ``[..., in_features] -> [..., out_features]``."""
    return condensed_matmul(x, self.condensed, method=self.method)


def _is_array(a: Any) -> bool:
  """Whether ``a`` is an array leaf (has ``shape`` and ``dtype``)."""
  return hasattr(a, "shape") and hasattr(a, "dtype")


def condense_params(
  params: Mapping[str, Any],
  masks: Mapping[str, Any],
  *,
  keep_dense: bool = False,
  strict: bool = False,
) -> dict[str, Any]:
  """Condenses every constant-fan-in layer of a params tree.

  A layer is a mapping whose keys are ``{"kernel"}`` or ``{"kernel", "bias"}`` (Flax
  ``Dense``/``Conv`` params; for NNX use ``nnx.to_pure_dict(nnx.state(model,
  nnx.Param))``). If ``masks`` has an array at that layer's ``"kernel"`` path, the
  layer becomes ``condense(kernel, mask, bias)``; layers without a mask (``None``,
  ``optax.MaskedNode()``, a missing key) stay as they are, and so do layers whose
  mask is not constant fan-in unless ``strict``.

  Args:
    params: nested mapping of arrays.
    masks: nested mapping of the same structure (may be partial); kernel masks are
      bool/uint8 arrays shaped like their kernels.
    keep_dense: forwarded to :func:`sparsejax.condense`.
    strict: raise instead of keeping a non-constant-fan-in layer dense.

  Returns:
    A nested ``dict`` like ``params`` with condensed layers replaced by
    :class:`~sparsejax.Condensed`; apply a layer with :func:`condensed_dense_apply`.

  Raises:
    NotConstantFanInError: with ``strict=True``, naming the layer path.
    ValueError: from :func:`sparsejax.condense` for invalid kernels or masks.
  """

  def rec(p: Any, m: Any, path: tuple[str, ...]) -> Any:
    if not isinstance(p, Mapping):
      return p
    m = m if isinstance(m, Mapping) else {}
    if "kernel" in p and set(p) <= {"kernel", "bias"} and _is_array(p["kernel"]):
      mask = m.get("kernel")
      if not _is_array(mask):
        return dict(p)
      try:
        return condense(p["kernel"], mask, p.get("bias"), keep_dense=keep_dense)
      except NotConstantFanInError as e:
        if strict:
          raise NotConstantFanInError(f"layer {'/'.join(path)}: {e}") from e
        return dict(p)
    return {key: rec(val, m.get(key), (*path, str(key))) for key, val in p.items()}

  return rec(params, masks, ())


def condensed_dense_apply(
  layer: Condensed | Mapping[str, Any], x: jax.typing.ArrayLike, *, method: Method = "auto"
) -> jax.Array:
  """Applies one layer of a :func:`condense_params` tree: ``x @ kernel (+ bias)``.

  Args:
    layer: a :class:`~sparsejax.Condensed` or a dense ``{"kernel": [in, out],
      "bias": [out]}`` mapping (a layer that was not condensed).
    x: ``[..., in]`` activations.
    method: path for condensed layers (see :func:`sparsejax.condensed_matmul`).

  Returns:
    ``[..., out]``.

  Raises:
    TypeError: if ``layer`` is neither form.
    ValueError: for a dense kernel that is not 2-D.
  """
  if isinstance(layer, Condensed):
    return condensed_matmul(x, layer, method=method)
  if isinstance(layer, Mapping) and "kernel" in layer:
    kernel = jnp.asarray(layer["kernel"])
    if kernel.ndim != 2:
      raise ValueError(
        f"layer: a dense kernel must be [in, out] to apply as a matmul, got shape {kernel.shape}"
      )
    y = jnp.asarray(x) @ kernel
    if layer.get("bias") is not None:
      y = y + layer["bias"]
    return y
  raise TypeError(f"layer must be a Condensed or a {{'kernel', 'bias'}} mapping, got {type(layer)}")


def condensed_conv(
  x: jax.Array,
  c: Condensed,
  *,
  strides: tuple[int, ...] | None = None,
  padding: str | Sequence[tuple[int, int]] = "SAME",
  method: str = "auto",
) -> jax.Array:
  """N-d convolution (channels last, Flax ``nnx.Conv`` layout) from a condensed kernel.

  Equals ``lax.conv_general_dilated(x, kernel * mask, strides, padding)`` (+ bias) for a
  kernel ``[*window, in, out]`` condensed with :func:`sparsejax.condense`. Implemented as
  im2col patches (``lax.conv_general_dilated_patches``, reordered to the kernel's
  ``(*window, in)`` fan-in order) followed by :func:`sparsejax.condensed_matmul`, so the
  per-batch dispatch (native kernel / gather / dense) applies to the ``B·H·W`` rows.

  Args:
    x: ``[batch, *spatial, in]`` input.
    c: a condensed conv kernel (``c.kernel_shape == (*window, in, out)``).
    strides: window strides (default 1 on every spatial axis).
    padding: ``"SAME"``, ``"VALID"`` or explicit pairs, as in ``lax.conv_general_dilated``.
    method: forwarded to :func:`sparsejax.condensed_matmul`.

  Returns:
    ``[batch, *out_spatial, out]``.

  Raises:
    ValueError: if ``c`` is not a conv kernel matching ``x``'s channels.
  """
  window = tuple(c.kernel_shape[:-2])
  n_in = c.kernel_shape[-2]
  if not window or x.ndim != len(window) + 2 or x.shape[-1] != n_in:
    raise ValueError(
      f"condensed_conv: `c` has kernel shape {c.kernel_shape} (expected [*window, in, out]) "
      f"but `x` has shape {x.shape} (expected [batch, *spatial, {n_in}])."
    )
  spatial = "".join("HWD"[: len(window)])
  dims = (f"N{spatial}C", f"OI{spatial}", f"N{spatial}C")
  patches = lax.conv_general_dilated_patches(
    x,
    filter_shape=window,
    window_strides=strides or (1,) * len(window),
    padding=padding,
    dimension_numbers=dims,
  )  # [..., in * prod(window)], channel-major
  lead = patches.shape[:-1]
  patches = patches.reshape(*lead, n_in, -1)
  patches = jnp.swapaxes(patches, -1, -2).reshape(*lead, -1)  # (*window, in) order
  return condensed_matmul(patches, c, method=method)
