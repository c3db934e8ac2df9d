r"""Static sparse training on MNIST-1D: a random ERK mask fixed for the whole run (90% sparse).

Launch::

  python -m experiments.main --config experiments/configs/static.py --workdir /tmp/sparsejax_static

Smoke run (seconds)::

  python -m experiments.main --config experiments/configs/static.py:smoke --workdir /tmp/sparsejax_static_smoke
"""

import ml_collections

from experiments.configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the static config; arg names presets ("smoke")."""
  config = default.get_config(arg, method="static")
  return config
