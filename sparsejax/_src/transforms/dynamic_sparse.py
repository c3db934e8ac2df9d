"""The Optax-composable dynamic sparse training (DST) transformation.

A DST method is an ``optax.GradientTransformationExtraArgs`` that wraps any inner
optimizer. Its state (masks, inner state, step count, PRNG key) lives in the optimizer
state, so jit, sharding and checkpointing need nothing extra, and its updates keep pruned
weights exactly zero after ``optax.apply_updates``: there is no training-loop hook.

Data flow of one step (DESIGN.md §2)::

  grads (dense) ─► mask-update step?  (one lax.cond per sparse leaf on the step count)
                    yes: drop/grow scores → structured drop-and-grow → flips = new ^ old
                    no:  flips = False (each cond returns only bool flips: no copies of
                         params, state or masks; new mask = old ^ flips, in place)
               ─► inner-optimizer state reset to 0 at newly grown positions (a fused no-op
                  on other steps)
               ─► grads masked by (mask ∩ previous mask) → inner.update
               ─► updates = where(mask, inner updates, -params); grown: grow_init - params

Conventions (ALGORITHMS.md §10):
  * **First update** (item 8): mask updates happen at steps ``t`` (the transformation's
    update count, 0-based) with ``start_step < t < end_step`` and
    ``(t - start_step) % update_every == 0``. Step ``start_step`` itself is *not* an update
    (the calgaryml/condensed-sparsity convention: the first update comes after
    ``update_every`` optimizer steps). On an update step the inner optimizer still takes
    its step for the kept weights (as CS does); newly grown weights are set to
    ``grow_init`` and take no step until the next one.
  * **Counts** (item 7): ``n_drop = floor(nnz · drop_fraction)`` (float32), nnz preserved
    exactly (google-research/rigl, CS).
  * **Drop** only among active weights; **grow** among all non-kept positions (weights
    dropped in the same update may be regrown and then keep their value and optimizer
    state; item 6). Ties are broken by the lowest index. This departs from GR/CS, which
    rank all positions by ``|mask·w|`` and may resolve zero-valued ties arbitrarily.
  * **Drop fraction**: a float decays with a cosine from ``drop_fraction`` at
    ``start_step`` to 0 at ``end_step`` (``optax.cosine_decay_schedule``, evaluated at
    ``t - start_step``); ``drop_fraction_decay="constant"`` keeps it fixed; a callable is an
    Optax schedule evaluated at the global count ``t``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sparsejax._src import base
from sparsejax._src import tree as tree_lib
from sparsejax._src.allocation import distributions
from sparsejax._src.criteria import scores as criteria
from sparsejax._src.primitives import structures


class DynamicSparseState(NamedTuple):
  """State of a DST transformation.

  Attributes:
    count: int32 scalar, number of ``update`` calls so far (the step index ``t``).
    key: uint32 ``[2]`` PRNG key; update ``t`` of leaf ``i`` uses
      ``fold_in(fold_in(key, t), i)``, so draws do not depend on device count.
    masks: params-structured pytree: a bool mask (shaped like the param) for each sparse
      leaf, ``optax.MaskedNode()`` for dense leaves.
    inner_state: the inner optimizer's state.
    skipped_updates: int32 scalar, number of scheduled mask updates skipped because a
      gradient, weight or score was NaN/inf (masks are left unchanged then).
  """

  count: jax.Array
  key: jax.Array
  masks: base.Masks
  inner_state: optax.OptState
  skipped_updates: jax.Array


class LeafMaskUpdate(Protocol):
  """Computes one leaf's new mask and the kept subset of the old one.

  Called inside the jitted update with the leaf's score context, its drop and grow scores,
  the number of weights to drop, the leaf's sparsity, the structure, and the paths of all
  sparse leaves (flattening order). Returns ``(new_mask, kept)``.
  """

  def __call__(self, ctx, drop_scores, grow_scores, n_drop, sparsity, structure, sparse_paths): ...


# --------------------------------------------------------------------------------------
# Which leaves are sparse, and how sparse (static: runs on shapes only).
# --------------------------------------------------------------------------------------


def _compile_regex(name: str, pattern: str | None) -> re.Pattern | None:
  if pattern is None:
    return None
  try:
    return re.compile(pattern)
  except (re.error, TypeError) as e:
    raise ValueError(f"`{name}` must be a valid regular expression, got {pattern!r}: {e}") from e


def plan_sparsity(
  params: base.Params,
  *,
  sparsity: float | None,
  distribution: str | distributions.Distribution = "erk",
  structure: str | structures.Structure | None = None,
  include: str | None = None,
  exclude: str | None = None,
  keep_first_dense: bool = False,
  keep_last_dense: bool = False,
  overrides: Mapping[str, float] | None = None,
  erk_power_scale: float = 1.0,
) -> dict[str, float | None]:
  """Decides the sparsity of every leaf of ``params`` (``None`` = dense, no mask).

  Candidates are floating leaves with ``ndim > 1`` (kernels), or the floating leaves whose
  path matches ``include`` if given; ``exclude`` removes matches; ``keep_first_dense`` /
  ``keep_last_dense`` remove the first / last candidate in tree-flattening order (the
  order of ``jax.tree_util.tree_flatten_with_path``: dict keys sorted, lists in order).
  Paths look like ``"layer1/kernel"``; patterns use ``re.search``.

  Args:
    params: a pytree of arrays or ``jax.ShapeDtypeStruct``.
    sparsity: target fraction of zeros over the sparse leaves, in [0, 1). May be ``None``
      with an N:M structure (the sparsity is then ``1 - n/m``).
    distribution: ``"uniform"``, ``"erdos_renyi"``, ``"erk"`` or a function
      ``(shapes, sparsity, *, overrides) -> {path: sparsity}``.
    structure: see :func:`sparsejax.get_structure`.
    include: regex selecting the candidate leaves (default: every ``ndim > 1`` leaf).
    exclude: regex of leaves to keep dense.
    keep_first_dense: keep the first candidate leaf dense.
    keep_last_dense: keep the last candidate leaf dense.
    overrides: ``{regex: sparsity}``; matching leaves get that sparsity (outside the
      distribution's budget); 0 makes a leaf dense. Every regex must match a candidate.
    erk_power_scale: exponent of the ERK raw densities (``distribution="erk"`` only).

  Returns:
    ``{path: sparsity or None}`` for every leaf, in flattening order.

  Raises:
    ValueError / TypeError: on any invalid argument, naming it.
  """
  structure = structures.get_structure(structure)
  paths, leaves, _ = flatten_with_paths_checked(params)
  include_re = _compile_regex("include", include)
  exclude_re = _compile_regex("exclude", exclude)
  if not isinstance(keep_first_dense, bool) or not isinstance(keep_last_dense, bool):
    raise TypeError("`keep_first_dense` and `keep_last_dense` must be bools.")

  candidates = []
  for path, leaf in zip(paths, leaves, strict=True):
    if not base.is_floating(leaf):
      continue
    if include_re is not None:
      if not include_re.search(path):
        continue
    elif len(leaf.shape) < 2:
      continue
    if exclude_re is not None and exclude_re.search(path):
      continue
    candidates.append(path)
  if keep_first_dense and candidates:
    candidates = candidates[1:]
  if keep_last_dense and candidates:
    candidates = candidates[:-1]
  if not candidates:
    floats = [p for p, leaf in zip(paths, leaves, strict=True) if base.is_floating(leaf)]
    raise ValueError(
      "No parameter leaf is eligible for sparsity (candidates are floating leaves with "
      f"ndim > 1, or those matching `include`). Floating leaves found: {floats[:20]}; "
      f"include={include!r}, exclude={exclude!r}."
    )

  resolved_overrides: dict[str, float] = {}
  if overrides is not None:
    if not isinstance(overrides, Mapping):
      raise TypeError(f"`overrides` must be a mapping {{regex: sparsity}}, got {overrides!r}.")
    for pattern, value in overrides.items():
      value = base.check_sparsity(f"overrides[{pattern!r}]", value)
      regex = _compile_regex(f"overrides key {pattern!r}", pattern)
      matched = [p for p in candidates if regex.search(p)]
      if not matched:
        raise ValueError(
          f"`overrides` pattern {pattern!r} matches no sparse parameter. Sparse candidates: "
          f"{candidates[:20]}{' ...' if len(candidates) > 20 else ''}"
        )
      for p in matched:
        resolved_overrides[p] = value

  shapes = {p: tuple(leaf.shape) for p, leaf in zip(paths, leaves, strict=True)}
  if isinstance(structure, structures.NM):
    if (
      sparsity is not None
      and abs(base.check_sparsity("sparsity", sparsity) - structure.sparsity) > 1e-9
    ):
      raise ValueError(
        f"`sparsity`={sparsity} conflicts with structure=NM({structure.n}, {structure.m}), "
        f"whose sparsity is 1 - n/m = {structure.sparsity}. Pass sparsity=None."
      )
    per_layer = {p: resolved_overrides.get(p, structure.sparsity) for p in candidates}
  else:
    if sparsity is None:
      raise ValueError("`sparsity` is required (a float in [0, 1)) unless structure is NM(n, m).")
    sparsity = base.check_sparsity("sparsity", sparsity)
    dist = distributions.get_distribution(distribution)
    cand_shapes = {p: shapes[p] for p in candidates}
    if dist is distributions.erk:
      per_layer = dist(
        cand_shapes, sparsity, overrides=resolved_overrides, power_scale=erk_power_scale
      )
    else:
      per_layer = dist(cand_shapes, sparsity, overrides=resolved_overrides)

  for path in candidates:
    value = per_layer.get(path)
    if value is None or not (0.0 <= float(value) < 1.0):
      raise ValueError(
        f"`distribution` {distribution!r} cannot reach sparsity={sparsity}: it gave layer "
        f"{path!r} the sparsity {value!r}; every layer needs a value in [0, 1)."
      )
  plan: dict[str, float | None] = {}
  for path in paths:
    s = per_layer.get(path)
    if s is None or s <= 0.0:
      plan[path] = None
    else:
      plan[path] = structure.layer_sparsity(path, shapes[path], float(s))
  return plan


def flatten_with_paths_checked(params: base.Params) -> tuple[list[str], list[Any], Any]:
  """Flattens params, rejecting empty trees and duplicate paths."""
  paths, leaves, treedef = tree_lib.flatten_with_paths(params)
  if not leaves:
    raise ValueError("`params` is an empty pytree: there is nothing to sparsify.")
  for leaf in leaves:
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      raise TypeError(
        f"`params` leaves must be arrays or jax.ShapeDtypeStruct, got {type(leaf).__name__}."
      )
  return paths, leaves, treedef


# --------------------------------------------------------------------------------------
# Schedules.
# --------------------------------------------------------------------------------------


def _make_drop_fraction_schedule(drop_fraction, decay: str, start_step: int, end_step: int | None):
  if callable(drop_fraction):
    return drop_fraction
  value = base.check_fraction("drop_fraction", drop_fraction)
  if decay == "constant" or end_step is None:
    return lambda count: jnp.asarray(value, jnp.float32)
  if decay == "cosine":
    cosine = optax.cosine_decay_schedule(value, decay_steps=end_step - start_step)
    return lambda count: jnp.asarray(cosine(count - start_step), jnp.float32)
  raise ValueError(f"`drop_fraction_decay` must be 'cosine' or 'constant', got {decay!r}.")


def is_mask_update_step(
  count, *, update_every: int | None, start_step: int = 0, end_step: int | None
):
  """Whether step ``count`` is a mask-update step (see the module docstring)."""
  if update_every is None or end_step is None:
    return jnp.zeros((), bool)
  count = jnp.asarray(count, jnp.int32)
  return (count > start_step) & (count < end_step) & ((count - start_step) % update_every == 0)


# --------------------------------------------------------------------------------------
# Inner-optimizer state access through tree_map_params (no isinstance ladders).
# --------------------------------------------------------------------------------------


def _inner_moments(inner, inner_state, n_leaves: int, treedef) -> list[tuple[jax.Array, ...]]:
  """Per param leaf, the tuple of param-shaped arrays in the inner state (state order)."""
  collected: list[list[jax.Array]] = [[] for _ in range(n_leaves)]
  index_tree = jax.tree.unflatten(treedef, list(range(n_leaves)))

  def collect(value, index):
    if not tree_lib.is_masked_node(value) and hasattr(value, "shape"):
      collected[index].append(value)
    return value

  optax.tree_utils.tree_map_params(
    inner, collect, inner_state, index_tree, is_leaf=tree_lib.is_masked_node
  )
  return [tuple(c) for c in collected]


def _reset_inner_state(inner, inner_state, grown: list[Any], treedef):
  """Sets every param-shaped inner state entry to 0 where ``grown`` is True."""
  grown_tree = jax.tree.unflatten(treedef, [False if g is None else g for g in grown])

  def reset(value, grown_leaf):
    if grown_leaf is False or tree_lib.is_masked_node(value) or not hasattr(value, "shape"):
      return value
    return jnp.where(grown_leaf, jnp.zeros_like(value), value)

  return optax.tree_utils.tree_map_params(
    inner, reset, inner_state, grown_tree, is_leaf=tree_lib.is_masked_node
  )


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _random_mask(structure, key, shape, sparsity):
  return structure.random_mask(key, shape, sparsity)


def _is_params_placeholder(params: Any) -> bool:
  return type(params).__name__ == "_ParamsPlaceholder" and not jax.tree.leaves(params)


def _default_leaf_update(ctx, drop_scores, grow_scores, n_drop, sparsity, structure, sparse_paths):
  del sparse_paths
  return structure.drop_and_grow(ctx.mask, drop_scores, grow_scores, n_drop, sparsity)


# --------------------------------------------------------------------------------------
# The transformation.
# --------------------------------------------------------------------------------------


def dynamic_sparse(
  inner: optax.GradientTransformation,
  *,
  sparsity: float | None = None,
  distribution: str | distributions.Distribution = "erk",
  drop: str | criteria.Criterion = "magnitude",
  grow: str | criteria.Criterion = "gradient",
  update_every: int | None = 100,
  start_step: int = 0,
  end_step: int | None = None,
  drop_fraction: float | optax.Schedule = 0.3,
  drop_fraction_decay: str = "cosine",
  structure: str | structures.Structure | None = None,
  grow_init: float = 0.0,
  seed: int = 0,
  include: str | None = None,
  exclude: str | None = None,
  keep_first_dense: bool = False,
  keep_last_dense: bool = False,
  overrides: Mapping[str, float] | None = None,
  erk_power_scale: float = 1.0,
  leaf_mask_update: LeafMaskUpdate | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` into a dynamic sparse training transformation.

  Generic drop-and-grow DST: every ``update_every`` steps between ``start_step`` and
  ``end_step``, each sparse layer drops ``floor(nnz·drop_fraction)`` active weights with
  the lowest ``drop`` scores and grows as many with the highest ``grow`` scores, keeping
  nnz (and the ``structure``) exactly. See the module docstring for the precise
  conventions. References: SET (Mocanu et al. 2018, https://arxiv.org/abs/1707.04780),
  RigL (Evci et al. 2020, https://arxiv.org/abs/1911.11134).

  Usage::

    tx = sparsejax.dynamic_sparse(optax.adam(1e-3), sparsity=0.9, end_step=7500)
    opt_state = tx.init(params)
    params = sparsejax.apply_masks(params, opt_state)        # start sparse
    updates, opt_state = tx.update(grads, opt_state, params)  # params are required
    params = optax.apply_updates(params, updates)             # pruned weights stay 0

  Args:
    inner: the optimizer to wrap (any Optax transformation, chains included).
    sparsity: target fraction of zeros over the sparse leaves, in [0, 1); ``None`` only
      with ``structure=NM(n, m)``.
    distribution: per-layer allocation: ``"uniform"``, ``"erdos_renyi"``, ``"erk"``, or a
      function (see :func:`plan_sparsity`).
    drop: drop criterion (name or ``ctx -> scores``); higher scores are kept.
    grow: grow criterion (name or ``ctx -> scores``); higher scores are grown.
    update_every: ΔT, steps between mask updates (``None``: never update, static).
    start_step: no mask update at or before this step.
    end_step: no mask update at or after this step; required unless ``update_every`` is
      ``None``. RigL/SRigL use 75% of training.
    drop_fraction: initial fraction of active weights swapped per update, in [0, 1], or an
      Optax schedule of the step count.
    drop_fraction_decay: ``"cosine"`` (default, RigL) or ``"constant"`` (SET paper).
    structure: ``None``/``"unstructured"``, ``ConstantFanIn()``/``"fan_in"``,
      ``NM(n, m)``/``"nm:n:m"``.
    grow_init: value of newly grown weights (0, as RigL).
    seed: seed of the initial masks and of random criteria.
    include: regex of the leaves that may be sparse (default: every ``ndim > 1`` leaf).
    exclude: regex of the leaves kept dense.
    keep_first_dense: keep the first sparse candidate dense.
    keep_last_dense: keep the last sparse candidate dense.
    overrides: ``{regex: sparsity}`` per-layer overrides.
    erk_power_scale: ERK exponent.
    leaf_mask_update: advanced: replaces the per-leaf drop-and-grow (used by SRigL).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`DynamicSparseState`. ``update`` requires ``params``.

  Raises:
    ValueError / TypeError: at construction or ``init`` time for any invalid argument,
    naming it and the allowed values.
  """
  if not hasattr(inner, "init") or not hasattr(inner, "update"):
    raise TypeError(f"`inner` must be an optax.GradientTransformation, got {inner!r}.")
  inner = optax.with_extra_args_support(inner)
  base.check_sparsity("sparsity", sparsity, allow_none=True)
  structure = structures.get_structure(structure)
  if isinstance(distribution, str):
    distributions.get_distribution(distribution)
  elif not callable(distribution):
    raise TypeError(f"`distribution` must be a name or a function, got {distribution!r}.")
  drop_fn = criteria.get_criterion(drop, argname="drop")
  grow_fn = criteria.get_criterion(grow, argname="grow")
  start_step = base.check_int("start_step", start_step, minimum=0)
  if update_every is not None:
    update_every = base.check_int("update_every", update_every, minimum=1)
    if end_step is None:
      raise ValueError(
        "`end_step` is required for dynamic sparsity (RigL/SRigL use 75% of the total "
        "training steps); pass update_every=None for a static mask."
      )
  if end_step is not None:
    end_step = base.check_int("end_step", end_step)
    if end_step <= start_step:
      raise ValueError(f"`end_step` must be > `start_step`={start_step}, got {end_step}.")
  drop_fraction_fn = _make_drop_fraction_schedule(
    drop_fraction, drop_fraction_decay, start_step, end_step
  )
  if not callable(drop_fraction) and drop_fraction_decay not in ("cosine", "constant"):
    raise ValueError(
      f"`drop_fraction_decay` must be 'cosine' or 'constant', got {drop_fraction_decay!r}."
    )
  if isinstance(grow_init, bool) or not isinstance(grow_init, int | float):
    raise TypeError(f"`grow_init` must be a float, got {grow_init!r}.")
  seed = base.check_int("seed", seed)
  leaf_update = leaf_mask_update or _default_leaf_update
  plan_kwargs = dict(
    sparsity=sparsity,
    distribution=distribution,
    structure=structure,
    include=include,
    exclude=exclude,
    keep_first_dense=keep_first_dense,
    keep_last_dense=keep_last_dense,
    overrides=overrides,
    erk_power_scale=erk_power_scale,
  )
  # Fail at construction for argument errors that do not need params.
  for name in ("include", "exclude"):
    _compile_regex(name, plan_kwargs[name])

  def sparsities_for(params) -> list[float | None]:
    return list(plan_sparsity(params, **plan_kwargs).values())

  def init_fn(params):
    if _is_params_placeholder(params):
      # optax.tree_utils.tree_map_params probes init with a placeholder: report where the
      # param-shaped trees are (the masks and the inner state's), without building masks.
      return DynamicSparseState(
        count=jnp.zeros([], jnp.int32),
        key=jax.random.PRNGKey(seed),
        masks=params,
        inner_state=inner.init(params),
        skipped_updates=jnp.zeros([], jnp.int32),
      )
    paths, leaves, treedef = flatten_with_paths_checked(params)
    layer_sparsity = sparsities_for(params)
    key = jax.random.PRNGKey(seed)
    masks = []
    for i, (leaf, s) in enumerate(zip(leaves, layer_sparsity, strict=True)):
      if s is None:
        masks.append(optax.MaskedNode())
      else:
        mask = _random_mask(structure, jax.random.fold_in(key, i), tuple(leaf.shape), s)
        masks.append(base.reshard_like(mask, leaf))  # Explicit meshes: shard like the param
    return DynamicSparseState(
      count=jnp.zeros([], jnp.int32),
      key=key,
      masks=jax.tree.unflatten(treedef, masks),
      inner_state=inner.init(params),
      skipped_updates=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
        "sparsejax DST transformations need `params` in update(grads, state, params): "
        "they emit updates that keep pruned weights at exactly 0."
      )
    paths, grads, treedef = tree_lib.flatten_with_paths(updates)
    param_leaves = treedef.flatten_up_to(params)
    mask_leaves = treedef.flatten_up_to(state.masks)
    if len(param_leaves) != len(grads):
      raise ValueError("`updates` and `params` have different tree structures.")
    layer_sparsity = sparsities_for(params)
    sparse_idx = [i for i, m in enumerate(mask_leaves) if not tree_lib.is_masked_node(m)]
    sparse_paths = tuple(paths[i] for i in sparse_idx)
    for i in sparse_idx:
      if layer_sparsity[i] is None or mask_leaves[i].shape != grads[i].shape:
        raise ValueError(
          f"The DST state's masks do not match the params at {paths[i]!r}: mask shape "
          f"{getattr(mask_leaves[i], 'shape', None)} vs gradient shape {grads[i].shape}. "
          "Was the optimizer state initialized for a different model?"
        )

    def emit(grad_masks, active, grown, inner_state):
      """Inner update on masked grads; updates that keep inactive weights at exactly 0.

      ``grad_masks``: the weights that take an inner step (kept = old & new); ``active``: the
      new masks; ``grown``: new & ~old (set to ``grow_init``), or None. Each mask is read by
      one fusion only (masking the grads, or forming the update), so XLA materialises none.
      """
      masked_grads = [
        g if m is None else jnp.where(m, g, jnp.zeros_like(g))
        for g, m in zip(grads, grad_masks, strict=True)
      ]
      inner_updates, new_inner_state = inner.update(
        jax.tree.unflatten(treedef, masked_grads), inner_state, params, **extra_args
      )
      inner_leaves = treedef.flatten_up_to(inner_updates)
      out = []
      for u, p, a, gr in zip(inner_leaves, param_leaves, active, grown, strict=True):
        if a is None:
          out.append(u)
          continue
        p = p.astype(u.dtype)
        if gr is not None:
          u = jnp.where(gr, jnp.asarray(grow_init, u.dtype) - p, u)
        out.append(jnp.where(a, u, -p))
      return jax.tree.unflatten(treedef, out), new_inner_state

    def leaf_flips(i, count, key, param, grad, mask, moments):
      """Leaf ``i``'s mask update as flips (``new ^ old``), and whether its scores were finite.

      Runs inside the conditional, only on mask-update steps; every array it reads is an
      argument (Explicit meshes convert arguments, not closed-over values, to Auto axes).
      """
      drop_key, grow_key = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, count), i))
      ctx = base.ScoreContext(
        param=param,
        grad=grad,
        mask=mask,
        key=drop_key,
        step=count,
        path=paths[i],
        inner_moments=moments,
      )
      drop_scores = drop_fn(ctx)
      grow_scores = grow_fn(ctx._replace(key=grow_key))
      for name, scores in (("drop", drop_scores), ("grow", grow_scores)):
        if scores.shape != mask.shape:
          raise ValueError(
            f"`{name}` criterion returned shape {scores.shape} for {paths[i]!r}; expected "
            f"{mask.shape} (the param's shape)."
          )
      finite = jnp.all(jnp.isfinite(drop_scores)) & jnp.all(jnp.isfinite(grow_scores))
      nnz = jnp.sum(mask, dtype=jnp.int32)
      n_drop = jnp.floor(nnz.astype(jnp.float32) * drop_fraction_fn(count)).astype(jnp.int32)
      new, _ = leaf_update(
        ctx, drop_scores, grow_scores, n_drop, layer_sparsity[i], structure, sparse_paths
      )
      return new ^ mask, finite

    def update_branch(i):
      """The cond's update branch for leaf ``i`` (no operands: they are closed over)."""
      fn = functools.partial(leaf_flips, i)
      spec = base.explicit_sharding_spec(mask_leaves[i])
      if spec is not None:
        # Explicit axes: selections flatten and scatter, which Explicit types reject; run the
        # selection with the compiler choosing shardings, and give the flips the mask's.
        fn = jax.sharding.auto_axes(fn, out_sharding=(spec, jax.sharding.PartitionSpec()))
      return fn(state.count, state.key, param_leaves[i], grads[i], mask_leaves[i], all_moments[i])

    def no_flips(i):
      return jnp.zeros_like(mask_leaves[i]), jnp.ones([], bool)

    if not sparse_idx:  # nothing is sparse (e.g. sparsity 0): exactly the inner optimizer.
      new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
      return new_updates, state._replace(
        count=optax.safe_int32_increment(state.count), inner_state=inner_state
      )

    grad_masks = [None if tree_lib.is_masked_node(m) else m for m in mask_leaves]
    grown = [None] * len(grads)
    new_mask_leaves = list(mask_leaves)
    inner_state = state.inner_state
    skipped = state.skipped_updates
    if update_every is not None:
      # Only the selection sits in the conditionals, one per sparse leaf, and each returns the
      # mask's flips (new ^ old; all False on other steps), never params, optimizer state or
      # the masks themselves. Measured on XLA:CPU (benchmarks/RESULTS.md): returning the
      # masks costs two copies per mask per step (the pass-through branch and the donated
      # output), one cond for all leaves keeps every leaf's selection temporaries alive at
      # once (a temp buffer twice as large, page-faulted on every step once it passes glibc's
      # 32 MiB mmap threshold), and running the inner update inside the cond copies params
      # and state through it (1.5x). Below, the old masks are read only by `old ^ flips`, so
      # the new masks are written in place.
      do_update = is_mask_update_step(
        state.count, update_every=update_every, start_step=start_step, end_step=end_step
      )
      all_moments = _inner_moments(inner, state.inner_state, len(grads), treedef)
      flips = {}
      all_finite = jnp.ones([], bool)
      for i in sparse_idx:
        flips[i], finite = lax.cond(
          do_update, functools.partial(update_branch, i), functools.partial(no_flips, i)
        )
        all_finite = all_finite & finite
      skipped = skipped + (~all_finite).astype(jnp.int32)
      for i in sparse_idx:
        # NaN/inf in any leaf's scores: leave every mask unchanged (counted in `skipped`).
        flip = flips[i] & all_finite
        new = mask_leaves[i] ^ flip
        new_mask_leaves[i] = new
        grown[i] = new & flip
        grad_masks[i] = new & ~flip  # == old & new
      inner_state = _reset_inner_state(inner, inner_state, grown, treedef)
    active = [None if tree_lib.is_masked_node(m) else m for m in new_mask_leaves]
    new_updates, inner_state = emit(grad_masks, active, grown, inner_state)
    new_state = DynamicSparseState(
      count=optax.safe_int32_increment(state.count),
      key=state.key,
      masks=jax.tree.unflatten(treedef, new_mask_leaves),
      inner_state=inner_state,
      skipped_updates=skipped,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def static_sparse(
  inner: optax.GradientTransformation, **kwargs
) -> optax.GradientTransformationExtraArgs:
  """Static sparse training: a random (structured) mask fixed for the whole run.

  Accepts the keywords of :func:`dynamic_sparse`; schedule keywords (``update_every``,
  ``end_step``, ``drop_fraction``, ``drop``, ``grow``) are accepted for uniformity but a
  static mask never changes. Reference: the "Static" baseline of Evci et al. 2020.
  """
  kwargs["update_every"] = None
  kwargs.setdefault("end_step", None)
  return dynamic_sparse(inner, **kwargs)


def set_(inner: optax.GradientTransformation, **kwargs) -> optax.GradientTransformationExtraArgs:
  """SET: magnitude drop, uniform random regrowth (Mocanu et al. 2018).

  Reference: https://arxiv.org/abs/1707.04780. Same keywords as :func:`dynamic_sparse`
  (defaults: ``drop="magnitude"``, ``grow="random"``). The drop fraction decays with a
  cosine by default, as in google-research/rigl's SET; pass
  ``drop_fraction_decay="constant"`` for the paper's constant ζ.
  """
  kwargs.setdefault("drop", "magnitude")
  kwargs.setdefault("grow", "random")
  return dynamic_sparse(inner, **kwargs)


def rigl(inner: optax.GradientTransformation, **kwargs) -> optax.GradientTransformationExtraArgs:
  """RigL: magnitude drop, dense-gradient-magnitude regrowth (Evci et al. 2020).

  Reference: "Rigging the Lottery: Making All Tickets Winners",
  https://arxiv.org/abs/1911.11134. Same keywords as :func:`dynamic_sparse` (defaults:
  ``drop="magnitude"``, ``grow="gradient"``, ΔT=100, α=0.3 cosine-decayed).
  """
  kwargs.setdefault("drop", "magnitude")
  kwargs.setdefault("grow", "gradient")
  return dynamic_sparse(inner, **kwargs)


# --------------------------------------------------------------------------------------
# Reading and applying the state.
# --------------------------------------------------------------------------------------


def _is_dst_state(x: Any) -> bool:
  return isinstance(x, DynamicSparseState)


def find_dst_state(opt_state: Any) -> DynamicSparseState:
  """Finds the (single) :class:`DynamicSparseState` inside any optimizer state.

  Accepts a bare state, any nesting (chains, ``MultiSteps``, ``inject_hyperparams``), an
  ``nnx.Optimizer``'s ``opt_state`` or the ``nnx.Optimizer`` itself.
  """
  if hasattr(opt_state, "opt_state") and not _is_dst_state(opt_state):
    opt_state = opt_state.opt_state
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_dst_state) if _is_dst_state(x)]
  if not found:
    raise ValueError(
      "`opt_state` holds no sparsejax DynamicSparseState: was it created by a sparsejax "
      "transformation (dynamic_sparse, rigl, set_, srigl, ...)?"
    )
  if len(found) > 1:
    raise ValueError(f"`opt_state` holds {len(found)} sparsejax DST states; pass the one you mean.")
  return found[0]


def _unwrap(x: Any) -> Any:
  """Unwraps NNX Variable-like containers (OptVariable) to their array."""
  if isinstance(x, jax.Array) or not hasattr(x, "get_value"):
    return x
  return _variable_value(x)


def _variable_value(x: Any) -> Any:
  return x.get_value() if hasattr(x, "get_value") else x.value


def _mask_leaves(opt_state: Any) -> list[Any]:
  masks = find_dst_state(opt_state).masks
  return [
    _unwrap(m)
    for m in jax.tree.leaves(
      masks, is_leaf=lambda x: tree_lib.is_masked_node(x) or isinstance(x, jax.Array)
    )
  ]


def get_masks(opt_state: Any, params: base.Params | None = None) -> Any:
  """The masks of a DST optimizer state.

  Args:
    opt_state: an optimizer state containing a DST state (see :func:`find_dst_state`).
    params: optional; when given, the result has exactly the structure of ``params``.

  Returns:
    A pytree with the params' structure: a bool array for each sparse leaf and ``None``
    for dense leaves.
  """
  leaves = [
    None if tree_lib.is_masked_node(m) else jnp.asarray(m, bool) for m in _mask_leaves(opt_state)
  ]
  if params is None:
    masks = find_dst_state(opt_state).masks
    treedef = jax.tree.structure(
      jax.tree.map(
        lambda x: 0, masks, is_leaf=lambda x: tree_lib.is_masked_node(x) or isinstance(x, jax.Array)
      )
    )
    return _strip_variables(jax.tree.unflatten(treedef, leaves))
  treedef = jax.tree.structure(params)
  if treedef.num_leaves != len(leaves):
    raise ValueError(
      f"`params` has {treedef.num_leaves} leaves but the DST state has {len(leaves)} masks: "
      "the optimizer state belongs to a different model."
    )
  return _strip_variables(jax.tree.unflatten(treedef, leaves))


def _is_variable_like(x: Any) -> bool:
  return not isinstance(x, jax.Array) and hasattr(x, "get_value") and hasattr(x, "replace")


def _strip_variables(tree: Any) -> Any:
  """Replaces NNX Variable nodes by their content, so masks are plain arrays / None."""
  return jax.tree.map(
    lambda x: _variable_value(x) if _is_variable_like(x) else x, tree, is_leaf=_is_variable_like
  )


def apply_masks(params: base.Params, opt_state: Any) -> base.Params:
  """Zeroes the pruned entries of ``params`` (call once after ``init`` to start sparse).

  Args:
    params: the params pytree the optimizer state was initialized with.
    opt_state: an optimizer state holding a DST state.

  Returns:
    ``params`` with every sparse leaf multiplied by its mask (dense leaves unchanged).

  Raises:
    ValueError: if the masks do not match the params.
  """
  paths, leaves, treedef = tree_lib.flatten_with_paths(params)
  masks = _mask_leaves(opt_state)
  if len(masks) != len(leaves):
    raise ValueError(
      f"`params` has {len(leaves)} leaves but the DST state has {len(masks)} masks: the "
      "optimizer state belongs to a different model."
    )
  out = []
  for path, leaf, mask in zip(paths, leaves, masks, strict=True):
    if tree_lib.is_masked_node(mask):
      out.append(leaf)
      continue
    if mask.shape != leaf.shape:
      raise ValueError(
        f"Mask shape {mask.shape} does not match param {path!r} of shape {leaf.shape}."
      )
    out.append(jnp.where(mask, leaf, jnp.zeros_like(leaf)))
  return jax.tree.unflatten(treedef, out)


def summarize(params: base.Params, opt_state: Any | None = None) -> dict[str, Any]:
  """Per-layer and total sparsity and nnz.

  Args:
    params: the params pytree.
    opt_state: optional DST optimizer state; when given, each sparse layer also reports
      its mask's nnz (``mask_nnz``) and whether the weights respect it.

  Returns:
    ``{"layers": {path: {"shape", "size", "nnz", "sparsity", "sparse"[, "mask_nnz"]}},
    "total_size", "total_nnz", "total_sparsity", "sparse_size", "sparse_nnz",
    "sparse_sparsity"}``; "sparse_*" count only leaves that carry a mask (all leaves
    with ``ndim > 1`` when no ``opt_state`` is given). Values are Python numbers.
  """
  paths, leaves, _ = tree_lib.flatten_with_paths(params)
  masks = _mask_leaves(opt_state) if opt_state is not None else [None] * len(leaves)
  if len(masks) != len(leaves):
    raise ValueError("`params` and the DST masks have different numbers of leaves.")
  layers = {}
  tot = tot_nnz = sp = sp_nnz = 0
  for path, leaf, mask in zip(paths, leaves, masks, strict=True):
    size = int(leaf.size)
    nnz = int(jnp.count_nonzero(leaf))
    is_sparse = (not tree_lib.is_masked_node(mask)) if opt_state is not None else leaf.ndim > 1
    entry = {
      "shape": tuple(leaf.shape),
      "size": size,
      "nnz": nnz,
      "sparsity": 1.0 - nnz / size if size else 0.0,
      "sparse": bool(is_sparse),
    }
    if opt_state is not None and is_sparse:
      entry["mask_nnz"] = int(jnp.count_nonzero(mask))
    layers[path] = entry
    tot += size
    tot_nnz += nnz
    if is_sparse:
      sp += size
      sp_nnz += nnz
  return {
    "layers": layers,
    "total_size": tot,
    "total_nnz": tot_nnz,
    "total_sparsity": 1.0 - tot_nnz / tot if tot else 0.0,
    "sparse_size": sp,
    "sparse_nnz": sp_nnz,
    "sparse_sparsity": 1.0 - sp_nnz / sp if sp else 0.0,
  }


def format_summary(summary: dict[str, Any]) -> str:
  """Renders :func:`summarize`'s output as a fixed-width text table."""
  rows = [f"{'layer':<40} {'shape':<20} {'nnz':>10} {'size':>10} {'sparsity':>9}"]
  for path, e in summary["layers"].items():
    rows.append(
      f"{path:<40} {str(e['shape']):<20} {e['nnz']:>10} {e['size']:>10} {e['sparsity']:>9.4f}"
    )
  rows.append(
    f"{'total':<40} {'':<20} {summary['total_nnz']:>10} {summary['total_size']:>10} "
    f"{summary['total_sparsity']:>9.4f}"
  )
  rows.append(
    f"{'sparse layers':<40} {'':<20} {summary['sparse_nnz']:>10} {summary['sparse_size']:>10} "
    f"{summary['sparse_sparsity']:>9.4f}"
  )
  return "\n".join(rows)


def layer_sparsities(params: base.Params, **kwargs) -> dict[str, float | None]:
  """The per-leaf sparsity a DST transformation would use (``None`` = dense).

  Takes the same allocation keywords as :func:`dynamic_sparse` (``sparsity``,
  ``distribution``, ``structure``, ``include``, ``exclude``, ``keep_first_dense``,
  ``keep_last_dense``, ``overrides``, ``erk_power_scale``).
  """
  return plan_sparsity(params, **kwargs)


__all__ = (
  "DynamicSparseState",
  "dynamic_sparse",
  "static_sparse",
  "set_",
  "rigl",
  "apply_masks",
  "get_masks",
  "summarize",
  "format_summary",
  "find_dst_state",
  "plan_sparsity",
  "layer_sparsities",
  "is_mask_update_step",
)
