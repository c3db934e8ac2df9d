"""Plots for sparse training runs (matplotlib, an optional dependency).

matplotlib is imported only when a plotting function is called; without it those functions
raise an ``ImportError`` that names the extra to install. Figures are built with
``matplotlib.figure.Figure`` (no pyplot global state), so they work in scripts, threads and
notebooks alike (a notebook displays a returned ``Figure``); save them with
:func:`save_figure`.

Inputs are plain Python data, typically read back with :func:`sparsejax.read_jsonl` from a
run's ``metrics.jsonl``:

* :func:`plot_layer_sparsity`: per-layer target vs realised sparsity (bars);
* :func:`plot_curves`: loss / accuracy curves, one line per run (method);
* :func:`plot_topology`: mask turnover and ever-active fraction vs step;
* :func:`plot_fan_in_heatmap`: per-neuron fan-in of one layer at each mask update.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _matplotlib():
  """Imports matplotlib's object-oriented API lazily, with a helpful error."""
  try:
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      "sparsejax plotting needs matplotlib: pip install 'sparsejax[experiments]' "
      "(or pip install matplotlib)."
    ) from e
  return Figure


def _new_figure(width: float, height: float):
  Figure = _matplotlib()
  return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig: Any, path: str | os.PathLike, *, dpi: int = 120) -> str:
  """Saves ``fig`` as an image (format from the extension), creating directories.

  Args:
    fig: a ``matplotlib.figure.Figure``.
    path: the file to write, e.g. ``"plots/curves.png"``.
    dpi: resolution of raster formats.

  Returns:
    The path written.
  """
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=dpi)
  return path


def plot_layer_sparsity(
  target: Mapping[str, float],
  realised: Mapping[str, float] | None = None,
  *,
  title: str = "Per-layer sparsity",
) -> Any:
  """Bar chart of the target (allocated) and realised sparsity of each layer.

  ERK gives small layers less sparsity (often 0); this is the plot to check first.

  Args:
    target: ``{layer: sparsity}`` from the allocation (e.g. the initial masks).
    realised: ``{layer: sparsity}`` measured on the trained weights (fraction of zeros).
    title: figure title.

  Returns:
    A ``matplotlib.figure.Figure``.
  """
  layers = list(target)
  if realised:
    layers += [k for k in realised if k not in target]
  fig = _new_figure(max(5.0, 0.9 * len(layers) + 2.0), 3.8)
  ax = fig.add_subplot()
  x = np.arange(len(layers))
  width = 0.4 if realised else 0.6
  ax.bar(
    x - (width / 2 if realised else 0),
    [target.get(k, np.nan) for k in layers],
    width,
    label="target",
  )
  if realised:
    ax.bar(x + width / 2, [realised.get(k, np.nan) for k in layers], width, label="realised")
  ax.set_xticks(x, layers, rotation=30, ha="right", fontsize=8)
  ax.set_ylim(0.0, 1.0)
  ax.set_ylabel("sparsity (fraction of zeros)")
  ax.set_title(title)
  ax.legend(loc="lower right")
  ax.grid(axis="y", alpha=0.3)
  return fig


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
  if not pts:
    return np.zeros(0), np.zeros(0)
  steps, values = zip(*pts, strict=True)
  return np.asarray(steps), np.asarray(values, dtype=float)


def _finish_step_axes(fig: Any, axes: Sequence[Any], title: str | None, *, legend: bool) -> Any:
  """Labels the x axes "step", adds a light grid, legends (if ``legend``) and the title."""
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if legend:
      ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  return fig


def plot_curves(
  runs: Mapping[str, Sequence[Mapping[str, Any]]],
  keys: Sequence[str] = ("train/loss", "eval/accuracy"),
  *,
  title: str | None = None,
) -> Any:
  """Line plots of metrics vs step, one subplot per key and one line per run.

  Args:
    runs: ``{label: records}``, records as in ``metrics.jsonl`` (each with ``step``).
    keys: the metrics to plot, one subplot each.
    title: optional figure title.

  Returns:
    A ``matplotlib.figure.Figure``.
  """
  fig = _new_figure(4.2 * len(keys), 3.4)
  axes = fig.subplots(1, len(keys), squeeze=False)[0]
  for ax, key in zip(axes, keys, strict=True):
    for label, records in runs.items():
      steps, values = _series(records, key)
      if steps.size:
        ax.plot(steps, values, label=label, marker="." if steps.size < 30 else None)
    ax.set_title(key)
  return _finish_step_axes(fig, axes, title, legend=len(runs) > 1)


def plot_topology(
  runs: Mapping[str, Sequence[Mapping[str, Any]]],
  *,
  turnover_key: str = "dst/turnover",
  ever_active_key: str = "dst/ever_active",
  title: str | None = None,
) -> Any:
  """Mask turnover at each update and the ever-active fraction, vs step.

  Args:
    runs: ``{label: records}`` (``metrics.jsonl`` records).
    turnover_key: key of the per-update turnover.
    ever_active_key: key of the ever-active fraction.
    title: optional figure title.

  Returns:
    A ``matplotlib.figure.Figure``.
  """
  fig = _new_figure(8.4, 3.4)
  ax_t, ax_e = fig.subplots(1, 2)
  for label, records in runs.items():
    s, v = _series(records, turnover_key)
    if s.size:
      ax_t.plot(s, v, marker=".", label=label)
    s, v = _series(records, ever_active_key)
    if s.size:
      ax_e.plot(s, v, marker=".", label=label)
  ax_t.set_title("mask turnover per update")
  ax_t.set_ylabel("fraction of active weights replaced")
  ax_e.set_title("ever-active fraction (ITOP)")
  ax_e.set_ylabel("fraction of sparse-layer weights")
  return _finish_step_axes(fig, (ax_t, ax_e), title, legend=len(runs) > 1)


def plot_fan_in_heatmap(
  steps: Sequence[int],
  fan_in: Sequence[Sequence[int]] | np.ndarray,
  *,
  layer: str = "",
  sort_neurons: bool = False,
) -> Any:
  """Heat map of the per-neuron fan-in of one layer (neurons × mask updates).

  Constant fan-in (SRigL) shows as a flat colour per column; unstructured RigL shows the
  fan-in spreading out over training; ablated neurons show as 0.

  Args:
    steps: the step of each snapshot (columns).
    fan_in: ``[len(steps), neurons]`` fan-in counts.
    layer: layer name for the title.
    sort_neurons: order neurons by their final fan-in (easier to read).

  Returns:
    A ``matplotlib.figure.Figure``.

  Raises:
    ValueError: ``fan_in`` is not ``[len(steps), neurons]``.
  """
  data = np.asarray(fan_in, dtype=float)
  if data.ndim != 2 or data.shape[0] != len(steps):
    raise ValueError(f"fan_in must be [len(steps)={len(steps)}, neurons]; got shape {data.shape}.")
  if sort_neurons and data.size:
    data = data[:, np.argsort(-data[-1], kind="stable")]
  fig = _new_figure(6.4, 4.0)
  ax = fig.add_subplot()
  im = ax.imshow(data.T, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower")
  n = len(steps)
  ticks = np.unique(np.linspace(0, n - 1, num=min(n, 8)).astype(int)) if n else []
  ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
  ax.set_xlabel("step")
  ax.set_ylabel("neuron" + (" (sorted by final fan-in)" if sort_neurons else ""))
  ax.set_title(f"fan-in per neuron{': ' + layer if layer else ''}")
  fig.colorbar(im, ax=ax, label="active inputs")
  return fig
