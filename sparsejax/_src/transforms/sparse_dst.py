"""Dynamic sparse training of truly sparse layers (values + CSR topology), as Optax.

:func:`truly_sparse` turns a masked DST method (``sj.rigl(...)``, ``sj.set_``,
``sj.srigl``, ``sj.static_sparse``, ``sj.dynamic_sparse``) into a
:class:`SparseDST`: an ``optax.GradientTransformationExtraArgs`` over a model whose sparse
layers store only their active weights (``values [C]``) and an integer
:class:`~sparsejax._src.transforms.sparse_topology.CSRTopology`. The optimizer state is
per active weight (Adam's moments are shaped like ``values``); no mask is read on a
regular step, which is the inner optimizer plus a step counter.

A mask update (:func:`update_topology`, every ΔT steps on the method's schedule) runs the
**masked method's own rule** on the dense view of each layer: the same criteria, the same
exact selections and tie-breaking (``step.leaf_flips``), the same counts
``n_drop = floor(nnz · drop_fraction)``, PRNG keys and schedules. It then rewrites the
topology in place (same shapes), gathers ``values``, gradients and every values-shaped
optimizer-state leaf through the old → new slot map (``optax.tree_utils.tree_map_params``,
so any optimizer works), and marks the grown slots; ``update(..., sparse_slots=...)``
then steps the kept weights and sets the grown ones to ``grow_init`` exactly as the masked
method does. RigL's and SRigL's dense gradient is an input (``dense_grads``, ``xᵀ·dy`` per
layer) computed only on those steps. So a truly sparse model and its masked-dense twin
follow the same trajectory up to floating-point rounding.

References: RigL (Evci et al. 2020, arXiv:1911.11134), SET (Mocanu et al. 2018,
arXiv:1707.04780), SRigL (Lasby et al. 2024, arXiv:2305.02299), Nerva (Wesselink et al.
2024, arXiv:2407.17437).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax._src import base, tree
from sparsejax._src.primitives import structures
from sparsejax._src.transforms import sparse_topology as topo_lib
from sparsejax._src.transforms import step
from sparsejax._src.transforms.sparse_topology import CSRTopology

__all__ = [
  "SlotMasks",
  "SparseDST",
  "SparseDSTState",
  "TopologyUpdate",
  "layer_capacity",
  "truly_sparse",
  "update_topology",
]


class SparseDSTState(NamedTuple):
  """State of a :class:`SparseDST` transformation.

  Attributes:
    count: int32 scalar, number of ``update`` calls so far (the step ``t``).
    key: PRNG key of the random criteria (the masked method's, same draws).
    inner_state: the inner optimizer's state, per active weight.
    skipped_updates: int32 scalar, scheduled mask updates that did not change the
      topology because an input was NaN/inf, or because a regular step ran on an update
      step (the topology step was not called).
  """

  count: jax.Array
  key: jax.Array
  inner_state: optax.OptState
  skipped_updates: jax.Array


class SlotMasks(NamedTuple):
  """Per slot of one layer after a topology update: ``kept`` (bool ``[C]``) and ``grown``."""

  kept: jax.Array
  grown: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class _Init:
  config: Any  # dynamic_sparse.DSTConfig
  masked: Any  # the masked SparseTransformation

  def __call__(self, params) -> SparseDSTState:
    return SparseDSTState(
      count=jnp.zeros([], jnp.int32),
      key=jax.random.PRNGKey(self.config.seed),
      inner_state=self.config.inner.init(params),
      skipped_updates=jnp.zeros([], jnp.int32),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class _Update:
  config: Any

  def __call__(self, updates, state, params=None, *, sparse_slots=None, **extra_args):
    if not isinstance(state, SparseDSTState):
      raise TypeError(f"`state` must be a SparseDSTState, got {type(state).__name__}.")
    config, count = self.config, state.count
    skipped = state.skipped_updates
    if sparse_slots is None:
      if config.schedule.update_every is not None:
        skipped = skipped + config.schedule.is_update(count).astype(jnp.int32)
      new_updates, inner_state = config.inner.update(
        updates, state.inner_state, params, **extra_args
      )
    else:
      if params is None:
        raise ValueError("update(..., sparse_slots=...) needs `params`.")
      paths, grads, treedef = tree.flatten_with_paths(updates)
      unknown = sorted(set(sparse_slots) - set(paths))
      if unknown:
        raise ValueError(f"sparse_slots names leaves that are not in the gradients: {unknown}")
      kept = [sparse_slots[p].kept if p in sparse_slots else None for p in paths]
      grown = [sparse_slots[p].grown if p in sparse_slots else None for p in paths]
      active = [None if k is None else k | g for k, g in zip(kept, grown, strict=True)]
      inner_updates, inner_state = step.masked_inner_update(
        config.inner, grads, kept, state.inner_state, params, treedef, extra_args
      )
      new_updates = step.keep_sparse(
        inner_updates, params, active, grown, config.grow_init, treedef
      )
    return new_updates, SparseDSTState(
      count=optax.safe_int32_increment(count),
      key=state.key,
      inner_state=inner_state,
      skipped_updates=skipped,
    )


class SparseDST(optax.GradientTransformationExtraArgs):
  """The Optax transformation of a truly sparse DST method (built by :func:`truly_sparse`).

  ``update(grads, state, params)`` is the inner optimizer on the layers' values (and on
  every dense leaf). On a topology step, :func:`update_topology` prepares the inputs and
  ``update(grads, state, params, sparse_slots=...)`` steps only the kept slots.
  """

  @property
  def config(self):
    """The masked method's :class:`DSTConfig` (allocation, schedule, criteria)."""
    return self.init.config

  @property
  def masked(self):
    """The masked-dense transformation this one was built from (its twin)."""
    return self.init.masked

  def is_update_step(self, count) -> jax.Array:
    """Whether step ``count`` is a scheduled mask update (the topology step's turn)."""
    return self.config.schedule.is_update(count)


def truly_sparse(masked) -> SparseDST:
  """The truly sparse version of a masked DST method.

  Args:
    masked: a transformation from ``sj.rigl``, ``sj.set_``, ``sj.srigl``,
      ``sj.static_sparse`` or ``sj.dynamic_sparse`` with a constant nnz per layer (no
      sparsity schedule).

  Returns:
    A :class:`SparseDST` with the same inner optimizer, allocation, schedule, criteria,
    drop fraction, ``grow_init`` and seed.

  Raises:
    TypeError: ``masked`` is not a sparsejax DST transformation (e.g. SR-STE).
    ValueError: ``masked`` follows a sparsity schedule (gmp, granet): nnz changes, so the
      layers' shapes could not stay static.
  """
  config = getattr(getattr(masked, "init", None), "config", None)
  if config is None or not hasattr(config, "schedule") or not hasattr(config, "allocation"):
    raise TypeError(
      "truly_sparse needs a masked DST transformation from sparsejax (dynamic_sparse, "
      f"static_sparse, set_, rigl, srigl), got {masked!r}."
    )
  if config.gradual:
    raise ValueError(
      "truly_sparse: this method follows a sparsity schedule (gmp/granet/initial_sparsity), so "
      "nnz changes over training and the sparse layers' shapes could not stay static. Use a "
      "constant-nnz method (static_sparse, set_, rigl, srigl)."
    )
  return SparseDST(_Init(config, masked), _Update(config))


def layer_capacity(structure, kernel_shape, sparsity: float, path: str, layer) -> int:
  """Slots a layer needs: its nnz, or SRigL's budget ``floor(size · density)`` when neurons
  may be ablated (then ``nnz = k · n_active <= budget``)."""
  nnz = structure.target_nnz(tuple(kernel_shape), sparsity)
  if isinstance(structure, structures.ConstantFanIn) and structure.ablates(path, layer):
    nnz = max(nnz, base.floor_count(base.shape_size(kernel_shape), 1.0 - sparsity))
  return int(nnz)


def kernel_path(values_path: str) -> str:
  """``"a/b/values"`` → ``"a/b/kernel"``: the masked twin's path of a sparse layer."""
  return values_path.rsplit("/", 1)[0] + "/kernel" if "/" in values_path else "kernel"


def virtual_dense_params(params, topologies: Mapping[str, CSRTopology]) -> dict:
  """The masked twin's params as ``ShapeDtypeStruct``: each sparse layer's ``values``
  becomes a ``kernel`` of its dense shape (same keys and order otherwise)."""

  def rec(node, prefix: tuple) -> Any:
    if isinstance(node, Mapping):
      out = {}
      for key, value in node.items():
        path = tree.path_to_str([jax.tree_util.DictKey(k) for k in (*prefix, key)])
        if path in topologies:
          t = topologies[path]
          out["kernel"] = jax.ShapeDtypeStruct(t.kernel_shape, tree.unwrap(value).dtype)
        else:
          out[key] = rec(value, (*prefix, key))
      return out
    leaf = tree.unwrap(node)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)

  return rec(params, ())


class TopologyUpdate(NamedTuple):
  """What :func:`update_topology` returns (pass the pieces to ``tx.update``).

  Attributes:
    params: params with each sparse layer's values in the new slot order (grown slots 0).
    grads: gradients in the new slot order (0 at grown slots).
    opt_state: the optimizer state, values-shaped leaves permuted (0 at grown slots).
    topologies: ``{values path: new CSRTopology}``.
    sparse_slots: ``{values path: SlotMasks}`` for ``tx.update(..., sparse_slots=...)``.
  """

  params: Any
  grads: Any
  opt_state: Any
  topologies: dict[str, CSRTopology]
  sparse_slots: dict[str, SlotMasks]


def _find_state(opt_state) -> SparseDSTState:
  is_state = lambda x: isinstance(x, SparseDSTState)  # noqa: E731
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]
  if len(found) != 1:
    raise ValueError(
      f"`opt_state` must hold exactly one SparseDSTState (from sj.sparse.truly_sparse), "
      f"found {len(found)}."
    )
  return found[0]


def _rules_by_path(config, params, topologies) -> dict[str, step.LeafRule]:
  plan = config.allocation.plan(virtual_dense_params(params, topologies))
  rules = {r.path: r for r in config.rules(plan)}
  out = {}
  for path, t in topologies.items():
    kp = kernel_path(path)
    rule = rules.get(kp)
    if rule is None:
      raise ValueError(
        f"sparse layer {path!r}: the method's allocation keeps {kp!r} dense; build the sparse "
        "model from this method (sj.sparse.sparsify) so that layers and allocation agree."
      )
    cap = layer_capacity(rule.structure, t.kernel_shape, rule.sparsity, rule.path, rule.layer)
    if cap != t.capacity:
      raise ValueError(
        f"sparse layer {path!r} has {t.capacity} slots but the method's allocation gives "
        f"{kp!r} (sparsity {rule.sparsity:.4f}) {cap}: the model was built for another "
        "allocation."
      )
    out[path] = rule
  return out


def update_topology(
  tx: SparseDST,
  opt_state,
  params,
  grads,
  topologies: Mapping[str, CSRTopology],
  dense_grads: Mapping[str, jax.Array],
  *,
  ops: topo_lib.TopologyOps | None = None,
) -> TopologyUpdate:
  """One mask update of every sparse layer (call on the schedule's update steps).

  Args:
    tx: the :class:`SparseDST` (the whole optimizer whose state is ``opt_state``).
    opt_state: its state.
    params: the params (each sparse layer's ``values`` leaf at the key ``"values"``).
    grads: the gradients of ``params`` at this step.
    topologies: ``{values path: CSRTopology}`` of the sparse layers (paths as
      ``"a/b/values"``).
    dense_grads: ``{values path: [n_in, n_out] dense weight gradient}`` (``xᵀ·dy``; from
      the ``probe`` of :func:`sparsejax.sparse.sparse_matmul`).
    ops: the dense-view and rebuild operations (default: pure XLA; ``sj.sparse``'s
      ``update_topology`` passes the native C++ ones on the CPU).

  Returns:
    A :class:`TopologyUpdate`; then ``tx.update(out.grads, out.opt_state, out.params,
    sparse_slots=out.sparse_slots)``.

  Raises:
    ValueError: layers that do not match the method's allocation, missing dense grads.
  """
  if not isinstance(tx, SparseDST):
    raise TypeError(f"`tx` must be a SparseDST (sj.sparse.truly_sparse), got {type(tx).__name__}.")
  config, state = tx.config, _find_state(opt_state)
  ops = topo_lib.XLA_OPS if ops is None else ops
  missing = sorted(set(topologies) - set(dense_grads))
  if missing:
    raise ValueError(f"dense_grads is missing the sparse layers {missing}.")
  paths, p_leaves, treedef = tree.flatten_with_paths(params)
  g_leaves = treedef.flatten_up_to(grads)
  rules = _rules_by_path(config, params, topologies)
  moments = step.inner_moments(config.inner, state.inner_state, len(paths), treedef)
  do_update = config.schedule.is_update(state.count)
  flips, masks, finite = {}, {}, jnp.ones([], bool)
  keys = step.leaf_keys([rules[p].index for p in topologies], do_update, state.count, state.key)
  for (path, t), leaf_key in zip(topologies.items(), keys, strict=True):
    i, rule, shape = paths.index(path), rules[path], t.kernel_shape
    masks[path] = ops.mask(t).reshape(shape)
    flips[path], ok = step.leaf_flips(
      rule,
      state.count,
      leaf_key,
      ops.to_dense(p_leaves[i], t).reshape(shape),
      jnp.asarray(dense_grads[path]).reshape(shape).astype(p_leaves[i].dtype),
      masks[path],
      tuple(ops.to_dense(m, t).reshape(shape) for m in moments[i]),
    )
    finite = finite & ok
  change = do_update & finite
  new_topos, slots, perms = {}, {}, {}
  for path, t in topologies.items():
    new_mask = (masks[path] ^ (flips[path] & change)).reshape(t.n_in, t.n_out)
    new_topos[path], prev = ops.rebuild(new_mask, t)
    valid = jnp.arange(t.capacity, dtype=jnp.int32) < new_topos[path].nnz
    kept = prev >= 0
    perms[path], slots[path] = jnp.maximum(prev, 0), SlotMasks(kept=kept, grown=valid & ~kept)

  def permute(leaf, path):
    if path not in perms:
      return leaf
    return jnp.where(slots[path].kept, leaf[perms[path]], jnp.zeros_like(leaf))

  new_params = treedef.unflatten([permute(x, p) for x, p in zip(p_leaves, paths, strict=True)])
  new_grads = treedef.unflatten([permute(g, p) for g, p in zip(g_leaves, paths, strict=True)])
  path_tree = treedef.unflatten(paths)
  opt_state = optax.tree_utils.tree_map_params(
    tx,
    lambda v, p: v if tree.is_masked_node(v) else permute(v, p),
    opt_state,
    path_tree,
    is_leaf=tree.is_masked_node,
  )
  skipped = (do_update & ~finite).astype(jnp.int32)
  opt_state = jax.tree.map(
    lambda s: (
      s._replace(skipped_updates=s.skipped_updates + skipped)
      if isinstance(s, SparseDSTState)
      else s
    ),
    opt_state,
    is_leaf=lambda s: isinstance(s, SparseDSTState),
  )
  return TopologyUpdate(new_params, new_grads, opt_state, new_topos, slots)
