r"""Plots from one or more experiment workdirs (reads ``metrics.jsonl``, writes PNGs).

Usage::

  python -m experiments.plot /tmp/sparsejax_rigl            # PNGs in /tmp/sparsejax_rigl/plots
  python -m experiments.plot /tmp/sparsejax_rigl /tmp/sparsejax_set --out /tmp/sparsejax_plots
  python -m experiments.plot --workdirs /tmp/sparsejax_rigl,/tmp/sparsejax_set \
      --out /tmp/sparsejax_plots

With one workdir the PNGs are: ``curves.png`` (train loss, test accuracy),
``layer_sparsity.png`` (target vs realised per layer), ``topology.png`` (mask turnover and
ever-active fraction) and ``fan_in_<layer>.png`` (per-neuron fan-in at each mask update,
from ``topology.jsonl``). With several workdirs, ``curves.png`` and ``topology.png`` overlay
the runs (labelled by ``--labels`` or by each run's method). ``train.train_and_evaluate``
calls :func:`write_run_plots` at the end of a run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app, flags

import sparsejax as sj

_SPARSITY = "sparsity/"
_WEIGHT_SPARSITY = "final/weight_sparsity/"


def _load(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No metrics.jsonl in {workdir!r}: is it an experiment workdir?")
  return sj.metrics.read_jsonl(path)


def _label(workdir: str) -> str:
  try:
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
      cfg = json.load(f)
    dst = cfg.get("dst", {})
    method = dst.get("method", "?")
    return method if method == "dense" else f"{method} s={dst.get('sparsity')}"
  except (OSError, ValueError):
    return os.path.basename(os.path.normpath(workdir))


def layer_sparsities(records: Sequence[Mapping[str, Any]]) -> tuple[dict, dict]:
  """``(target, realised)`` per-layer sparsity from a run's records.

  The target is the masks' sparsity in the last record that has per-layer values (the
  final masks: for gmp/granet the end of the sparsity schedule, for the other methods the
  same as at step 0); the realised sparsity is the fraction of zero weights at the end.
  """
  target: dict[str, float] = {}
  for r in records:
    layers = {
      k[len(_SPARSITY) :]: v
      for k, v in r.items()
      if k.startswith(_SPARSITY) and k not in ("sparsity/total", "sparsity/global")
    }
    if layers:
      target = layers
  realised: dict[str, float] = {}
  for r in records:
    for k, v in r.items():
      if k.startswith(_WEIGHT_SPARSITY):
        realised[k[len(_WEIGHT_SPARSITY) :]] = v
  return target, realised


def _fan_in_history(workdir: str) -> dict[str, tuple[list[int], list[list[int]]]]:
  path = os.path.join(workdir, "topology.jsonl")
  if not os.path.exists(path):
    return {}
  out: dict[str, tuple[list[int], list[list[int]]]] = {}
  for rec in sj.metrics.read_jsonl(path):
    for layer, vec in rec.get("fan_in", {}).items():
      steps, rows = out.setdefault(layer, ([], []))
      steps.append(int(rec["step"]))
      rows.append(vec)
  return out


def write_run_plots(workdir: str, out_dir: str | None = None) -> list[str]:
  """Writes the PNGs of one run to ``out_dir`` (default ``<workdir>/plots``).

  Returns:
    The paths written.

  Raises:
    ImportError: matplotlib is not installed.
  """
  plotting = sj.plotting
  out_dir = out_dir or os.path.join(workdir, "plots")
  records = _load(workdir)
  label = _label(workdir)
  written = []
  fig = plotting.plot_curves({label: records}, title=label)
  written.append(plotting.save_figure(fig, os.path.join(out_dir, "curves.png")))
  target, realised = layer_sparsities(records)
  if target or realised:
    fig = plotting.plot_layer_sparsity(target or realised, realised or None, title=label)
    written.append(plotting.save_figure(fig, os.path.join(out_dir, "layer_sparsity.png")))
  if any("dst/turnover" in r for r in records):
    fig = plotting.plot_topology({label: records}, title=label)
    written.append(plotting.save_figure(fig, os.path.join(out_dir, "topology.png")))
  for layer, (steps, rows) in _fan_in_history(workdir).items():
    fig = plotting.plot_fan_in_heatmap(steps, rows, layer=layer)
    name = "fan_in_" + layer.replace("/", "_") + ".png"
    written.append(plotting.save_figure(fig, os.path.join(out_dir, name)))
  return written


def write_comparison_plots(
  workdirs: Sequence[str], out_dir: str, labels: Sequence[str] | None = None
) -> list[str]:
  """Overlays several runs: ``curves.png`` and ``topology.png`` in ``out_dir``."""
  plotting = sj.plotting
  if labels is not None and len(labels) != len(workdirs):
    raise ValueError(f"--labels has {len(labels)} entries for {len(workdirs)} workdirs.")
  labels = list(labels) if labels else [_label(w) for w in workdirs]
  runs = {lab: _load(w) for lab, w in zip(labels, workdirs, strict=True)}
  written = [plotting.save_figure(plotting.plot_curves(runs), os.path.join(out_dir, "curves.png"))]
  if any(any("dst/turnover" in r for r in recs) for recs in runs.values()):
    written.append(
      plotting.save_figure(plotting.plot_topology(runs), os.path.join(out_dir, "topology.png"))
    )
  return written


def _define_flags() -> None:
  flags.DEFINE_list(
    "workdirs", None, "Comma-separated experiment workdirs (or give them as positional arguments)."
  )
  flags.DEFINE_string("out", None, "Output directory (default: <workdir>/plots for one).")
  flags.DEFINE_list("labels", None, "Optional labels, one per workdir.")


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  positional = list(argv[1:])
  if positional and f.workdirs:
    raise app.UsageError(
      f"Give the workdirs either as arguments or with --workdirs, not both (got {positional} "
      f"and --workdirs={','.join(f.workdirs)})."
    )
  workdirs = positional or f.workdirs
  if not workdirs:
    raise app.UsageError(
      "No workdir given: python -m experiments.plot WORKDIR [WORKDIR ...] (or --workdirs=A,B)."
    )
  if len(workdirs) == 1:
    paths = write_run_plots(workdirs[0], f.out)
  else:
    if not f.out:
      raise app.UsageError("--out is required with several workdirs.")
    paths = write_comparison_plots(workdirs, f.out, f.labels)
    for w in workdirs:
      paths += write_run_plots(w, os.path.join(f.out, os.path.basename(os.path.normpath(w))))
  for p in paths:
    print(p)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
