"""The SRigL-at-95% study (issue 16 item 7): why SRigL is far below RigL on MNIST-1D.

Every variant runs at 95% sparsity with the table's seeds, is one config file plus a few
overrides, and is compared with its RigL counterpart (same model, distribution and dense
layers) by the per-seed accuracy difference. :func:`plan` gives the runs (the table's own
``rigl`` and ``srigl`` runs are reused), :func:`section` the Markdown table; the
conclusions are written by hand in ``RESULTS.md`` below the table.

The variants answer one question each:

* does ablation ever fire, and does it help when it does? γ_sal ∈ {0.3 (config), 0.5, 0.9}
  relative to the sparse fan-in, 0.3 relative to the dense fan-in, and no ablation at all
  (γ_sal = 0.7 gives the same integer thresholds as 0.5 at this model's fan-ins, k = 2 and
  4, so it is not run);
* is it the first layer (fan-in 5, ERK gives it k = 2)? first layer dense, for both;
* is it ERK? uniform (first layer dense: at 95% uniform a fan-in-5 kernel cannot keep one
  weight per neuron), for both;
* both changes that help, together: γ_sal = 0.9 with the first layer dense;
* is it the model's width (the per-neuron fan-in k)? 128 and 256 channels instead of 64,
  for both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from experiments import results_markdown as md
from experiments.results_runs import Run

SPARSITY = 0.95
CONV_LAYERS = ("convs/0/kernel", "convs/1/kernel", "convs/2/kernel")
#: SRigL as issue 16 measured it (``configs/srigl.py`` then): every field the study varies
#: is pinned, so the study's runs stay what they are if the config file's defaults change.
SRIGL_BASE = (
  ("dst.gamma_sal", 0.3),
  ("dst.ablation_fan_in", "sparse"),
  ("dst.distribution", "erk"),
  ("dst.keep_first_dense", False),
)
_FIRST_DENSE = (("dst.keep_first_dense", True),)
_UNIFORM = (("dst.distribution", "uniform"), ("dst.keep_first_dense", True))
_WIDE = (("model_kwargs.cnn_channels", 128),)
_WIDER = (("model_kwargs.cnn_channels", 256),)


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the study.

  Attributes:
    tag: the run's tag (``""``: the config file's own table run).
    label: what the row shows.
    config_file: ``rigl`` or ``srigl``.
    changes: config overrides (on top of :data:`SRIGL_BASE` for ``srigl``).
    baseline: the ``tag`` of the ``rigl`` run it is compared with (``None``: none).
  """

  tag: str
  label: str
  config_file: str
  changes: tuple[tuple[str, Any], ...] = ()
  baseline: str | None = ""

  @property
  def overrides(self) -> tuple[tuple[str, Any], ...]:
    if self.config_file != "srigl":
      return self.changes
    return tuple(dict(SRIGL_BASE + self.changes).items())


VARIANTS: tuple[Variant, ...] = (
  Variant("", "RigL (unstructured)", "rigl", baseline=None),
  Variant(
    "base", "SRigL, γ_sal = 0.3 of the sparse fan-in, ERK, all layers sparse (issue 16)", "srigl"
  ),
  Variant(
    "noabl", "SRigL w/o ablation (RigL + constant fan-in)", "rigl", (("dst.structure", "fan_in"),)
  ),
  Variant("g0.5", "SRigL, γ_sal = 0.5", "srigl", (("dst.gamma_sal", 0.5),)),
  Variant("g0.9", "SRigL, γ_sal = 0.9", "srigl", (("dst.gamma_sal", 0.9),)),
  Variant(
    "dense-fan-in",
    "SRigL, γ_sal = 0.3 of the dense fan-in",
    "srigl",
    (("dst.ablation_fan_in", "dense"),),
  ),
  Variant("first-dense", "RigL, first layer dense", "rigl", _FIRST_DENSE, baseline=None),
  Variant("first-dense", "SRigL, first layer dense", "srigl", _FIRST_DENSE, "first-dense"),
  Variant(
    "g0.9-first-dense",
    "SRigL, γ_sal = 0.9, first layer dense",
    "srigl",
    (("dst.gamma_sal", 0.9), *_FIRST_DENSE),
    "first-dense",
  ),
  Variant("uniform", "RigL, uniform, first layer dense", "rigl", _UNIFORM, baseline=None),
  Variant("uniform", "SRigL, uniform, first layer dense", "srigl", _UNIFORM, "uniform"),
  Variant("w128", "RigL, 128 channels", "rigl", _WIDE, baseline=None),
  Variant("w128", "SRigL, 128 channels", "srigl", _WIDE, "w128"),
  Variant("w256", "RigL, 256 channels", "rigl", _WIDER, baseline=None),
  Variant("w256", "SRigL, 256 channels", "srigl", _WIDER, "w256"),
)


def _run(v: Variant, seed: int) -> Run:
  return Run(v.config_file, "", v.config_file, SPARSITY, seed, v.overrides, v.tag)


#: Sparsities at which issue 16's SRigL setup is compared with ``configs/srigl.py``.
DEFAULTS_SPARSITIES = (0.8, 0.9, 0.95)


def _base_run(sparsity: float, seed: int) -> Run:
  base = VARIANTS[1]
  return Run("srigl", "", "srigl", sparsity, seed, base.overrides, base.tag)


def plan(seeds: Sequence[int]) -> list[Run]:
  """Every run of the study (the table's 95% RigL run included), and issue 16's SRigL
  setup at the other sparsities of :data:`DEFAULTS_SPARSITIES`."""
  runs = [_run(v, s) for v in VARIANTS for s in seeds]
  return runs + [_base_run(sp, s) for sp in DEFAULTS_SPARSITIES if sp != SPARSITY for s in seeds]


def defaults_section(rows_by_name: Mapping[str, dict[str, Any]], seeds: Sequence[int]):
  """RigL, issue 16's SRigL setup and ``configs/srigl.py`` at every sparsity."""
  lines = [
    "",
    "SRigL's config defaults before (issue 16's setup: γ_sal = 0.3, every layer sparse) and "
    "after (`configs/srigl.py`: γ_sal = 0.9, first layer dense), top-1 (%) mean ± 95% CI, "
    "Δ = per-seed difference to RigL:",
    "",
    "| sparsity | RigL | SRigL, issue 16's setup | Δ | SRigL, `configs/srigl.py` | Δ |",
    "| ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for sp in DEFAULTS_SPARSITIES:
    rigl = [rows_by_name.get(Run("rigl", "", "rigl", sp, s).name) for s in seeds]
    old = [rows_by_name.get(_base_run(sp, s).name) for s in seeds]
    new = [rows_by_name.get(Run("srigl", "", "srigl", sp, s).name) for s in seeds]
    rigl = [r for r in rigl if r is not None]
    cells = [md.fmt_accuracy([r["test_accuracy"] for r in rigl]) if rigl else "–"]
    for rows in ([r for r in old if r is not None], [r for r in new if r is not None]):
      cells.append(md.fmt_accuracy([r["test_accuracy"] for r in rows]) if rows else "–")
      cells.append(_paired_delta(rows, rigl) if rows and rigl else "–")
    lines.append(f"| {100 * sp:g}% | " + " | ".join(cells) + " |")
  return lines


def _paired_delta(rows: Sequence[dict], base: Sequence[dict]) -> str:
  by_seed = {r["seed"]: r["test_accuracy"] for r in base}
  diffs = [r["test_accuracy"] - by_seed[r["seed"]] for r in rows if r["seed"] in by_seed]
  if not diffs:
    return "–"
  m, ci = md.mean_ci(diffs)
  text = f"{100 * m:+.1f}".replace("-0.0", "+0.0")
  return text + ("" if ci != ci else f" ± {100 * ci:.1f}")  # nan: n = 1


def section(rows_by_name: Mapping[str, dict[str, Any]], seeds: Sequence[int]) -> list[str]:
  """The study's table: accuracy, paired difference to RigL, FLOPs, final topology."""
  lines = [
    "",
    f"## SRigL at {100 * SPARSITY:g}%: the study (seeds {', '.join(map(str, seeds))})",
    "",
    "Test accuracy (%) mean ± 95% CI; Δ = per-seed difference to the RigL run with the same "
    "model, distribution and dense layers (mean ± 95% CI of the differences); topology of "
    f"seed {min(seeds)} at the end of training (active neurons, fan-in min–max). Variants "
    "are defined in `experiments/srigl_study.py`; the conclusions follow the table.",
    "",
    "| variant | overrides | top-1 | Δ vs RigL | FLOPs train | "
    + " | ".join(f"`{layer}`" for layer in CONV_LAYERS)
    + " |",
    "| --- | --- | ---: | ---: | ---: | " + " | ".join("---" for _ in CONV_LAYERS) + " |",
  ]
  for v in VARIANTS:
    rows = [rows_by_name[n] for n in (_run(v, s).name for s in seeds) if n in rows_by_name]
    if not rows:
      continue
    base = []
    if v.baseline is not None:
      names = [_run(Variant(v.baseline, "", "rigl"), s).name for s in seeds]
      base = [rows_by_name[n] for n in names if n in rows_by_name]
    over = ", ".join(f"`{k}={val}`" for k, val in v.changes) or "–"
    delta = _paired_delta(rows, base) if base else "–"
    first = min(rows, key=lambda r: r["seed"])
    lines.append(
      f"| {v.label} | {over} | {md.fmt_accuracy([r['test_accuracy'] for r in rows])} | "
      f"{delta} | {md.fmt_flops([r.get('train_flops_ratio') for r in rows])} | "
      + md.topology_cells(first, CONV_LAYERS)
    )
  return lines + defaults_section(rows_by_name, seeds)
