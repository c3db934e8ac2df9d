"""The Optax-composable dynamic sparse training (DST) transformation.

A DST method is an ``optax.GradientTransformationExtraArgs`` that wraps any inner
optimizer. Its state (masks, inner state, step count, PRNG key) lives in the optimizer
state, so jit, sharding and checkpointing need nothing extra, and its updates keep pruned
weights exactly zero after ``optax.apply_updates``: there is no training-loop hook.

Data flow of one step (DESIGN.md §2; the pieces are in ``step.py``)::

  grads (dense) ─► mask-update step?  (one lax.cond per sparse leaf on the step count)
                    yes: drop/grow scores → structure.drop_and_grow → flips = new ^ old
                    no:  flips = False
               ─► inner-optimizer state reset to 0 where a weight was grown or dropped
               ─► grads masked by (mask ∩ previous mask) → inner.update
               ─► updates = where(mask, inner updates, -params); grown: grow_init - params

Conventions (ALGORITHMS.md §10): schedules in ``criteria/schedules.py`` (no update at
``start_step``; updates at ``start_step < t < end_step``); ``n_drop = floor(nnz ·
drop_fraction)`` (float32), nnz preserved exactly; drop only among active weights, grow
among all non-kept positions (weights dropped in the same update may be regrown and keep
their value and optimizer state); ties broken by the lowest index. On an update step the
inner optimizer still steps the kept weights (as calgaryml/condensed-sparsity does);
newly grown weights are set to ``grow_init`` and take no step until the next one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax._src import base, tree
from sparsejax._src.allocation import plan as plan_lib
from sparsejax._src.criteria import scores as criteria
from sparsejax._src.transforms import config as config_lib
from sparsejax._src.transforms import pruning, step
from sparsejax._src.transforms.config import DSTConfig
from sparsejax._src.transforms.state import DynamicSparseState


class SparseTransformation(optax.GradientTransformationExtraArgs):
  """An ``optax.GradientTransformationExtraArgs`` built by a sparsejax method.

  Behaves exactly like any Optax transformation (``init``/``update``); in addition
  :meth:`plan` tells which leaves are sparse, how sparse, and why.
  """

  def plan(self, params: base.Params) -> plan_lib.Plan:
    """The allocation of ``params`` (per leaf: sparsity, position in the model, role)."""
    return self.init.allocation.plan(params)


@dataclasses.dataclass(frozen=True, eq=False)
class _Init:
  config: DSTConfig

  @property
  def allocation(self) -> plan_lib.Allocation:
    return self.config.allocation

  def __call__(self, params: base.Params) -> DynamicSparseState:
    config = self.config
    if tree.is_leafless_node(params):
      # optax.tree_utils.tree_map_params probes init with a leafless placeholder: report
      # where the param-shaped trees are (the masks and the inner state's).
      masks = params
    else:
      masks = pruning.initial_masks(
        config.allocation,
        params,
        config.init_masks,
        seed=config.seed,
        initial_alloc=config.initial_allocation,
      )
    # Host scalars placed on the device: outside jit, jnp.zeros would compile a program.
    return DynamicSparseState(
      count=jax.device_put(np.zeros([], np.int32)),
      key=jax.random.PRNGKey(config.seed),
      masks=masks,
      inner_state=config.inner.init(params),
      skipped_updates=jax.device_put(np.zeros([], np.int32)),
    )


def _check_update_args(updates, state, params) -> tuple[list[str], list, Any, list, list]:
  if params is None:
    raise ValueError(
      "sparsejax transformations need `params` in update(grads, state, params): "
      "they emit updates that keep pruned weights at exactly 0."
    )
  if not isinstance(state, DynamicSparseState):
    raise TypeError(
      f"`state` must be the DynamicSparseState returned by this transformation's init, got "
      f"{type(state).__name__}."
    )
  paths, grads, treedef = tree.flatten_with_paths(updates)
  param_paths = tree.flatten_with_paths(params)[0]
  if param_paths != paths:
    missing = [p for p in param_paths if p not in paths]
    extra = [p for p in paths if p not in param_paths]
    raise ValueError(
      "The gradients (`updates`) must have the structure of `params`: "
      f"params have {len(param_paths)} leaves, the gradients {len(paths)}; in params but "
      f"missing from the gradients: {missing[:6]}; in the gradients but not in params: "
      f"{extra[:6]}."
    )
  try:
    param_leaves = treedef.flatten_up_to(params)
    mask_leaves = treedef.flatten_up_to(state.masks)
  except (ValueError, TypeError) as e:
    raise ValueError(
      "The optimizer state's masks do not match the params: was the optimizer state "
      f"initialized for a different model? ({e})"
    ) from None
  return paths, grads, treedef, param_leaves, mask_leaves


def _is_traced(tree_: Any) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree_))


@dataclasses.dataclass(frozen=True, eq=False)
class _Update:
  """``update``: traced inline under jit/vmap/grad; called eagerly, it runs a compiled copy.

  Eager calls (notebooks, quick scripts, ``nnx.Optimizer`` outside ``nnx.jit``) would
  otherwise dispatch every selection op one by one (about a second per call); the jitted
  body is compiled once per tree structure and shapes and then costs what a jitted step
  costs.
  """

  config: DSTConfig

  def __post_init__(self):
    object.__setattr__(self, "_compiled", jax.jit(self.body))

  def __call__(self, updates, state, params=None, **extra_args):
    if params is not None and not _is_traced((updates, state, params, extra_args)):
      _check_update_args(updates, state, params)  # clear errors before tracing
      return self._compiled(updates, state, params, **extra_args)
    return self.body(updates, state, params, **extra_args)

  def body(self, updates, state, params=None, **extra_args):
    config = self.config
    paths, grads, treedef, param_leaves, mask_leaves = _check_update_args(updates, state, params)
    plan = config.allocation.plan(params)
    rules = config.rules(plan, config.initial_plan(params))
    sparse = {r.index for r in rules}
    for i, m in enumerate(mask_leaves):
      if (i in sparse) != (not tree.is_masked_node(m)) or (
        i in sparse and m.shape != grads[i].shape
      ):
        raise ValueError(
          f"The optimizer state's masks do not match the params at {paths[i]!r}: mask "
          f"{getattr(m, 'shape', 'none (dense)')} vs gradient shape {grads[i].shape}. Was "
          "the optimizer state initialized for a different model?"
        )
    inner_state, count = state.inner_state, state.count
    if not rules:  # nothing is sparse (e.g. sparsity 0): exactly the inner optimizer.
      new_updates, inner_state = config.inner.update(updates, inner_state, params, **extra_args)
      return new_updates, state._replace(
        count=optax.safe_int32_increment(count), inner_state=inner_state
      )
    masks = [None if tree.is_masked_node(m) else m for m in mask_leaves]
    grad_masks, grown, skipped = masks, [None] * len(masks), state.skipped_updates
    if config.schedule.update_every is not None:
      moments = step.inner_moments(config.inner, inner_state, len(grads), treedef)
      do_update = config.schedule.is_update(count)
      operands = (count, state.key, param_leaves, grads, mask_leaves, moments)
      targets = None
      if config.gradual and config.allocation.is_global:
        targets = step.global_targets(
          rules, do_update, *operands, config.global_total(plan), pruning.global_counts
        )
      flips, finite = step.mask_update_flips(rules, do_update, *operands, targets)
      skipped = skipped + (~finite).astype(jnp.int32)
      masks, grown, grad_masks, changed = step.apply_flips(masks, flips, finite)
      inner_state = step.reset_inner_state(config.inner, inner_state, changed, treedef)
    inner_updates, inner_state = step.masked_inner_update(
      config.inner, grads, grad_masks, inner_state, params, treedef, extra_args
    )
    new_updates = step.keep_sparse(inner_updates, params, masks, grown, config.grow_init, treedef)
    new_masks = [optax.MaskedNode() if m is None else m for m in masks]
    return new_updates, DynamicSparseState(
      count=optax.safe_int32_increment(count),
      key=state.key,
      masks=jax.tree.unflatten(treedef, new_masks),
      inner_state=inner_state,
      skipped_updates=skipped,
    )


def dynamic_sparse(
  inner: optax.GradientTransformation,
  *,
  sparsity: float | None = None,
  distribution: str | Any = "erk",
  drop: str | criteria.Criterion = "magnitude",
  grow: str | criteria.Criterion = "gradient",
  update_every: int | None = 100,
  start_step: int = 0,
  end_step: int | None = None,
  drop_fraction: float | optax.Schedule = 0.3,
  drop_fraction_decay: str = "cosine",
  structure: Any = None,
  grow_init: float = 0.0,
  seed: int = 0,
  include: plan_lib.Include = None,
  exclude: str | None = None,
  keep_first_dense: bool = False,
  keep_last_dense: bool = False,
  first_layer: str | None = None,
  last_layer: str | None = None,
  overrides: Mapping[str, float] | None = None,
  erk_power_scale: float = 1.0,
  initial_sparsity: float | None = None,
  power: float = 3.0,
  regrow_end_step: int | None = None,
  init_masks: Any = None,
) -> SparseTransformation:
  """Wraps ``inner`` into a dynamic sparse training transformation.

  Generic drop-and-grow DST: every ``update_every`` steps between ``start_step`` and
  ``end_step``, each sparse layer drops ``floor(nnz·drop_fraction)`` active weights with
  the lowest ``drop`` scores and grows as many with the highest ``grow`` scores, keeping
  nnz (and the ``structure``) exactly. See the module docstring for the precise
  conventions. References: SET (Mocanu et al. 2018, https://arxiv.org/abs/1707.04780),
  RigL (Evci et al. 2020, https://arxiv.org/abs/1911.11134).

  With ``initial_sparsity`` set, nnz follows a *sparsity schedule* instead of staying
  constant (gradual magnitude pruning, Zhu & Gupta 2017, arXiv:1710.01878; GraNet, Liu et
  al. 2021, arXiv:2106.10404): masks update at ``start_step`` and every ``update_every``
  steps up to ``end_step`` (and at ``end_step``), each layer going to
  ``s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t_end - t0))^power`` (``s_i`` capped at the
  layer's ``s_f``); an update drops ``nnz - target + n_swap`` weights and grows
  ``n_swap = floor(target · drop_fraction)`` (0 for pure pruning), so masks only shrink
  by the schedule while the topology can keep exploring.

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
      function ``(shapes, sparsity, *, overrides) -> {path: sparsity}``.
    drop: drop criterion (name or ``ctx -> scores``); higher scores are kept.
    grow: grow criterion (name or ``ctx -> scores``); higher scores are grown.
    update_every: ΔT, steps between mask updates (``None``: never update, static).
    start_step: no mask update at or before this step.
    end_step: no mask update at or after this step; required unless ``update_every`` is
      ``None``. RigL/SRigL use 75% of training.
    drop_fraction: initial fraction of active weights swapped per update, in [0, 1], or an
      Optax schedule of the step count (checked on every update step at construction).
    drop_fraction_decay: ``"cosine"`` (default, RigL) or ``"constant"`` (SET paper).
    structure: ``None``/``"unstructured"``, ``ConstantFanIn()``/``"fan_in"``,
      ``NM(n, m)``/``"nm:n:m"``, or a user structure (see :class:`sparsejax.Structure`).
    grow_init: value of newly grown weights (0, as RigL).
    seed: seed of the initial masks and of random criteria.
    include: regex (or ``(path, leaf) -> bool``) of the leaves that may be sparse
      (default: every floating leaf with ``ndim > 1``).
    exclude: regex of the leaves kept dense.
    keep_first_dense: keep the model's first layer dense.
    keep_last_dense: keep the model's last layer dense.
    first_layer: regex matching the model's first layer (when the paths cannot tell).
    last_layer: regex matching the model's last (output) layer.
    overrides: ``{regex: sparsity}`` per-layer overrides.
    erk_power_scale: ERK exponent.
    initial_sparsity: ``s_i`` of a sparsity schedule (``None``: nnz constant); at most
      ``sparsity``; per layer it is the distribution's allocation at ``s_i``.
    power: exponent of the sparsity schedule (3: Zhu & Gupta's cubic), ``> 0``.
    regrow_end_step: under a sparsity schedule, the last step of mask updates (regrowth
      continues at the final sparsity after ``end_step``, as in GraNet); default
      ``end_step``. The drop fraction's cosine ends there.
    init_masks: the masks to start from: ``None`` (default: random masks of the
      structure at the planned sparsity; under a sparsity schedule, all-True masks when
      ``initial_sparsity`` is 0, else random at it), ``"random"``, ``"dense"``, a masks
      pytree like :func:`sparsejax.get_masks`'s (e.g. from :func:`sparsejax.prune`:
      "SNIP + static" is ``init_masks=sj.prune(params, criterion="snip", grads=g, ...)``),
      or a function ``params -> masks``. With ``distribution="global"`` the default is one
      global ranking of the initial ``|w|``.

  Returns:
    A :class:`SparseTransformation` (an ``optax.GradientTransformationExtraArgs``) whose
    state is a :class:`DynamicSparseState`. ``update`` requires ``params``.

  Raises:
    ValueError / TypeError: at construction or ``init`` time for any invalid argument,
    naming it and the allowed values.
  """
  arguments = dict(locals())  # every keyword, validated and assembled by _config
  config = config_lib.make_config(**arguments)
  return SparseTransformation(_Init(config), _Update(config))
