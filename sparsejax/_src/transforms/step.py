"""The pieces of one DST step, as module-level pure functions (DESIGN.md §2).

``dynamic_sparse``'s ``update`` is these functions in order::

  flips, finite = mask_update_flips(...)     # one lax.cond per sparse leaf: bool new ^ old
  masks, grown, kept = apply_flips(...)      # new = old ^ flips (NaN/inf: no flips at all)
  inner_state = reset_inner_state(...)       # inner-optimizer state 0 at grown positions
  updates, inner_state = masked_inner_update(...)  # inner optimizer on kept-masked grads
  updates = keep_sparse(...)                 # pruned weights stay exactly 0

Each mask is read by exactly one fusion on a normal step (masking the gradient, or forming
the update), so XLA materialises no intermediate mask; only the selection sits in the
conditionals, and each returns the leaf's flips, never params, optimizer state or masks
(measured on XLA:CPU, ``benchmarks/RESULTS.md``: returning masks costs two copies per mask
per step; one cond for all leaves keeps every leaf's temporaries alive at once; running the
inner update inside the cond copies params and state through it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sparsejax._src import base, tree


@dataclasses.dataclass(frozen=True)
class LeafRule:
  """Everything static about one sparse leaf's mask update.

  Attributes:
    index: the leaf's flat index (also the PRNG fold-in index).
    path: the leaf's path.
    sparsity: the leaf's target sparsity.
    layer: the leaf's position in the model.
    drop: drop criterion ``ctx -> scores`` (higher is kept).
    grow: grow criterion ``ctx -> scores`` (higher is grown).
    drop_fraction: schedule ``count -> fraction`` of active weights swapped.
    structure: the sparsity structure (its ``drop_and_grow`` makes the new mask).
  """

  index: int
  path: str
  sparsity: float
  layer: base.LayerInfo | None
  drop: Callable[[base.ScoreContext], jax.Array]
  grow: Callable[[base.ScoreContext], jax.Array]
  drop_fraction: Callable[[Any], jax.Array]
  structure: Any


def inner_moments(inner, inner_state, n_leaves: int, treedef) -> list[tuple[jax.Array, ...]]:
  """Per param leaf, the tuple of param-shaped arrays in the inner state (state order).

  Found with ``optax.tree_utils.tree_map_params``, so any optimizer works.
  """
  collected: list[list[jax.Array]] = [[] for _ in range(n_leaves)]
  index_tree = jax.tree.unflatten(treedef, list(range(n_leaves)))

  def collect(value, index):
    if not tree.is_masked_node(value) and hasattr(value, "shape"):
      collected[index].append(value)
    return value

  optax.tree_utils.tree_map_params(
    inner, collect, inner_state, index_tree, is_leaf=tree.is_masked_node
  )
  return [tuple(c) for c in collected]


def reset_inner_state(inner, inner_state, grown: Sequence[Any], treedef):
  """Sets every param-shaped inner-state entry to 0 where ``grown`` is True."""
  grown_tree = jax.tree.unflatten(treedef, [False if g is None else g for g in grown])

  def reset(value, grown_leaf):
    if grown_leaf is False or tree.is_masked_node(value) or not hasattr(value, "shape"):
      return value
    return jnp.where(grown_leaf, jnp.zeros_like(value), value)

  return optax.tree_utils.tree_map_params(
    inner, reset, inner_state, grown_tree, is_leaf=tree.is_masked_node
  )


def leaf_flips(rule: LeafRule, count, key, param, grad, mask, moments):
  """One leaf's mask update as flips (``new ^ old``), and whether its inputs were finite.

  Runs inside the conditional, only on mask-update steps; every array it reads is an
  argument (Explicit meshes convert arguments, not closed-over values, to Auto axes).
  """
  drop_key, grow_key = jax.random.split(
    jax.random.fold_in(jax.random.fold_in(key, count), rule.index)
  )
  ctx = base.ScoreContext(
    param=param,
    grad=grad,
    mask=mask,
    key=drop_key,
    step=count,
    path=rule.path,
    inner_moments=moments,
    sparsity=rule.sparsity,
    layer=rule.layer,
  )
  drop_scores = rule.drop(ctx)
  grow_scores = rule.grow(ctx._replace(key=grow_key))
  for name, scores in (("drop", drop_scores), ("grow", grow_scores)):
    if scores.shape != mask.shape:
      raise ValueError(
        f"`{name}` criterion returned shape {scores.shape} for {rule.path!r}; expected "
        f"{mask.shape} (the param's shape)."
      )
  finite = jnp.ones([], bool)
  for x in (drop_scores, grow_scores, grad, param):
    finite = finite & jnp.all(jnp.isfinite(x))
  nnz = jnp.sum(mask, dtype=jnp.int32)
  fraction = jnp.clip(jnp.asarray(rule.drop_fraction(count), jnp.float32), 0.0, 1.0)
  n_drop = jnp.floor(nnz.astype(jnp.float32) * fraction).astype(jnp.int32)
  new = rule.structure.drop_and_grow(ctx, drop_scores, grow_scores, n_drop)
  return new ^ mask, finite


def _update_branch(rule: LeafRule, count, key, param, grad, mask, moments):
  fn = functools.partial(leaf_flips, rule)
  spec = base.explicit_sharding_spec(mask)
  if spec is not None:
    # Explicit axes: selections flatten and scatter, which Explicit types reject; run the
    # selection with the compiler choosing shardings, and give the flips the mask's.
    fn = jax.sharding.auto_axes(fn, out_sharding=(spec, jax.sharding.PartitionSpec()))
  return fn(count, key, param, grad, mask, moments)


def mask_update_flips(
  rules: Sequence[LeafRule],
  do_update: jax.Array,
  count: jax.Array,
  key: jax.Array,
  params: Sequence[jax.Array],
  grads: Sequence[jax.Array],
  masks: Sequence[Any],
  moments: Sequence[tuple[jax.Array, ...]],
) -> tuple[dict[int, jax.Array], jax.Array]:
  """Every sparse leaf's flips (one ``lax.cond`` each) and whether all inputs were finite.

  Returns:
    ``({leaf index: bool flips}, all_finite)``; the flips are all False on other steps.
  """
  flips = {}
  all_finite = jnp.ones([], bool)
  for rule in rules:
    i = rule.index
    operands = (count, key, params[i], grads[i], masks[i], moments[i])
    flips[i], finite = lax.cond(
      do_update,
      lambda r=rule, ops=operands: _update_branch(r, *ops),
      lambda m=masks[i]: (jnp.zeros_like(m), jnp.ones([], bool)),
    )
    all_finite = all_finite & finite
  return flips, all_finite


def apply_flips(masks: Sequence[Any], flips: dict[int, jax.Array], all_finite: jax.Array):
  """New masks, grown positions and kept positions from the flips.

  NaN/inf anywhere: every mask stays unchanged (the caller counts a skipped update). The
  old masks are read only by ``old ^ flips``, so the new masks are written in place.

  Returns:
    ``(new_masks, grown, kept)`` lists over all leaves; ``grown`` (``new & ~old``) and
    ``kept`` (``new & old``) are None for dense leaves.
  """
  new_masks, grown, kept = list(masks), [None] * len(masks), [None] * len(masks)
  for i, leaf_flips_ in flips.items():
    flip = leaf_flips_ & all_finite
    new = masks[i] ^ flip
    new_masks[i] = new
    grown[i] = new & flip
    kept[i] = new & ~flip  # == old & new
  return new_masks, grown, kept


def masked_inner_update(inner, grads, grad_masks, inner_state, params, treedef, extra_args):
  """The inner optimizer's update on gradients masked to the weights that take a step."""
  masked = [
    g if m is None else jnp.where(m, g, jnp.zeros_like(g))
    for g, m in zip(grads, grad_masks, strict=True)
  ]
  return inner.update(jax.tree.unflatten(treedef, masked), inner_state, params, **extra_args)


def keep_sparse(inner_updates, params, active, grown, grow_init: float, treedef):
  """Updates that keep inactive weights at exactly 0 and set grown ones to ``grow_init``.

  ``where(active, u, -p)`` (after ``optax.apply_updates`` pruned weights are exactly 0)
  and ``grow_init - p`` at newly grown positions.
  """
  out = []
  for u, p, a, g in zip(
    treedef.flatten_up_to(inner_updates), treedef.flatten_up_to(params), active, grown, strict=True
  ):
    if a is None:
      out.append(u)
      continue
    p = p.astype(u.dtype)
    if g is not None:
      u = jnp.where(g, jnp.asarray(grow_init, u.dtype) - p, u)
    out.append(jnp.where(a, u, -p))
  return jax.tree.unflatten(treedef, out)
