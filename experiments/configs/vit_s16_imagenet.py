r"""SRigL on ViT-S/16 / ImageNet with the SRigL paper's ViT recipe (Lasby et al., ICLR 2024).

**Target: none published.** No RigL or SRigL result for ViT-S/16 exists in the sources
collected for sparsejax (docs/SCALE.md). The nearest published numbers are SRigL's ViT-B/16
(150 epochs, uniform sparsity): **76.0%** top-1 at 90% with ablation (γ_sal = 0.95), 77.5% at
80%; RigL 76.4% / 77.9%; dense ViT-B/16 78.35% in that setup. A ViT-S/16 (22M parameters, a
quarter of ViT-B/16's) should land below those; run the ``dense`` preset for the reference.

Recipe (SRigL ``configs/training/vit.yaml``): batch 4096, 150 epochs, AdamW learning rate
3e-3 with cosine decay, weight decay 0.3, gradient clipping at global norm 1.0, 224×224
Inception crops. The warm-up is not given there: 10,000 steps, as the original ViT training
(an assumption). SRigL: uniform distribution, constant fan-in, ΔT = 100, drop fraction 0.3
with cosine decay, updates over the first 75% of training, γ_sal = 0.95, the head protected.
The class token and position embeddings stay dense (``experiments/vision_models.py``).

Launch (one host; multi-host with ``--distributed``, docs/SCALE.md)::

  python -m experiments.main --config experiments/configs/vit_s16_imagenet.py \
    --workdir /ckpt/srigl_vit_s16 --config.data.dir ~/tensorflow_datasets/imagenet2012/5.1.0

Smoke run (3 steps, 32×32 images = 2×2 patches)::

  python -m experiments.main --config experiments/configs/vit_s16_imagenet.py:smoke \
    --workdir /tmp/vit_smoke --config.data.dir /tmp/fake_imagenet
"""

import ml_collections

from experiments.configs import default, scale_common

TRAIN_EXAMPLES = 1_281_167
BATCH = 4096
EPOCHS = 150
TARGETS: dict[str, float] = {}  # no published ViT-S/16 DST number


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the ViT-S/16 ImageNet config; ``arg`` names presets (``smoke``, ``dense``)."""
  presets = default.parse_presets(arg, scale_common.PRESETS + ("dense",))
  config = scale_common.base("dense" if "dense" in presets else "srigl")
  config.dataset = "imagenet2012"
  config.data.image_size = 224
  config.model = "vit_s16"

  config.batch_size = BATCH
  config.num_train_steps = (TRAIN_EXAMPLES // BATCH) * EPOCHS
  config.optimizer = "adamw"
  config.learning_rate = 3e-3
  config.weight_decay = 0.3
  config.grad_clip_norm = 1.0
  config.lr_schedule = "cosine"
  config.warmup_steps = 10_000

  if "dense" not in presets:
    config.dst.sparsity = 0.9
    config.dst.distribution = "uniform"
    config.dst.structure = "fan_in"
    config.dst.update_every = 100
    config.dst.end_fraction = 0.75
    config.dst.drop_fraction = 0.3
    config.dst.drop_fraction_decay = "cosine"
    config.dst.gamma_sal = 0.95

  config.eval_batch_size = 2048
  config.log_every_steps = 100
  config.eval_every_steps = 3120  # every 10 epochs
  config.checkpoint_every_steps = 1000
  if "smoke" in presets:
    scale_common.apply_smoke(config)
  return config
