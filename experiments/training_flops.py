"""Training FLOPs of a run relative to dense training, from the run's recorded mask history.

The count follows Evci et al. 2020 (RigL, arXiv:1911.11134, appendix H). Let ``F_l`` be
the dense forward FLOPs per example of kernel ``l`` and ``d_l(t)`` the density of its mask
at step ``t`` (1 for a dense layer). A training step is three products per layer: the
forward pass, the gradient w.r.t. the activations and the gradient w.r.t. the weights, each
costing ``d_l(t)·F_l`` when the masks are exploited, so dense training costs ``3·Σ F_l``
per example and step. On top of that:

* a step whose method needs the **dense gradient** computes the weight gradient of every
  sparse layer densely: ``F_l`` instead of ``d_l(t)·F_l`` for that product. RigL, SRigL
  (whose neuron ablation reads the same gradient) and GraNet (gradient regrowth) pay it on
  their scheduled mask updates (every ``update_every`` steps); SR-STE on every step (its
  gradient is dense by construction);
* **SNIP** pays one dense forward and backward pass (``3·Σ F_l``) at initialization;
* **GMP and GraNet** start dense and their density falls along the schedule: the history
  says how much each step costs. Their pruning is by ``|w|`` and costs nothing.

Mask-update bookkeeping (top-k, sorting) is ignored, as in the paper; so are biases and
activations. Batch size cancels in the ratio. A mask recorded at step ``s`` (the number of
completed steps) is the mask the steps ``s, s+1, …`` use, until the next record; an update
at count ``t`` is recorded at ``s = t + 1``, so step ``t`` itself still ran on the old mask.

:func:`training_flops` is the arithmetic; :func:`run_training_flops` reads a run's
``config.json`` and ``metrics.jsonl`` (``flops/dense/<layer>`` at step 0,
``sparsity/<layer>`` at every topology and eval record, ``dst/update_step`` at every
scheduled update) and applies it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections

import sparsejax as sj
from experiments import builders, config_lib


def training_flops(
  layer_flops: Mapping[str, float],
  densities: Sequence[tuple[int, Mapping[str, float]]],
  num_steps: int,
  *,
  dense_grad_steps: Iterable[int] = (),
  dense_grad_every_step: bool = False,
  dense_init_steps: float = 0.0,
) -> dict[str, float]:
  """Training FLOPs per example of a run, and their ratio to dense training.

  Args:
    layer_flops: ``{layer: F_l}``, the dense forward FLOPs per example of every kernel.
    densities: ``(step, {layer: density})`` records, ascending in step; each holds from its
      step until the next record. Layers missing from a record, and every step before the
      first record, count as dense.
    num_steps: the number of training steps.
    dense_grad_steps: the steps (0-based counts) that compute the dense weight gradient.
    dense_grad_every_step: every step computes the dense weight gradient (SR-STE).
    dense_init_steps: dense forward-backward passes before training (SNIP: 1).

  Returns:
    ``{"dense": 3·ΣF_l·num_steps, "sparse": the run's FLOPs, "ratio": sparse / dense}``.
  """
  steps = [int(s) for s, _ in densities]
  if steps != sorted(steps):
    raise ValueError(f"`densities` must be in ascending step order; got steps {steps}.")
  total = float(sum(layer_flops.values()))
  grad_steps = sorted({int(t) for t in dense_grad_steps if 0 <= int(t) < num_steps})
  bounds = [(0, {})] + [(min(max(int(s), 0), num_steps), dict(d)) for s, d in densities]
  sparse = 0.0
  for i, (start, dens) in enumerate(bounds):
    end = bounds[i + 1][0] if i + 1 < len(bounds) else num_steps
    if end <= start:
      continue
    # fwd + dX + dW at the mask's density; dW dense where the dense gradient is computed.
    fwd = sum(f * dens.get(layer, 1.0) for layer, f in layer_flops.items())
    n_grad = end - start if dense_grad_every_step else _count_in(grad_steps, start, end)
    sparse += (end - start) * 3.0 * fwd + n_grad * (total - fwd)
  sparse += 3.0 * total * float(dense_init_steps)
  dense = 3.0 * total * num_steps
  return {"dense": dense, "sparse": sparse, "ratio": sparse / dense if dense else 1.0}


def _count_in(sorted_steps: Sequence[int], start: int, end: int) -> int:
  return sum(1 for t in sorted_steps if start <= t < end)


def run_config(run_dir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with: ``config.json`` plus the allowed changes."""
  with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  changes_path = os.path.join(run_dir, "config_changes.jsonl")
  if os.path.exists(changes_path):
    for rec in sj.metrics.read_jsonl(changes_path):
      config = config_lib.apply_changes(config, {k: v["to"] for k, v in rec["changes"].items()})
  return ml_collections.ConfigDict(config_lib.with_defaults(config))


def cost_rule(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the run's method computes beyond its masks (see the module docstring).

  Returns:
    ``{"dense_grad_on_updates": bool, "dense_grad_every_step": bool, "dense_init_steps":
    float}``.
  """
  d = config.dst
  grow = builders.grow_criterion(config)
  return {
    "dense_grad_on_updates": grow is not None and grow not in builders.GRADIENT_FREE_GROW,
    "dense_grad_every_step": d.method == "nm_sr_ste",
    "dense_init_steps": 1.0 if d.init == "snip" else 0.0,
  }


def run_training_flops(run_dir: str) -> dict[str, float]:
  """:func:`training_flops` of a finished run, from its workdir's records.

  Raises:
    FileNotFoundError: the workdir has no ``config.json`` or ``metrics.jsonl``.
    ValueError: a sparse run without the step-0 ``flops/dense/<layer>`` record (written by
      the driver since issue 16).
  """
  config = run_config(run_dir)
  records = sj.metrics.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
  num_steps = int(config.num_train_steps)
  if config.dst.method == "dense":
    return {"dense": 1.0, "sparse": 1.0, "ratio": 1.0}
  first = next((r for r in records if r["step"] == 0 and _layer_flops(r)), None)
  if first is None:
    raise ValueError(
      f"{run_dir}: no step-0 record with flops/dense/<layer>; rerun it with this driver."
    )
  layer_flops = _layer_flops(first)
  densities = []
  for r in records:
    dens = {
      layer: 1.0 - float(r[f"sparsity/{layer}"])
      for layer in layer_flops
      if f"sparsity/{layer}" in r
    }
    if dens:
      densities.append((int(r["step"]), dens))
  rule = cost_rule(config)
  grad_steps = ()
  if rule["dense_grad_on_updates"]:
    grad_steps = [int(r["dst/update_step"]) for r in records if "dst/update_step" in r]
  return training_flops(
    layer_flops,
    sorted(densities, key=lambda x: x[0]),
    num_steps,
    dense_grad_steps=grad_steps,
    dense_grad_every_step=rule["dense_grad_every_step"],
    dense_init_steps=rule["dense_init_steps"],
  )


def _layer_flops(record: Mapping[str, Any]) -> dict[str, float]:
  prefix = "flops/dense/"
  return {k[len(prefix) :]: float(v) for k, v in record.items() if k.startswith(prefix)}
