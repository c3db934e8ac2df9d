r"""SNIP + static on MNIST-1D (Lee et al. 2019): prune at initialization, then train the mask.

One batch's gradient at the initial weights scores every weight by ``|g ⊙ w|``; each layer
keeps its top weights at its ERK sparsity (``sparsejax.prune(criterion="snip")``, per layer
as in google-research/rigl's SNIP), and the mask stays fixed (``method="static"``,
``dst.init="snip"``). The "SNIP" row of RigL's Table 1. ``dst.init`` works with every
method: ``--config experiments/configs/rigl.py --config.dst.init=snip`` starts RigL from
SNIP masks. Launch::

  python -m experiments.main --config experiments/configs/snip.py --workdir /tmp/sparsejax_snip

Smoke run (seconds)::

  python -m experiments.main --config experiments/configs/snip.py:smoke --workdir /tmp/sparsejax_snip_smoke
"""

import ml_collections

from experiments.configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the SNIP config; ``arg`` names presets (``"smoke"``)."""
  config = default.get_config(arg, method="static")
  config.dst.init = "snip"
  return config
