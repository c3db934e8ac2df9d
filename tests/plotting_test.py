"""Tests for sparsejax's plots (matplotlib is optional)."""

import os
import sys

import pytest

from sparsejax._src.integration import plotting as P

# -- plots -------------------------------------------------------------------------------


def test_plots_write_png_files(tmp_path):
  pytest.importorskip("matplotlib")
  records = [
    {"step": 0, "dst/ever_active": 0.1},
    {"step": 10, "train/loss": 2.0, "dst/turnover": 0.3, "dst/ever_active": 0.15},
    {"step": 20, "train/loss": 1.0, "eval/accuracy": 0.5, "dst/turnover": 0.1},
  ]
  figs = {
    "curves.png": P.plot_curves({"rigl": records, "set": records[:2]}),
    "topology.png": P.plot_topology({"rigl": records}),
    "sparsity.png": P.plot_layer_sparsity({"a": 0.9, "b": 0.5}, {"a": 0.91, "b": 0.5}),
    "fan_in.png": P.plot_fan_in_heatmap([0, 10], [[1, 2, 3], [2, 2, 2]], layer="a"),
  }
  for name, fig in figs.items():
    path = P.save_figure(fig, tmp_path / "plots" / name)
    assert os.path.getsize(path) > 1000
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_fan_in_heatmap_rejects_bad_shape():
  pytest.importorskip("matplotlib")
  with pytest.raises(ValueError, match="len\\(steps\\)=3"):
    P.plot_fan_in_heatmap([0, 1, 2], [[1, 2]])


def test_plotting_without_matplotlib_is_clear(monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
  with pytest.raises(ImportError, match="matplotlib"):
    P.plot_layer_sparsity({"a": 0.5})
