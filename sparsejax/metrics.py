"""Topology metrics, metric writers and a progress reporter for sparse training.

Topology metrics work on masks pytrees (``sj.get_masks(opt_state)``) and inside ``jit``;
writers have ``clu.metric_writers`` method names.
"""

from sparsejax._src.metrics.progress import ReportProgress as ReportProgress
from sparsejax._src.metrics.topology import estimate_flops as estimate_flops
from sparsejax._src.metrics.topology import ever_active_fraction as ever_active_fraction
from sparsejax._src.metrics.topology import fan_in_stats as fan_in_stats
from sparsejax._src.metrics.topology import init_ever_active as init_ever_active
from sparsejax._src.metrics.topology import mask_summary as mask_summary
from sparsejax._src.metrics.topology import mask_turnover as mask_turnover
from sparsejax._src.metrics.topology import to_scalars as to_scalars
from sparsejax._src.metrics.topology import update_ever_active as update_ever_active
from sparsejax._src.metrics.writers import JsonlWriter as JsonlWriter
from sparsejax._src.metrics.writers import LoggingWriter as LoggingWriter
from sparsejax._src.metrics.writers import MetricWriter as MetricWriter
from sparsejax._src.metrics.writers import MultiWriter as MultiWriter
from sparsejax._src.metrics.writers import TensorBoardWriter as TensorBoardWriter
from sparsejax._src.metrics.writers import create_default_writer as create_default_writer
from sparsejax._src.metrics.writers import read_jsonl as read_jsonl
from sparsejax._src.tree import sparse_leaves as sparse_leaves

__all__ = (
  "JsonlWriter",
  "LoggingWriter",
  "MetricWriter",
  "MultiWriter",
  "ReportProgress",
  "TensorBoardWriter",
  "create_default_writer",
  "estimate_flops",
  "ever_active_fraction",
  "fan_in_stats",
  "init_ever_active",
  "mask_summary",
  "mask_turnover",
  "read_jsonl",
  "sparse_leaves",
  "to_scalars",
  "update_ever_active",
)
