"""Shared types and argument validation for sparsejax (no pytrees, no Flax).

Everything here is used by several layers: the records a criterion or a structure is
given (:class:`ScoreContext`, :class:`LayerInfo`), and the ``check_*`` helpers that turn a
bad argument into an error naming it and the allowed values.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Params = Any  # a pytree of arrays
Masks = Any  # a params-structured pytree: bool arrays for sparse leaves, MaskedNode otherwise
MASK_DTYPE = jnp.bool_


class LayerInfo(NamedTuple):
  """Where a sparse-candidate leaf sits in the model (static Python values).

  The order is the model's layer order as far as sparsejax can know it (see
  :func:`sparsejax.layer_sparsities`): explicit ``first_layer=``/``last_layer=`` patterns,
  else the natural order of the paths (``Dense_2`` before ``Dense_10``). ``is_first`` /
  ``is_last`` are ``None`` when that order is decided by names alone (``head`` vs
  ``hidden``), i.e. unknown.

  Attributes:
    path: the leaf's path, e.g. ``"layer1/kernel"``.
    shape: the leaf's shape.
    index: position among the candidate leaves (0-based) in that order.
    num_layers: number of candidate leaves.
    is_first: whether this is the model's first layer (``None``: unknown).
    is_last: whether this is the model's last (output) layer (``None``: unknown).
  """

  path: str
  shape: tuple[int, ...]
  index: int
  num_layers: int
  is_first: bool | None
  is_last: bool | None


class ScoreContext(NamedTuple):
  """Everything a drop or grow criterion (or a structure's mask update) may look at.

  Criteria are functions ``ctx -> scores`` returning an array shaped like ``ctx.param``
  (higher means "keep" for drop criteria and "grow" for grow criteria). New fields are
  added at the end; criteria that read fields by name keep working.

  Attributes:
    param: the current weights, shape ``S`` (pruned entries are exactly 0).
    grad: the dense gradient of this step, shape ``S`` (nonzero at pruned entries too).
    mask: the current bool mask, shape ``S``.
    key: a PRNG key unique to this leaf, this update and this criterion.
    step: int32 scalar, the transformation's update count at this step.
    path: the leaf's path, e.g. ``"layer1/kernel"`` (a static Python string).
    inner_moments: a tuple of the inner optimizer's param-shaped state arrays for this
      leaf (e.g. Adam's ``(mu, nu)``, SGD momentum's ``(trace,)``), in state order.
    sparsity: the layer's target sparsity (a static Python float; under a sparsity
      schedule, the final one).
    layer: the layer's position in the model (:class:`LayerInfo`).
    target_nnz: int32 scalar, the number of nonzeros the mask must have after this
      update under a sparsity schedule (gradual pruning, GraNet), or ``None`` when the
      update keeps nnz (every drop-and-grow method).
  """

  param: jax.Array
  grad: jax.Array
  mask: jax.Array
  key: jax.Array
  step: jax.Array
  path: str
  inner_moments: tuple[jax.Array, ...]
  sparsity: float = 0.0
  layer: LayerInfo | None = None
  target_nnz: jax.Array | None = None


def check_sparsity(name: str, value: Any, *, allow_none: bool = False) -> float | None:
  """Validates a sparsity in [0, 1); raises ValueError naming ``name`` otherwise."""
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"`{name}` must be a float in [0, 1), got {value!r} ({type(value).__name__}).")
  value = float(value)
  if not (0.0 <= value < 1.0) or math.isnan(value):
    raise ValueError(f"`{name}` must be in [0, 1) (fraction of zeros), got {value}.")
  return value


def check_fraction(name: str, value: Any) -> float:
  """Validates a fraction in [0, 1]; raises ValueError naming ``name`` otherwise."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"`{name}` must be a float in [0, 1], got {value!r} ({type(value).__name__}).")
  value = float(value)
  if not (0.0 <= value <= 1.0) or math.isnan(value):
    raise ValueError(f"`{name}` must be in [0, 1], got {value}.")
  return value


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
  """Validates an integer (>= ``minimum``); raises naming ``name`` otherwise."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"`{name}` must be an int, got {value!r} ({type(value).__name__}).")
  value = int(value)
  if minimum is not None and value < minimum:
    raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
  return value


def check_bool(name: str, value: Any) -> bool:
  """Validates a bool; raises TypeError naming ``name`` otherwise."""
  if not isinstance(value, bool):
    raise TypeError(f"`{name}` must be a bool (True or False), got {value!r}.")
  return value


def check_callable(name: str, fn: Any, n_args: int) -> Callable[..., Any]:
  """Checks that ``fn`` is callable with ``n_args`` positional arguments."""
  if not callable(fn):
    raise TypeError(f"`{name}` must be callable, got {fn!r}.")
  try:
    inspect.signature(fn).bind(*([None] * n_args))
  except TypeError as e:
    raise TypeError(
      f"`{name}` must accept exactly {n_args} positional argument(s); "
      f"{getattr(fn, '__name__', fn)!r} has signature {inspect.signature(fn)}: {e}"
    ) from None
  except ValueError:  # builtins without a signature: accept.
    pass
  return fn


def is_floating(leaf: Any) -> bool:
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def floor_count(size: int, fraction: float) -> int:
  """``floor(fraction * size)`` robust to float noise (0.29 * 100 -> 29, not 28).

  A documented departure from calgaryml/condensed-sparsity, which computes a budget as
  ``int(size * fraction)`` in float64: 0.1 * 4000 = 399.99… gives 399 there, 400 here.
  """
  return int(math.floor(fraction * size + 1e-9))


def nnz_for_sparsity(size: int, sparsity: float) -> int:
  """Number of nonzeros of a layer of ``size`` at ``sparsity``: ``size - floor(S*size)``."""
  return size - floor_count(size, sparsity)


def shape_size(shape: Sequence[int]) -> int:
  return int(np.prod(shape, dtype=np.int64))


def fan_in_shape(shape: Sequence[int]) -> tuple[int, int]:
  """``(fan_in, n_out)`` of a kernel in Flax layout: neurons on the last axis."""
  shape = tuple(shape)
  return shape_size(shape[:-1]), shape[-1]


# --------------------------------------------------------------------------------------
# Explicit sharding ("sharding in types", the default axis type of jax.make_mesh).
# --------------------------------------------------------------------------------------


def explicit_sharding_spec(x: Any) -> jax.sharding.PartitionSpec | None:
  """``x``'s ``PartitionSpec`` when its type carries an Explicit-axes mesh, else None.

  Under Auto axes (or without a mesh) shardings are not part of the type and the compiler
  propagates them; nothing needs to be done then.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
    return None
  return sharding.spec


def reshard_like(x: jax.Array, like: Any) -> jax.Array:
  """Gives ``x`` the Explicit sharding of ``like`` (same shape); a no-op otherwise."""
  if explicit_sharding_spec(like) is None:
    return x
  concrete = isinstance(like, jax.Array) and not isinstance(like, jax.core.Tracer)
  return jax.sharding.reshard(x, like.sharding if concrete else jax.typeof(like).sharding)


def sparsity_totals(layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """Totals of per-layer ``{"size", "nnz", "sparse"}`` entries: all leaves, sparse leaves.

  Returns:
    ``{"total_size", "total_nnz", "total_sparsity", "sparse_size", "sparse_nnz",
    "sparse_sparsity"}`` (Python numbers; sparsity 0 for an empty set).
  """
  out: dict[str, Any] = {}
  for key, chosen in (
    ("total", list(layers.values())),
    ("sparse", [e for e in layers.values() if e["sparse"]]),
  ):
    size = sum(e["size"] for e in chosen)
    nnz = sum(e["nnz"] for e in chosen)
    out[f"{key}_size"] = size
    out[f"{key}_nnz"] = nnz
    out[f"{key}_sparsity"] = 1.0 - nnz / size if size else 0.0
  return out
