"""Training and evaluation for the sparsejax experiments.

:func:`train_and_evaluate` is the one entry point shared by the command line
(``experiments/main.py``), the tests and the notebooks::

  from experiments import train
  from experiments.configs import rigl
  metrics = train.train_and_evaluate(rigl.get_config("smoke"), "/tmp/run")

What a run does:

1. validates the config against ``configs/default.py`` (unknown fields and bad values are
   errors naming the field and the allowed values) and imports ``config.extra_imports`` (so
   a module that calls ``sparsejax.register_criterion`` can provide ``config.dst.grow``);
2. builds the data (offline), the NNX model and ``nnx.Optimizer(model, tx, wrt=nnx.Param)``
   where ``tx`` is the DST transformation chosen by ``config.dst.method``, and starts sparse
   (``sparsejax.apply_masks``);
3. resumes from the latest checkpoint in ``<workdir>/checkpoints`` if there is one (a
   checkpoint of another model is refused with a ``ValueError``; a corrupt one raises,
   never a silent fresh start);
4. trains with a jitted step that compiles once, writing metrics to the log and to
   ``<workdir>/metrics.jsonl``, a progress line, checkpoints, and plots in
   ``<workdir>/plots/`` at the end; prints the final test accuracy and returns the final
   metrics.

``metrics.jsonl`` keys (one JSON object per line, always with ``step`` = number of completed
optimizer steps):

* every ``log_every_steps``: ``train/loss``, ``train/accuracy`` (means over the window),
  ``learning_rate``;
* every ``eval_every_steps`` and at the end: ``eval/loss``, ``eval/accuracy`` (test split),
  ``sparsity/total`` (over masked layers), ``sparsity/global`` (zeros over all params),
  ``sparsity/<layer>``, ``nnz/total``, ``flops/dense``, ``flops/sparse``, ``flops/ratio``
  (estimated forward FLOPs per example, :func:`sparsejax.estimate_flops`);
* at each mask update (DST methods): ``dst/turnover`` and ``dst/turnover/<layer>`` (fraction
  of active weights replaced), ``dst/drop_fraction`` (the drop fraction in force),
  ``dst/ever_active`` (fraction of sparse-layer weights active at any time so far),
  ``fan_in/<layer>/min``, ``fan_in/<layer>/max``, ``fan_in/<layer>/mean`` and
  ``active_neurons/<layer>``; at step 0 the same topology keys plus ``sparsity/<layer>`` and
  ``sparsity/total`` describe the initial masks. SR-STE recomputes its N:M masks every step,
  so it writes these keys every ``log_every_steps`` with the turnover summed over the window
  (and no drop fraction);
* at the end: ``final/test_accuracy``, ``final/test_loss`` and
  ``final/weight_sparsity/<layer>`` (zeros in the weights the forward pass uses);
* from the progress reporter: ``perf/steps_per_sec``, ``perf/uptime``, ``perf/<section>_ms``
  (wall-clock timings; the only keys that differ between otherwise identical runs).

Mask-update steps are logged at ``step = t + 1`` where ``t`` is the DST update count of the
step that changed the masks (``sparsejax.is_mask_update_step(t)``).

``<workdir>/topology.jsonl`` holds the per-neuron fan-in of every sparse layer at step 0 and
at each mask update (for the fan-in heat map); ``config.json`` and ``hparams.json`` hold the
resolved config.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import math
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

import sparsejax as sj
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import parallel
from experiments.configs import default as default_config

METHODS = ("dense", "static", "set", "rigl", "srigl", "nm_sr_ste")
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")
DISTRIBUTIONS = ("uniform", "erdos_renyi", "erk")
DECAYS = ("cosine", "constant")
_METHOD_FN = {
  "static": "static_sparse",
  "set": "set_",
  "rigl": "rigl",
  "srigl": "srigl",
  "nm_sr_ste": "nm_sr_ste",
}


def _say(msg: str) -> None:
  """absl INFO under absl.app (visible there), else print (notebooks, tests)."""
  if logging.level_info():
    logging.info(msg)
  else:
    print(msg, flush=True)


@contextlib.contextmanager
def _timer(name: str):
  t0 = time.monotonic()
  yield
  logging.info("%s took %.2f s", name, time.monotonic() - t0)


# --------------------------------------------------------------------------------------
# Config validation.
# --------------------------------------------------------------------------------------


def _check_keys(config: Mapping[str, Any], reference: Mapping[str, Any], prefix: str) -> None:
  unknown = sorted(set(config) - set(reference))
  if unknown:
    name = f"config.{prefix}{unknown[0]}"
    group = "config." + prefix[:-1] if prefix else "config"
    raise ValueError(
      f"Unknown config field {name!r}. Allowed fields of {group}: {', '.join(sorted(reference))}."
    )
  for key, value in config.items():
    ref = reference.get(key)
    if isinstance(ref, Mapping):
      if not isinstance(value, Mapping):
        raise ValueError(f"config.{prefix}{key} must be a group, got {value!r}.")
      _check_keys(value, ref, f"{prefix}{key}.")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"Unknown config.{name}={value!r}; allowed values: {', '.join(allowed)}.")


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks field names against ``configs/default.py`` and values; returns a locked copy.

  Missing fields are filled from the defaults, so a config written for an older version
  still runs.

  Raises:
    ValueError: an unknown field or a bad value (naming the field and the allowed values).
  """
  if not isinstance(config, ml_collections.ConfigDict):
    raise TypeError(f"config must be an ml_collections.ConfigDict, got {type(config).__name__}.")
  reference = default_config.get_config().to_dict()
  given = config.to_dict()
  _check_keys(given, reference, "")

  def merge(ref: dict, new: dict) -> dict:
    out = dict(ref)
    for k, v in new.items():
      out[k] = merge(ref[k], v) if isinstance(ref.get(k), dict) else v
    return out

  c = ml_collections.ConfigDict(merge(reference, given))
  _choice("dst.method", c.dst.method, METHODS)
  _choice("dataset", c.dataset, data_lib.DATASET_NAMES)
  _choice("model", c.model, models_lib.MODEL_NAMES)
  _choice("optimizer", c.optimizer, OPTIMIZERS)
  _choice("lr_schedule", c.lr_schedule, LR_SCHEDULES)
  _choice("dst.distribution", c.dst.distribution, DISTRIBUTIONS)
  _choice("dst.drop_fraction_decay", c.dst.drop_fraction_decay, DECAYS)
  if c.dst.structure not in ("unstructured", "fan_in") and not re.fullmatch(
    r"nm:\d+:\d+", c.dst.structure
  ):
    raise ValueError(
      f"Unknown config.dst.structure={c.dst.structure!r}; allowed values: unstructured, "
      "fan_in, nm:N:M (e.g. nm:2:4)."
    )
  if not 0.0 <= c.dst.sparsity < 1.0:
    raise ValueError(f"config.dst.sparsity must be in [0, 1); got {c.dst.sparsity}.")
  if not 0.0 < c.dst.end_fraction <= 1.0:
    raise ValueError(f"config.dst.end_fraction must be in (0, 1]; got {c.dst.end_fraction}.")
  if not 0.0 <= c.dst.drop_fraction <= 1.0:
    raise ValueError(f"config.dst.drop_fraction must be in [0, 1]; got {c.dst.drop_fraction}.")
  for name in ("num_train_steps", "batch_size", "log_every_steps", "eval_every_steps"):
    if int(c[name]) < 1:
      raise ValueError(f"config.{name} must be >= 1; got {c[name]}.")
  if int(c.dst.update_every) < 1:
    raise ValueError(f"config.dst.update_every must be >= 1; got {c.dst.update_every}.")
  if int(c.checkpoint_every_steps) < 0:
    raise ValueError(
      f"config.checkpoint_every_steps must be >= 0 (0 = only at the end); "
      f"got {c.checkpoint_every_steps}."
    )
  mesh_sizes = parallel.mesh_shape(c.mesh, jax.device_count())
  batch_shards = mesh_sizes["data"] * mesh_sizes["fsdp"]
  if int(c.batch_size) % batch_shards:
    raise ValueError(
      f"config.batch_size={c.batch_size} must be divisible by config.mesh.data * "
      f"config.mesh.fsdp = {batch_shards} (the batch is split over both axes)."
    )
  if int(c.mesh.min_shard_size) < 0:
    raise ValueError(f"config.mesh.min_shard_size must be >= 0; got {c.mesh.min_shard_size}.")
  if c.learning_rate <= 0:
    raise ValueError(f"config.learning_rate must be > 0; got {c.learning_rate}.")
  if isinstance(c.extra_imports, str):
    raise ValueError(
      f"config.extra_imports must be a list of module names, got the string "
      f"{c.extra_imports!r}; write ({c.extra_imports!r},)."
    )
  c.lock()
  return c


# --------------------------------------------------------------------------------------
# Building blocks.
# --------------------------------------------------------------------------------------


def import_extra_modules(names: Any) -> None:
  """Imports ``config.extra_imports`` (e.g. a module registering a custom criterion)."""
  for name in names or ():
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ImportError(
        f"config.extra_imports: could not import {name!r} ({e}). Give an importable module "
        "name (on sys.path / PYTHONPATH), e.g. 'my_criteria' for ./my_criteria.py."
      ) from e
    _say(f"Imported extra module {name!r}.")


def enable_compilation_cache(path: str) -> None:
  """Turns on JAX's persistent compilation cache in ``path`` (speeds up repeated runs)."""
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(os.path.expanduser(path))
  if jax.config.jax_compilation_cache_dir == path:
    return
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  compilation_cache.reset_cache()  # takes effect even after earlier compilations.


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


def inner_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule):
  """The dense optimizer that the DST method wraps."""
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


def dst_end_step(config: ml_collections.ConfigDict, num_steps: int) -> int:
  """``end_fraction · num_train_steps`` rounded, at least ``start_step + 1``."""
  return max(int(config.dst.start_step) + 1, int(round(config.dst.end_fraction * num_steps)))


def build_transform(config: ml_collections.ConfigDict, num_steps: int, schedule: optax.Schedule):
  """The optimizer for ``config.dst.method``: the inner optimizer, wrapped unless dense.

  Returns:
    ``(tx, dst_kwargs)``; ``dst_kwargs`` is None for ``dense``.

  Raises:
    ValueError: the method is unknown or not provided by this sparsejax version, or a
      method-specific option is not supported by it.
  """
  inner = inner_optimizer(config, schedule)
  d = config.dst
  if d.method == "dense":
    return inner, None
  if d.method == "nm_sr_ste":
    return _build_sr_ste(config, inner)
  fn_name = _METHOD_FN[d.method]
  fn = getattr(sj, fn_name, None)
  if fn is None:
    raise ValueError(
      f"config.dst.method={d.method!r} needs sparsejax.{fn_name}, which this sparsejax "
      f"version does not provide. Available methods here: {', '.join(available_methods())}."
    )
  kwargs: dict[str, Any] = dict(
    sparsity=float(d.sparsity),
    distribution=d.distribution,
    seed=int(d.seed),
    keep_first_dense=bool(d.keep_first_dense),
    keep_last_dense=bool(d.keep_last_dense),
  )
  if d.structure != "unstructured":
    kwargs["structure"] = d.structure
  if d.method != "static":
    kwargs.update(
      update_every=int(d.update_every),
      start_step=int(d.start_step),
      end_step=dst_end_step(config, num_steps),
      drop_fraction=float(d.drop_fraction),
      drop_fraction_decay=d.drop_fraction_decay,
      grow_init=float(d.grow_init),
    )
    if d.drop:
      kwargs["drop"] = d.drop
    if d.grow:
      kwargs["grow"] = d.grow
  if d.method == "srigl":
    kwargs["gamma_sal"] = float(d.gamma_sal)
  tx = _call_filtered(fn, inner, kwargs, d.method)
  return tx, kwargs


def parse_nm(structure: str) -> tuple[int, int]:
  """``"nm:2:4"`` -> ``(2, 4)``; a clear error otherwise."""
  parts = structure.strip().lower().split(":")
  if len(parts) != 3 or parts[0] != "nm" or not (parts[1].isdigit() and parts[2].isdigit()):
    raise ValueError(
      f"config.dst.structure={structure!r} must be 'nm:N:M' (e.g. 'nm:2:4') for this method."
    )
  n, m = int(parts[1]), int(parts[2])
  if not 1 <= n <= m:
    raise ValueError(f"config.dst.structure={structure!r}: need 1 <= N <= M.")
  return n, m


_SR_STE_FNS = ("nm_sr_ste", "nm_ste", "nm_mask")


def _build_sr_ste(config: ml_collections.ConfigDict, inner):
  """SR-STE: dense weights, N:M magnitude mask recomputed in every forward."""
  missing = [f for f in _SR_STE_FNS if not hasattr(sj, f)]
  if missing:
    raise ValueError(
      "config.dst.method='nm_sr_ste' needs sparsejax."
      + ", sparsejax.".join(missing)
      + f", which this sparsejax version does not provide. Available methods here: "
      f"{', '.join(available_methods())}."
    )
  d = config.dst
  n, m = parse_nm(d.structure)
  if d.drop or d.grow:
    raise ValueError("config.dst.drop/grow do not apply to nm_sr_ste (no drop-and-grow).")
  # The leaves are chosen from the params at init (_Sparsity); the filter reads `chosen`.
  chosen: set[str] = set()

  def leaf_filter(names: tuple[str, ...], leaf: Any) -> bool:
    del leaf
    names = tuple(names)
    if names and names[-1] == "value":  # NNX Variable leaves
      names = names[:-1]
    return "/".join(names) in chosen

  tx = sj.nm_sr_ste(inner, n, m, filter=leaf_filter)
  return tx, {"n": n, "m": m, "sr_ste": True, "chosen": chosen, "filter": leaf_filter}


def _call_filtered(fn, inner, kwargs: dict[str, Any], method: str):
  """Calls ``fn(inner, **kwargs)``; a clear error if ``fn`` does not take some keyword."""
  import inspect  # pylint: disable=g-import-not-at-top

  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return fn(inner, **kwargs)
  if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
    unsupported = [k for k in kwargs if k not in params]
    if unsupported:
      raise ValueError(
        f"config.dst.method={method!r} does not support option(s) {unsupported} "
        f"(sparsejax.{fn.__name__} accepts: {', '.join(p for p in params if p != 'inner')})."
      )
  return fn(inner, **kwargs)


def available_methods() -> list[str]:
  """Methods whose sparsejax function exists in the installed version."""
  out = ["dense"] + [m for m, f in _METHOD_FN.items() if hasattr(sj, f) and m != "nm_sr_ste"]
  if all(hasattr(sj, f) for f in _SR_STE_FNS):
    out.append("nm_sr_ste")
  return out


def _drop_fraction_at(config: ml_collections.ConfigDict, num_steps: int, count: int) -> float:
  """The drop fraction the library uses at update count ``count``.

  A host-side replica of ``optax.cosine_decay_schedule(drop_fraction, end - start)``
  evaluated at ``count - start`` (what ``sparsejax.dynamic_sparse`` does), in plain Python
  so that logging it costs no device work.
  """
  d = config.dst
  if d.method in ("dense", "static", "nm_sr_ste"):
    return 0.0
  if d.drop_fraction_decay == "constant":
    return float(d.drop_fraction)
  start, end = int(d.start_step), dst_end_step(config, num_steps)
  decay_steps = end - start
  t = min(count - start, decay_steps)
  return float(d.drop_fraction) * 0.5 * (1.0 + math.cos(math.pi * t / decay_steps))


def _update_steps(config: ml_collections.ConfigDict, num_steps: int) -> np.ndarray:
  """Bool array: whether update count ``t`` (0-based) is a scheduled mask update."""
  d = config.dst
  if d.method in ("dense", "static", "nm_sr_ste"):
    return np.zeros(num_steps, bool)
  fn = getattr(sj, "is_mask_update_step", None)
  kwargs = dict(
    update_every=int(d.update_every),
    start_step=int(d.start_step),
    end_step=dst_end_step(config, num_steps),
  )
  if fn is not None:
    flags = jax.jit(lambda t: fn(t, **kwargs))(jnp.arange(num_steps, dtype=jnp.int32))
    return np.asarray(jax.device_get(flags), bool)
  t = np.arange(num_steps)
  return (
    (t > kwargs["start_step"])
    & (t < kwargs["end_step"])
    & ((t - kwargs["start_step"]) % kwargs["update_every"] == 0)
  )


# --------------------------------------------------------------------------------------
# Files in the workdir.
# --------------------------------------------------------------------------------------


def _truncate_jsonl(path: str, max_step: int) -> int:
  """Drops records with ``step > max_step`` (written after the checkpoint we resume from).

  Returns:
    The number of records dropped.
  """
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  keep, dropped = [], 0
  for line in lines:
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      dropped += 1  # a line cut by a crash.
      continue
    if int(rec.get("step", 0)) > max_step:
      dropped += 1
    else:
      keep.append(line)
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
  return dropped


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def _config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out += _config_diff(a, b, f"{prefix}{k}.")
    elif json.dumps(a, default=str) != json.dumps(b, default=str):
      out.append(f"{prefix}{k}: {a!r} -> {b!r}")
  return out


# --------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------


def _masks_list(optimizer: nnx.Optimizer) -> list[jax.Array]:
  """The sparse masks of an NNX optimizer with a DST state, in tree order ([] if none)."""
  try:
    masks = sj.get_masks(optimizer.opt_state)
  except ValueError:
    return []
  return [m for _, m in sj.sparse_leaves(masks)]


class _Sparsity:
  """Where a run's masks come from: none (dense), the DST state, or the weights (SR-STE)."""

  def __init__(self, config: ml_collections.ConfigDict, dst_kwargs: dict[str, Any] | None):
    self.kind = "dense" if dst_kwargs is None else ("sr_ste" if dst_kwargs.get("sr_ste") else "dst")
    self.kwargs = dst_kwargs or {}
    self.config = config
    self.paths: list[str] = []

  def choose_sr_ste_leaves(self, params: Any) -> None:
    """SR-STE: N:M kernels = divisible contraction size, minus first/last if asked."""
    m = self.kwargs["m"]
    kernels = [(p, leaf.shape) for p, leaf in sj.sparse_leaves(params) if np.ndim(leaf) > 1]
    if self.config.dst.keep_first_dense:
      kernels = kernels[1:]
    if self.config.dst.keep_last_dense:
      kernels = kernels[:-1]
    cands = [p for p, shape in kernels if math.prod(shape[:-1]) % m == 0]
    if not cands:
      raise ValueError(f"nm_sr_ste: no kernel has a contraction size divisible by M={m}.")
    self.kwargs["chosen"].update(cands)
    self.paths = cands

  def masks(self, model: nnx.Module, optimizer: nnx.Optimizer) -> list[jax.Array]:
    """The current masks (traceable), in the order of ``self.paths``."""
    if self.kind == "dst":
      return _masks_list(optimizer)
    if self.kind == "sr_ste":
      params = dict(sj.sparse_leaves(nnx.state(model, nnx.Param)))
      n, m = self.kwargs["n"], self.kwargs["m"]
      return [sj.nm_mask(params[p], n, m) for p in self.paths]
    return []

  def forward_model(self, model: nnx.Module) -> nnx.Module:
    """The model the forward pass uses (SR-STE: straight-through N:M projected weights)."""
    if self.kind != "sr_ste":
      return model
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = sj.nm_ste(params, self.kwargs["n"], self.kwargs["m"], filter=self.kwargs["filter"])
    return nnx.merge(graphdef, params, rest)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates one configuration; resumes from ``workdir`` if possible.

  Args:
    config: an experiment config (see ``configs/default.py``).
    workdir: directory for checkpoints, ``metrics.jsonl``, ``topology.jsonl``, plots, the
      config and the cached dataset.

  Returns:
    Final metrics: ``test_accuracy``, ``test_loss``, ``step``, ``sparsity``,
    ``sparsity_global``, ``flops_dense``, ``flops_sparse``, ``wall_time_s``,
    ``train_step_compiles``, ``resumed_from`` (step or None), ``method``, ``mesh`` (axis
    sizes and how many param leaves are sharded; ``{"devices": 1}`` without a mesh).

  Raises:
    ValueError: a bad config, or a checkpoint in ``workdir`` from a different model.
    sparsejax.CorruptCheckpointError: a checkpoint in ``workdir`` that cannot be read.
  """
  t_start = time.monotonic()
  config = validate_config(config)
  if not workdir:
    raise ValueError("workdir must be a non-empty path.")
  workdir = os.path.abspath(os.fspath(workdir))
  os.makedirs(workdir, exist_ok=True)
  if config.jax_cache_dir:
    enable_compilation_cache(config.jax_cache_dir)
  import_extra_modules(config.extra_imports)

  # Data.
  cache_dir = config.data.cache_dir or os.path.join(workdir, "data")
  ds = data_lib.load_dataset(
    config.dataset,
    cache_dir=cache_dir,
    seed=config.seed,
    num_samples=config.data.num_samples,
    mnist1d_seed=config.data.mnist1d_seed,
  )
  train_iter = data_lib.BatchIterator(ds.x_train, ds.y_train, config.batch_size, seed=config.seed)
  num_steps = int(config.num_train_steps)
  _say(
    f"Dataset {ds.name}: train {ds.x_train.shape}, test {ds.x_test.shape}, "
    f"{train_iter.steps_per_epoch} steps/epoch, {num_steps} steps "
    f"({num_steps / train_iter.steps_per_epoch:.1f} epochs)."
  )

  # Model and optimizer.
  mk = config.model_kwargs
  schedule = learning_rate_schedule(config, num_steps)
  tx, dst_kwargs = build_transform(config, num_steps, schedule)
  is_sparse = dst_kwargs is not None
  sparsity = _Sparsity(config, dst_kwargs)

  @nnx.jit
  def init():
    # One compiled program instead of one small compilation per eager init op.
    model = models_lib.create_model(
      config.model,
      ds.input_shape,
      ds.num_classes,
      seed=config.seed,
      mlp_features=tuple(mk.mlp_features),
      cnn_channels=mk.cnn_channels,
      cnn2d_channels=tuple(mk.cnn2d_channels),
      cnn2d_hidden=mk.cnn2d_hidden,
    )
    if sparsity.kind == "sr_ste":
      sparsity.choose_sr_ste_leaves(nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    if sparsity.kind == "dst":  # start sparse.
      nnx.update(model, sj.apply_masks(nnx.state(model, nnx.Param), optimizer.opt_state))
    # A copy of the masks, OR-accumulated during training.
    ever = [m | False for m in sparsity.masks(model, optimizer)]
    return model, optimizer, ever

  with _timer("init"):
    model, optimizer, ever_active = init()
  mask_paths: list[str] = []
  init_mask_sparsity: dict[str, float] = {}
  summary0: dict[str, Any] = {}
  if sparsity.kind == "dst":
    mask_paths = [p for p, _ in sj.sparse_leaves(sj.get_masks(optimizer.opt_state))]
    sparsity.paths = mask_paths
  elif sparsity.kind == "sr_ste":
    mask_paths = sparsity.paths
  if is_sparse:
    summary0 = sj.mask_summary(dict(zip(mask_paths, jax.device_get(ever_active), strict=True)))
    init_mask_sparsity = {p: float(summary0[p]["sparsity"]) for p in mask_paths}
  positions = model.kernel_positions()

  # Resume.
  ckpt = sj.CheckpointManager(
    os.path.join(workdir, "checkpoints"),
    max_to_keep=int(config.max_checkpoints_to_keep),
    async_save=bool(config.async_checkpointing),
  )

  def fresh_accum() -> dict[str, Any]:
    # Host-side sums over the current log window (checkpointed, so resume is exact).
    return {
      "loss_sum": 0.0,
      "correct": 0,
      "count": 0,
      # SR-STE: mask flips per layer (length >= 1: orbax cannot save empty arrays).
      "grown": np.zeros(max(1, len(mask_paths)), np.int64),
    }

  train_accum = fresh_accum()
  step = 0
  resumed_from = None
  latest = ckpt.latest_step()
  if latest is not None:
    target = {
      "model": nnx.state(model),
      "optimizer": nnx.state(optimizer),
      "step": 0,
      "data_state": train_iter.get_state(),
      "ever_active": ever_active,
      "train_accum": train_accum,
    }
    restored, stored_config = ckpt.restore(target)  # raises on mismatch / corruption.
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
    step = int(restored["step"])
    train_iter.set_state({k: int(v) for k, v in restored["data_state"].items()})
    ever_active = list(restored["ever_active"])
    train_accum = {
      "loss_sum": float(restored["train_accum"]["loss_sum"]),
      "correct": int(restored["train_accum"]["correct"]),
      "count": int(restored["train_accum"]["count"]),
      "grown": np.asarray(restored["train_accum"]["grown"], np.int64),
    }
    resumed_from = step
    _say(f"Resumed from checkpoint step {step} in {ckpt.directory}.")
    if stored_config is not None:
      diff = _config_diff(stored_config, config.to_dict())
      if diff:
        logging.warning("Config differs from the checkpoint's: %s", "; ".join(diff))
  else:
    stray = [n for n in os.listdir(ckpt.directory) if not n.startswith(".")]
    if stray:
      logging.warning(
        "Checkpoint directory %s has entries but no complete checkpoint (%s); they are "
        "left untouched and training starts from step 0.",
        ckpt.directory,
        ", ".join(sorted(stray)[:5]),
      )

  # Metric files: drop records written after the checkpoint we resume from.
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  topology_path = os.path.join(workdir, "topology.jsonl")
  for path in (metrics_path, topology_path):
    n = _truncate_jsonl(path, step if resumed_from is not None else -1)
    if n:
      _say(f"Dropped {n} record(s) after step {step} from {os.path.basename(path)}.")
  writer = sj.create_default_writer(workdir, tensorboard=bool(config.tensorboard))
  writer.write_hparams(config.to_dict())
  _write_json(os.path.join(workdir, "config.json"), config.to_dict())
  logging.info("Resolved config:\n%s", config)
  _say(
    f"Model {config.model}: {models_lib.count_params(model)} parameters; method {config.dst.method}."
  )

  # Jitted functions (on split state: one compile, no graph traversal per step).
  # The states travel as flat lists of arrays: jit dispatch then skips NNX's Python-level
  # pytree flattening (about 1 ms per step for this model).
  mdef, mstate_tree = nnx.split(model)
  odef, ostate_tree = nnx.split(optimizer)
  m_treedef, o_treedef = jax.tree.structure(mstate_tree), jax.tree.structure(ostate_tree)
  mstate, ostate = jax.tree.leaves(mstate_tree), jax.tree.leaves(ostate_tree)
  mesh = parallel.make_mesh(config.mesh)
  if mesh is not None:
    # Params, masks and moments sharded like their params, counters replicated, the batch
    # split over data x fsdp; jit's in/out shardings keep every step on that layout.
    m_sh, o_sh, by_path = parallel.state_shardings(
      mesh, mstate_tree, ostate_tree, min_shard_size=int(config.mesh.min_shard_size)
    )
    ever_sh = parallel.shardings_for_paths(mask_paths, by_path, mesh)
    mstate, ostate = jax.device_put(mstate, m_sh), jax.device_put(ostate, o_sh)
    ever_active = jax.device_put(list(ever_active), ever_sh)
    mesh_info = parallel.describe(mesh, m_sh)
    _say(f"Mesh {mesh_info}.")
  else:
    mesh_info = parallel.describe(None)
  del mstate_tree, ostate_tree

  def merge_model(leaves):
    return nnx.merge(mdef, jax.tree.unflatten(m_treedef, leaves))

  def merge_opt(leaves):
    return nnx.merge(odef, jax.tree.unflatten(o_treedef, leaves))

  def loss_and_logits(m, x, y):
    logits = sparsity.forward_model(m)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

  def train_step(mstate, ostate, ever, x, y):
    m = merge_model(mstate)
    opt = merge_opt(ostate)
    old = sparsity.masks(m, opt)
    (loss, logits), grads = nnx.value_and_grad(loss_and_logits, has_aux=True)(m, x, y)
    opt.update(m, grads)
    new = sparsity.masks(m, opt)
    counts = [
      jnp.stack([jnp.sum(n & ~o, dtype=jnp.int32), jnp.sum(o, dtype=jnp.int32)])
      for o, n in zip(old, new, strict=True)
    ]
    ever = [e | n for e, n in zip(ever, new, strict=True)]
    out = {
      "loss": loss,
      "correct": jnp.sum(jnp.argmax(logits, -1) == y, dtype=jnp.int32),
      "grown_nnz": jnp.stack(counts) if counts else jnp.zeros((0, 2), jnp.int32),
    }
    return jax.tree.leaves(nnx.state(m)), jax.tree.leaves(nnx.state(opt)), ever, out

  if mesh is None:
    train_step_jit = jax.jit(train_step, donate_argnums=(0, 1, 2))
  else:
    batch_sh = parallel.batch_sharding(mesh)
    train_step_jit = jax.jit(
      train_step,
      in_shardings=(m_sh, o_sh, ever_sh, batch_sh, batch_sh),
      out_shardings=(
        m_sh,
        o_sh,
        ever_sh,
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
      ),
      donate_argnums=(0, 1, 2),
    )

  @jax.jit
  def eval_step(mstate, x, y):
    loss, logits = loss_and_logits(merge_model(mstate), x, y)
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)

  @jax.jit
  def masks_of(mstate, ostate):
    return sparsity.masks(merge_model(mstate), merge_opt(ostate))

  @jax.jit
  def forward_params(mstate):
    # The weights the forward pass sees (SR-STE: N:M projected).
    return jax.tree.leaves(nnx.state(sparsity.forward_model(merge_model(mstate)), nnx.Param))

  x_test, y_test = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
  lr_fn = jax.jit(schedule)
  update_steps = _update_steps(config, num_steps)
  progress = sj.ReportProgress(
    num_steps,
    writer=writer,
    every_steps=int(config.progress_every_steps) or None,
    every_secs=float(config.progress_every_secs) or None,
    log_fn=_say,
  )

  def topology_record(at_step: int, turnover: Mapping[str, float] | None) -> dict[str, Any]:
    masks = jax.device_get(masks_of(mstate, ostate))
    ever = jax.device_get(ever_active)
    tree = dict(zip(mask_paths, masks, strict=True))
    rec: dict[str, Any] = {}
    if turnover is not None:
      rec.update(turnover)
      if sparsity.kind == "dst":
        rec["dst/drop_fraction"] = _drop_fraction_at(config, num_steps, at_step - 1)
    rec["dst/ever_active"] = sj.to_scalars(
      sj.ever_active_fraction(dict(zip(mask_paths, ever, strict=True)))
    )["total"]
    fan = sj.fan_in_stats(tree)
    for p, st in fan.items():
      rec[f"fan_in/{p}/min"] = int(st["min"])
      rec[f"fan_in/{p}/max"] = int(st["max"])
      rec[f"fan_in/{p}/mean"] = float(st["mean"])
      rec[f"active_neurons/{p}"] = int(st["active_neurons"])
    with open(topology_path, "a", encoding="utf-8") as f:
      vecs = {
        p: np.asarray(m).reshape(-1, m.shape[-1]).sum(0).tolist()
        for p, m in tree.items()
        if np.ndim(m) >= 2
      }
      f.write(json.dumps({"step": at_step, "fan_in": vecs}) + "\n")
    return rec

  param_paths = [p for p, _ in sj.sparse_leaves(nnx.as_pure(nnx.state(model, nnx.Param)))]
  last_params: dict[str, np.ndarray] = {}

  def eval_record() -> dict[str, Any]:
    loss, acc = eval_step(mstate, x_test, y_test)
    rec = {"eval/loss": float(loss), "eval/accuracy": float(acc)}
    host_params = dict(zip(param_paths, jax.device_get(forward_params(mstate)), strict=True))
    last_params.clear()
    last_params.update(host_params)
    if is_sparse:
      masks = dict(zip(mask_paths, jax.device_get(masks_of(mstate, ostate)), strict=True))
      summ = sj.to_scalars(sj.mask_summary(masks))
      for p in mask_paths:
        rec[f"sparsity/{p}"] = summ[f"{p}/sparsity"]
      rec["sparsity/total"] = summ["total/sparsity"]
      rec["nnz/total"] = summ["total/nnz"]
    else:
      masks = None
      rec["sparsity/total"] = 0.0
    rec["sparsity/global"] = _global_sparsity(host_params)
    flops = sj.estimate_flops(host_params, masks, positions)
    rec.update({"flops/dense": flops["dense"], "flops/sparse": flops["sparse"]})
    rec["flops/ratio"] = flops["ratio"]
    return rec

  def final_weight_sparsity() -> dict[str, float]:
    out = {}  # the weights the forward pass uses, as of the last eval_record().
    for p, leaf in last_params.items():
      if p in init_mask_sparsity or (not is_sparse and np.ndim(leaf) > 1):
        out[f"final/weight_sparsity/{p}"] = 1.0 - np.count_nonzero(leaf) / leaf.size
    return out

  def save_checkpoint(at_step: int) -> None:
    writer.flush()
    with progress.timed("checkpoint", first_call_compiles=False):
      state = {
        "model": jax.tree.unflatten(m_treedef, mstate),
        "optimizer": jax.tree.unflatten(o_treedef, ostate),
        "step": at_step,
        "data_state": train_iter.get_state(),
        "ever_active": ever_active,
        "train_accum": train_accum,
      }
      ckpt.save(at_step, state, config=config.to_dict(), force=True)

  if step == 0 and is_sparse:
    rec0 = {f"sparsity/{p}": v for p, v in init_mask_sparsity.items()}
    rec0["sparsity/total"] = float(summary0["total"]["sparsity"])
    rec0.update(topology_record(0, None))
    writer.write_scalars(0, rec0)

  stop_at = int(config.stop_after_step)
  log_every = int(config.log_every_steps)
  eval_every = int(config.eval_every_steps)
  ckpt_every = int(config.checkpoint_every_steps)
  pending: list[tuple[int, dict[str, jax.Array]]] = []  # (step, device metrics)
  warned_unscheduled = False
  last_nnz = np.zeros(len(mask_paths), np.int64)
  steps_run = 0

  def flush_pending() -> None:
    nonlocal pending, warned_unscheduled
    if not pending:
      return
    host = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, host, strict=True):
      train_accum["loss_sum"] += float(m["loss"])
      train_accum["correct"] += int(m["correct"])
      train_accum["count"] += 1
      if sparsity.kind == "sr_ste":
        train_accum["grown"][: len(mask_paths)] += m["grown_nnz"][:, 0]
        last_nnz[:] = m["grown_nnz"][:, 1]
      elif m["grown_nnz"].size and m["grown_nnz"][:, 0].any() and not update_steps[s - 1]:
        if not warned_unscheduled:
          logging.warning("Masks changed at step %d, outside the predicted schedule.", s)
          warned_unscheduled = True
    pending = []

  while step < num_steps and (stop_at < 0 or step < stop_at):
    is_update = bool(update_steps[step])
    x, y = next(train_iter)
    section = "mask_update" if is_update else "train_step"
    with progress.timed(section, first_call_compiles=section == "train_step"):
      mstate, ostate, ever_active, out = train_step_jit(mstate, ostate, ever_active, x, y)
      if is_update:
        jax.block_until_ready(out)
    step += 1
    steps_run += 1
    pending.append((step, out))
    if is_update:
      gn = np.asarray(jax.device_get(out["grown_nnz"]))
      turnover = {
        f"dst/turnover/{p}": (float(g) / n if n else 0.0)
        for p, (g, n) in zip(mask_paths, gn.tolist(), strict=True)
      }
      tot_n = int(gn[:, 1].sum())
      turnover["dst/turnover"] = float(gn[:, 0].sum()) / tot_n if tot_n else 0.0
      writer.write_scalars(step, topology_record(step, turnover))
    if step % log_every == 0 or step == num_steps:
      flush_pending()
      if sparsity.kind == "sr_ste":  # masks move every step: turnover per log window.
        g = train_accum["grown"][: len(mask_paths)]
        turnover = {
          f"dst/turnover/{p}": float(gi) / ni if ni else 0.0
          for p, gi, ni in zip(mask_paths, g.tolist(), last_nnz.tolist(), strict=True)
        }
        turnover["dst/turnover"] = float(g.sum()) / last_nnz.sum() if last_nnz.sum() else 0.0
        writer.write_scalars(step, topology_record(step, turnover))
      n = max(train_accum["count"], 1)
      writer.write_scalars(
        step,
        {
          "train/loss": train_accum["loss_sum"] / n,
          "train/accuracy": train_accum["correct"] / (n * config.batch_size),
          "learning_rate": float(lr_fn(step - 1)),
        },
      )
      train_accum = fresh_accum()
    if step % eval_every == 0 or step == num_steps:
      flush_pending()
      with progress.timed("eval"):
        rec = eval_record()
      if step == num_steps:
        rec["final/test_accuracy"] = rec["eval/accuracy"]
        rec["final/test_loss"] = rec["eval/loss"]
        rec.update(final_weight_sparsity())
      writer.write_scalars(step, rec)
    if (
      (ckpt_every and step % ckpt_every == 0)
      or step == num_steps
      or (stop_at >= 0 and step == stop_at)
    ):
      flush_pending()
      save_checkpoint(step)
    if len(pending) >= 256:
      flush_pending()
    progress(step)

  flush_pending()
  writer.flush()
  ckpt.close()
  compiles = train_step_jit._cache_size()  # pylint: disable=protected-access
  if steps_run and compiles != 1:
    logging.warning("The train step compiled %d times (expected 1).", compiles)

  # Final evaluation (also when the run was already complete).
  final = eval_record()
  result = {
    "method": config.dst.method,
    "step": step,
    "test_accuracy": final["eval/accuracy"],
    "test_loss": final["eval/loss"],
    "sparsity": final["sparsity/total"],
    "sparsity_global": final["sparsity/global"],
    "flops_dense": final["flops/dense"],
    "flops_sparse": final["flops/sparse"],
    "wall_time_s": time.monotonic() - t_start,
    "train_step_compiles": int(compiles),
    "resumed_from": resumed_from,
    "timings": progress.summary(),
    "mesh": mesh_info,
  }
  if step < num_steps:
    _say(f"Stopped at step {step}/{num_steps} (config.stop_after_step); resume by rerunning.")
  else:
    print(
      f"Final test accuracy: {result['test_accuracy']:.4f} ({config.dst.method}, "
      f"sparsity {result['sparsity']:.3f}, step {step}, {result['wall_time_s']:.1f} s)",
      flush=True,
    )
  if config.write_plots and step == num_steps and steps_run:
    _write_plots(workdir)
  writer.close()
  return result


def _write_plots(workdir: str) -> None:
  """PNG plots of the run in ``<workdir>/plots`` (skipped if matplotlib is missing)."""
  if importlib.util.find_spec("matplotlib") is None:
    logging.warning(
      "Plots skipped: matplotlib is not installed (pip install 'sparsejax[experiments]')."
    )
    return
  from experiments import plot as plot_lib  # pylint: disable=g-import-not-at-top

  paths = plot_lib.write_run_plots(workdir)
  _say(f"Wrote {len(paths)} plot(s) to {os.path.join(workdir, 'plots')}.")


def _global_sparsity(params: Any) -> float:
  """Fraction of exactly-zero entries over all params (host arrays)."""
  leaves = jax.tree.leaves(params)
  size = sum(int(np.size(x)) for x in leaves)
  nnz = sum(int(np.count_nonzero(x)) for x in leaves)
  return 1.0 - nnz / size if size else 0.0
