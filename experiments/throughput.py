r"""Expected throughput of a config from a dry FLOP count (nothing allocated, no data, no compile).

The count is the arithmetic of RigL's appendix H: a kernel applied at ``p`` positions per
example costs ``2·p·size`` forward FLOPs (multiply and add), plus the FLOPs no kernel holds
(a ViT's attention products, ``model.extra_flops()``); a training step is three such products
per layer (forward, gradient w.r.t. the activations, gradient w.r.t. the weights), so
``3 × forward × batch``. Masked dense training (what sparsejax runs on GPUs and TPUs) costs
the dense count whatever the sparsity; the sparse count is what kernels exploiting the
sparsity would cost (reported for reference, as RigL's "FLOPs" columns). Mask updates
(every ``update_every`` steps) and the optimizer are ignored.

Expected step time = dense FLOPs per step / (devices × peak FLOP/s per device × MFU), with
the accelerator's peak for float32 models (:data:`ACCELERATORS`) and an assumed model FLOPs
utilisation (default 0.4, optimistic for ResNets, whose batch norms and input pipeline
usually hold them nearer 0.25; measure yours: ``perf/steps_per_sec`` in ``metrics.jsonl``).

  python -m experiments.throughput --config experiments/configs/resnet50_imagenet.py \
      --devices 64 --accelerator tpu_v4
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

import sparsejax as sj
from experiments import builders, config_lib, input_pipeline

#: Peak dense FLOP/s per device for the experiments' float32 models: TF32 tensor cores on
#: NVIDIA GPUs (JAX's default matmul precision there), bf16 passes on TPUs (the MXU's default
#: for float32). NVIDIA and Google Cloud datasheet figures, without structured sparsity.
ACCELERATORS = {
  "a100": 156e12,
  "h100": 495e12,
  "h200": 495e12,
  "tpu_v4": 275e12,
  "tpu_v5e": 197e12,
  "tpu_v5p": 459e12,
  "tpu_v6e": 918e12,
}


#: Per-example input shape and classes of the in-memory datasets.
_IN_MEMORY = {"mnist1d": ((40,), 10), "digits": ((8, 8), 10), "teacher_student": ((32,), 10)}


def _input(config: ml_collections.ConfigDict) -> tuple[tuple[int, ...], int]:
  if config.dataset in input_pipeline.DATASETS:
    size = int(config.data.image_size)
    return (size, size, 3), input_pipeline.DATASETS[config.dataset][2]
  return _IN_MEMORY[config.dataset]


def flop_count(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Forward FLOPs per example (dense and at the config's sparsity) and per training step.

  Returns:
    ``{"params", "forward_dense", "forward_sparse", "step_dense", "step_sparse",
    "layers": {kernel: {"positions", "size", "sparsity"}}}`` (FLOPs as floats).
  """
  config = config_lib.validate_config(config)
  shape, classes = _input(config)
  create = builders.model_factory(config, shape, classes)
  model = nnx.eval_shape(create)
  positions = model.kernel_positions()
  params = nnx.state(model, nnx.Param)
  leaves = dict(sj.metrics.sparse_leaves(params))
  num_steps = int(config.num_train_steps)
  tx = builders.build_transformation(
    config, num_steps, builders.learning_rate_schedule(config, num_steps), list(positions)
  )
  sparsity = {}
  if isinstance(tx, sj.SparseTransformation):
    sparsity = {leaf.path: leaf.sparsity or 0.0 for leaf in tx.plan(params).leaves}
  extra = float(getattr(model, "extra_flops", lambda: 0)())
  layers, dense, sparse = {}, extra, extra
  for path, n in positions.items():
    size = math.prod(leaves[path].shape)
    s = float(sparsity.get(path, 0.0))
    layers[path] = {"positions": int(n), "size": int(size), "sparsity": s}
    dense += 2.0 * n * size
    sparse += 2.0 * n * size * (1.0 - s)
  batch = int(config.batch_size)
  return {
    "params": int(sum(math.prod(x.shape) for x in leaves.values())),
    "forward_dense": dense,
    "forward_sparse": sparse,
    "step_dense": 3.0 * dense * batch,
    "step_sparse": 3.0 * sparse * batch,
    "layers": layers,
  }


def expected_step_time(step_flops: float, devices: int, peak: float, mfu: float = 0.4) -> float:
  """Seconds per step of ``step_flops`` on ``devices`` at ``mfu`` of ``peak`` FLOP/s each."""
  if devices < 1 or peak <= 0 or not 0 < mfu <= 1:
    raise ValueError(f"devices >= 1, peak > 0 and 0 < mfu <= 1; got {devices}, {peak}, {mfu}.")
  return step_flops / (devices * peak * mfu)


def report(config: ml_collections.ConfigDict, devices: int, accelerator: str, mfu: float) -> str:
  """The dry count and the expected throughput as text."""
  if accelerator not in ACCELERATORS:
    raise ValueError(
      f"--accelerator must be one of {', '.join(ACCELERATORS)}; got {accelerator!r}."
    )
  c = flop_count(config)
  t = expected_step_time(c["step_dense"], devices, ACCELERATORS[accelerator], mfu)
  steps, batch = int(config.num_train_steps), int(config.batch_size)
  return "\n".join(
    [
      f"model {config.model}: {c['params'] / 1e6:.2f}M params; method {config.dst.method}",
      f"forward FLOPs per example: dense {c['forward_dense']:.4g}, at the config's sparsity "
      f"{c['forward_sparse']:.4g} ({c['forward_sparse'] / c['forward_dense']:.3f}×)",
      f"training FLOPs per step (batch {batch}): {c['step_dense']:.4g} masked dense, "
      f"{c['step_sparse']:.4g} if the sparsity were exploited",
      f"expected on {devices} × {accelerator} at MFU {mfu:g}: {t * 1e3:.3g} ms/step, "
      f"{batch / t:,.0f} examples/s, {steps} steps in {steps * t / 3600:.2f} h",
    ]
  )


_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file.", lock_config=True
)
_DEVICES = flags.DEFINE_integer("devices", 8, "Number of accelerator devices (all hosts).")
_ACCELERATOR = flags.DEFINE_enum("accelerator", "a100", list(ACCELERATORS), "Accelerator.")
_MFU = flags.DEFINE_float("mfu", 0.4, "Assumed model FLOPs utilisation.")


def main(argv: Sequence[str]) -> None:
  del argv
  print(report(_CONFIG.value, _DEVICES.value, _ACCELERATOR.value, _MFU.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
