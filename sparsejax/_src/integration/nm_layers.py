"""Dense layers with a compressed N:M kernel (Flax NNX and Linen).

The kernel ``[in_features, out_features]`` is stored compressed
(:class:`~sparsejax._src.formats.nm_format.NMSparse`, groups of M consecutive input
features): the trainable ``values`` ``[in*N/M, out]`` and the fixed int8
``indices`` (not a parameter, so optimizers never touch it). The forward runs
:func:`~sparsejax._src.kernels.nm_matmul.nm_matmul` (Pallas kernels on GPU/TPU, the
decompress-then-dot reference on CPU). The topology is fixed for the life of
the layer; to change it, re-compress (e.g. after a DST mask update).

Typical use: train a Flax ``Dense`` kernel under an N:M mask (SR-STE, a fixed
mask, or N:M DST), then export it with :func:`nm_dense_from_kernel` (NNX) or
:func:`nm_dense_linen_variables` (Linen) for inference or further training on
compressed weights.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax._src.formats.nm_format import NMSparse, nm_compress
from sparsejax._src.kernels.nm_matmul import nm_matmul
from sparsejax._src.primitives.nm_mask import _check_nm, _is_tracer

__all__ = [
  "NM_INDICES_COLLECTION",
  "NMDense",
  "NMDenseLinen",
  "NMIndices",
  "nm_dense_from_kernel",
  "nm_dense_linen_variables",
]

#: Linen collection that holds the (non-trainable) int8 indices.
NM_INDICES_COLLECTION = "nm_indices"

_default_kernel_init = nnx.initializers.lecun_normal()
_default_bias_init = nnx.initializers.zeros_init()


class NMIndices(nnx.Variable):
  """Non-trainable int8 N:M indices of an :class:`NMDense` layer.

  A separate Variable type, so ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and
  ``nnx.grad`` (which default to ``nnx.Param``) leave it alone, while
  ``nnx.state(model, NMIndices)`` selects it for checkpoints.
  """


def _check_in_features(in_features: int, m: int, owner: str) -> None:
  """Raises unless ``in_features`` is divisible by the group size ``m``."""
  if in_features % m:
    raise ValueError(
      f"{owner}: in_features must be divisible by m (groups of m input features); "
      f"got in_features={in_features}, m={m}."
    )


def _nm_dense_apply(
  x: jax.Array, nms: NMSparse, bias: jax.Array | None, dtype: Any, interpret: bool | None
) -> jax.Array:
  """The forward shared by :class:`NMDense` and :class:`NMDenseLinen`: ``x @ W + bias``.

  Args:
    x: ``[..., in_features]`` inputs.
    nms: the compressed ``[in_features, out_features]`` kernel.
    bias: ``[out_features]`` or None.
    dtype: computation dtype (``x``, the values and the bias are cast to it), or None
      to promote ``x`` and the parameters.
    interpret: forwarded to :func:`nm_matmul`.

  Returns:
    ``[..., out_features]`` outputs.
  """
  if dtype is not None:
    x = x.astype(dtype)
    nms = nms.replace(values=nms.values.astype(dtype))
    bias = None if bias is None else bias.astype(dtype)
  y = nm_matmul(x, nms, interpret=interpret)
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y


class NMDense(nnx.Module):
  """A Dense layer whose kernel is stored compressed N:M (Flax NNX).

  ``y = x @ W + b`` with ``W: [in_features, out_features]`` keeping n of every m
  consecutive input features per output. Parameters: ``values``
  (``nnx.Param``, ``[in*n/m, out]``) and ``bias`` (``nnx.Param``, ``[out]``,
  optional); ``indices`` is an :class:`NMIndices` variable (int8, not trained).

  At construction the kernel is drawn from ``kernel_init`` and projected to
  N:M by magnitude (the n largest ``|w|`` per group are kept). To wrap a
  trained kernel use :func:`nm_dense_from_kernel`.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> layer = NMDense(64, 32, 2, 4, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((8, 64))).shape
    (8, 32)
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    n: int,
    m: int,
    *,
    use_bias: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    kernel_init: Any = _default_kernel_init,
    bias_init: Any = _default_bias_init,
    interpret: bool | None = None,
    rngs: nnx.Rngs,
  ):
    """Initialises the layer.

    Args:
      in_features: input features K, divisible by ``m``.
      out_features: output features Nout.
      n: kept entries per group.
      m: group size along the input features.
      use_bias: whether to add a bias.
      dtype: computation dtype (inputs and weights are cast to it), or None
        to promote ``x`` and the parameters.
      param_dtype: dtype of ``values`` and ``bias``.
      kernel_init: initializer of the dense kernel before the N:M projection.
      bias_init: initializer of the bias.
      interpret: forwarded to :func:`nm_matmul` (``True`` runs the Pallas
        kernels in interpret mode).
      rngs: random number generators (``rngs.params()`` is used).

    Raises:
      ValueError: for an invalid N:M pair or ``in_features % m != 0``.
    """
    n, m = _check_nm(n, m)
    _check_in_features(in_features, m, "NMDense")
    kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
    nms = nm_compress(kernel, n, m)
    self.values = nnx.Param(nms.values)
    self.indices = NMIndices(nms.indices)
    self.bias: nnx.Param | None
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
    else:
      self.bias = nnx.data(None)
    self.in_features = in_features
    self.out_features = out_features
    self.n = n
    self.m = m
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.interpret = interpret

  def sparse_kernel(self) -> NMSparse:
    """The kernel as an :class:`NMSparse` ``[in_features, out_features]``."""
    return NMSparse(
      values=self.values[...],
      indices=self.indices[...],
      n=self.n,
      m=self.m,
      shape=(self.in_features, self.out_features),
    )

  def dense_kernel(self) -> jax.Array:
    """The decompressed kernel ``[in_features, out_features]``."""
    return self.sparse_kernel().todense()

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the layer.

    Args:
      x: ``[..., in_features]`` inputs.

    Returns:
      ``[..., out_features]`` outputs.
    """
    bias = self.bias[...] if self.bias is not None else None
    return _nm_dense_apply(x, self.sparse_kernel(), bias, self.dtype, self.interpret)


def _check_nm_kernel(kernel: jax.Array, n: int, m: int, fn: str) -> None:
  """Raises if a concrete 2-D kernel has more than n non-zeros in a group."""
  if kernel.ndim != 2:
    raise ValueError(
      f"{fn}: kernel must be a 2-D [in_features, out_features] Dense kernel; "
      f"got kernel.shape={tuple(kernel.shape)}."
    )
  _check_in_features(kernel.shape[0], m, fn)
  if _is_tracer(kernel):
    raise TypeError(f"{fn}: kernel must be a concrete array (call it outside jit).")
  k, nout = kernel.shape
  counts = (np.asarray(kernel).reshape(k // m, m, nout) != 0).sum(axis=1)
  if counts.size and counts.max() > n:
    g, c = (int(v) for v in np.argwhere(counts > n)[0])
    raise ValueError(
      f"{fn}: kernel is not {n}:{m} sparse along axis 0 (groups of {m} input "
      f"features): group {g} (rows {g * m}..{g * m + m - 1}), column {c} has "
      f"{int(counts[g, c])} non-zeros; {int((counts > n).sum())} groups exceed {n}. "
      "Apply the N:M mask first (e.g. kernel * nm_mask(kernel, n, m))."
    )


def nm_dense_from_kernel(
  kernel: jax.Array,
  bias: jax.Array | None,
  n: int,
  m: int,
  *,
  dtype: Any = None,
  interpret: bool | None = None,
) -> NMDense:
  """Exports a trained N:M-masked Dense kernel to an :class:`NMDense` layer.

  Args:
    kernel: concrete ``[in_features, out_features]`` kernel with at most n
      non-zeros in every group of m consecutive rows (pruned entries exactly 0).
    bias: ``[out_features]`` bias or None.
    n: kept entries per group.
    m: group size along axis 0.
    dtype: computation dtype of the layer.
    interpret: forwarded to :func:`nm_matmul`.

  Returns:
    An :class:`NMDense` with ``values``/``bias`` in ``kernel.dtype`` whose
    forward equals ``x @ kernel + bias``.

  Raises:
    ValueError: if the kernel is not 2-D, not divisible by m, or not N:M.
    TypeError: if the kernel is a tracer.
  """
  n, m = _check_nm(n, m)
  _check_nm_kernel(kernel, n, m, "nm_dense_from_kernel")
  kernel = jnp.asarray(kernel)
  in_features, out_features = kernel.shape
  layer = NMDense(
    in_features,
    out_features,
    n,
    m,
    use_bias=bias is not None,
    dtype=dtype,
    param_dtype=kernel.dtype,
    kernel_init=nnx.initializers.zeros_init(),
    interpret=interpret,
    rngs=nnx.Rngs(0),
  )
  nms = nm_compress(kernel, n, m)
  layer.values = nnx.Param(nms.values)
  layer.indices = NMIndices(nms.indices)
  if bias is not None:
    bias = jnp.asarray(bias)
    if tuple(bias.shape) != (out_features,):
      raise ValueError(
        f"nm_dense_from_kernel: bias.shape must be ({out_features},); got {tuple(bias.shape)}."
      )
    layer.bias = nnx.Param(bias)
  return layer


class NMDenseLinen(nn.Module):
  """Linen counterpart of :class:`NMDense`.

  Variables: ``params/values`` ``[in*n/m, features]``, ``params/bias``
  (optional) and the int8 ``nm_indices/indices`` in the
  :data:`NM_INDICES_COLLECTION` collection (not trained: pass only
  ``variables["params"]`` to the optimizer and the whole dict to ``apply``).

  Attributes:
    features: output features.
    n: kept entries per group.
    m: group size along the input features.
    use_bias: whether to add a bias.
    dtype: computation dtype, or None to promote.
    param_dtype: dtype of the parameters.
    kernel_init: initializer of the dense kernel before the N:M projection.
    bias_init: initializer of the bias.
    interpret: forwarded to :func:`nm_matmul`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> layer = NMDenseLinen(features=32, n=2, m=4)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 64)))
    >>> sorted(variables)
    ['nm_indices', 'params']
  """

  features: int
  n: int
  m: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = _default_kernel_init
  bias_init: Any = _default_bias_init
  interpret: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the layer to ``x: [..., in_features]`` -> ``[..., features]``."""
    n, m = _check_nm(self.n, self.m)
    in_features = x.shape[-1]
    _check_in_features(in_features, m, "NMDenseLinen")
    cache: dict[str, NMSparse] = {}

    def init_nms(key: jax.Array) -> NMSparse:
      if "nms" not in cache:
        kernel = self.kernel_init(key, (in_features, self.features), self.param_dtype)
        cache["nms"] = nm_compress(kernel, n, m)
      return cache["nms"]

    values = self.param("values", lambda key: init_nms(key).values)
    indices = self.variable(
      NM_INDICES_COLLECTION,
      "indices",
      lambda: init_nms(self.make_rng("params")).indices,
    ).value
    nms = NMSparse(values=values, indices=indices, n=n, m=m, shape=(in_features, self.features))
    bias = None
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    return _nm_dense_apply(x, nms, bias, self.dtype, self.interpret)


def nm_dense_linen_variables(
  kernel: jax.Array, bias: jax.Array | None, n: int, m: int
) -> dict[str, dict[str, jax.Array]]:
  """Exports a trained N:M-masked Dense kernel to :class:`NMDenseLinen` variables.

  Args:
    kernel: concrete ``[in_features, out_features]`` N:M-masked kernel.
    bias: ``[out_features]`` or None (then build the layer with ``use_bias=False``).
    n: kept entries per group.
    m: group size along axis 0.

  Returns:
    ``{"params": {"values", ["bias"]}, "nm_indices": {"indices"}}`` for
    ``NMDenseLinen(features=out_features, n=n, m=m).apply``.

  Raises:
    ValueError: if the kernel is not 2-D, not divisible by m, or not N:M.
  """
  n, m = _check_nm(n, m)
  _check_nm_kernel(kernel, n, m, "nm_dense_linen_variables")
  nms = nm_compress(jnp.asarray(kernel), n, m)
  params: dict[str, jax.Array] = {"values": nms.values}
  if bias is not None:
    params["bias"] = jnp.asarray(bias)
  return {"params": params, NM_INDICES_COLLECTION: {"indices": nms.indices}}
