"""The static configuration of a DST transformation: validated once, at construction."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import optax

from sparsejax._src import base
from sparsejax._src.allocation import plan as plan_lib
from sparsejax._src.criteria import schedules
from sparsejax._src.criteria import scores as criteria
from sparsejax._src.primitives import structures
from sparsejax._src.transforms import step


@dataclasses.dataclass(frozen=True, eq=False)
class DSTConfig:
  """Everything static about a DST transformation (built once by :func:`dynamic_sparse`).

  ``schedule`` is an :class:`UpdateSchedule` (nnz constant: static, SET, RigL, SRigL) or a
  :class:`GradualSchedule` (nnz follows a sparsity schedule: gradual pruning, GraNet);
  ``initial_allocation`` is the allocation at the schedule's initial sparsity.
  """

  inner: optax.GradientTransformationExtraArgs
  allocation: plan_lib.Allocation
  schedule: schedules.UpdateSchedule | schedules.GradualSchedule
  drop: criteria.Criterion
  grow: criteria.Criterion
  drop_fraction: optax.Schedule
  grow_init: float
  seed: int
  initial_allocation: plan_lib.Allocation | None = None
  init_masks: Any = None

  @property
  def gradual(self) -> bool:
    return isinstance(self.schedule, schedules.GradualSchedule)

  def initial_plan(self, params: base.Params) -> plan_lib.Plan | None:
    """The plan at the schedule's initial sparsity (``None``: dense start or no schedule)."""
    if self.initial_allocation is None:
      return None
    return self.initial_allocation.plan(params)

  def _budget(self, leaf: plan_lib.LeafPlan, initial: plan_lib.LeafPlan | None) -> tuple:
    s0 = (initial.sparsity or 0.0) if initial is not None else 0.0
    return tuple(
      self.allocation.structure.target_nnz(leaf.shape, float(s))
      for s in self.schedule.sparsities(leaf.sparsity, s0)
    )

  def rules(self, plan: plan_lib.Plan, initial: plan_lib.Plan | None = None) -> list[step.LeafRule]:
    """The static mask-update rule of every sparse leaf of ``plan``."""
    rules = []
    for i, leaf in enumerate(plan.leaves):
      if leaf.sparsity is None:
        continue
      budget = None
      if self.gradual and not self.allocation.is_global:
        budget = self._budget(leaf, None if initial is None else initial.leaves[i])
      rules.append(
        step.LeafRule(
          index=i,
          path=leaf.path,
          sparsity=leaf.sparsity,
          layer=leaf.layer,
          drop=self.drop,
          grow=self.grow,
          drop_fraction=self.drop_fraction,
          structure=self.allocation.structure,
          budget=budget,
          budget_index=self.schedule.index if budget is not None else None,
        )
      )
    return rules

  def global_total(self, plan: plan_lib.Plan) -> Any:
    """``count -> total nnz`` of the pooled layers under a global sparsity schedule."""
    size = sum(base.shape_size(leaf.shape) for leaf in plan.leaves if leaf.sparsity is not None)
    s0 = self.initial_allocation.sparsity if self.initial_allocation is not None else 0.0
    table = tuple(
      base.nnz_for_sparsity(size, float(s))
      for s in self.schedule.sparsities(self.allocation.sparsity, s0)
    )
    return lambda count: jnp.asarray(table, jnp.int32)[self.schedule.index(count)]


def make_config(
  inner,
  sparsity,
  distribution,
  drop,
  grow,
  update_every,
  start_step,
  end_step,
  drop_fraction,
  drop_fraction_decay,
  structure,
  grow_init,
  seed,
  include,
  exclude,
  keep_first_dense,
  keep_last_dense,
  first_layer,
  last_layer,
  overrides,
  erk_power_scale,
  initial_sparsity,
  power,
  regrow_end_step,
  init_masks,
) -> DSTConfig:
  """Validates :func:`dynamic_sparse`'s arguments and assembles its :class:`DSTConfig`."""
  if not hasattr(inner, "init") or not hasattr(inner, "update"):
    raise TypeError(f"`inner` must be an optax.GradientTransformation, got {inner!r}.")
  start_step = base.check_int("start_step", start_step, minimum=0)
  if initial_sparsity is None:
    schedule = schedules.UpdateSchedule(update_every, start_step, end_step)
    schedules.warn_if_never_updates(schedule)
    fraction_end = end_step
  else:
    schedule = _gradual_schedule(
      sparsity, initial_sparsity, update_every, start_step, end_step, power, regrow_end_step
    )
    fraction_end = schedule.last_update
  drop_fraction_fn = schedules.drop_fraction_schedule(
    drop_fraction, decay=drop_fraction_decay, start_step=start_step, end_step=fraction_end
  )
  if callable(drop_fraction):
    schedules.check_drop_fraction_schedule(drop_fraction, schedule.update_steps())
  if isinstance(grow_init, bool) or not isinstance(grow_init, int | float):
    raise TypeError(f"`grow_init` must be a float, got {grow_init!r}.")
  _check_init_masks_arg(init_masks)
  allocation = dict(
    distribution=distribution,
    structure=structure,
    include=include,
    exclude=exclude,
    keep_first_dense=keep_first_dense,
    keep_last_dense=keep_last_dense,
    first_layer=first_layer,
    last_layer=last_layer,
    overrides=overrides,
    erk_power_scale=erk_power_scale,
  )
  final = plan_lib.Allocation(sparsity=sparsity, **allocation)
  initial = None
  if initial_sparsity:
    initial = plan_lib.Allocation(sparsity=initial_sparsity, **allocation)
  if initial_sparsity is not None:
    _check_schedulable(final)
  config = DSTConfig(
    inner=optax.with_extra_args_support(inner),
    allocation=final,
    schedule=schedule,
    drop=criteria.get_criterion(drop, argname="drop"),
    grow=criteria.get_criterion(grow, argname="grow"),
    drop_fraction=drop_fraction_fn,
    grow_init=float(grow_init),
    seed=base.check_int("seed", seed),
    initial_allocation=initial,
    init_masks=_default_init(init_masks, initial_sparsity),
  )
  return config


def _gradual_schedule(
  sparsity, initial_sparsity, update_every, start_step, end_step, power, regrow_end_step
):
  if update_every is None or end_step is None:
    raise ValueError(
      "a sparsity schedule (`initial_sparsity`) needs `update_every` and `end_step` (the last "
      "pruning step)."
    )
  schedule = schedules.GradualSchedule(
    start_step, end_step, update_every, initial_sparsity, power, regrow_end_step
  )
  if sparsity is not None and initial_sparsity > sparsity:
    raise ValueError(
      f"`initial_sparsity`={initial_sparsity} is above the final `sparsity`={sparsity}: a "
      "sparsity schedule only prunes (masks only shrink)."
    )
  return schedule


def _check_schedulable(allocation: plan_lib.Allocation) -> None:
  structure = allocation.structure
  if isinstance(structure, structures.NM):
    raise ValueError(
      f"structure=NM({structure.n}, {structure.m}) has a fixed sparsity 1 - n/m, so it cannot "
      "follow a sparsity schedule; for N:M from scratch with a schedule over N use "
      "sparsejax.nm_sr_ste with structure_decay (SDGF)."
    )
  if isinstance(structure, structures.ConstantFanIn) and structure.gamma_sal is not None:
    raise ValueError(
      "SRigL's neuron ablation (ConstantFanIn(gamma_sal=...)) does not combine with a sparsity "
      "schedule; use ConstantFanIn() (constant fan-in that shrinks with the schedule)."
    )


def _check_init_masks_arg(init_masks: Any) -> None:
  if isinstance(init_masks, str) and init_masks not in ("random", "dense"):
    raise ValueError(
      f"`init_masks` must be 'random', 'dense', a masks pytree or a function params -> masks, "
      f"got {init_masks!r}."
    )


def _default_init(init_masks: Any, initial_sparsity: float | None) -> Any:
  if init_masks is None and initial_sparsity is not None and not initial_sparsity:
    return "dense"  # dense-to-sparse: every weight active until the first pruning step
  return init_masks
