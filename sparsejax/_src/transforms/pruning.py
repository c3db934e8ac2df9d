"""Masks from scores: one-shot pruning, pruning at initialization, global budgets.

:func:`prune` turns params (and, for saliency criteria, one batch's gradients) into masks
for a sparsity, a criterion and a distribution: SNIP (Lee et al. 2019, arXiv:1810.02340)
is ``criterion="snip"`` with one batch's gradients at initialization; one-shot magnitude
pruning is ``criterion="magnitude"`` on trained weights. Every method takes such masks as
``init_masks=`` (e.g. "SNIP + static" of RigL's Table 1).

:func:`global_counts` is the cross-layer ranking behind ``distribution="global"``: one
threshold over the scores of all pooled layers, returned as a per-layer count.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax._src import base, tree
from sparsejax._src.allocation import plan as plan_lib
from sparsejax._src.criteria import scores as criteria
from sparsejax._src.primitives import host_random, host_selection, selection, structures

# Criteria that read the gradient: prune() needs `grads` for them.
_NEEDS_GRADS = frozenset({"snip", "gradient", "gradient_magnitude"})


def global_counts(
  scores: Sequence[jax.Array], candidates: Sequence[jax.Array | None], total: Any
) -> jax.Array:
  """Per-layer counts of the ``total`` highest scores ranked across all layers together.

  Ties break by layer order, then index. Every layer keeps at least one weight (a layer
  pruned to nothing disconnects the network: SynFlow's "layer collapse"), taken from the
  rest of the budget.

  Args:
    scores: one score array per pooled layer.
    candidates: optional bool array per layer (only those entries may be counted).
    total: the number of weights to keep over all layers (int or traced int32).

  Returns:
    int32 ``[n_layers]`` counts summing to ``total`` (clipped to the candidates).
  """
  flat = jnp.concatenate([s.reshape(-1).astype(jnp.float32) for s in scores])
  cands = None
  if any(c is not None for c in candidates):
    cands = jnp.concatenate(
      [
        (jnp.ones(s.size, bool) if c is None else c.reshape(-1))
        for s, c in zip(scores, candidates, strict=True)
      ]
    )
  floor = len(scores)
  keep = selection.topk_mask(flat, jnp.asarray(total, jnp.int32) - floor, candidates=cands)
  sizes = np.cumsum([0] + [s.size for s in scores])
  counts = jnp.stack(
    [jnp.sum(keep[a:b], dtype=jnp.int32) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
  )
  return counts + 1  # the per-layer floor of one weight


def _criterion_fn(criterion: str | Callable, grads: Any) -> Callable:
  fn = criteria.get_criterion(criterion, argname="criterion")
  if grads is None and isinstance(criterion, str) and criterion in _NEEDS_GRADS:
    raise ValueError(
      f"criterion={criterion!r} scores with the gradient: pass `grads` (e.g. one batch's "
      "gradient at initialization for SNIP)."
    )
  return fn


def prune(
  params: base.Params,
  *,
  sparsity: float,
  criterion: str | Callable[[base.ScoreContext], jax.Array] = "magnitude",
  grads: base.Params | None = None,
  distribution: str | Callable = "erk",
  structure: Any = None,
  seed: int = 0,
  **allocation: Any,
) -> Any:
  """Masks that keep the highest-scoring weights: one-shot pruning and pruning at init.

  Args:
    params: the params pytree (arrays).
    sparsity: target fraction of zeros over the sparse leaves, in [0, 1).
    criterion: ``"magnitude"`` (``|w|``), ``"random"``, ``"snip"`` (``|g ⊙ w|``, Lee et al.
      2019: needs ``grads``), any registered criterion name, or a function ``ctx ->
      scores`` (``ctx.grad`` is ``None`` without ``grads``).
    grads: gradients shaped like ``params`` (one batch's, for SNIP).
    distribution: ``"erk"``, ``"uniform"``, ``"erdos_renyi"``, ``"global"`` (one ranking
      across layers), or a function.
    structure: any structure (``"fan_in"``, ``"nm:2:4"``, ``"block:4x4"``, ...): the mask
      is the structure's best mask for the scores.
    seed: seed of ``criterion="random"``.
    **allocation: the other allocation keywords of :func:`sparsejax.dynamic_sparse`
      (``include``, ``exclude``, ``keep_first_dense``, ``keep_last_dense``,
      ``first_layer``, ``last_layer``, ``overrides``, ``erk_power_scale``).

  Returns:
    A masks pytree shaped like :func:`sparsejax.get_masks`'s: a bool array per sparse leaf,
    ``None`` for dense leaves.

  Raises:
    ValueError / TypeError: an unknown criterion, a saliency criterion without ``grads``,
      ``grads`` of another structure, and the allocation errors of ``dynamic_sparse``.

  Example:
    >>> masks = sj.prune(params, sparsity=0.9, criterion="snip", grads=grads)
    >>> tx = sj.static_sparse(optax.sgd(0.1), sparsity=0.9, init_masks=masks)
  """
  alloc = plan_lib.Allocation(
    sparsity=sparsity, distribution=distribution, structure=structure, **allocation
  )
  return masks_from_scores(alloc, params, _criterion_fn(criterion, grads), grads, seed)


def masks_from_scores(
  alloc: plan_lib.Allocation, params: Any, criterion: Callable, grads: Any, seed: int
) -> Any:
  """Scores every sparse leaf with ``criterion`` and keeps the best mask of the structure."""
  plan = alloc.plan(params)
  paths, leaves, treedef = plan_lib.flatten_params(params)
  if grads is not None:
    g_paths, g_leaves, _ = tree.flatten_with_paths(grads)
    if g_paths != paths or any(
      tuple(g.shape) != tuple(p.shape) for g, p in zip(g_leaves, leaves, strict=True)
    ):
      raise ValueError("`grads` must have the structure and shapes of `params`.")
  else:
    g_leaves = [None] * len(leaves)
  key = jax.random.PRNGKey(base.check_int("seed", seed))
  scores: dict[int, jax.Array] = {}
  for i, leaf_plan in enumerate(plan.leaves):
    if leaf_plan.sparsity is None:
      continue
    ctx = base.ScoreContext(
      param=leaves[i],
      grad=g_leaves[i],
      mask=jnp.ones(leaves[i].shape, bool),
      key=jax.random.fold_in(key, i),
      step=jnp.zeros([], jnp.int32),
      path=leaf_plan.path,
      inner_moments=(),
      sparsity=leaf_plan.sparsity,
      layer=leaf_plan.layer,
    )
    scores[i] = jnp.asarray(criterion(ctx), jnp.float32)
    if scores[i].shape != tuple(leaves[i].shape):
      raise ValueError(
        f"`criterion` returned shape {scores[i].shape} for {leaf_plan.path!r}; expected "
        f"{tuple(leaves[i].shape)}."
      )
  masks = select_masks(alloc, plan, scores)
  return jax.tree.unflatten(treedef, [masks.get(i) for i in range(len(leaves))])


def select_masks(
  alloc: plan_lib.Allocation, plan: plan_lib.Plan, scores: dict[int, jax.Array]
) -> dict[int, jax.Array]:
  """``{leaf index: mask}``: per layer by the structure, or one global ranking."""
  overrides = {i for i in scores if alloc.is_global and _overridden(alloc, plan.leaves[i].path)}
  pooled = [i for i in scores if alloc.is_global and i not in overrides]
  out = {
    i: alloc.structure.select(s, plan.leaves[i].sparsity)
    for i, s in scores.items()
    if i not in pooled
  }
  if pooled:
    size = sum(int(scores[i].size) for i in pooled)
    total = base.nnz_for_sparsity(size, alloc.sparsity)
    counts = global_counts([scores[i] for i in pooled], [None] * len(pooled), total)
    for i, count in zip(pooled, counts, strict=True):
      out[i] = selection.topk_mask(scores[i], count)
  return out


def _overridden(alloc: plan_lib.Allocation, path: str) -> bool:
  return any(re.search(pattern, path) for pattern in (alloc.overrides or {}))


def check_init_masks(plan: plan_lib.Plan, structure: Any, masks: list[Any], exact: bool) -> None:
  """Validates user masks against the plan: sparse leaves, shapes, bool, the structure.

  ``exact``: the structure needs the plan's nnz (constant fan-in, N:M, blocks keep it
  exact through every update); unstructured masks may have any nonzero count.

  Raises:
    ValueError / TypeError: naming ``init_masks`` and the leaf.
  """
  for leaf_plan, mask in zip(plan.leaves, masks, strict=True):
    path = leaf_plan.path
    if (mask is None) != (leaf_plan.sparsity is None):
      want = "a bool mask" if mask is None else "None (a dense leaf)"
      raise ValueError(
        f"`init_masks` at {path!r}: expected {want}, as the allocation plans this leaf "
        f"{leaf_plan.role!r}. Make the masks with the same allocation keywords."
      )
    if mask is None:
      continue
    if tuple(mask.shape) != tuple(leaf_plan.shape) or mask.dtype != jnp.bool_:
      raise TypeError(
        f"`init_masks` at {path!r} must be a bool array of shape {leaf_plan.shape}, got "
        f"{mask.dtype}{tuple(mask.shape)}."
      )
    if isinstance(mask, jax.core.Tracer):
      continue  # values cannot be checked under a trace
    nnz = int(np.count_nonzero(np.asarray(mask)))
    if nnz == 0:
      raise ValueError(f"`init_masks` at {path!r} keeps no weight.")
    if exact:
      target = structure.target_nnz(leaf_plan.shape, leaf_plan.sparsity)
      if nnz != target or not bool(
        np.all(np.asarray(structure.select(mask, leaf_plan.sparsity)) == np.asarray(mask))
      ):
        raise ValueError(
          f"`init_masks` at {path!r} does not satisfy structure={structure!r} at the planned "
          f"sparsity {leaf_plan.sparsity:.4f} ({nnz} nonzeros, expected {target} in the "
          "structure's pattern). Make the masks with sparsejax.prune(..., structure=...)."
        )


def initial_masks(
  alloc: plan_lib.Allocation,
  params: Any,
  spec: Any,
  *,
  seed: int,
  initial_alloc: plan_lib.Allocation | None = None,
) -> Any:
  """The masks a method starts from (see ``init_masks`` of :func:`dynamic_sparse`)."""
  plan = alloc.plan(params)
  paths, leaves, treedef = plan_lib.flatten_params(params)
  if callable(spec) and not isinstance(spec, str):
    spec = spec(params)
  if spec is None or isinstance(spec, str):
    mode = spec or "random"
    if mode not in ("random", "dense"):
      raise ValueError(
        f"`init_masks` must be 'random', 'dense', masks or a function, got {mode!r}."
      )
    source = initial_alloc or alloc
    source_plan = source.plan(params) if source is not alloc else plan
    key = jax.random.PRNGKey(seed)
    masks = []
    for i, (leaf, leaf_plan, src) in enumerate(
      zip(leaves, plan.leaves, source_plan.leaves, strict=True)
    ):
      if leaf_plan.sparsity is None:
        masks.append(None)
      elif mode == "dense" or not src.sparsity:
        masks.append(_leaf_mask(_DENSE, key, leaf, 0.0))
      elif source.is_global and initial_alloc is None:
        masks.append(None)  # filled below by one global ranking of |w|
      else:
        masks.append(_leaf_mask(source.structure, _fold_in(key, i), leaf, src.sparsity))
    pending = [i for i, m in enumerate(masks) if m is None and plan.leaves[i].sparsity is not None]
    if pending:
      out_shardings = {i: _concrete_sharding(leaves[i]) for i in pending}

      def select(scores):
        return select_masks(
          alloc, plan, {i: jnp.abs(s).astype(jnp.float32) for i, s in scores.items()}
        )

      specs = {i: base.explicit_sharding_spec(leaves[i]) for i in pending}
      if all(s is not None for s in specs.values()):
        # Explicit axes: the ranking flattens and concatenates, which Explicit types reject;
        # the compiler chooses its shardings and the masks get their params'.
        select = jax.sharding.auto_axes(select, out_sharding=specs)
      if all(s is not None for s in out_shardings.values()):  # straight into the shardings
        select = jax.jit(select, out_shardings=out_shardings)
      for i, mask in select({i: leaves[i] for i in pending}).items():
        masks[i] = base.reshard_like(mask, leaves[i])
    return jax.tree.unflatten(treedef, [optax.MaskedNode() if m is None else m for m in masks])
  _, given, _ = tree.flatten_masks(spec)
  if len(given) != len(leaves):
    raise ValueError(
      f"`init_masks` has {len(given)} leaves, `params` {len(leaves)}: pass masks shaped like "
      "sparsejax.get_masks (None for dense leaves)."
    )
  exact = not isinstance(alloc.structure, structures.Unstructured)
  check_init_masks(plan, alloc.structure, given, exact)
  return jax.tree.unflatten(
    treedef,
    [
      optax.MaskedNode() if m is None else _given_mask(m, p)
      for m, p in zip(given, leaves, strict=True)
    ],
  )


def _fold_in(key: jax.Array, data: int) -> jax.Array | np.ndarray:
  """``jax.random.fold_in(key, data)``; on the host for a concrete threefry key (no
  program compiled outside ``jit``, the same bits)."""
  if host_random.supported(key):
    return host_random.fold_in(key, data)
  return jax.random.fold_in(key, data)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _random_mask_program(structure, key, shape, sparsity):
  return structure.random_mask(key, shape, sparsity)


def _host_random_mask(structure, key, shape, sparsity) -> np.ndarray | None:
  """``structure.random_mask(key, shape, sparsity)`` in NumPy, or None where unsupported.

  The built-in unstructured, constant fan-in and N:M structures (exactly these classes:
  a subclass may change the selection) with a concrete threefry key (``tx.init`` outside
  ``jit``): the same uniform scores (as their order keys, ``host_random.uniform_keys``)
  and the same top-k (``host_selection.topk_keys_host``), so the same mask bit for bit.
  Through XLA each layer shape and sparsity compiles a threefry and a selection program,
  which costs more time and compiler memory (tens of MB per program) than the draw and
  the selection.
  """
  kind = type(structure)
  if kind not in (structures.Unstructured, structures.ConstantFanIn, structures.NM):
    return None
  if not host_random.supported(key) or base.shape_size(shape) >= 2**32:
    return None
  # The uniform scores' 23-bit integers: the same order and ties as the floats.
  if kind is structures.Unstructured:
    keys = host_random.uniform_keys(key, shape)
    return host_selection.topk_keys_host(keys, structure.target_nnz(shape, sparsity))
  if kind is structures.ConstantFanIn:
    keys = host_random.uniform_keys(key, base.fan_in_shape(shape))
    k = structure.fan_in(shape, sparsity)
    return host_selection.topk_keys_host(keys, k, axis=0).reshape(shape)
  grouped = structure.grouped_shape(shape)  # N:M: n of every group of m
  keys = host_random.uniform_keys(key, grouped)
  return host_selection.topk_keys_host(keys, structure.n, axis=1).reshape(shape)


def _random_mask(structure, key, shape, sparsity):
  """``structure.random_mask(key, shape, sparsity)``, on the host where it can be.

  See :func:`_host_random_mask`; elsewhere (other structures, a traced key, another PRNG
  implementation) one jitted program per configuration.
  """
  host = _host_random_mask(structure, key, tuple(shape), sparsity)
  if host is not None:
    return jax.device_put(host)  # jnp.asarray would compile a staging program per shape
  return _random_mask_program(structure, key, shape, sparsity)


# --------------------------------------------------------------------------------------
# Initial masks of concretely sharded params: built straight into the param's sharding.
# --------------------------------------------------------------------------------------


class _DenseMask:
  """An all-ones mask (``init_masks="dense"`` and layers the source plan keeps dense)."""

  def random_mask(self, key, shape, sparsity):
    del key, sparsity
    return jnp.ones(shape, bool)


_DENSE = _DenseMask()


def _concrete_sharding(leaf: Any) -> jax.sharding.NamedSharding | None:
  """The ``NamedSharding`` of a concrete (not traced) ``jax.Array`` param, else None."""
  if isinstance(leaf, jax.core.Tracer) or not isinstance(leaf, jax.Array):
    return None
  sharding = leaf.sharding
  return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None


def _row_view_sharding(
  sharding: jax.sharding.NamedSharding, shape: tuple[int, ...]
) -> jax.sharding.NamedSharding | None:
  """The param's mesh axes on the rows of its ``[rows, last axis]`` view (None if not even).

  The selections behind an initial mask (``selection.topk_mask``) work on that view and
  visit it in column chunks (a ``fori_loop`` of dynamic column slices). Shards made of
  whole rows keep every chunk local and the selection sharded (one all-reduce of a count
  histogram per pass), whereas XLA gathers a view sharded along the sliced axis: a conv
  kernel ``[h, w, in, out]`` sharded along ``in`` is such a view. None on a mesh with
  Explicit axes, where a value's sharding is its type (the mask is then drawn as typed).
  """
  if jax.sharding.AxisType.Explicit in tuple(sharding.mesh.axis_types):
    return None
  axes: list[str] = []
  for part in sharding.spec:
    if isinstance(part, str):
      axes.append(part)
    elif isinstance(part, tuple):
      axes.extend(part)
    elif part is not None:
      return None  # e.g. PartitionSpec.UNCONSTRAINED: keep the param's layout
  size = int(np.prod([sharding.mesh.shape[a] for a in axes])) if axes else 1
  rows = int(np.prod(shape[:-1])) if len(shape) >= 2 else 0
  if size == 1 or not rows or rows % size:
    return None
  names = tuple(axes) if len(axes) > 1 else axes[0]
  spec = jax.sharding.PartitionSpec(names, None)
  return jax.sharding.NamedSharding(sharding.mesh, spec, memory_kind=sharding.memory_kind)


@functools.cache
def sharded_mask_program(structure: Any, shape: tuple[int, ...], sparsity: float, sharding: Any):
  """The jitted ``key -> mask`` that :func:`initial_masks` runs for a sharded param.

  The mask is computed on its ``[rows, last axis]`` view sharded along the rows
  (:func:`_row_view_sharding`) and returned in the param's ``sharding`` (an all-to-all of
  the bool mask when the two differ), so every device draws and selects only its shard: no
  device ever holds the whole mask (or its scores). ``structure.random_mask(key, shape,
  sparsity)`` is the same computation as on one device (JAX's partitionable threefry), so
  the masks are bit-identical.
  """
  view = _row_view_sharding(sharding, shape)

  def draw(key: jax.Array) -> jax.Array:
    mask = structure.random_mask(key, shape, sparsity)
    if view is None:
      return mask
    rows = jax.lax.with_sharding_constraint(mask.reshape(-1, shape[-1]), view)
    return rows.reshape(shape)

  return jax.jit(draw, out_shardings=sharding)


def _leaf_mask(structure: Any, key: jax.Array, leaf: Any, sparsity: float) -> jax.Array:
  """``structure.random_mask(key, leaf.shape, sparsity)``, placed like ``leaf``.

  A concretely sharded param (``jax.device_put(params, NamedSharding(...))``, Auto or
  Explicit axes) gets its mask built directly with its sharding; traced or single-device
  params keep the plain path (under ``jax.jit`` the compiler places the mask).
  """
  shape = tuple(int(d) for d in leaf.shape)
  sharding = _concrete_sharding(leaf)
  if sharding is None:
    return base.reshard_like(_random_mask(structure, key, shape, sparsity), leaf)
  return sharded_mask_program(structure, shape, float(sparsity), sharding)(key)


def _given_mask(mask: Any, leaf: Any) -> jax.Array:
  """A user-given initial mask, placed like ``leaf`` (shard by shard when it is sharded)."""
  sharding = _concrete_sharding(leaf)
  if sharding is None:
    return base.reshard_like(jnp.asarray(mask), leaf)
  return jax.device_put(mask, sharding)
