"""The pieces of one DST step, as module-level pure functions (DESIGN.md §2).

``dynamic_sparse``'s ``update`` is these functions in order::

  flips, finite = mask_update_flips(...)     # one lax.cond per sparse leaf: bool new ^ old
  masks, grown, kept, changed = apply_flips(...)  # new = old ^ flips (NaN/inf: no flips)
  inner_state = reset_inner_state(...)       # inner-optimizer state 0 where a mask changed
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
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sparsejax._src import base, tree
from sparsejax._src.criteria import scores as criteria
from sparsejax._src.primitives import native_select, score_form, selection, structures, threefry


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
    budget: under a sparsity schedule, the leaf's target nnz at each pruning step (a
      static table), else ``None`` (nnz preserved).
    budget_index: ``count -> index`` into ``budget``.
  """

  index: int
  path: str
  sparsity: float
  layer: base.LayerInfo | None
  drop: Callable[[base.ScoreContext], jax.Array]
  grow: Callable[[base.ScoreContext], jax.Array]
  drop_fraction: Callable[[Any], jax.Array]
  structure: Any
  budget: tuple[int, ...] | None = None
  budget_index: Callable[[Any], jax.Array] | None = None

  def target(self, count) -> jax.Array | None:
    """The target nnz at step ``count`` (``None`` without a sparsity schedule)."""
    if self.budget is None:
      return None
    return jnp.asarray(self.budget, jnp.int32)[self.budget_index(count)]


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


def reset_inner_state(inner, inner_state, where: Sequence[Any], treedef):
  """Sets every param-shaped inner-state entry to 0 where ``where`` is True.

  Called with the positions whose mask changed (grown or dropped), so the inner state is
  0 at every inactive position and a regrown weight starts from a fresh state.
  """
  where_tree = jax.tree.unflatten(treedef, [False if w is None else w for w in where])

  def reset(value, where_leaf):
    if where_leaf is False or tree.is_masked_node(value) or not hasattr(value, "shape"):
      return value
    return jnp.where(where_leaf, jnp.zeros_like(value), value)

  return optax.tree_utils.tree_map_params(
    inner, reset, inner_state, where_tree, is_leaf=tree.is_masked_node
  )


def _derive_keys(indices: Sequence[int], count, key) -> jax.Array:
  """``split(fold_in(fold_in(key, count), index))`` of every index, as ``[L, 2, *key]``.

  Raw threefry keys take one native call on a one-device CPU process
  (``native_select.leaf_keys``), else the unrolled elementwise hash
  (``primitives/threefry.py``): the same bits, instead of three compiled while loops.
  """
  data = jnp.asarray(indices, jnp.uint32)
  if threefry.supported(key):
    # Native: one call (the unrolled hash is one large fusion, ~10 MB to compile).
    return selection.native_or_xla(
      lambda: native_select.leaf_keys(key, count, data),
      lambda: threefry.split(threefry.fold_in(threefry.fold_in(key, count), data)),
    )
  step_key = jax.random.fold_in(key, count)
  return jax.vmap(lambda i: jax.random.split(jax.random.fold_in(step_key, i)))(data)


def leaf_keys(indices: Sequence[int], do_update, count, key) -> list[jax.Array]:
  """Each leaf's ``(drop, grow)`` criterion keys of this step, one ``[2, *key.shape]`` each.

  ``split(fold_in(fold_in(key, count), index))``, bit for bit the per-leaf derivation, but
  one vectorised threefry for all leaves in one ``lax.cond`` (zeros on other steps)
  instead of three threefry loops per leaf: each loop is several compiled kernels
  (compile time and compiler memory), and the update branches of methods whose criteria
  read no key (RigL) drop their unused keys, so XLA removes this conditional.
  """
  shape = jax.eval_shape(_derive_keys, indices, count, key)
  keys = lax.cond(
    do_update,
    lambda: _derive_keys(indices, count, key),
    lambda: jnp.zeros(shape.shape, shape.dtype),
  )
  return [keys[j] for j in range(len(indices))]


def _context(rule: LeafRule, count, keys, param, grad, mask, moments, target=None):
  """The leaf's drop-criterion context (``keys[0]``); ``keys[1]`` is its grow key."""
  return base.ScoreContext(
    param=param,
    grad=grad,
    mask=mask,
    key=keys[0],
    step=count,
    path=rule.path,
    inner_moments=moments,
    sparsity=rule.sparsity,
    layer=rule.layer,
    target_nnz=rule.target(count) if target is None else target,
  )


def global_targets(rules, do_update, count, key, params, grads, masks, moments, total, counts_fn):
  """Per-leaf nnz targets of a *global* sparsity schedule (one ``lax.cond``).

  On update steps, the ``total(count)`` highest drop scores over all pooled layers (active
  weights only: masks only shrink) are counted per layer (``counts_fn``, see
  ``pruning.global_counts``); other steps return zeros, which no leaf reads.

  Returns:
    ``{leaf index: int32 target}``.
  """

  def compute():
    scores, cands = [], []
    keys = _derive_keys([rule.index for rule in rules], count, key)
    for j, rule in enumerate(rules):
      i = rule.index
      ctx = _context(rule, count, keys[j], params[i], grads[i], masks[i], moments[i], target=0)
      scores.append(rule.drop(ctx))
      cands.append(masks[i])
    return counts_fn(scores, cands, total(count))

  counts = lax.cond(do_update, compute, lambda: jnp.zeros((len(rules),), jnp.int32))
  return {rule.index: counts[j] for j, rule in enumerate(rules)}


def leaf_flips(rule: LeafRule, count, keys, param, grad, mask, moments, target=None):
  """One leaf's mask update as flips (``new ^ old``), and whether its inputs were finite.

  Runs inside the conditional, only on mask-update steps; every array it reads is an
  argument (Explicit meshes convert arguments, not closed-over values, to Auto axes).
  ``keys`` are the leaf's ``(drop, grow)`` criterion keys (:func:`leaf_keys`); ``target``
  is the leaf's nnz after the update under a global sparsity schedule (else the rule's
  own table, or none: nnz preserved).
  """
  ctx = _context(rule, count, keys, param, grad, mask, moments, target)
  # Built-in criteria come as forms the native kernels read in place (|w|, |g|, SET's
  # hash: no float32 copy per weight in the step's temporaries); others as their arrays.
  drop_scores = criteria.scores_of(rule.drop, ctx)
  grow_scores = criteria.scores_of(rule.grow, ctx._replace(key=keys[1]))
  for name, scores in (("drop", drop_scores), ("grow", grow_scores)):
    if scores.shape != mask.shape:
      raise ValueError(
        f"`{name}` criterion returned shape {scores.shape} for {rule.path!r}; expected "
        f"{mask.shape} (the param's shape)."
      )
  # One elementwise pass and one reduction (separate all(isfinite(x)) per input would
  # each materialise a bool array in the update branch's temporaries).
  checks = [score_form.isfinite(drop_scores), score_form.isfinite(grow_scores)]
  finite = jnp.all(
    functools.reduce(
      jnp.logical_and,
      [c for c in checks if c is not None],
      jnp.isfinite(grad) & jnp.isfinite(param),
    )
  )
  if not structures.reads_score_forms(rule.structure):
    drop_scores, grow_scores = score_form.as_array(drop_scores), score_form.as_array(grow_scores)
  # Swapped weights: a fraction of the active ones (or of the target under a schedule).
  nnz = selection.count_true(mask) if ctx.target_nnz is None else ctx.target_nnz
  fraction = jnp.clip(jnp.asarray(rule.drop_fraction(count), jnp.float32), 0.0, 1.0)
  n_drop = jnp.floor(nnz.astype(jnp.float32) * fraction).astype(jnp.int32)
  new = rule.structure.drop_and_grow(ctx, drop_scores, grow_scores, n_drop)
  return new ^ mask, finite


def _update_branch(rule: LeafRule, count, keys, param, grad, mask, moments, target):
  fn = functools.partial(leaf_flips, rule)
  spec = base.explicit_sharding_spec(mask)
  if spec is not None:
    # Explicit axes: selections flatten and scatter, which Explicit types reject; run the
    # selection with the compiler choosing shardings, and give the flips the mask's.
    fn = jax.sharding.auto_axes(fn, out_sharding=(spec, jax.sharding.PartitionSpec()))
  return fn(count, keys, param, grad, mask, moments, target)


def mask_update_flips(
  rules: Sequence[LeafRule],
  do_update: jax.Array,
  count: jax.Array,
  key: jax.Array,
  params: Sequence[jax.Array],
  grads: Sequence[jax.Array],
  masks: Sequence[Any],
  moments: Sequence[tuple[jax.Array, ...]],
  targets: dict[int, jax.Array] | None = None,
) -> tuple[dict[int, jax.Array], jax.Array]:
  """Every sparse leaf's flips (one ``lax.cond`` each) and whether all inputs were finite.

  ``targets``: per-leaf nnz after the update, when a global sparsity schedule decided them.

  Returns:
    ``({leaf index: bool flips}, all_finite)``; the flips are all False on other steps.
  """
  flips = {}
  all_finite = jnp.ones([], bool)
  keys = leaf_keys([rule.index for rule in rules], do_update, count, key)
  one_device = jax.device_count() == 1
  for rule, leaf_key in zip(rules, keys, strict=True):
    i = rule.index
    target = None if targets is None else targets[i]
    operands = (count, leaf_key, params[i], grads[i], masks[i], moments[i], target)
    # One device: the conditional returns the flips packed 32 per word, so a normal step
    # writes and reads 1/32 of a mask (its all-False flips) instead of a bool per weight;
    # the unpacking fuses into the fusions that read the flips. With several devices (or
    # explicit mesh axes) the flips keep the mask's shape and sharding.
    packed = one_device and base.explicit_sharding_spec(masks[i]) is None

    def update(r=rule, ops=operands, packed=packed):
      leaf, finite = _update_branch(r, *ops)
      return (pack_bits(leaf) if packed else leaf), finite

    def keep(m=masks[i], packed=packed):
      if not packed:
        return jnp.zeros_like(m), jnp.ones([], bool)
      words = jax.eval_shape(pack_bits, m)
      return jnp.zeros(words.shape, words.dtype), jnp.ones([], bool)

    leaf_flips_, finite = lax.cond(do_update, update, keep)
    flips[i] = unpack_bits(leaf_flips_, masks[i].shape) if packed else leaf_flips_
    all_finite = all_finite & finite
  return flips, all_finite


def pack_bits(bits: jax.Array) -> jax.Array:
  """bool ``[..., G]`` (or 1-D) as uint32 ``[rows, ceil(G / 32)]``, 32 bits per word along
  the last axis (bit ``j`` of word ``w`` is column ``32 w + j``)."""
  view = bits.reshape(-1, bits.shape[-1]) if bits.ndim >= 2 else bits.reshape(1, -1)
  rows, cols = view.shape
  words = -(-cols // 32)
  view = jnp.pad(view, ((0, 0), (0, words * 32 - cols))).reshape(rows, words, 32)
  shifts = jnp.arange(32, dtype=jnp.uint32)
  return jnp.sum(view.astype(jnp.uint32) << shifts, axis=-1, dtype=jnp.uint32)


def unpack_bits(words: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The bool array of ``shape`` packed by :func:`pack_bits`."""
  cols = shape[-1] if len(shape) >= 2 else math.prod(shape)
  bits = (words[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
  return bits.reshape(words.shape[0], -1)[:, :cols].astype(bool).reshape(shape)


def apply_flips(masks: Sequence[Any], flips: dict[int, jax.Array], all_finite: jax.Array):
  """New masks, grown, kept and changed positions from the flips.

  NaN/inf anywhere: every mask stays unchanged (the caller counts a skipped update). The
  old masks are read only by ``old ^ flips``, so the new masks are written in place.

  Returns:
    ``(new_masks, grown, kept, changed)`` lists over all leaves; ``grown`` (``new &
    ~old``), ``kept`` (``new & old``) and ``changed`` (``new ^ old``) are None for dense
    leaves.
  """
  n = len(masks)
  new_masks, grown, kept, changed = list(masks), [None] * n, [None] * n, [None] * n
  for i, leaf_flips_ in flips.items():
    flip = leaf_flips_ & all_finite
    new = masks[i] ^ flip
    new_masks[i] = new
    grown[i] = new & flip
    kept[i] = new & ~flip  # == old & new
    changed[i] = flip
  return new_masks, grown, kept, changed


def masked_inner_update(inner, grads, grad_masks, inner_state, params, treedef, extra_args):
  """The inner optimizer's update on the weights that take a step (``grad_masks``).

  Both the gradients and the params it sees are masked, so its state stays 0 at inactive
  positions also when it reads the params (weight decay inside the inner optimizer would
  otherwise write ``wd · w`` of a just-pruned weight into its momentum).
  """
  param_leaves = treedef.flatten_up_to(params)
  masked_grads, masked_params = [], []
  for g, p, m in zip(grads, param_leaves, grad_masks, strict=True):
    masked_grads.append(g if m is None else jnp.where(m, g, jnp.zeros_like(g)))
    masked_params.append(p if m is None else jnp.where(m, p, jnp.zeros_like(p)))
  return inner.update(
    jax.tree.unflatten(treedef, masked_grads),
    inner_state,
    jax.tree.unflatten(treedef, masked_params),
    **extra_args,
  )


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
