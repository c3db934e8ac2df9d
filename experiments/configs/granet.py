r"""GraNet on MNIST-1D (Liu et al. 2021): gradual magnitude pruning plus gradient regrowth.

The GMP schedule of ``gmp.py`` (dense start, cubic to 90% ERK at 75% of training, every 100
steps) and, at every update, zero-cost neuroregeneration: a further ``drop_fraction`` of
each layer's weights dropped by |w| and as many regrown by |dense gradient|
(``sparsejax.granet``). As in GraNet's code, the regeneration fraction starts at 0.5
(``prune-rate``), decays with a cosine, and regeneration continues after the pruning ends,
to the end of training (``dst.regrow_end_fraction`` = 1). Launch::

  python -m experiments.main --config experiments/configs/granet.py --workdir /tmp/sparsejax_granet

Smoke run (seconds)::

  python -m experiments.main --config experiments/configs/granet.py:smoke --workdir /tmp/sparsejax_granet_smoke

GraNet's global pruning: ``--config.dst.distribution=global``.
"""

import ml_collections

from experiments.configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the GraNet config; ``arg`` names presets (``"smoke"``)."""
  config = default.get_config(arg, method="granet")
  config.dst.initial_sparsity = 0.0
  config.dst.power = 3.0
  config.dst.drop_fraction = 0.5
  config.dst.regrow_end_fraction = 1.0
  return config
