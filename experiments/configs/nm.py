r"""N:M (2:4) sparse training on MNIST-1D.

Default: RigL constrained to 2:4 groups along each kernel's contraction axis
(``method="rigl"``, ``structure="nm:2:4"``); the first convolution stays dense (its
contraction size, 5, is not a multiple of 4). Preset ``sr_ste`` switches to SR-STE
(``method="nm_sr_ste"``, Zhou et al. 2021), which needs ``sparsejax.nm_sr_ste``.

Launch::

  python -m experiments.main --config experiments/configs/nm.py --workdir /tmp/sparsejax_nm
  python -m experiments.main --config experiments/configs/nm.py:sr_ste --workdir /tmp/sparsejax_srste

Smoke runs (seconds)::

  python -m experiments.main --config experiments/configs/nm.py:smoke --workdir /tmp/sparsejax_nm_smoke
  python -m experiments.main --config experiments/configs/nm.py:sr_ste,smoke --workdir /tmp/sparsejax_srste_smoke
"""

import ml_collections

from experiments.configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the 2:4 config; ``arg`` names presets (``"smoke"``, ``"sr_ste"``)."""
  presets = default.parse_presets(arg, default.PRESETS + ("sr_ste",))
  config = default.get_config(",".join(sorted(presets & set(default.PRESETS))))
  config.dst.method = "nm_sr_ste" if "sr_ste" in presets else "rigl"
  config.dst.structure = "nm:2:4"
  config.dst.sparsity = 0.5  # implied by 2:4; every sparse layer is exactly 2:4.
  config.dst.distribution = "uniform"
  config.dst.keep_first_dense = True
  return config
