"""Schedules: when masks update, and how many weights each update swaps.

Conventions (ALGORITHMS.md §10):

* **First update** (item 8): mask updates happen at steps ``t`` (the transformation's
  update count, 0-based) with ``start_step < t < end_step`` and
  ``(t - start_step) % update_every == 0``. Step ``start_step`` itself is *not* an update
  (the calgaryml/condensed-sparsity convention: the first update comes after
  ``update_every`` optimizer steps).
* **Drop fraction**: a float decays with a cosine from ``drop_fraction`` at ``start_step``
  to 0 at ``end_step`` (``optax.cosine_decay_schedule``, evaluated at ``t - start_step``);
  ``decay="constant"`` keeps it fixed; a callable is an Optax schedule evaluated at the
  global count ``t``. Values are clipped to [0, 1] when used; a callable is checked at
  construction on every scheduled update step, so a schedule returning a percentage
  (``30`` for 30%) is an error, not a dense layer.

These functions are public (``sparsejax.is_mask_update_step``,
``sparsejax.drop_fraction_schedule``) so that training loops and loggers ask the library
instead of re-deriving its schedule.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax._src import base

DECAYS = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class UpdateSchedule:
  """When masks update: every ``update_every`` steps in ``(start_step, end_step)``.

  ``update_every=None`` means never (a static mask).
  """

  update_every: int | None = 100
  start_step: int = 0
  end_step: int | None = None

  def __post_init__(self):
    base.check_int("start_step", self.start_step, minimum=0)
    if self.update_every is not None:
      base.check_int("update_every", self.update_every, minimum=1)
      if self.end_step is None:
        raise ValueError(
          "`end_step` is required for dynamic sparsity (RigL/SRigL use 75% of the total "
          "training steps); pass update_every=None for a static mask."
        )
    if self.end_step is not None:
      base.check_int("end_step", self.end_step)
      if self.end_step <= self.start_step:
        raise ValueError(
          f"`end_step` must be > `start_step`={self.start_step}, got {self.end_step}."
        )

  @property
  def first_update(self) -> int | None:
    """The first update step, or ``None`` if the schedule has none."""
    if self.update_every is None:
      return None
    first = self.start_step + self.update_every
    return first if first < self.end_step else None

  def is_update(self, count: Any) -> jax.Array:
    """Whether step ``count`` (a scalar or array, traced or concrete) updates the masks."""
    if self.update_every is None:
      return jnp.zeros(jnp.shape(count), bool)
    count = jnp.asarray(count, jnp.int32)
    start, every = self.start_step, self.update_every
    return (count > start) & (count < self.end_step) & ((count - start) % every == 0)

  def update_steps(self) -> np.ndarray:
    """All update steps, ascending (a host int array; empty for a static schedule)."""
    if self.first_update is None:
      return np.zeros((0,), np.int64)
    return np.arange(self.first_update, self.end_step, self.update_every, dtype=np.int64)


def is_mask_update_step(
  count: Any, *, update_every: int | None, start_step: int = 0, end_step: int | None
) -> jax.Array:
  """Whether step ``count`` is a mask-update step of a DST transformation.

  Args:
    count: the transformation's update count (0-based), a scalar or an array.
    update_every: ΔT, steps between updates (``None``: never).
    start_step: no update at or before this step.
    end_step: no update at or after this step (required unless ``update_every`` is None).

  Returns:
    A bool array shaped like ``count``.

  Raises:
    ValueError / TypeError: ``update_every < 1``, ``end_step <= start_step``, a missing
      ``end_step``.

  Example:
    >>> is_mask_update_step(jnp.arange(6), update_every=2, start_step=0, end_step=5)
    Array([False, False,  True, False,  True, False], dtype=bool)
  """
  return UpdateSchedule(update_every, start_step, end_step).is_update(count)


def drop_fraction_schedule(
  drop_fraction: float | optax.Schedule = 0.3,
  *,
  decay: str = "cosine",
  start_step: int = 0,
  end_step: int | None = None,
) -> optax.Schedule:
  """The drop fraction used at step ``t`` (see the module docstring).

  Args:
    drop_fraction: initial fraction in [0, 1], or an Optax schedule of the step count
      (returned unchanged).
    decay: ``"cosine"`` (RigL) or ``"constant"`` (SET paper); ignored for a schedule.
    start_step: where the cosine starts.
    end_step: where the cosine reaches 0 (``None``: constant).

  Returns:
    ``schedule(count) -> float32``.

  Raises:
    ValueError: a fraction outside [0, 1], an unknown ``decay``.
  """
  if callable(drop_fraction):
    return drop_fraction
  if decay not in DECAYS:
    raise ValueError(f"`drop_fraction_decay` must be 'cosine' or 'constant', got {decay!r}.")
  value = base.check_fraction("drop_fraction", drop_fraction)
  if decay == "constant" or end_step is None:
    return lambda count: jnp.full(jnp.shape(count), value, jnp.float32)
  cosine = optax.cosine_decay_schedule(value, decay_steps=end_step - start_step)
  return lambda count: jnp.asarray(cosine(jnp.asarray(count) - start_step), jnp.float32)


def check_drop_fraction_schedule(fn: Callable[[Any], Any], steps: np.ndarray) -> None:
  """Evaluates a callable drop fraction at every update step; raises if outside [0, 1].

  Raises:
    ValueError: naming the first step whose value is outside [0, 1] (e.g. a percentage)
      or not finite, or the schedule's failure.
  """
  if steps.size == 0:
    return
  try:
    values = np.asarray(
      jax.device_get(
        jax.vmap(lambda t: jnp.asarray(fn(t), jnp.float32))(jnp.asarray(steps, jnp.int32))
      )
    )
  except Exception as e:  # noqa: BLE001 - any failure: say which argument.
    raise ValueError(
      f"`drop_fraction` schedule failed when evaluated at the update steps: {e!r}"
    ) from e
  if values.shape != steps.shape:
    raise ValueError(
      f"`drop_fraction` schedule must return a scalar per step, got shape {values.shape[1:]}."
    )
  bad = ~(np.isfinite(values) & (values >= 0.0) & (values <= 1.0))
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(
      f"`drop_fraction` schedule returns {values[i]} at update step {int(steps[i])}; a drop "
      "fraction must be in [0, 1] (a fraction, not a percentage)."
    )


def warn_if_never_updates(schedule: UpdateSchedule) -> None:
  """Warns when a dynamic schedule has no update step (it would train a static mask)."""
  if schedule.update_every is not None and schedule.first_update is None:
    warnings.warn(
      f"update_every={schedule.update_every} with start_step={schedule.start_step} and "
      f"end_step={schedule.end_step}: no mask update ever happens (the first one would be "
      f"at step {schedule.start_step + schedule.update_every}), so this trains a static "
      "mask. Lower `update_every` or raise `end_step`, or use static_sparse.",
      stacklevel=3,
    )


# --------------------------------------------------------------------------------------
# Sparsity schedules: gradual magnitude pruning (Zhu & Gupta 2017) and GraNet.
# --------------------------------------------------------------------------------------


def gradual_sparsity(
  step: Any,
  *,
  sparsity: float,
  initial_sparsity: float = 0.0,
  start_step: int = 0,
  end_step: int,
  power: float = 3.0,
) -> Any:
  """Zhu & Gupta's cubic sparsity schedule at ``step`` (a number or a NumPy array).

  ``s_t = s_f + (s_i - s_f)·(1 - p)^power`` with ``p = clip((t - t0)/(t_end - t0), 0, 1)``:
  ``s_i`` at ``start_step``, ``s_f`` from ``end_step`` on. Reference: Zhu & Gupta 2017,
  "To prune, or not to prune", https://arxiv.org/abs/1710.01878 (the formula of
  tensorflow/model-optimization ``PolynomialDecay``, ALGORITHMS_BASELINES.md §1.1).

  Args:
    step: the step count(s).
    sparsity: the final sparsity ``s_f``.
    initial_sparsity: ``s_i`` (``<= s_f``).
    start_step: ``t0``.
    end_step: ``t_end > t0``.
    power: the exponent (3 for Zhu & Gupta), ``> 0``.

  Returns:
    The sparsity at ``step`` (float64, same shape as ``step``).
  """
  p = np.clip((np.asarray(step, np.float64) - start_step) / (end_step - start_step), 0.0, 1.0)
  return sparsity + (initial_sparsity - sparsity) * (1.0 - p) ** power


@dataclasses.dataclass(frozen=True)
class GradualSchedule:
  """When a sparsity schedule prunes, and the sparsity each pruning step reaches.

  Pruning steps: ``t0 = start_step`` and every ``update_every`` steps after it up to
  ``end_step``, and ``end_step`` itself even when it is off that grid, so that every layer
  ends exactly at its target (jaxpruner and TF's schedules miss it then). Mask updates
  (GraNet's regrowth) continue on the same grid until ``regrow_end_step`` (default
  ``end_step``) with the sparsity held at its final value.

  Attributes:
    start_step: ``t0``, the first pruning step.
    end_step: the last pruning step (sparsity final from here).
    update_every: ΔT between pruning steps.
    initial_sparsity: ``s_i`` in [0, 1).
    power: exponent of the schedule (3: cubic).
    regrow_end_step: last step with mask updates (``None``: ``end_step``).
  """

  start_step: int
  end_step: int
  update_every: int
  initial_sparsity: float = 0.0
  power: float = 3.0
  regrow_end_step: int | None = None

  def __post_init__(self):
    base.check_int("start_step", self.start_step, minimum=0)
    base.check_int("update_every", self.update_every, minimum=1)
    base.check_int("end_step", self.end_step)
    if self.end_step <= self.start_step:
      raise ValueError(f"`end_step` must be > `start_step`={self.start_step}, got {self.end_step}.")
    base.check_sparsity("initial_sparsity", self.initial_sparsity)
    power = self.power
    if isinstance(power, bool) or not isinstance(power, int | float) or not power > 0:
      raise ValueError(f"`power` (the schedule's exponent) must be > 0, got {power!r}.")
    if self.regrow_end_step is not None:
      base.check_int("regrow_end_step", self.regrow_end_step)
      if self.regrow_end_step < self.end_step:
        raise ValueError(
          f"`regrow_end_step`={self.regrow_end_step} must be >= `end_step`={self.end_step}."
        )

  @property
  def last_update(self) -> int:
    return self.end_step if self.regrow_end_step is None else self.regrow_end_step

  def update_steps(self) -> np.ndarray:
    """Every step with a mask update, ascending (host ints)."""
    grid = np.arange(self.start_step, self.last_update + 1, self.update_every, dtype=np.int64)
    return np.union1d(grid, [self.end_step])

  def pruning_steps(self) -> np.ndarray:
    """The steps at which the sparsity changes (up to and including ``end_step``)."""
    steps = self.update_steps()
    return steps[steps <= self.end_step]

  def is_update(self, count: Any) -> jax.Array:
    """Whether step ``count`` updates the masks (jit-safe)."""
    count = jnp.asarray(count, jnp.int32)
    on_grid = (count - self.start_step) % self.update_every == 0
    in_range = (count >= self.start_step) & (count <= self.last_update)
    return in_range & (on_grid | (count == self.end_step))

  def index(self, count: Any) -> jax.Array:
    """Index of ``count`` in :meth:`pruning_steps` (the last one from ``end_step`` on)."""
    n = len(self.pruning_steps())
    grid = (jnp.asarray(count, jnp.int32) - self.start_step) // self.update_every
    idx = jnp.where(jnp.asarray(count) >= self.end_step, n - 1, grid)
    return jnp.clip(idx, 0, n - 1)

  def sparsities(self, final: float, initial: float) -> np.ndarray:
    """The sparsity at every pruning step, for one layer going ``initial`` → ``final``."""
    return gradual_sparsity(
      self.pruning_steps(),
      sparsity=final,
      initial_sparsity=min(initial, final),
      start_step=self.start_step,
      end_step=self.end_step,
      power=self.power,
    )
