"""One run of the results table: its config, its workdir, its result row (resumable).

A :class:`Run` names a config file, a preset, a sparsity, a seed and optional config
overrides (the SRigL study's variants). :func:`run_one` trains it in
``<workdir>/<run.name>`` or, when that run finished in an earlier invocation, reads its row
back from ``result.json``; a finished run whose config differs from the one asked for is
refused rather than silently reused.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
from collections.abc import Mapping
from typing import Any

IGNORED_OVERRIDES = ("cache_dir", "jax_cache_dir")


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the table or of the study.

  Attributes:
    config_file: module under ``experiments.configs``.
    preset: its preset (``""``: none).
    method: the row label.
    sparsity: ``config.dst.sparsity`` (ignored by dense and N:M configs).
    seed: ``config.seed`` (and ``config.dst.seed`` for methods with random masks).
    overrides: ``(("dst.gamma_sal", 0.9), ...)`` applied after the config file.
    tag: distinguishes the run's workdir from the config file's plain runs.
  """

  config_file: str
  preset: str
  method: str
  sparsity: float
  seed: int
  overrides: tuple[tuple[str, Any], ...] = ()
  tag: str = ""

  @property
  def name(self) -> str:
    tag = self.config_file + (f"-{self.preset}" if self.preset else "")
    tag += f"-{self.tag}" if self.tag else ""
    return f"{tag}_s{self.sparsity:g}_seed{self.seed}"


def make_config(run: Run, workdir: str, num_train_steps: int | None):
  """The method's config file with this run's sparsity, seeds and overrides."""
  from experiments import builders  # pylint: disable=g-import-not-at-top

  module = importlib.import_module(f"experiments.configs.{run.config_file}")
  config = module.get_config(run.preset or None)
  config.seed = run.seed
  for dotted, value in run.overrides:
    node = config
    *parents, leaf = dotted.split(".")
    for key in parents:
      node = node[key]
    node[leaf] = value
  fields = builders.METHODS[config.dst.method].fields
  if "seed" in fields:  # the mask seed, for methods that draw random masks
    config.dst.seed = run.seed
  if "sparsity" in fields and run.config_file != "nm":
    config.dst.sparsity = run.sparsity
  if num_train_steps:
    config.num_train_steps = num_train_steps
  config.data.cache_dir = os.path.join(workdir, "data")
  config.jax_cache_dir = os.path.join(workdir, "jax_cache")
  config.write_plots = False
  config.checkpoint_every_steps = 0  # only the final checkpoint
  config.progress_every_secs = 30.0
  return config


def overrides(config) -> dict[str, Any]:
  """The config's fields that differ from ``configs/default.py`` (cache paths excepted)."""
  base = importlib.import_module("experiments.configs.default").get_config().to_dict()
  out = {}

  def walk(a, b, prefix=""):
    for k, v in b.items():
      if isinstance(v, dict):
        walk(a.get(k, {}), v, f"{prefix}{k}.")
      elif a.get(k) != v and k not in IGNORED_OVERRIDES:
        out[prefix + k] = v

  walk(base, config.to_dict())
  return json.loads(json.dumps(out, default=str))


def _check_same_config(row: Mapping[str, Any], config, run_dir: str) -> None:
  """A finished run is reused only if it was trained with the config asked for now."""
  asked = overrides(config)
  if row.get("overrides") != asked:
    had = row.get("overrides")
    diff = sorted(k for k in set(had or {}) | set(asked) if (had or {}).get(k) != asked.get(k))
    raise ValueError(
      f"{run_dir} holds a finished run of another config (fields {diff} differ: the config "
      "file changed since). Use a new --workdir, or delete that run directory to retrain it."
    )


def run_one(run: Run, workdir: str, num_train_steps: int | None) -> dict[str, Any]:
  """Trains (or reads back) one run; returns its result row.

  The row has the run's fields, ``name``, ``test_accuracy``, ``sparsity_realised``,
  ``flops_ratio`` (inference FLOPs of the final masks over dense), ``train_flops_ratio``
  (:func:`experiments.training_flops.run_training_flops`), ``wall_time_s``,
  ``num_train_steps`` and ``overrides`` (the config's differences from ``default.py``).

  Raises:
    ValueError: ``<workdir>/<run.name>`` holds a finished run of another config.
  """
  from experiments import train, training_flops  # pylint: disable=g-import-not-at-top

  config = make_config(run, workdir, num_train_steps)
  run_dir = os.path.join(workdir, run.name)
  done_path = os.path.join(run_dir, "result.json")
  if os.path.exists(done_path):  # finished by an earlier invocation.
    with open(done_path, encoding="utf-8") as f:
      row = json.load(f)
    _check_same_config(row, config, run_dir)
    return row
  t0 = time.monotonic()
  result = train.train_and_evaluate(config, run_dir)
  row = {
    **json.loads(json.dumps(dataclasses.asdict(run))),
    "name": run.name,
    "test_accuracy": result["test_accuracy"],
    "sparsity_realised": result["sparsity"],
    "flops_ratio": result["flops_sparse"] / result["flops_dense"],
    "train_flops_ratio": training_flops.run_training_flops(run_dir)["ratio"],
    "wall_time_s": time.monotonic() - t0,
    "num_train_steps": int(config.num_train_steps),
    "overrides": overrides(config),
  }
  with open(done_path, "w", encoding="utf-8") as f:
    json.dump(row, f, indent=2)
  return row


def final_topology(run_dir: str) -> dict[str, dict[str, float]]:
  """Per layer, the active neurons and fan-in range of the last topology record of a run."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  import sparsejax as sj  # pylint: disable=g-import-not-at-top

  last: dict[str, Any] = {}
  for rec in sj.metrics.read_jsonl(path):
    if any(k.startswith("active_neurons/") for k in rec):
      last = rec
  out: dict[str, dict[str, float]] = {}
  for k, v in last.items():
    if k.startswith("active_neurons/"):
      layer = k[len("active_neurons/") :]
      out[layer] = {
        "active_neurons": v,
        "fan_in_min": last.get(f"fan_in/{layer}/min"),
        "fan_in_max": last.get(f"fan_in/{layer}/max"),
      }
  return out
