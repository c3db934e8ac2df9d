"""From a config to the objects of a run: the model, the optimizer and its mask schedule.

:data:`METHODS` is the one place that knows the methods: ``config.dst.method`` names a
sparsejax constructor and the ``config.dst`` fields it takes. Everything the driver logs
about a method's schedule comes from the library (:func:`sparsejax.is_mask_update_step`,
:func:`sparsejax.drop_fraction_schedule`), never from a copy of its logic.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

import sparsejax as sj
from experiments import data as data_lib
from experiments import models as models_lib
from experiments.run_metrics import say


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method: its sparsejax constructor and the ``config.dst`` fields it takes.

  Attributes:
    constructor: ``constructor(inner, **keywords)``, or ``None`` for dense training (the
      inner optimizer itself).
    fields: the ``config.dst`` fields passed to the constructor (see :func:`_keywords`).
  """

  constructor: Callable[..., sj.SparseTransformation] | None
  fields: tuple[str, ...]


_ALLOCATION = ("sparsity", "distribution", "structure", "keep_first_dense", "keep_last_dense")
_SCHEDULE = ("update_every", "start_step", "end_fraction", "drop_fraction", "drop_fraction_decay")
_CRITERIA = ("drop", "grow", "grow_init")

#: ``config.dst.method`` -> constructor and the ``config.dst`` fields it takes.
METHODS: dict[str, Method] = {
  "dense": Method(None, ()),
  "static": Method(sj.static_sparse, (*_ALLOCATION, "seed")),
  "set": Method(sj.set_, (*_ALLOCATION, "seed", *_SCHEDULE, *_CRITERIA)),
  "rigl": Method(sj.rigl, (*_ALLOCATION, "seed", *_SCHEDULE, *_CRITERIA)),
  "srigl": Method(sj.srigl, (*_ALLOCATION, "seed", *_SCHEDULE, *_CRITERIA, "gamma_sal")),
  "nm_sr_ste": Method(
    sj.nm_sr_ste, ("sparsity", "structure", "keep_first_dense", "keep_last_dense")
  ),
}


def dst_end_step(config: ml_collections.ConfigDict, num_steps: int) -> int:
  """``end_fraction · num_train_steps`` rounded, at least ``start_step + 1``."""
  return max(int(config.dst.start_step) + 1, int(round(config.dst.end_fraction * num_steps)))


def _keywords(config: ml_collections.ConfigDict, num_steps: int) -> dict[str, dict[str, Any]]:
  """For each ``config.dst`` field, the constructor keywords it becomes."""
  d = config.dst
  return {
    "sparsity": {"sparsity": float(d.sparsity)},
    "distribution": {"distribution": d.distribution},
    "structure": {"structure": d.structure},
    "keep_first_dense": {"keep_first_dense": bool(d.keep_first_dense)},
    "keep_last_dense": {"keep_last_dense": bool(d.keep_last_dense)},
    "seed": {"seed": int(d.seed)},
    "update_every": {"update_every": int(d.update_every)},
    "start_step": {"start_step": int(d.start_step)},
    "end_fraction": {"end_step": dst_end_step(config, num_steps)},
    "drop_fraction": {"drop_fraction": float(d.drop_fraction)},
    "drop_fraction_decay": {"drop_fraction_decay": d.drop_fraction_decay},
    "drop": {"drop": d.drop} if d.drop else {},  # "" = the method's default
    "grow": {"grow": d.grow} if d.grow else {},
    "grow_init": {"grow_init": float(d.grow_init)},
    "gamma_sal": {"gamma_sal": float(d.gamma_sal)},
  }


# --------------------------------------------------------------------------------------
# Optimizer.
# --------------------------------------------------------------------------------------


def learning_rate_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warm-up then constant or cosine decay to 0."""
  warmup = max(0, min(int(config.warmup_steps), num_steps - 1))
  lr = float(config.learning_rate)
  if config.lr_schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(1, num_steps - warmup))
  else:
    main = optax.constant_schedule(lr)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def inner_optimizer(
  config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """The dense optimizer that the sparse method wraps."""
  wd = float(config.weight_decay)
  if config.optimizer == "sgd":
    parts = [optax.add_decayed_weights(wd)] if wd else []
    parts.append(optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))
    return optax.chain(*parts) if len(parts) > 1 else parts[0]
  if config.optimizer == "adam":
    parts = [optax.add_decayed_weights(wd)] if wd else []
    parts.append(optax.adam(schedule))
    return optax.chain(*parts) if len(parts) > 1 else parts[0]
  return optax.adamw(schedule, weight_decay=wd)


def _exact(path: str) -> str:
  return "^" + re.escape(path) + "$"


def build_transformation(
  config: ml_collections.ConfigDict,
  num_steps: int,
  schedule: optax.Schedule,
  layer_order: Sequence[str],
) -> optax.GradientTransformation:
  """The optimizer of ``config.dst.method``: the inner optimizer, wrapped unless dense.

  Args:
    config: a validated config.
    num_steps: the run's number of optimizer steps.
    schedule: the learning-rate schedule.
    layer_order: the model's kernel paths in the order the forward pass applies them; the
      first and last tell the library which layers are the model's first and output layer.

  Returns:
    An optax transformation (a :class:`sparsejax.SparseTransformation` unless dense).

  Raises:
    ValueError / TypeError: the library's error for a bad combination of fields,
      prefixed with the method.
  """
  inner = inner_optimizer(config, schedule)
  method = METHODS[config.dst.method]
  if method.constructor is None:
    return inner
  keywords = _keywords(config, num_steps)
  kwargs = {k: v for field in method.fields for k, v in keywords[field].items()}
  kwargs.update(first_layer=_exact(layer_order[0]), last_layer=_exact(layer_order[-1]))
  try:
    return method.constructor(inner, **kwargs)
  except (ValueError, TypeError) as e:
    raise type(e)(f"config.dst.method={config.dst.method!r}: {e}") from e


@dataclasses.dataclass(frozen=True)
class MaskSchedule:
  """The method's mask-update schedule, per update count ``t`` (0-based step).

  Attributes:
    updates: bool ``[num_steps]``, whether step ``t`` is a scheduled mask update (all
      False for methods without a schedule: dense, static, SR-STE).
    drop_fraction: float32 ``[num_steps]``, the drop fraction in force at step ``t``, or
      ``None`` for methods without a drop fraction.
  """

  updates: np.ndarray
  drop_fraction: np.ndarray | None


def mask_schedule(config: ml_collections.ConfigDict, num_steps: int) -> MaskSchedule:
  """The schedule of ``config.dst.method``, from the library's own schedule functions."""
  d, fields = config.dst, METHODS[config.dst.method].fields
  t = np.arange(num_steps)
  if "update_every" not in fields:
    return MaskSchedule(np.zeros(num_steps, bool), None)
  kwargs = dict(start_step=int(d.start_step), end_step=dst_end_step(config, num_steps))
  updates = np.asarray(sj.is_mask_update_step(t, update_every=int(d.update_every), **kwargs))
  drop = None
  if "drop_fraction" in fields:
    fn = sj.drop_fraction_schedule(float(d.drop_fraction), decay=d.drop_fraction_decay, **kwargs)
    drop = np.asarray(fn(t), np.float32)
  return MaskSchedule(updates.astype(bool), drop)


# --------------------------------------------------------------------------------------
# Environment and data.
# --------------------------------------------------------------------------------------


def import_extra_modules(names: Sequence[str]) -> None:
  """Imports ``config.extra_imports`` (e.g. a module registering a custom criterion)."""
  for name in names or ():
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ImportError(
        f"config.extra_imports: could not import {name!r} ({e}). Give an importable module "
        "name (on sys.path / PYTHONPATH), e.g. 'my_criteria' for ./my_criteria.py."
      ) from e
    say(f"Imported extra module {name!r}.")


def enable_compilation_cache(path: str) -> None:
  """Turns on JAX's persistent compilation cache in ``path`` (speeds up repeated runs)."""
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(os.path.expanduser(path))
  if jax.config.jax_compilation_cache_dir == path:
    return
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  compilation_cache.reset_cache()  # takes effect even after earlier compilations.


def load_data(config: ml_collections.ConfigDict, workdir: str):
  """The config's dataset (cached in ``config.data.cache_dir`` or the workdir) and batches."""
  ds = data_lib.load_dataset(
    config.dataset,
    cache_dir=config.data.cache_dir or os.path.join(workdir, "data"),
    seed=config.seed,
    num_samples=config.data.num_samples,
    mnist1d_seed=config.data.mnist1d_seed,
  )
  train_iter = data_lib.BatchIterator(ds.x_train, ds.y_train, config.batch_size, seed=config.seed)
  n = int(config.num_train_steps)
  say(
    f"Dataset {ds.name}: train {ds.x_train.shape}, test {ds.x_test.shape}, "
    f"{train_iter.steps_per_epoch} steps/epoch, {n} steps ({n / train_iter.steps_per_epoch:.1f} "
    "epochs)."
  )
  return ds, train_iter


# --------------------------------------------------------------------------------------
# Model.
# --------------------------------------------------------------------------------------


def model_factory(
  config: ml_collections.ConfigDict, input_shape: tuple[int, ...], num_classes: int
) -> Callable[[], nnx.Module]:
  """A function creating the config's model (call it inside ``nnx.jit`` or ``eval_shape``)."""
  mk = config.model_kwargs

  def create() -> nnx.Module:
    return models_lib.create_model(
      config.model,
      input_shape,
      num_classes,
      seed=config.seed,
      mlp_features=tuple(mk.mlp_features),
      cnn_channels=mk.cnn_channels,
      cnn2d_channels=tuple(mk.cnn2d_channels),
      cnn2d_hidden=mk.cnn2d_hidden,
    )

  return create


def kernel_positions(create: Callable[[], nnx.Module]) -> Mapping[str, int]:
  """The model's ``kernel_positions()`` (definition order), without allocating params."""
  return nnx.eval_shape(create).kernel_positions()
