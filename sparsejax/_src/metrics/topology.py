"""Topology metrics of masks pytrees: sparsity, turnover, ever-active, fan-in, FLOPs.

A masks pytree has a bool array per sparse leaf and ``None`` or ``optax.MaskedNode()`` at
dense leaves (e.g. :func:`sparsejax.get_masks`'s output); NNX ``Variable`` boxes around the
arrays are unwrapped (:mod:`sparsejax._src.tree`). The metrics are
:func:`mask_summary` (per-layer and total sparsity / nnz), :func:`mask_turnover`,
:func:`update_ever_active` + :func:`ever_active_fraction` (in-time over-parameterisation),
:func:`fan_in_stats` and :func:`estimate_flops`. Everything except :func:`estimate_flops`
works inside ``jax.jit``; on host (NumPy) inputs it computes with NumPy, so nothing is
dispatched or compiled. Outside jit, turn the results into Python numbers with
:func:`to_scalars`.

Conventions: a *neuron* is one entry of a kernel's **last** axis (Flax ``Dense`` kernels are
``[in, out]``, ``Conv`` kernels ``[..., in, out]``); its *fan-in* is the number of active
weights over all other axes. Layer names are paths such as ``"layer1/kernel"``.

Metric writers live in :mod:`sparsejax._src.metrics.writers`, the progress reporter in
:mod:`sparsejax._src.metrics.progress`.
"""

from __future__ import annotations

import importlib
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._src import tree as tree_lib
from sparsejax._src.tree import sparse_leaves as sparse_leaves

TOTAL = "total"

# Transitional: names that moved to writers.py / progress.py, still served from here
# (lazily, without an import cycle) for importers of the old module (tests/experiments_test.py).
# Delete with ``__getattr__`` once nothing imports them from here.
_MOVED = {
  "MetricWriter": "writers",
  "LoggingWriter": "writers",
  "JsonlWriter": "writers",
  "MultiWriter": "writers",
  "TensorBoardWriter": "writers",
  "create_default_writer": "writers",
  "read_jsonl": "writers",
  "ReportProgress": "progress",
}


def __getattr__(name: str) -> Any:
  """Resolves the names of ``_MOVED`` from their new module."""
  module = _MOVED.get(name)
  if module is None:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"sparsejax._src.metrics.{module}"), name)


def _xp(*arrays: Any):
  """NumPy for host arrays (no per-op dispatch or compilation), jax.numpy otherwise."""
  if all(isinstance(a, np.ndarray | np.generic | bool | int | float) for a in arrays):
    return np
  return jnp


def _as_bool(m: Any) -> jax.Array:
  xp = _xp(m)
  m = xp.asarray(m)
  return m if m.dtype == np.bool_ else m != 0


def _count(m: Any) -> jax.Array:
  xp = _xp(m)
  return xp.sum(_as_bool(m), dtype=xp.int32)


def _safe_div(num: Any, den: Any) -> jax.Array:
  xp = _xp(num, den)
  num = xp.asarray(num, xp.float32)
  den = xp.asarray(den, xp.float32)
  return xp.where(den > 0, num / xp.where(den > 0, den, 1.0), xp.float32(0.0))


def _counts(masks: Any) -> list[tuple[str, Any, int]]:
  """``(path, nnz, size)`` of each sparse leaf; ``nnz`` an int32 scalar, ``size`` an int."""
  return [
    (path, _count(m), int(np.prod(m.shape, dtype=np.int64))) for path, m in sparse_leaves(masks)
  ]


def _totals(counts: list[tuple[str, Any, int]]) -> tuple[Any, int]:
  """Summed ``nnz`` and ``size`` over ``counts`` (0 and 0 when there is no sparse leaf)."""
  return sum((n for _, n, _ in counts), 0), sum(s for _, _, s in counts)


def mask_summary(masks: Any) -> dict[str, dict[str, jax.Array]]:
  """Per-layer and total sparsity and nnz of a masks pytree.

  Args:
    masks: masks pytree (see :func:`sparse_leaves`).

  Returns:
    ``{path: {"sparsity", "nnz", "size"}, ..., "total": {...}}`` where ``"total"`` sums
    over the sparse (masked) layers only. ``sparsity = 1 - nnz / size``. Values are JAX
    scalars (NumPy for NumPy masks; ``size`` is a Python int).

  Example::

    >>> mask_summary({"w": jnp.array([[1, 0], [0, 0]], bool), "b": None})["w"]["nnz"]
    Array(1, dtype=int32)
  """
  counts = _counts(masks)
  out: dict[str, dict[str, Any]] = {
    path: {"sparsity": 1.0 - _safe_div(nnz, size), "nnz": nnz, "size": size}
    for path, nnz, size in counts
  }
  nnz_tot, size_tot = _totals(counts)
  out[TOTAL] = {"sparsity": 1.0 - _safe_div(nnz_tot, size_tot), "nnz": nnz_tot, "size": size_tot}
  return out


def _check_same_structure(a: Any, b: Any, names: tuple[str, str]) -> tuple[list, list]:
  la, lb = sparse_leaves(a), sparse_leaves(b)
  pa, pb = [p for p, _ in la], [p for p, _ in lb]
  if pa != pb:
    raise ValueError(f"`{names[0]}` and `{names[1]}` have different sparse layers: {pa} vs {pb}.")
  for (p, x), (_, y) in zip(la, lb, strict=True):
    if x.shape != y.shape:
      raise ValueError(
        f"`{names[0]}` and `{names[1]}` differ in shape at {p!r}: {x.shape} vs {y.shape}."
      )
  return la, lb


def mask_turnover(old_masks: Any, new_masks: Any) -> dict[str, jax.Array]:
  """Fraction of the active positions that changed between two masks pytrees.

  Per layer ``|new ∧ ¬old| / |old|``: the share of the previously active connections that
  were replaced. With nnz preserved (every DST update) this equals ``|old ∧ ¬new| / |old|``
  and half the Hamming distance over ``|old|``. A layer with no active position has
  turnover 0.

  Args:
    old_masks: masks before the update.
    new_masks: masks after the update (same sparse layers and shapes).

  Returns:
    ``{path: turnover, ..., "total": turnover over all sparse layers}`` (float32 scalars).

  Raises:
    ValueError: if the two trees do not have the same sparse layers and shapes.
  """
  lo, ln = _check_same_structure(old_masks, new_masks, ("old_masks", "new_masks"))
  out = {}
  grown_tot = old_tot = 0
  for (path, o), (_, n) in zip(lo, ln, strict=True):
    o, n = _as_bool(o), _as_bool(n)
    xp = _xp(o, n)
    grown = xp.sum(n & ~o, dtype=xp.int32)
    nnz = xp.sum(o, dtype=xp.int32)
    out[path] = _safe_div(grown, nnz)
    grown_tot, old_tot = grown_tot + grown, old_tot + nnz
  out[TOTAL] = _safe_div(grown_tot, old_tot)
  return out


def init_ever_active(masks: Any) -> Any:
  """Starts an "ever active" record from the current masks.

  Args:
    masks: masks pytree.

  Returns:
    ``masks`` with every mask as a bool array; dense markers (``None``/``MaskedNode``) and
    the tree structure (NNX ``Variable`` boxes included) kept.
  """
  return jax.tree.map(
    lambda m: m if tree_lib.is_dense_marker(m) else _as_bool(tree_lib.unwrap(m)),
    masks,
    is_leaf=tree_lib.is_dense_marker,
  )


def update_ever_active(ever_active: Any, masks: Any) -> Any:
  """OR-accumulates ``masks`` into ``ever_active`` (jit-safe).

  Call after every mask update (or every step: it is cheap) to track in-time
  over-parameterisation (Liu et al. 2021, https://arxiv.org/abs/2102.02887).

  Args:
    ever_active: the record so far (:func:`init_ever_active`).
    masks: the current masks, with the same structure.

  Returns:
    The updated record: per sparse leaf ``ever_active | masks`` (bool), dense leaves kept.

  Raises:
    ValueError: if the two trees do not have the same sparse layers and shapes.
  """
  _check_same_structure(ever_active, masks, ("ever_active", "masks"))
  return jax.tree.map(
    lambda e, m: (
      e
      if tree_lib.is_dense_marker(e)
      else _as_bool(tree_lib.unwrap(e)) | _as_bool(tree_lib.unwrap(m))
    ),
    ever_active,
    masks,
    is_leaf=tree_lib.is_dense_marker,
  )


def ever_active_fraction(ever_active: Any) -> dict[str, jax.Array]:
  """Fraction of the positions of each sparse layer that have ever been active.

  Args:
    ever_active: an OR-accumulated masks pytree (:func:`update_ever_active`).

  Returns:
    ``{path: fraction, ..., "total": fraction over all sparse layers}``. For a static mask
    this is the density ``1 - sparsity``; dynamic methods explore more of the weights.
  """
  counts = _counts(ever_active)
  out = {path: _safe_div(n, size) for path, n, size in counts}
  out[TOTAL] = _safe_div(*_totals(counts))
  return out


def _fan_in(mask: Any) -> jax.Array:
  """Per-neuron fan-in of one mask: active weights summed over all but the last axis."""
  m = _as_bool(mask)
  if m.ndim < 2:
    raise ValueError(f"fan-in needs a kernel with ndim >= 2; got shape {m.shape}.")
  xp = _xp(m)
  return xp.sum(m.reshape((-1, m.shape[-1])), axis=0, dtype=xp.int32)


def fan_in_stats(masks: Any) -> dict[str, dict[str, jax.Array]]:
  """Fan-in statistics of each sparse layer, over its **active** neurons.

  A neuron (an entry of the last axis) is active if it has at least one active incoming
  weight. Layers with ``ndim < 2`` are skipped.

  Args:
    masks: masks pytree.

  Returns:
    ``{path: {"min", "max", "mean", "std", "active_neurons", "neurons"}}``; the statistics
    are over active neurons only (all 0 when the layer has none). Constant fan-in
    structures (SRigL) have ``min == max``.
  """
  out = {}
  for path, m in sparse_leaves(masks):
    if np.ndim(m) < 2:
      continue
    xp = _xp(m)
    f = _fan_in(m)
    active = f > 0
    n_active = xp.sum(active, dtype=xp.int32)
    big = np.iinfo(np.int32).max
    fmin = xp.where(n_active > 0, xp.min(xp.where(active, f, big)), 0)
    fmax = xp.max(xp.where(active, f, 0))
    mean = _safe_div(xp.sum(f), n_active)
    var = _safe_div(xp.sum(xp.where(active, (f - mean) ** 2, 0.0)), n_active)
    out[path] = {
      "min": fmin,
      "max": fmax,
      "mean": mean,
      "std": xp.sqrt(var),
      "active_neurons": n_active,
      "neurons": int(f.shape[0]),
    }
  return out


def _default_is_kernel(path: str, shape: Sequence[int]) -> bool:
  del path
  return len(shape) >= 2


def _active_weights(leaf: Any, name: str, mask_by_path: Mapping[str, Any], masked: bool) -> int:
  """Active weights of one kernel: its mask's nnz, else all of them, else its nonzeros."""
  if name in mask_by_path:
    return int(np.count_nonzero(np.asarray(mask_by_path[name])))
  if masked or isinstance(leaf, jax.ShapeDtypeStruct):
    return int(np.prod(leaf.shape, dtype=np.int64))  # a dense leaf of a masked model.
  return int(np.count_nonzero(np.asarray(leaf)))


def estimate_flops(
  params: Any,
  masks: Any = None,
  positions: Mapping[str, int] | None = None,
  *,
  is_kernel: Callable[[str, Sequence[int]], bool] = _default_is_kernel,
) -> dict[str, Any]:
  """Estimated forward FLOPs per example, dense vs sparse (host-side, not jit-able).

  The estimate counts 2 FLOPs (multiply + add) per active kernel weight per application:

  * ``Dense`` kernel ``[in, out]``: ``2·in·out`` dense, ``2·nnz`` sparse;
  * ``Conv`` kernel ``[*window, in, out]``: ``2·prod(window)·in·out·P`` dense and
    ``2·nnz·P`` sparse, where ``P`` is the number of output positions (the product of the
    output spatial dimensions, e.g. ``H_out·W_out``), given in ``positions``.

  Biases, activations, normalisation and pooling are ignored (small next to the kernels),
  and so is the gather/scatter cost of real sparse kernels: the "sparse" number is what an
  ideal sparse implementation would need, not what masked dense compute costs (masked
  training executes the dense FLOPs). A training step costs about 3× the forward FLOPs
  (forward, backward w.r.t. activations and w.r.t. weights; Evci et al. 2020, appendix H).

  Args:
    params: params pytree (arrays or ``jax.ShapeDtypeStruct``).
    masks: optional masks pytree with the same sparse leaves as ``params`` (``None`` or
      ``MaskedNode`` at dense leaves). Without masks, the sparse count is the nonzero count
      of ``params``.
    positions: ``{path: P}`` output positions per kernel application (default 1, right for
      ``Dense`` layers; give it for convolutions and for Dense layers applied per token).
    is_kernel: which leaves count as kernels (default: ``ndim >= 2``).

  Returns:
    ``{"dense": int, "sparse": int, "ratio": sparse/dense, "layers": {path: {"dense",
    "sparse", "positions"}}, "unknown_positions": [kernel paths with ndim > 2 that were not
    in positions and so were counted once]}``.
  """
  positions = dict(positions or {})
  mask_by_path = dict(sparse_leaves(masks)) if masks is not None else {}
  paths, leaves, _ = tree_lib.flatten_masks(params)
  layers: dict[str, dict[str, int]] = {}
  unknown = []
  dense_tot = sparse_tot = 0
  for name, leaf in zip(paths, leaves, strict=True):
    if leaf is None or not hasattr(leaf, "shape"):
      continue
    shape = tuple(int(d) for d in leaf.shape)
    if not is_kernel(name, shape):
      continue
    if name not in positions and len(shape) > 2:
      unknown.append(name)
    p = int(positions.get(name, 1))
    d = 2 * int(np.prod(shape, dtype=np.int64)) * p
    s = 2 * _active_weights(leaf, name, mask_by_path, masks is not None) * p
    layers[name] = {"dense": d, "sparse": s, "positions": p}
    dense_tot += d
    sparse_tot += s
  return {
    "dense": dense_tot,
    "sparse": sparse_tot,
    "ratio": sparse_tot / dense_tot if dense_tot else 1.0,
    "layers": layers,
    "unknown_positions": unknown,
  }


def _to_python(x: Any) -> Any:
  x = np.asarray(jax.device_get(x))
  if x.ndim != 0:
    raise ValueError(f"expected a scalar, got an array of shape {x.shape}.")
  if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
    return int(x)
  return float(x)


def to_scalars(tree: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
  """Flattens a nested dict of scalar metrics into ``{"a/b/c": python_number}``.

  Transfers JAX arrays to the host once (``jax.device_get``). Non-numeric values (lists,
  strings) and arrays with ``ndim > 0`` are dropped.

  Args:
    tree: nested mapping, e.g. ``{"l1/kernel": {"min": Array(3)}}``.
    prefix: prepended to every key (``"fan_in"`` → ``"fan_in/l1/kernel/min"``).
    sep: key separator.

  Returns:
    A flat dict of Python ints/floats (bools become ints).
  """
  tree = jax.device_get(tree)
  out: dict[str, Any] = {}

  def rec(node: Any, key: str) -> None:
    if isinstance(node, Mapping):
      for k, v in node.items():
        rec(v, f"{key}{sep}{k}" if key else str(k))
      return
    if isinstance(node, bool | numbers.Number | np.ndarray | np.generic | jax.Array):
      if np.ndim(node) == 0:
        out[key] = _to_python(node)

  rec(tree, prefix)
  return out
