"""Reading and applying the state of any sparsejax method.

Every method keeps a :class:`DynamicSparseState` (SR-STE inside its
:class:`NMSRSTEState`), so one set of readers serves them all: :func:`find_dst_state`,
:func:`get_masks`, :func:`apply_masks`, :func:`forward_params`, :func:`summarize`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax._src import base, tree
from sparsejax._src.allocation import plan as plan_lib
from sparsejax._src.transforms.sr_ste import NMSRSTEState
from sparsejax._src.transforms.state import DynamicSparseState


def _states(opt_state: Any, kind: type) -> list[Any]:
  if isinstance(opt_state, kind):
    return [opt_state]
  # An nnx.Optimizer holds its optax state in `.opt_state` (NNX's own attribute).
  inner = getattr(opt_state, "opt_state", None)
  if inner is not None and not isinstance(opt_state, tuple | list | dict):
    opt_state = inner
  is_state = lambda x: isinstance(x, kind)  # noqa: E731
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]


def find_dst_state(opt_state: Any) -> DynamicSparseState:
  """Finds the (single) :class:`DynamicSparseState` inside any optimizer state.

  Accepts a bare state, any nesting (chains, ``MultiSteps``, ``inject_hyperparams``,
  SR-STE's :class:`NMSRSTEState`), an ``nnx.Optimizer``'s ``opt_state`` or the
  ``nnx.Optimizer`` itself.

  Raises:
    ValueError: no sparsejax state, or more than one.
  """
  found = _states(opt_state, DynamicSparseState)
  if not found:
    raise ValueError(
      "`opt_state` holds no sparsejax DynamicSparseState: was it created by a sparsejax "
      "transformation (dynamic_sparse, rigl, set_, srigl, nm_sr_ste, ...)?"
    )
  if len(found) > 1:
    raise ValueError(f"`opt_state` holds {len(found)} sparsejax states; pass the one you mean.")
  return found[0]


def _check_matches(params: Any, paths: list[str], masks: list[Any]) -> tuple[list, list, Any]:
  """Flattens params and checks that ``masks`` (flat) belong to them; clear errors."""
  p_paths, leaves, treedef = tree.flatten_with_paths(params)
  if p_paths != paths:
    missing = [p for p in p_paths if p not in paths][:5]
    extra = [p for p in paths if p not in p_paths][:5]
    raise ValueError(
      f"The optimizer state's masks belong to a different model: `params` has "
      f"{len(p_paths)} leaves, the masks {len(paths)}; params-only paths {missing}, "
      f"mask-only paths {extra}."
    )
  for path, leaf, mask in zip(paths, leaves, masks, strict=True):
    if mask is not None and tuple(mask.shape) != tuple(leaf.shape):
      raise ValueError(
        f"Mask shape {tuple(mask.shape)} does not match param {path!r} of shape "
        f"{tuple(leaf.shape)}: the optimizer state belongs to a different model."
      )
  return p_paths, leaves, treedef


def get_masks(opt_state: Any, params: base.Params | None = None) -> Any:
  """The masks of a sparsejax optimizer state.

  Args:
    opt_state: an optimizer state containing a sparsejax state (see
      :func:`find_dst_state`).
    params: optional; when given, the result has exactly the structure of ``params``
      (checked: same paths and shapes).

  Returns:
    A pytree with the params' structure: a bool array for each sparse leaf and ``None``
    for dense leaves.

  Raises:
    ValueError: ``params`` of another model.
  """
  paths, masks, treedef = tree.flatten_masks(find_dst_state(opt_state).masks)
  masks = [None if m is None else jnp.asarray(m, bool) for m in masks]
  if params is not None:
    _, _, treedef = _check_matches(params, paths, masks)
  return tree.strip_variables(jax.tree.unflatten(treedef, masks))


def apply_masks(params: base.Params, opt_state: Any) -> base.Params:
  """Makes ``params`` consistent with the method's state (call once after ``init``).

  Every drop-and-grow method (static, SET, RigL, SRigL, ...) stores pruned weights as
  exact zeros: this zeroes the pruned entries, so training starts sparse. SR-STE
  (:func:`nm_sr_ste`) keeps dense weights by design (its masks act in the forward pass,
  see :func:`forward_params`), so its params are returned unchanged.

  Args:
    params: the params pytree the optimizer state was initialized with.
    opt_state: an optimizer state holding a sparsejax state.

  Returns:
    ``params`` with every pruned entry set to 0 (dense leaves, and SR-STE, unchanged).

  Raises:
    ValueError: if the masks do not match the params.
  """
  paths, masks, _ = tree.flatten_masks(find_dst_state(opt_state).masks)
  _, leaves, treedef = _check_matches(params, paths, masks)
  if _states(opt_state, NMSRSTEState):
    return params
  sparse = [i for i, mask in enumerate(masks) if mask is not None]
  out = list(leaves)
  for i, leaf in zip(sparse, _zero_pruned([leaves[i] for i in sparse], [masks[i] for i in sparse])):
    out[i] = leaf
  return jax.tree.unflatten(treedef, out)


@jax.jit
def _zero_pruned(leaves: list[jax.Array], masks: list[jax.Array]) -> list[jax.Array]:
  """Every leaf with its pruned entries set to 0: one program for all leaves (eagerly, a
  ``jnp.where`` per leaf compiles a program per shape)."""
  return [jnp.where(m, x, jnp.zeros_like(x)) for x, m in zip(leaves, masks, strict=True)]


def forward_params(params: base.Params, opt_state: Any) -> base.Params:
  """The weights a model's forward pass should use under a sparsejax method.

  For every drop-and-grow method pruned weights are stored as exact zeros, so this is
  ``params`` itself (no op, and the gradient at pruned positions stays the dense gradient
  RigL grows by). For SR-STE (:func:`nm_sr_ste`) it is the straight-through N:M
  projection of the dense weights with the state's masks (the N:M masks of the current
  weights) and MDGF factor ``beta``: forward ``W ⊙ (M + (1 - M)β)``, identity backward.

  Args:
    params: the params pytree.
    opt_state: the optimizer state (any nesting, or an ``nnx.Optimizer``).

  Returns:
    A pytree like ``params``.
  """
  sr_ste = _states(opt_state, NMSRSTEState)
  if not sr_ste:
    find_dst_state(opt_state)  # a clear error when there is no sparsejax state at all.
    return params
  state = sr_ste[0]
  paths, masks, _ = tree.flatten_masks(state.sparse.masks)
  _, leaves, treedef = _check_matches(params, paths, masks)
  beta = tree.unwrap(state.beta)
  out = []
  for w, mask in zip(leaves, masks, strict=True):
    if mask is not None:
      scale = jnp.where(mask, jnp.ones((), w.dtype), jnp.asarray(beta, w.dtype))
      w = w + lax.stop_gradient(w * scale - w)
    out.append(w)
  return jax.tree.unflatten(treedef, out)


def summarize(
  params: base.Params, opt_state: Any | None = None, *, tx: Any | None = None
) -> dict[str, Any]:
  """Per-layer and total sparsity and nnz, on the host.

  Args:
    params: the params pytree.
    opt_state: optional sparsejax optimizer state; when given, each sparse layer also
      reports its mask's nnz (``mask_nnz``), and sparse/dense comes from the masks.
    tx: optional sparsejax transformation (``tx.plan``); when given, each layer also
      reports its ``role``: why it is sparse or dense, e.g. ``"dense: last layer
      (keep_last_dense)"`` or ``"sparse: output layer, never ablated"``.

  Returns:
    ``{"layers": {path: {"shape", "size", "nnz", "sparsity", "sparse"[, "mask_nnz",
    "role"]}}, "total_size", "total_nnz", "total_sparsity", "sparse_size",
    "sparse_nnz", "sparse_sparsity"}``; "sparse_*" count only leaves that carry a mask
    (all leaves with ``ndim > 1`` when no ``opt_state`` is given). Values are Python
    numbers.

  Raises:
    ValueError: an optimizer state of another model.
  """
  paths, leaves, _ = tree.flatten_with_paths(params)
  masks: list[Any] = [None] * len(leaves)
  if opt_state is not None:
    m_paths, masks, _ = tree.flatten_masks(find_dst_state(opt_state).masks)
    _check_matches(params, m_paths, masks)
  roles = None
  if tx is not None:
    roles = {leaf.path: leaf.role for leaf in tx.plan(params).leaves}
  layers = {}
  for path, leaf, mask in zip(paths, leaves, masks, strict=True):
    size = int(np.size(leaf))
    nnz = int(np.count_nonzero(np.asarray(jax.device_get(tree.unwrap(leaf)))))
    is_sparse = mask is not None if opt_state is not None else np.ndim(leaf) > 1
    entry = {
      "shape": tuple(np.shape(leaf)),
      "size": size,
      "nnz": nnz,
      "sparsity": 1.0 - nnz / size if size else 0.0,
      "sparse": bool(is_sparse),
    }
    if mask is not None:
      entry["mask_nnz"] = int(np.count_nonzero(np.asarray(jax.device_get(mask))))
    if roles is not None:
      entry["role"] = roles[path]
    layers[path] = entry
  return {"layers": layers, **base.sparsity_totals(layers)}


def format_summary(summary: dict[str, Any]) -> str:
  """Renders :func:`summarize`'s output as a fixed-width text table."""
  with_role = any("role" in e for e in summary["layers"].values())
  header = f"{'layer':<40} {'shape':<20} {'nnz':>10} {'size':>10} {'sparsity':>9}"
  rows = [header + ("  role" if with_role else "")]
  for path, e in summary["layers"].items():
    row = f"{path:<40} {str(e['shape']):<20} {e['nnz']:>10} {e['size']:>10} {e['sparsity']:>9.4f}"
    rows.append(row + (f"  {e.get('role', '')}" if with_role else ""))
  for name, key in (("total", "total"), ("sparse layers", "sparse")):
    rows.append(
      f"{name:<40} {'':<20} {summary[f'{key}_nnz']:>10} {summary[f'{key}_size']:>10} "
      f"{summary[f'{key}_sparsity']:>9.4f}"
    )
  return "\n".join(rows)


def layer_sparsities(params: base.Params, **kwargs: Any) -> dict[str, float | None]:
  """The per-leaf sparsity a sparsejax method would use (``None`` = dense).

  Takes the allocation keywords of :func:`dynamic_sparse` (``sparsity``,
  ``distribution``, ``structure``, ``include``, ``exclude``, ``keep_first_dense``,
  ``keep_last_dense``, ``first_layer``, ``last_layer``, ``overrides``,
  ``erk_power_scale``).

  Example:
    >>> p = {"layers_0": {"kernel": jnp.zeros((4, 8))}, "layers_1": {"kernel": jnp.zeros((8, 2))}}
    >>> layer_sparsities(p, sparsity=0.5, distribution="uniform", keep_last_dense=True)
    {'layers_0/kernel': 0.5, 'layers_1/kernel': None}
  """
  return plan_lib.plan_sparsity(params, **kwargs)
