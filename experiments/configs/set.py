r"""SET on MNIST-1D: magnitude drop, random regrowth (Mocanu et al., 2018), ERK, 90% sparse.

Launch::

  python -m experiments.main --config experiments/configs/set.py --workdir /tmp/sparsejax_set

Smoke run (seconds)::

  python -m experiments.main --config experiments/configs/set.py:smoke --workdir /tmp/sparsejax_set_smoke
"""

import ml_collections

from experiments.configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the set config; arg names presets ("smoke")."""
  config = default.get_config(arg, method="set")
  return config
