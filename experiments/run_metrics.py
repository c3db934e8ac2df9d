"""The records a run writes: train windows, evaluation, mask topology and turnover.

Every function here works on host values (NumPy arrays, Python numbers) that the training
loop fetched from the device; none knows which method produced the masks. The keys are
documented in ``experiments/train.py``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from absl import logging

import sparsejax as sj


def say(msg: str) -> None:
  """absl INFO under absl.app (visible there), else print (notebooks, tests)."""
  if logging.level_info():
    logging.info(msg)
  else:
    print(msg, flush=True)


@dataclasses.dataclass
class Window:
  """Host-side sums since the last train record and the last topology record.

  Checkpointed with the run (:meth:`state`), so a resumed run writes the same records as
  an uninterrupted one.

  Attributes:
    loss_sum: sum of the train losses since the last train record.
    correct: correctly classified train examples since the last train record.
    count: steps since the last train record.
    grown: per sparse layer, weights that became active since the last topology record
      (length at least 1: orbax cannot save empty arrays).
  """

  loss_sum: float
  correct: int
  count: int
  grown: np.ndarray

  @classmethod
  def empty(cls, num_layers: int) -> Window:
    """A window with nothing in it, for a run with ``num_layers`` sparse layers."""
    return cls(0.0, 0, 0, np.zeros(max(1, num_layers), np.int64))

  @classmethod
  def from_state(cls, state: Mapping[str, Any]) -> Window:
    """The window saved by :meth:`state` (values restored from a checkpoint)."""
    return cls(
      float(state["loss_sum"]),
      int(state["correct"]),
      int(state["count"]),
      np.array(state["grown"], np.int64),
    )

  def reset_train(self) -> None:
    """Starts a new train window (after a train record)."""
    self.loss_sum, self.correct, self.count = 0.0, 0, 0

  def reset_grown(self) -> None:
    """Starts a new topology window (after a topology record)."""
    self.grown[:] = 0

  def state(self) -> dict[str, Any]:
    """A checkpointable dict."""
    return {
      "loss_sum": self.loss_sum,
      "correct": self.correct,
      "count": self.count,
      "grown": self.grown,
    }


class StepOutputs:
  """The train step's device outputs, summed into a :class:`Window` when flushed.

  Fetching an output from the device waits for its step; buffering them lets the host run
  ahead of the device between log steps.

  Args:
    window: the window the outputs are added to.
    num_layers: the number of sparse layers (rows of the step's ``grown_nnz``).
  """

  def __init__(self, window: Window, num_layers: int):
    self.window = window
    self.num_layers = num_layers
    self.pending: list[dict[str, jax.Array]] = []
    self.nnz = np.zeros(num_layers, np.int64)  # per layer, before the last flushed step

  def append(self, out: dict[str, jax.Array]) -> None:
    """Buffers one step's outputs (``loss``, ``correct``, ``grown_nnz``)."""
    self.pending.append(out)

  def flush(self) -> None:
    """Fetches the buffered outputs and adds them to the window, in step order."""
    if not self.pending:
      return
    w, n = self.window, self.num_layers
    for out in jax.device_get(self.pending):
      w.loss_sum += float(out["loss"])
      w.correct += int(out["correct"])
      w.count += 1
      if n:
        w.grown[:n] += out["grown_nnz"][:, 0]
        self.nnz = np.asarray(out["grown_nnz"][:, 1], np.int64)
    self.pending = []


def train_record(window: Window, batch_size: int, learning_rate: float) -> dict[str, float]:
  """``train/loss``, ``train/accuracy`` (means over the window) and ``learning_rate``."""
  n = max(window.count, 1)
  return {
    "train/loss": window.loss_sum / n,
    "train/accuracy": window.correct / (n * batch_size),
    "learning_rate": learning_rate,
  }


def turnover(paths: Sequence[str], grown: np.ndarray, nnz: np.ndarray) -> dict[str, float]:
  """``dst/turnover`` and ``dst/turnover/<layer>``: grown weights over active weights."""
  grown, nnz = np.asarray(grown)[: len(paths)], np.asarray(nnz)
  out = {
    f"dst/turnover/{p}": float(g) / n if n else 0.0
    for p, g, n in zip(paths, grown.tolist(), nnz.tolist(), strict=True)
  }
  total = int(nnz.sum())
  out["dst/turnover"] = float(grown.sum()) / total if total else 0.0
  return out


def topology_record(
  paths: Sequence[str],
  masks: Sequence[np.ndarray],
  ever_active: Sequence[np.ndarray],
) -> tuple[dict[str, Any], dict[str, list[int]]]:
  """The topology of the current masks.

  Args:
    paths: the sparse layers' paths.
    masks: their current masks (host arrays).
    ever_active: per layer, the OR of every mask so far.

  Returns:
    ``(record, fan_in)``: the record has ``dst/ever_active``, ``fan_in/<layer>/{min,max,
    mean}`` and ``active_neurons/<layer>``; ``fan_in`` is the per-neuron fan-in vector of
    every layer with ``ndim >= 2`` (for ``topology.jsonl``).
  """
  tree = dict(zip(paths, masks, strict=True))
  ever = sj.metrics.ever_active_fraction(dict(zip(paths, ever_active, strict=True)))
  rec: dict[str, Any] = {"dst/ever_active": sj.metrics.to_scalars(ever)["total"]}
  for p, st in sj.metrics.fan_in_stats(tree).items():
    rec[f"fan_in/{p}/min"] = int(st["min"])
    rec[f"fan_in/{p}/max"] = int(st["max"])
    rec[f"fan_in/{p}/mean"] = float(st["mean"])
    rec[f"active_neurons/{p}"] = int(st["active_neurons"])
  fan_in = {
    p: np.asarray(m).reshape(-1, m.shape[-1]).sum(0).tolist()
    for p, m in tree.items()
    if np.ndim(m) >= 2
  }
  return rec, fan_in


def append_fan_in(path: str, step: int, fan_in: Mapping[str, list[int]]) -> None:
  """Appends ``{"step", "fan_in"}`` to ``topology.jsonl``."""
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps({"step": step, "fan_in": dict(fan_in)}) + "\n")


def mask_sparsities(paths: Sequence[str], masks: Sequence[np.ndarray]) -> dict[str, Any]:
  """``sparsity/<layer>``, ``sparsity/total`` and ``nnz/total`` of the masks."""
  summary = sj.metrics.to_scalars(sj.metrics.mask_summary(dict(zip(paths, masks, strict=True))))
  rec = {f"sparsity/{p}": summary[f"{p}/sparsity"] for p in paths}
  rec["sparsity/total"] = summary["total/sparsity"]
  rec["nnz/total"] = summary["total/nnz"]
  return rec


def global_sparsity(params: Any) -> float:
  """Fraction of exactly-zero entries over all params (host arrays)."""
  leaves = jax.tree.leaves(params)
  size = sum(int(np.size(x)) for x in leaves)
  nnz = sum(int(np.count_nonzero(x)) for x in leaves)
  return 1.0 - nnz / size if size else 0.0


def eval_record(
  loss: float,
  accuracy: float,
  params: Mapping[str, np.ndarray],
  masks: Mapping[str, np.ndarray] | None,
  positions: Mapping[str, int],
) -> dict[str, Any]:
  """The evaluation record.

  Args:
    loss: test loss.
    accuracy: test accuracy.
    params: the weights the forward pass uses, by path (host arrays).
    masks: the sparse layers' masks by path, or ``None`` for a dense run.
    positions: the model's ``kernel_positions()`` (for the FLOPs estimate).

  Returns:
    ``eval/loss``, ``eval/accuracy``, ``sparsity/*``, ``nnz/total`` (sparse runs),
    ``sparsity/global`` and ``flops/{dense,sparse,ratio}``.
  """
  rec: dict[str, Any] = {"eval/loss": float(loss), "eval/accuracy": float(accuracy)}
  if masks is not None:
    rec.update(mask_sparsities(list(masks), list(masks.values())))
  else:
    rec["sparsity/total"] = 0.0
  rec["sparsity/global"] = global_sparsity(dict(params))
  flops = sj.metrics.estimate_flops(dict(params), None if masks is None else dict(masks), positions)
  rec.update({"flops/dense": flops["dense"], "flops/sparse": flops["sparse"]})
  rec["flops/ratio"] = flops["ratio"]
  return rec


def final_weight_sparsity(
  params: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray] | None
) -> dict[str, float]:
  """``final/weight_sparsity/<layer>``: zeros in the weights the forward pass uses.

  Reported for the sparse layers of a sparse run and for every kernel of a dense run.
  """
  out = {}
  for p, leaf in params.items():
    if (masks is not None and p in masks) or (masks is None and np.ndim(leaf) > 1):
      out[f"final/weight_sparsity/{p}"] = 1.0 - np.count_nonzero(leaf) / leaf.size
  return out


# --------------------------------------------------------------------------------------
# Records of a run's device state.
# --------------------------------------------------------------------------------------


class _State(Protocol):
  """What :class:`Recorder` reads of the training loop's state (``train.TrainState``)."""

  mstate: list[jax.Array]
  ostate: list[jax.Array]
  ever: list[jax.Array]
  step: int
  window: Window


@dataclasses.dataclass(frozen=True)
class Recorder:
  """Turns a run's device state into records, through the run's jitted readers.

  Attributes:
    masks_fn: ``(mstate, ostate) -> masks`` of the sparse layers.
    weights_fn: ``(mstate, ostate) -> leaves`` of the weights the forward pass uses.
    eval_fn: ``(mstate, ostate, x, y) -> (loss, accuracy)``.
    mask_paths: the sparse layers' paths (empty for a dense run).
    param_paths: the paths of the ``weights_fn`` leaves.
    positions: the model's ``kernel_positions()``.
    drop_fraction: per update count, the drop fraction in force (None: the method has
      none).
    sparse: whether the run is sparse.
    topology_path: ``<workdir>/topology.jsonl``.
    target_sparsity: per update count, the sparsity schedule's target (None: the method
      has no sparsity schedule).
    fetch: gathers device arrays to the host (on a multi-process mesh, through a
      replicated copy); ``""`` as ``topology_path`` writes no file (processes other than 0).
  """

  masks_fn: Callable[..., Any]
  weights_fn: Callable[..., Any]
  eval_fn: Callable[..., Any]
  mask_paths: tuple[str, ...]
  param_paths: tuple[str, ...]
  positions: Mapping[str, int]
  drop_fraction: np.ndarray | None
  sparse: bool
  topology_path: str
  target_sparsity: np.ndarray | None = None
  fetch: Callable[[Any], Any] = jax.device_get

  def topology(self, state: _State, turnover: Mapping[str, float] | None = None) -> dict:
    """A topology record of the current masks (also appended to ``topology.jsonl``).

    It has the masks' ``sparsity/<layer>`` and ``sparsity/total`` (the mask history that
    training FLOPs are computed from); at step 0 also ``flops/dense/<layer>``, the dense
    forward FLOPs per example of every kernel.
    """
    masks = jax.device_get(self.masks_fn(state.mstate, state.ostate))
    rec, fan_in = topology_record(self.mask_paths, masks, self.fetch(state.ever))
    if self.topology_path:
      append_fan_in(self.topology_path, state.step, fan_in)
    rec.update(mask_sparsities(self.mask_paths, masks))
    rec.pop("nnz/total")
    if state.step == 0:
      rec.update(self.dense_layer_flops(state))
    return {**(turnover or {}), **rec}

  def dense_layer_flops(self, state: _State) -> dict[str, int]:
    """``flops/dense/<layer>``: dense forward FLOPs per example of every kernel."""
    weights = jax.device_get(self.weights_fn(state.mstate, state.ostate))
    params = dict(zip(self.param_paths, weights, strict=True))
    layers = sj.metrics.estimate_flops(params, None, self.positions)["layers"]
    return {f"flops/dense/{p}": int(v["dense"]) for p, v in layers.items()}

  def mask_change(self, state: _State, nnz: np.ndarray, scheduled: bool) -> dict[str, Any]:
    """The record after a scheduled update or a mask change; starts a new topology window.

    Args:
      state: the loop's state (its window holds the weights grown since the last record).
      nnz: the active weights per sparse layer (before the last step).
      scheduled: whether the last step was a scheduled mask update (then the record has
        the drop fraction in force, for methods with one).
    """
    rec = turnover(self.mask_paths, state.window.grown, nnz)
    if scheduled:
      rec["dst/update_step"] = state.step - 1
    if scheduled and self.drop_fraction is not None:
      rec["dst/drop_fraction"] = float(self.drop_fraction[state.step - 1])
    if scheduled and self.target_sparsity is not None:
      rec["dst/target_sparsity"] = float(self.target_sparsity[state.step - 1])
    state.window.reset_grown()
    return self.topology(state, rec)

  def evaluate(self, state: _State, batches: Iterable[tuple[jax.Array, ...]]):
    """``(record, forward weights by path, masks by path or None)`` of the current state.

    ``batches`` are the placed ``(x, y, weight)`` evaluation batches; the loss and the
    accuracy are weighted means over all of them (padding rows weigh 0).
    """
    totals = np.zeros(3)
    for batch in batches:
      totals += np.asarray(jax.device_get(self.eval_fn(state.mstate, state.ostate, *batch)))
    loss, accuracy = totals[0] / totals[2], totals[1] / totals[2]
    weights = jax.device_get(self.weights_fn(state.mstate, state.ostate))
    params = dict(zip(self.param_paths, weights, strict=True))
    masks = None
    if self.sparse:
      host_masks = jax.device_get(self.masks_fn(state.mstate, state.ostate))
      masks = dict(zip(self.mask_paths, host_masks, strict=True))
    return eval_record(loss, accuracy, params, masks, self.positions), params, masks
