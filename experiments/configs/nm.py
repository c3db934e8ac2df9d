r"""N:M (2:4) sparse training on MNIST-1D.

Default: RigL constrained to 2:4 groups along each kernel's contraction axis
(``method="rigl"``, ``structure="nm:2:4"``); the first convolution stays dense (its
contraction size, 5, is not a multiple of 4). Preset ``sr_ste`` switches to SR-STE
(``method="nm_sr_ste"``, Zhou et al. 2021: dense weights, N:M projected in every forward).
With another ``nm:N:M`` set ``config.dst.sparsity`` to ``1 - N/M`` (e.g. ``nm:1:4``:
``--config.dst.structure=nm:1:4 --config.dst.sparsity=0.75``).

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
  method = "nm_sr_ste" if "sr_ste" in presets else "rigl"
  config = default.get_config(",".join(sorted(presets & set(default.PRESETS))), method=method)
  config.dst.structure = "nm:2:4"
  # N:M fixes the sparsity of every sparse layer to 1 - N/M (no distribution applies);
  # config.dst.sparsity must say so: 0.5 for 2:4 (1 - n/m for --config.dst.structure=nm:n:m).
  config.dst.sparsity = 0.5
  config.dst.keep_first_dense = True
  return config
