r"""Gradual magnitude pruning on MNIST-1D (Zhu & Gupta 2017): dense to 90% sparse, ERK.

Starts dense and prunes every layer by |w| every ``update_every`` = 100 steps from
``start_step`` = 0 to ``end_fraction`` = 75% of training so that its sparsity follows the
cubic schedule ``s_t = s_f (1 − (1 − (t − t0)/(t_end − t0))^3)`` (``dst.power`` = 3,
``dst.initial_sparsity`` = 0; ``sparsejax.gmp``), then holds the masks for the last 25%
(as RigL's ``T_end``). The "Pruning" baseline of RigL's Table 1. Launch::

  python -m experiments.main --config experiments/configs/gmp.py --workdir /tmp/sparsejax_gmp

Smoke run (seconds)::

  python -m experiments.main --config experiments/configs/gmp.py:smoke --workdir /tmp/sparsejax_gmp_smoke

Global magnitude pruning (one threshold across layers): ``--config.dst.distribution=global``.
"""

import ml_collections

from experiments.configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the GMP config; ``arg`` names presets (``"smoke"``)."""
  config = default.get_config(arg, method="gmp")
  config.dst.initial_sparsity = 0.0
  config.dst.power = 3.0
  return config
