"""Shared by the published-setup configs (``resnet50_imagenet.py``, ``resnet18_cifar10.py``,
``vit_s16_imagenet.py``); not a config itself.

:func:`base` is the default config with the fields every large run sets (data parallel over
all devices and processes, checkpoints every N steps, no plots of a long run's per-step
records); :func:`apply_smoke` is their ``smoke`` preset: the same model and recipe for 3 steps
on a few tiny images (one mask update at step 1), as the tests run them on synthetic
records.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import default

PRESETS = ("smoke",)


def base(method: str) -> ml_collections.ConfigDict:
  """The default config for a large run of ``method`` (data parallel over every device)."""
  config = default.get_config(None, method=method)
  config.mesh.data = -1  # every device of every process; params replicated
  config.mesh.min_shard_size = 2**14
  config.async_checkpointing = True
  config.max_checkpoints_to_keep = 3
  config.progress_every_secs = 60.0
  config.write_plots = False
  config.data.num_workers = 16
  config.data.num_threads = 16
  return config


def apply_smoke(config: ml_collections.ConfigDict) -> None:
  """3 steps of the config's model on 32×32 images, global batch 8 (tests, dry runs)."""
  config.data.image_size = 32
  config.data.num_workers = 0
  config.data.num_threads = 2
  config.batch_size = 8
  config.eval_batch_size = 16
  config.num_train_steps = 3
  config.warmup_steps = 1
  from experiments import builders  # pylint: disable=g-import-not-at-top

  if "update_every" in builders.METHODS[config.dst.method].fields:
    config.dst.update_every = 1  # a mask update at step 1 (end_fraction rounds the end to 2)
  config.log_every_steps = 1
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
  config.progress_every_secs = 0.0
  config.progress_every_steps = 1
