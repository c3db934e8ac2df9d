"""The text of ``experiments/RESULTS.md``: the results table and the sections around it.

Every function turns result rows (the dicts :func:`experiments.results_table.run_one`
returns) into Markdown lines. :func:`write_markdown` writes the file; the text below
:data:`HAND_WRITTEN_MARKER` in an existing file (the discussion of the results) is kept.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

#: A line of RESULTS.md below which the text is written by hand and kept on regeneration.
HAND_WRITTEN_MARKER = (
  "<!-- Written by hand below this line; `python -m experiments.results_table` keeps it. -->"
)
BOOKKEEPING = (
  "seed",
  "dst.seed",
  "dst.sparsity",
  "checkpoint_every_steps",
  "progress_every_secs",
  "write_plots",
)
# Two-sided 95% Student-t quantiles for n-1 degrees of freedom.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
  """Mean and half-width of the two-sided 95% Student-t confidence interval."""
  n = len(values)
  m = statistics.fmean(values)
  if n < 2:
    return m, float("nan")
  t = _T95.get(n - 1, 1.96)
  return m, t * statistics.stdev(values) / math.sqrt(n)


def fmt_accuracy(values: Sequence[float]) -> str:
  """``"90.3 ± 1.6"`` (percent), or ``"90.3 (n=1)"`` for a single value."""
  m, ci = mean_ci(values)
  if math.isnan(ci):
    return f"{100 * m:.1f} (n=1)"
  return f"{100 * m:.1f} ± {100 * ci:.1f}"


def fmt_flops(values: Sequence[float | None]) -> str:
  """The mean of FLOPs ratios as ``"0.23×"`` (``"–"`` when unknown)."""
  known = [v for v in values if v is not None]
  return f"{statistics.fmean(known):.2f}×" if known else "–"


def _column_cells(
  by: dict[tuple[str, float], list[dict]], method: str, s: float, first: bool
) -> list[str]:
  """Top-1, train FLOPs and test FLOPs of one method at one sparsity."""
  if method == "dense":
    runs, note = by[("dense", 0.0)], " (dense)"
  elif (method, s) in by:
    runs, note = by[(method, s)], ""
  elif (method, 0.5) in by and first:
    runs, note = by[(method, 0.5)], " (50%, 2:4)"
  else:
    return ["–", "–", "–"]
  acc = fmt_accuracy([r["test_accuracy"] for r in runs]) + note
  train = fmt_flops([r.get("train_flops_ratio") for r in runs])
  test = fmt_flops([r.get("flops_ratio") for r in runs])
  return [acc, train, test]


def main_table(rows: list[dict[str, Any]], sparsities: list[float]) -> list[str]:
  """The table in the form of RigL's Table 1: per sparsity, top-1, train and test FLOPs."""
  by: dict[tuple[str, float], list[dict]] = {}
  for r in rows:
    by.setdefault((r["method"], r["sparsity"]), []).append(r)
  methods = list(dict.fromkeys(r["method"] for r in rows))
  head = ["method"]
  for s in sparsities:
    head += [f"top-1 @ {100 * s:g}%", "FLOPs train", "FLOPs test"]
  lines = [
    "| " + " | ".join(head) + " | wall time / run |",
    "| --- | " + " | ".join("---:" for _ in head[1:]) + " | ---: |",
  ]
  for method in methods:
    cells = []
    for i, s in enumerate(sparsities):
      cells += _column_cells(by, method, s, i == 0)
    wall = statistics.fmean(r["wall_time_s"] for r in rows if r["method"] == method)
    lines.append(f"| {method} | " + " | ".join(cells) + f" | {wall:.0f} s |")
  return lines


def order_section(acc: dict[tuple[str, float], list[float]], sparsities: list[float]) -> list[str]:
  """The RigL ≥ SET ≥ static verdict at each sparsity ≥ 90%."""
  lines = ["", "## Does RigL ≥ SET ≥ static hold?", ""]
  for s in [s for s in sparsities if s >= 0.9]:
    have = all((m, s) in acc for m in ("rigl", "set", "static"))
    if not have:
      lines.append(f"* {100 * s:g}%: not all of rigl/set/static were run.")
      continue
    means = {m: mean_ci(acc[(m, s)]) for m in ("rigl", "set", "static")}
    order_ok = means["rigl"][0] >= means["set"][0] >= means["static"][0]
    detail = ", ".join(
      f"{m} {100 * means[m][0]:.1f} ± {100 * means[m][1]:.1f}" for m in ("rigl", "set", "static")
    )
    overlap = []
    for a, b in (("rigl", "set"), ("set", "static")):
      (ma, ca), (mb, cb) = means[a], means[b]
      if abs(ma - mb) < max(ca, cb):
        overlap.append(f"{a} vs {b}")
    verdict = "holds" if order_ok else "does NOT hold"
    note = (
      f"; the difference(s) {', '.join(overlap)} lie within the 95% CI (not significant)"
      if overlap
      else "; both gaps exceed the 95% CIs"
    )
    lines.append(f"* {100 * s:g}%: the order {verdict} on the means ({detail}){note}.")
  return lines


def topology_section(rows: list[dict[str, Any]]) -> list[str]:
  """The final topology of the first seed's runs."""
  lines: list[str] = []
  first_seed = min(r["seed"] for r in rows)
  topo_rows = [r for r in rows if r.get("topology") and r["seed"] == first_seed]
  layers = sorted({layer for r in topo_rows for layer in r["topology"]})
  if topo_rows and layers:
    lines += [
      "",
      f"## Topology at the end of training (seed {first_seed})",
      "",
      "Active neurons and fan-in range (min–max over active neurons) per sparse layer, from "
      "the last topology record of each run's `metrics.jsonl`.",
      "",
      "| run | " + " | ".join(f"`{layer}`" for layer in layers) + " |",
      "| --- | " + " | ".join("---" for _ in layers) + " |",
    ]
    for r in topo_rows:
      lines.append(f"| {r['method']} {100 * r['sparsity']:g}% | " + topology_cells(r, layers))
  return lines


def topology_cells(row: dict[str, Any], layers: Sequence[str]) -> str:
  """``"64 active, 4–4 | …"``: per layer, active neurons and fan-in range (a table row end)."""
  cells = []
  for layer in layers:
    t = (row.get("topology") or {}).get(layer)
    cells.append(
      f"{t['active_neurons']} active, {t['fan_in_min']}–{t['fan_in_max']}" if t else "dense"
    )
  return " | ".join(cells) + " |"


def configs_section(rows: list[dict[str, Any]], sparsities: list[float]) -> list[str]:
  """Each config file and its differences from default.py."""
  lines = [
    "",
    "## Configs",
    "",
    "Each row is its config file run with the overrides below (plus `seed` = the seed, "
    "`dst.seed` = the seed for methods with random masks, and bookkeeping fields: "
    "`data.cache_dir`, `jax_cache_dir`, `write_plots=False`, `checkpoint_every_steps=0`, "
    "`progress_every_secs=30`).",
    "",
  ]
  seen = set()
  for r in rows:
    key = (r["config_file"], r["preset"])
    if key in seen:
      continue
    seen.add(key)
    preset = f":{r['preset']}" if r["preset"] else ""
    over = {k: v for k, v in r["overrides"].items() if k not in BOOKKEEPING}
    sweep = (
      ""
      if r["config_file"] in ("dense", "nm")
      else " with `--config.dst.sparsity` ∈ {" + ", ".join(f"{s:g}" for s in sparsities) + "}"
    )
    lines.append(
      f"* `experiments/configs/{r['config_file']}.py{preset}`{sweep}; differences from "
      f"`default.py`: `{json.dumps(over, sort_keys=True)}`"
    )
  return lines


def flops_section() -> list[str]:
  """How the FLOPs columns are counted."""
  return [
    "",
    "## How the FLOPs columns are counted",
    "",
    "As in RigL's Table 1 (Evci et al. 2020, appendix H), relative to dense training of the "
    "same model for the same steps. *FLOPs test*: forward FLOPs per example of the final "
    "masks (`sparsejax.metrics.estimate_flops`). *FLOPs train*: each step costs three "
    "products per layer (forward, gradient w.r.t. activations, gradient w.r.t. weights), "
    "each at the density of the mask that step used, read from the run's mask history "
    "(`sparsity/<layer>` at every topology record of `metrics.jsonl`); RigL, SRigL and "
    "GraNet compute the weight gradient densely on their scheduled mask updates (every "
    "ΔT = 100 steps), SNIP pays one dense forward-backward pass at initialization, GMP and "
    "GraNet start dense and get cheaper along their pruning schedule, static and SET never "
    "need a dense product. Mask-update bookkeeping, biases and activations are not counted. "
    "The code: `experiments/training_flops.py` (`training_flops`, unit-tested on a "
    "hand-worked case). Wall times are for masked dense compute on a CPU and say nothing "
    "about these FLOPs.",
  ]


def header(meta: dict[str, Any]) -> list[str]:
  """The title and the provenance line."""
  return [
    "# sparsejax baselines on MNIST-1D",
    "",
    "Generated by `python -m experiments.results_table` "
    f"({meta['date']}; {meta['total_wall_min']:.1f} min wall clock over "
    f"{meta.get('invocations', 1)} invocation(s), {meta['sum_run_min']:.1f} min summed over "
    f"runs; {meta['machine']}; the machine was shared with other work, so times are "
    "indicative).",
    "",
    "Test accuracy (%) on the 1000 MNIST-1D test samples, mean ± 95% confidence interval "
    f"(Student t) over seeds {meta['seeds']}; every sparse layer allocation is ERK (the "
    "layers a config keeps dense are listed under *Configs*); FLOPs are multiples of dense "
    "training / inference (see below).",
    "",
  ]


def keep_hand_written(path: str) -> str:
  """The marker and the hand-written text below it in ``path`` (``""`` if none)."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    return ""
  i = text.find(HAND_WRITTEN_MARKER)
  return "" if i < 0 else text[i:]


def write_markdown(
  rows: list[dict[str, Any]],
  path: str,
  meta: dict[str, Any],
  extra_sections: Callable[[], list[str]] | None = None,
) -> str:
  """Writes RESULTS.md (keeping its hand-written part) and returns its text.

  Args:
    rows: the table's result rows.
    path: the Markdown file.
    meta: ``date``, ``total_wall_min``, ``invocations``, ``sum_run_min``, ``machine``,
      ``seeds``.
    extra_sections: returns more lines to put after the table's sections (the SRigL
      study).
  """
  sparsities = sorted({r["sparsity"] for r in rows if r["method"] != "dense"} - {0.5})
  acc: dict[tuple[str, float], list[float]] = {}
  for r in rows:
    acc.setdefault((r["method"], r["sparsity"]), []).append(r["test_accuracy"])
  lines = header(meta) + main_table(rows, sparsities)
  lines += order_section(acc, sparsities)
  lines += flops_section()
  lines += topology_section(rows)
  lines += configs_section(rows, sparsities)
  if extra_sections is not None:
    lines += extra_sections()
  lines += [
    "",
    "Reproduce one cell: `python -m experiments.main --config experiments/configs/rigl.py "
    "--config.dst.sparsity=0.95 --config.seed=1 --config.dst.seed=1 --workdir /tmp/rigl95_1`.",
    "",
    f"Raw numbers: `results.json` in the results workdir ({len(rows)} table runs).",
    "",
  ]
  text = "\n".join(lines)
  hand = keep_hand_written(path)
  if hand:
    text += "\n" + hand
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return text
