r"""SRigL on MNIST-1D: RigL with constant fan-in and neuron ablation (Lasby et al., 2024).

Every active neuron keeps exactly ``k`` incoming weights (``structure="fan_in"``); neurons
whose salient-weight count is below ``gamma_sal`` times the sparse fan-in are ablated. Needs
``sparsejax.srigl``. Launch::

  python -m experiments.main --config experiments/configs/srigl.py --workdir /tmp/sparsejax_srigl

Smoke run (seconds)::

  python -m experiments.main --config experiments/configs/srigl.py:smoke --workdir /tmp/sparsejax_srigl_smoke
"""

import ml_collections

from experiments.configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the SRigL config; ``arg`` names presets (``"smoke"``)."""
  config = default.get_config(arg, method="srigl")
  config.dst.structure = "fan_in"
  config.dst.gamma_sal = 0.3
  return config
