r"""Dense baseline on MNIST-1D (1-D CNN, no sparsity).

Launch::

  python -m experiments.main --config experiments/configs/dense.py --workdir /tmp/sparsejax_dense

Smoke run (seconds)::

  python -m experiments.main --config experiments/configs/dense.py:smoke --workdir /tmp/sparsejax_dense_smoke
"""

import ml_collections

from experiments.configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the dense config; arg names presets ("smoke")."""
  config = default.get_config(arg, method="dense")
  return config
