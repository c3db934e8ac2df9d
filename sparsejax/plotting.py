"""Plots of sparse training runs (matplotlib is imported when a plot is made)."""

from sparsejax._src.integration.plotting import plot_curves as plot_curves
from sparsejax._src.integration.plotting import plot_fan_in_heatmap as plot_fan_in_heatmap
from sparsejax._src.integration.plotting import plot_layer_sparsity as plot_layer_sparsity
from sparsejax._src.integration.plotting import plot_topology as plot_topology
from sparsejax._src.integration.plotting import save_figure as save_figure

__all__ = (
  "plot_curves",
  "plot_fan_in_heatmap",
  "plot_layer_sparsity",
  "plot_topology",
  "save_figure",
)
