"""The files of a run's workdir: its config record, metric files, checkpoints and plots.

* ``config.json`` is the config the run was started with, written once and never
  rewritten; ``hparams.json`` (written by the metric writer) too.
* ``config_changes.jsonl``: one line per resumption that was explicitly allowed to change
  the config (``allow_config_change``), with the step and every changed field. The config
  in force is ``config.json`` with these changes applied in order.
* ``metrics.jsonl`` / ``topology.jsonl``: records after the checkpoint a run resumes from
  are dropped (:func:`truncate_jsonl`), so a resumed run writes exactly what an
  uninterrupted one would.
* ``checkpoints/``: :class:`sparsejax.checkpoint.CheckpointManager` (orbax).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from absl import logging

import sparsejax as sj
from experiments import config_lib, run_metrics
from experiments.run_metrics import say

CONFIG_JSON = "config.json"
CONFIG_CHANGES = "config_changes.jsonl"


class ConfigChangedError(ValueError):
  """Resuming a workdir whose run was started with a different config."""


def prepare(workdir: str | os.PathLike) -> str:
  """Checks ``workdir`` and creates it; returns its absolute path.

  Raises:
    ValueError: an empty path.
    NotADirectoryError: ``workdir`` (or a parent of it) is an existing regular file.
  """
  if not workdir:
    raise ValueError("workdir must be a non-empty path.")
  path = os.path.abspath(os.fspath(workdir))
  parent = path
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if parent and not os.path.isdir(parent):
    what = "is" if parent == path else f"is inside {parent!r}, which is"
    raise NotADirectoryError(
      f"workdir {path!r} {what} an existing file, not a directory. Pass a directory (it is "
      "created if missing) for the checkpoints, metrics and plots."
    )
  os.makedirs(path, exist_ok=True)
  return path


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as indented JSON, atomically (a temporary file, then a rename)."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def truncate_jsonl(path: str, max_step: int) -> int:
  """Drops records with ``step > max_step`` (written after the checkpoint we resume from).

  Returns:
    The number of records dropped (lines cut by a crash included).
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


class RunRecord:
  """The config a workdir's run was started with, and the changes allowed since.

  Args:
    workdir: the run's directory.
    ckpt: its checkpoint manager (the checkpoint's config is the record when an older
      workdir has no ``config.json``).
  """

  def __init__(self, workdir: str, ckpt: sj.checkpoint.CheckpointManager):
    self.config_path = os.path.join(workdir, CONFIG_JSON)
    self.changes_path = os.path.join(workdir, CONFIG_CHANGES)
    self.ckpt = ckpt

  def recorded(self) -> dict[str, Any] | None:
    """The config in force: ``config.json`` plus the recorded changes (None: a new run)."""
    if os.path.exists(self.config_path):
      with open(self.config_path, encoding="utf-8") as f:
        config = json.load(f)
    elif self.ckpt.latest_step() is not None:
      config = self.ckpt.read_config()
      if config is None:
        return None
    else:
      return None
    if os.path.exists(self.changes_path):
      for rec in sj.metrics.read_jsonl(self.changes_path):
        config = config_lib.apply_changes(config, {k: v["to"] for k, v in rec["changes"].items()})
    return config

  def check(
    self, config: ml_collections.ConfigDict, allow_change: bool
  ) -> dict[str, tuple[Any, Any]]:
    """The fields in which ``config`` differs from the record (bookkeeping fields excepted).

    Raises:
      ConfigChangedError: a difference, unless ``allow_change``; nothing is written.
    """
    recorded = self.recorded()
    if recorded is None:
      return {}
    changes = config_lib.config_changes(recorded, config.to_dict())
    if changes and not allow_change:
      listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
      raise ConfigChangedError(
        f"workdir {os.path.dirname(self.config_path)!r} holds a run started with another "
        f"config; differing fields: {listed}. Resuming would continue the checkpoint's "
        "training under the new values and misreport the run. Use a new --workdir, or "
        "pass --allow_config_change (train_and_evaluate(..., allow_config_change=True)) to "
        f"resume anyway; the change is then recorded in {CONFIG_CHANGES}."
      )
    if changes:
      logging.warning("Resuming with a changed config (allowed): %s", sorted(changes))
    return changes

  def write(self, config: ml_collections.ConfigDict, step: int, changes: Mapping) -> bool:
    """Writes ``config.json`` for a new run, or appends allowed ``changes``.

    Returns:
      True when ``config.json`` was written (a new run).
    """
    if not os.path.exists(self.config_path):
      write_json(self.config_path, config.to_dict())
      return True
    if changes:
      rec = {"step": step, "changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()}}
      with open(self.changes_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, default=str) + "\n")
    return False


def restore(ckpt: sj.checkpoint.CheckpointManager, defs, mstate, ostate, ever, train_iter, window):
  """Restores the latest checkpoint, if any, into the run's flat states.

  The arrays are read straight into the shardings of the given states (on a mesh, each
  process reads only its shards).

  Args:
    ckpt: the run's checkpoint manager.
    defs: the states' structure (``steps.StateDefs``).
    mstate: the model's state leaves (the restore target).
    ostate: the optimizer's state leaves.
    ever: the ever-active masks (a list of arrays).
    train_iter: the batch iterator (its position is restored).
    window: the run's :class:`~experiments.run_metrics.Window`.

  Returns:
    ``(step, mstate, ostate, ever, window)`` restored, or ``(None, ...)`` as given without a
    checkpoint.

  Raises:
    ValueError: a checkpoint of another model (naming paths and shapes).
    sparsejax.checkpoint.CorruptCheckpointError: a checkpoint that cannot be read.
  """
  if ckpt.latest_step() is None:
    stray = [n for n in os.listdir(ckpt.directory) if not n.startswith(".")]
    if stray:
      logging.warning(
        "Checkpoint directory %s has entries but no complete checkpoint (%s); they are "
        "left untouched and training starts from step 0.",
        ckpt.directory,
        ", ".join(sorted(stray)[:5]),
      )
    return None, mstate, ostate, ever, window
  target = {
    "model": jax.tree.unflatten(defs.model_tree, mstate),
    "optimizer": jax.tree.unflatten(defs.optimizer_tree, ostate),
    "step": 0,
    "data_state": train_iter.get_state(),
    "ever_active": ever,
    "train_accum": window.state(),
  }
  restored, _ = ckpt.restore(target)  # raises on mismatch / corruption.
  train_iter.set_state({k: int(v) for k, v in restored["data_state"].items()})
  step = int(restored["step"])
  say(f"Resumed from checkpoint step {step} in {ckpt.directory}.")
  window = run_metrics.Window.from_state(restored["train_accum"])
  mstate, ostate = jax.tree.leaves(restored["model"]), jax.tree.leaves(restored["optimizer"])
  return step, mstate, ostate, list(restored["ever_active"]), window


def save(
  ckpt: sj.checkpoint.CheckpointManager,
  config: ml_collections.ConfigDict,
  step: int,
  *,
  model: Any,
  optimizer: Any,
  data_state: Mapping[str, int],
  ever: list[Any],
  window: run_metrics.Window,
) -> None:
  """Saves the checkpoint that :func:`restore` reads (with the config).

  Args:
    ckpt: the run's checkpoint manager.
    config: the run's config (stored with the checkpoint).
    step: the number of completed steps.
    model: ``nnx.state(model)``.
    optimizer: ``nnx.state(optimizer)`` (masks, DST count and key inside).
    data_state: the batch iterator's position.
    ever: the ever-active masks.
    window: the metric window (so a resumed run writes the same records).
  """
  state = {
    "model": model,
    "optimizer": optimizer,
    "step": step,
    "data_state": data_state,
    "ever_active": ever,
    "train_accum": window.state(),
  }
  ckpt.save(step, state, config=config.to_dict(), force=True)


def truncate_metrics(workdir: str, step: int | None) -> None:
  """Drops metric records after ``step`` (all of them for a fresh start, ``None``)."""
  for name in ("metrics.jsonl", "topology.jsonl"):
    n = truncate_jsonl(os.path.join(workdir, name), -1 if step is None else step)
    if n:
      say(f"Dropped {n} record(s) after step {step or 0} from {name}.")


def write_plots(workdir: str) -> None:
  """PNG plots of the run in ``<workdir>/plots`` (skipped if matplotlib is missing)."""
  if importlib.util.find_spec("matplotlib") is None:
    logging.warning(
      "Plots skipped: matplotlib is not installed (pip install 'sparsejax[experiments]')."
    )
    return
  from experiments import plot as plot_lib  # pylint: disable=g-import-not-at-top

  paths = plot_lib.write_run_plots(workdir)
  say(f"Wrote {len(paths)} plot(s) to {os.path.join(workdir, 'plots')}.")
