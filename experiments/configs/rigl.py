r"""RigL on MNIST-1D: magnitude drop, gradient regrowth (Evci et al., 2020), ERK, 90% sparse.

The README's main job: about a minute on 2 CPU cores including dataset generation and
compilation; prints progress and the final test accuracy, writes metrics.jsonl, checkpoints
and plots to the workdir.

Launch::

  python -m experiments.main --config experiments/configs/rigl.py --workdir /tmp/sparsejax_rigl

Smoke run (seconds)::

  python -m experiments.main --config experiments/configs/rigl.py:smoke --workdir /tmp/sparsejax_rigl_smoke
"""

import ml_collections

from experiments.configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the rigl config; arg names presets ("smoke")."""
  config = default.get_config(arg, method="rigl")
  return config
