"""Experiment configs: validation against ``configs/default.py`` and comparison of two configs.

:func:`validate_config` is the first thing a run does: unknown fields and bad values are
errors naming the field and the allowed values, and a ``config.dst`` field that the chosen
method does not take is an error too when it was set to anything but its default.
:func:`config_changes` compares a resumed run's config with the one the run was started
with, ignoring :data:`BOOKKEEPING` fields (how a run is driven, not what it computes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

import sparsejax as sj
from experiments import builders, input_pipeline, parallel
from experiments import data as data_lib
from experiments import models as models_lib
from experiments.configs import default as default_config

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "step")
DISTRIBUTIONS = ("uniform", "erdos_renyi", "erk", "global")
DECAYS = ("cosine", "constant")
INITS = ("", "random", "dense", "magnitude", "snip")
ABLATION_FAN_INS = ("sparse", "dense")

#: Fields that may differ between a run and its resumption: they change how the run is
#: driven (when it stops, what it prints, where caches live, how often it checkpoints),
#: never what it computes.
BOOKKEEPING = (
  "stop_after_step",
  "progress_every_steps",
  "progress_every_secs",
  "jax_cache_dir",
  "write_plots",
  "tensorboard",
  "async_checkpointing",
  "checkpoint_every_steps",
  "max_checkpoints_to_keep",
  "data.cache_dir",
  "data.dir",
  "data.num_workers",
  "data.num_threads",
)


def defaults() -> dict[str, Any]:
  """The default config (``configs/default.py``, no preset) as a plain dict."""
  return default_config.get_config().to_dict()


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


def _merge(reference: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
  out = dict(reference)
  for key, value in given.items():
    out[key] = _merge(reference[key], value) if isinstance(reference.get(key), dict) else value
  return out


def with_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
  """``config`` (a dict) with every field it lacks taken from the defaults."""
  return _merge(defaults(), config)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    listed = ", ".join(a if a else "'' (the method's default)" for a in allowed)
    raise ValueError(f"Unknown config.{name}={value!r}; allowed values: {listed}.")


def _check_structure(dst: ml_collections.ConfigDict) -> None:
  """The structure is one the library knows; an N:M structure fixes the sparsity."""
  try:
    structure = sj.get_structure(dst.structure)
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"Unknown config.dst.structure={dst.structure!r}; allowed values: unstructured, "
      f"fan_in, nm:N:M (e.g. nm:2:4), block:HxW (e.g. block:4x4). ({e})"
    ) from None
  if isinstance(structure, sj.NM) and abs(dst.sparsity - structure.sparsity) > 1e-9:
    raise ValueError(
      f"config.dst.structure={dst.structure!r} keeps {structure.n} of every {structure.m} "
      f"weights, a sparsity of 1 - {structure.n}/{structure.m} = {structure.sparsity:g}, but "
      f"config.dst.sparsity={dst.sparsity:g}. Set --config.dst.sparsity={structure.sparsity:g}."
    )


def _check_ranges(c: ml_collections.ConfigDict) -> None:
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
  if int(c.mesh.min_shard_size) < 0:
    raise ValueError(f"config.mesh.min_shard_size must be >= 0; got {c.mesh.min_shard_size}.")
  if c.learning_rate <= 0:
    raise ValueError(f"config.learning_rate must be > 0; got {c.learning_rate}.")
  _check_schedule_ranges(c.dst)


def _check_schedule_ranges(d: ml_collections.ConfigDict) -> None:
  """The sparsity-schedule fields (gmp, granet) and ``config.dst.init``."""
  if not 0.0 <= d.initial_sparsity <= d.sparsity:
    raise ValueError(
      f"config.dst.initial_sparsity must be in [0, config.dst.sparsity={d.sparsity}] (a "
      f"sparsity schedule only prunes); got {d.initial_sparsity}."
    )
  if isinstance(d.power, bool) or not isinstance(d.power, int | float) or not d.power > 0:
    raise ValueError(f"config.dst.power (the schedule's exponent) must be > 0; got {d.power!r}.")
  if d.regrow_end_fraction and not d.end_fraction <= d.regrow_end_fraction <= 1.0:
    raise ValueError(
      f"config.dst.regrow_end_fraction must be 0 (regrowth ends with the pruning) or in "
      f"[config.dst.end_fraction={d.end_fraction}, 1]; got {d.regrow_end_fraction}."
    )
  if d.init == "dense" and not builders.has_sparsity_schedule(d.method):
    raise ValueError(
      f"config.dst.init='dense' needs a sparsity schedule to prune the dense masks "
      f"(config.dst.method gmp or granet); {d.method!r} keeps the number of weights it "
      "starts with. Use random, magnitude or snip."
    )
  starts_dense = builders.has_sparsity_schedule(d.method) and not d.initial_sparsity
  if starts_dense and d.init not in ("", "dense"):
    raise ValueError(
      f"config.dst.init={d.init!r} gives masks at a sparsity, but config.dst.method="
      f"{d.method!r} with config.dst.initial_sparsity=0 starts dense; set "
      "config.dst.initial_sparsity > 0 to start its schedule from these masks."
    )


def _check_scale_fields(c: ml_collections.ConfigDict) -> None:
  """Fields of the published setups (``config.data.dir`` is checked when the data load)."""
  if not 0.0 <= c.label_smoothing < 1.0:
    raise ValueError(f"config.label_smoothing must be in [0, 1); got {c.label_smoothing}.")
  values = {
    "grad_clip_norm": c.grad_clip_norm,
    "eval_batch_size": c.eval_batch_size,
    "data.num_workers": c.data.num_workers,
    "data.num_threads": c.data.num_threads,
    "data.image_size": c.data.image_size,
  }
  for name, value in values.items():
    if value < 0:
      raise ValueError(f"config.{name} must be >= 0; got {value}.")


def _check_method_fields(dst: ml_collections.ConfigDict) -> None:
  """A ``config.dst`` field the method does not take must keep its default."""
  taken = set(builders.METHODS[dst.method].fields) | {"method"}
  reference = defaults()["dst"]
  takes = ", ".join(f for f in builders.METHODS[dst.method].fields) or "no config.dst field"
  for field in sorted(reference):
    if field not in taken and _json(dst[field]) != _json(reference[field]):
      raise ValueError(
        f"config.dst.{field}={dst[field]!r} has no effect with config.dst.method="
        f"{dst.method!r}, which takes {takes}; remove the override (default "
        f"{reference[field]!r}) or choose another method."
      )


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks field names against ``configs/default.py`` and values; returns a locked copy.

  Missing fields are filled from the defaults, so a config written for an older version
  still runs.

  Args:
    config: an experiment config.

  Returns:
    A locked copy with every field present.

  Raises:
    TypeError: ``config`` is not an ``ml_collections.ConfigDict``.
    ValueError: an unknown field, a bad value, or a ``config.dst`` field set for a method
      that does not take it (naming the field and the allowed values).
  """
  if not isinstance(config, ml_collections.ConfigDict):
    raise TypeError(f"config must be an ml_collections.ConfigDict, got {type(config).__name__}.")
  reference = defaults()
  given = config.to_dict()
  _check_keys(given, reference, "")
  c = ml_collections.ConfigDict(_merge(reference, given))
  _choice("dst.method", c.dst.method, tuple(builders.METHODS))
  _choice("dataset", c.dataset, data_lib.DATASET_NAMES + input_pipeline.DATASET_NAMES)
  _choice("model", c.model, models_lib.MODEL_NAMES)
  _choice("optimizer", c.optimizer, OPTIMIZERS)
  _choice("lr_schedule", c.lr_schedule, LR_SCHEDULES)
  _choice("dst.distribution", c.dst.distribution, DISTRIBUTIONS)
  _choice("dst.drop_fraction_decay", c.dst.drop_fraction_decay, DECAYS)
  _choice("dst.init", c.dst.init, INITS)
  _choice("dst.ablation_fan_in", c.dst.ablation_fan_in, ABLATION_FAN_INS)
  _check_ranges(c)
  _check_structure(c.dst)
  _check_method_fields(c.dst)
  mesh_sizes = parallel.mesh_shape(c.mesh, jax.device_count())
  parallel.check_processes(c, mesh_sizes)
  batch_shards = mesh_sizes["data"] * mesh_sizes["fsdp"]
  if int(c.batch_size) % batch_shards:
    raise ValueError(
      f"config.batch_size={c.batch_size} must be divisible by config.mesh.data * "
      f"config.mesh.fsdp = {batch_shards} (the batch is split over both axes)."
    )
  _check_scale_fields(c)
  if isinstance(c.extra_imports, str):
    raise ValueError(
      f"config.extra_imports must be a list of module names, got the string "
      f"{c.extra_imports!r}; write ({c.extra_imports!r},)."
    )
  c.lock()
  return c


# --------------------------------------------------------------------------------------
# Comparing configs (resume).
# --------------------------------------------------------------------------------------


def _json(value: Any) -> str:
  return json.dumps(value, default=str, sort_keys=True)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """The fields that differ between two configs (dicts), bookkeeping fields excepted.

  Values are compared as JSON (so a tuple equals the list it was stored as); a field
  missing from ``old`` (a config written by an older version) counts as its default.

  Args:
    old: the config a run was started with.
    new: the config of the resumption.

  Returns:
    ``{"dst.sparsity": (old, new), ...}`` in sorted field order.
  """
  a, b = _flatten(with_defaults(old)), _flatten(with_defaults(new))
  out = {}
  for key in sorted(set(a) | set(b)):
    if key in BOOKKEEPING:
      continue
    if _json(a.get(key)) != _json(b.get(key)):
      out[key] = (a.get(key), b.get(key))
  return out


def apply_changes(config: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
  """``config`` (a dict) with ``{"a.b": new_value}`` changes applied."""
  out = json.loads(_json(config))
  for dotted, value in changes.items():
    node = out
    *parents, leaf = dotted.split(".")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return out
