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
from experiments import input_pipeline
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
_GRADUAL = ("update_every", "start_step", "end_fraction", "initial_sparsity", "power")

#: ``config.dst.method`` -> constructor and the ``config.dst`` fields it takes.
METHODS: dict[str, Method] = {
  "dense": Method(None, ()),
  "static": Method(sj.static_sparse, (*_ALLOCATION, "seed", "init")),
  "set": Method(sj.set_, (*_ALLOCATION, "seed", *_SCHEDULE, *_CRITERIA, "init")),
  "rigl": Method(sj.rigl, (*_ALLOCATION, "seed", *_SCHEDULE, *_CRITERIA, "init")),
  "srigl": Method(
    sj.srigl,
    (*_ALLOCATION, "seed", *_SCHEDULE, *_CRITERIA, "gamma_sal", "ablation_fan_in", "init"),
  ),
  "gmp": Method(sj.gmp, (*_ALLOCATION, "seed", *_GRADUAL, "init")),
  "granet": Method(
    sj.granet,
    (*_ALLOCATION, "seed", *_GRADUAL, "drop_fraction", "drop_fraction_decay", *_CRITERIA)
    + ("regrow_end_fraction", "init"),
  ),
  "nm_sr_ste": Method(
    sj.nm_sr_ste, ("sparsity", "structure", "keep_first_dense", "keep_last_dense")
  ),
}

#: Grow criteria that read no gradient (a method growing by one of these never needs the
#: dense gradient; any other criterion, a registered one included, is assumed to).
GRADIENT_FREE_GROW = ("random", "magnitude", "momentum", "momentum_magnitude")


def has_sparsity_schedule(method: str) -> bool:
  """Whether ``method`` follows a sparsity schedule (gmp, granet: nnz changes)."""
  return "initial_sparsity" in METHODS[method].fields


def grow_criterion(config: ml_collections.ConfigDict) -> str | None:
  """The grow criterion of the run (the method's default when ``config.dst.grow`` is empty).

  ``None`` for methods that grow nothing (dense, static, gmp, SR-STE).
  """
  d = config.dst
  if "grow" not in METHODS[d.method].fields:
    return None
  return d.grow or ("random" if d.method == "set" else "gradient")


def dst_end_step(config: ml_collections.ConfigDict, num_steps: int) -> int:
  """``end_fraction · num_train_steps`` rounded, at least ``start_step + 1``."""
  return max(int(config.dst.start_step) + 1, int(round(config.dst.end_fraction * num_steps)))


def regrow_end_step(config: ml_collections.ConfigDict, num_steps: int) -> int | None:
  """``regrow_end_fraction · num_train_steps`` rounded, at least the end step (None: 0)."""
  fraction = float(config.dst.regrow_end_fraction)
  if not fraction:
    return None
  return max(dst_end_step(config, num_steps), int(round(fraction * num_steps)))


def _keywords(
  config: ml_collections.ConfigDict, num_steps: int, init_masks: Any
) -> dict[str, dict[str, Any]]:
  """For each ``config.dst`` field, the constructor keywords it becomes."""
  d = config.dst
  regrow_end = regrow_end_step(config, num_steps)
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
    "ablation_fan_in": {"ablation_fan_in": d.ablation_fan_in},
    "initial_sparsity": {"initial_sparsity": float(d.initial_sparsity)},
    "power": {"power": float(d.power)},
    "regrow_end_fraction": {"regrow_end_step": regrow_end} if regrow_end is not None else {},
    "init": {"init_masks": init_masks} if init_masks is not None else {},
  }


def learning_rate_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warm-up, then constant, cosine decay to 0, or step decay.

  ``"step"`` multiplies the rate by ``config.lr_decay_factor`` at each of
  ``config.lr_boundaries`` (fractions of training, counted from step 0: RigL's ImageNet
  schedule is ``(0.3, 0.7, 0.9)``, epochs 30, 70 and 90 of 100).
  """
  warmup = max(0, min(int(config.warmup_steps), num_steps - 1))
  lr = float(config.learning_rate)
  if config.lr_schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(1, num_steps - warmup))
  elif config.lr_schedule == "step":
    bounds = {
      int(round(b * num_steps)) - warmup: float(config.lr_decay_factor)
      for b in config.lr_boundaries
    }
    main = optax.piecewise_constant_schedule(lr, {b: f for b, f in bounds.items() if b > 0})
  else:
    main = optax.constant_schedule(lr)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _decay_mask(config: ml_collections.ConfigDict) -> Callable[[Any], Any] | None:
  """Params whose path matches ``config.weight_decay_exclude`` are not decayed."""
  if not config.weight_decay_exclude:
    return None
  exclude = re.compile(config.weight_decay_exclude)
  return lambda params: jax.tree_util.tree_map_with_path(
    lambda path, _: not exclude.search(sj.path_to_str(path)), params
  )


def inner_optimizer(
  config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """The dense optimizer that the sparse method wraps (gradient clipping first, if set)."""
  wd, mask = float(config.weight_decay), _decay_mask(config)
  parts = [optax.clip_by_global_norm(float(config.grad_clip_norm))] if config.grad_clip_norm else []
  if config.optimizer == "adamw":
    parts.append(optax.adamw(schedule, weight_decay=wd, mask=mask))
  else:
    parts += [optax.add_decayed_weights(wd, mask)] if wd else []
    if config.optimizer == "sgd":
      parts.append(optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))
    else:
      parts.append(optax.adam(schedule))
  return optax.chain(*parts) if len(parts) > 1 else parts[0]


def _exact(path: str) -> str:
  return "^" + re.escape(path) + "$"


def _layer_keywords(layer_order: Sequence[str]) -> dict[str, str]:
  """``first_layer`` / ``last_layer``: the model's own first and output kernels."""
  return {"first_layer": _exact(layer_order[0]), "last_layer": _exact(layer_order[-1])}


def initial_masks(
  config: ml_collections.ConfigDict,
  layer_order: Sequence[str],
  create: Callable[[], nnx.Module] | None = None,
  ds: data_lib.Dataset | None = None,
) -> Any:
  """The ``init_masks=`` of ``config.dst.init``, for every method that takes it.

  ``""`` gives ``None`` (the method's default); ``"random"`` / ``"dense"`` are passed on;
  ``"magnitude"`` and ``"snip"`` give a function ``params -> masks`` calling
  :func:`sparsejax.prune` with the run's distribution, structure and dense-layer choices
  at ``config.dst.sparsity`` (``initial_sparsity`` for a schedule that starts sparse). SNIP
  scores ``|g ⊙ w|`` with the gradient of the training loss at the initial weights on one
  batch: the first batch of the training order (the one the first step sees).

  Args:
    config: a validated config.
    layer_order: the model's kernel paths, first layer first.
    create: the model factory (needed for ``"snip"``).
    ds: the dataset (needed for ``"snip"``).
  """
  d = config.dst
  if "init" not in METHODS[d.method].fields or d.init in ("", "random", "dense"):
    return d.init or None
  sparsity = float(d.sparsity)
  if has_sparsity_schedule(d.method) and d.initial_sparsity:
    sparsity = float(d.initial_sparsity)
  kwargs = dict(
    sparsity=sparsity,
    criterion=d.init,
    distribution=d.distribution,
    structure=d.structure,
    keep_first_dense=bool(d.keep_first_dense),
    keep_last_dense=bool(d.keep_last_dense),
    seed=int(d.seed),
    **_layer_keywords(layer_order),
  )
  if d.init == "magnitude":
    return lambda params: sj.prune(params, **kwargs)
  if create is None or ds is None:
    raise ValueError("config.dst.init='snip' needs the model and the dataset.")
  x, y = next(data_lib.BatchIterator(ds.x_train, ds.y_train, config.batch_size, seed=config.seed))

  def snip(params):
    model = create()
    nnx.update(model, params)

    def loss(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    return sj.prune(params, grads=nnx.grad(loss)(model), **kwargs)

  return snip


def build_transformation(
  config: ml_collections.ConfigDict,
  num_steps: int,
  schedule: optax.Schedule,
  layer_order: Sequence[str],
  init_masks: Any = None,
) -> optax.GradientTransformation:
  """The optimizer of ``config.dst.method``: the inner optimizer, wrapped unless dense.

  Args:
    config: a validated config.
    num_steps: the run's number of optimizer steps.
    schedule: the learning-rate schedule.
    layer_order: the model's kernel paths in the order the forward pass applies them; the
      first and last tell the library which layers are the model's first and output layer.
    init_masks: the masks to start from (:func:`initial_masks`; ``None``: the method's
      default).

  Returns:
    An optax transformation (a :class:`sparsejax.SparseTransformation` unless dense).

  Raises:
    ValueError / TypeError: the library's error for a bad combination of fields,
      prefixed with the method.
  """
  inner = inner_optimizer(config, schedule)
  method = METHODS[config.dst.method]
  if method.constructor is None:
    if config.sparse_compute:
      raise ValueError("config.sparse_compute=True needs a sparse config.dst.method, not 'dense'.")
    return inner
  keywords = _keywords(config, num_steps, init_masks)
  kwargs = {k: v for field in method.fields for k, v in keywords[field].items()}
  kwargs.update(_layer_keywords(layer_order))
  try:
    tx = method.constructor(inner, **kwargs)
    # Truly sparse layers and kernels, same method (sparsejax.sparse, issue 14).
    return sj.sparse.truly_sparse(tx) if config.sparse_compute else tx
  except (ValueError, TypeError) as e:
    raise type(e)(f"config.dst.method={config.dst.method!r}: {e}") from e


def check_allocation(
  config: ml_collections.ConfigDict,
  tx: optax.GradientTransformation,
  create: Callable[[], nnx.Module],
) -> None:
  """Plans the model's sparse layers now, so that a bad structure fails naming the fields.

  Raises:
    ValueError / TypeError: the library's error (e.g. a block shape that does not tile a
      kernel), prefixed with the ``config.dst`` fields that shape the allocation.
  """
  if isinstance(tx, sj.sparse.SparseDST):  # config.sparse_compute: the masked twin's plan
    tx = tx.masked
  if not isinstance(tx, sj.SparseTransformation):
    return
  try:
    tx.plan(nnx.state(nnx.eval_shape(create), nnx.Param))
  except (ValueError, TypeError) as e:
    d = config.dst
    raise type(e)(
      f"config.dst.structure={d.structure!r} with config.dst.sparsity={d.sparsity}, "
      f"config.dst.distribution={d.distribution!r}, keep_first_dense={d.keep_first_dense}, "
      f"keep_last_dense={d.keep_last_dense} (config.dst.method={d.method!r}): {e}"
    ) from None


@dataclasses.dataclass(frozen=True)
class MaskSchedule:
  """The method's mask-update schedule, per update count ``t`` (0-based step).

  Attributes:
    updates: bool ``[num_steps]``, whether step ``t`` is a scheduled mask update (all
      False for methods without a schedule: dense, static, SR-STE).
    drop_fraction: float32 ``[num_steps]``, the drop fraction in force at step ``t``, or
      ``None`` for methods without a drop fraction.
    target_sparsity: float64 ``[num_steps]``, the sparsity schedule's target at step ``t``
      (:func:`sparsejax.gradual_sparsity`), or ``None`` for methods without one.
  """

  updates: np.ndarray
  drop_fraction: np.ndarray | None
  target_sparsity: np.ndarray | None = None


def gradual_update_steps(config: ml_collections.ConfigDict, num_steps: int) -> np.ndarray:
  """The update steps of a sparsity schedule (gmp, granet), ascending.

  ``start_step`` and every ``update_every`` steps after it up to the last regrowth step
  (``regrow_end_fraction``, else the end step), plus the end step itself: the steps of
  ``GradualSchedule.update_steps`` in sparsejax, which has no public reader for them yet
  (``sparsejax.is_mask_update_step`` describes the constant-nnz schedule). A test checks
  that the masks change exactly here.
  """
  d = config.dst
  start, end = int(d.start_step), dst_end_step(config, num_steps)
  last = regrow_end_step(config, num_steps) or end
  grid = np.arange(start, last + 1, int(d.update_every), dtype=np.int64)
  steps = np.union1d(grid, [end])
  return steps[steps < num_steps]


def mask_schedule(config: ml_collections.ConfigDict, num_steps: int) -> MaskSchedule:
  """The schedule of ``config.dst.method``, from the library's own schedule functions."""
  d, fields = config.dst, METHODS[config.dst.method].fields
  t = np.arange(num_steps)
  if "update_every" not in fields:
    return MaskSchedule(np.zeros(num_steps, bool), None)
  start, end = int(d.start_step), dst_end_step(config, num_steps)
  target = None
  if has_sparsity_schedule(d.method):
    updates = np.isin(t, gradual_update_steps(config, num_steps))
    fraction_end = regrow_end_step(config, num_steps) or end
    target = np.asarray(
      sj.gradual_sparsity(
        t,
        sparsity=float(d.sparsity),
        initial_sparsity=float(d.initial_sparsity),
        start_step=start,
        end_step=end,
        power=float(d.power),
      ),
      np.float64,
    )
  else:
    updates = np.asarray(
      sj.is_mask_update_step(t, update_every=int(d.update_every), start_step=start, end_step=end)
    )
    fraction_end = end
  drop = None
  if "drop_fraction" in fields:
    fn = sj.drop_fraction_schedule(
      float(d.drop_fraction), decay=d.drop_fraction_decay, start_step=start, end_step=fraction_end
    )
    drop = np.asarray(fn(t), np.float32)
  return MaskSchedule(updates.astype(bool), drop, target)


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


def load_data(config: ml_collections.ConfigDict, workdir: str, rows: Sequence[int] | None = None):
  """The config's dataset and batches (of each global batch, the ``rows`` of this process).

  In-memory datasets are cached in ``config.data.cache_dir`` or the workdir; ``cifar10`` and
  ``imagenet2012`` are read from ``config.data.dir`` (:mod:`experiments.input_pipeline`).
  """
  n = int(config.num_train_steps)
  if config.dataset in input_pipeline.DATASET_NAMES:
    rows = range(int(config.batch_size)) if rows is None else rows
    ds, train_iter = input_pipeline.load(config, rows)
    epochs = n / train_iter.steps_per_epoch
    say(
      f"Dataset {ds.name} ({config.data.dir}): {ds.train_size} train examples, {epochs:.2f} epochs."
    )
    return ds, train_iter
  ds = data_lib.load_dataset(
    config.dataset,
    cache_dir=config.data.cache_dir or os.path.join(workdir, "data"),
    seed=config.seed,
    num_samples=config.data.num_samples,
    mnist1d_seed=config.data.mnist1d_seed,
  )
  train_iter = data_lib.BatchIterator(
    ds.x_train, ds.y_train, config.batch_size, seed=config.seed, rows=rows
  )
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
