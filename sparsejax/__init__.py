"""sparsejax: sparse neural-network training for JAX, as composable Optax transformations.

``import sparsejax as sj; tx = sj.rigl(optax.adam(1e-3), sparsity=0.9, end_step=7500)``.

The top level holds the core: the methods, the state readers, structures, criteria,
distributions and schedules, and the main N:M and condensed entry points. Everything else
lives in namespaces, imported when first used (so ``import sparsejax`` loads neither Flax,
orbax, matplotlib nor Pallas):

* ``sj.nm``: the N:M format, kernels, Flax layers and SR-STE pieces;
* ``sj.condensed``: the condensed constant-fan-in format, kernels and layers;
* ``sj.primitives``: exact top-k selection, drop-and-grow, SRigL's ablation rule;
* ``sj.metrics``: topology metrics, metric writers, progress reporting;
* ``sj.checkpoint``: orbax checkpointing; ``sj.sharding``: sharding helpers;
* ``sj.plotting``: matplotlib plots.

Implementation lives in ``sparsejax._src`` (folders per layer: primitives, allocation,
criteria, transforms, formats, kernels, integration, metrics); do not import from there.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from sparsejax._src.allocation.distributions import erdos_renyi as erdos_renyi
from sparsejax._src.allocation.distributions import erk as erk
from sparsejax._src.allocation.distributions import uniform as uniform
from sparsejax._src.base import LayerInfo as LayerInfo
from sparsejax._src.base import ScoreContext as ScoreContext
from sparsejax._src.criteria.schedules import drop_fraction_schedule as drop_fraction_schedule
from sparsejax._src.criteria.schedules import gradual_sparsity as gradual_sparsity
from sparsejax._src.criteria.schedules import is_mask_update_step as is_mask_update_step
from sparsejax._src.criteria.scores import get_criterion as get_criterion
from sparsejax._src.criteria.scores import gradient_magnitude as gradient_magnitude
from sparsejax._src.criteria.scores import magnitude as magnitude
from sparsejax._src.criteria.scores import momentum_magnitude as momentum_magnitude
from sparsejax._src.criteria.scores import random_scores as random_scores
from sparsejax._src.criteria.scores import register_criterion as register_criterion
from sparsejax._src.criteria.scores import registered_criteria as registered_criteria
from sparsejax._src.criteria.scores import snip as snip
from sparsejax._src.formats.condensed import condense as condense
from sparsejax._src.formats.condensed import condensed_matmul as condensed_matmul
from sparsejax._src.formats.nm_format import nm_compress as nm_compress
from sparsejax._src.formats.nm_format import nm_decompress as nm_decompress
from sparsejax._src.kernels.nm_matmul import nm_matmul as nm_matmul
from sparsejax._src.primitives.structures import NM as NM
from sparsejax._src.primitives.structures import Block as Block
from sparsejax._src.primitives.structures import ConstantFanIn as ConstantFanIn
from sparsejax._src.primitives.structures import Structure as Structure
from sparsejax._src.primitives.structures import Unstructured as Unstructured
from sparsejax._src.primitives.structures import get_structure as get_structure
from sparsejax._src.transforms.dynamic_sparse import SparseTransformation as SparseTransformation
from sparsejax._src.transforms.dynamic_sparse import dynamic_sparse as dynamic_sparse
from sparsejax._src.transforms.methods import gmp as gmp
from sparsejax._src.transforms.methods import granet as granet
from sparsejax._src.transforms.methods import rigl as rigl
from sparsejax._src.transforms.methods import set_ as set_
from sparsejax._src.transforms.methods import srigl as srigl
from sparsejax._src.transforms.methods import static_sparse as static_sparse
from sparsejax._src.transforms.pruning import prune as prune
from sparsejax._src.transforms.readers import apply_masks as apply_masks
from sparsejax._src.transforms.readers import find_dst_state as find_dst_state
from sparsejax._src.transforms.readers import format_summary as format_summary
from sparsejax._src.transforms.readers import forward_params as forward_params
from sparsejax._src.transforms.readers import get_masks as get_masks
from sparsejax._src.transforms.readers import layer_sparsities as layer_sparsities
from sparsejax._src.transforms.readers import summarize as summarize
from sparsejax._src.transforms.sr_ste import NMSRSTEState as NMSRSTEState
from sparsejax._src.transforms.sr_ste import nm_sr_ste as nm_sr_ste
from sparsejax._src.transforms.state import DynamicSparseState as DynamicSparseState
from sparsejax._src.tree import path_to_str as path_to_str

__version__ = "0.2.0"

_NAMESPACES = (
  "checkpoint",
  "condensed",
  "metrics",
  "nm",
  "plotting",
  "primitives",
  "sharding",
  "sparse",
)

__all__ = (
  # Methods.
  "dynamic_sparse",
  "static_sparse",
  "set_",
  "rigl",
  "srigl",
  "gmp",
  "granet",
  "nm_sr_ste",
  "prune",
  "SparseTransformation",
  # State and readers.
  "DynamicSparseState",
  "NMSRSTEState",
  "apply_masks",
  "forward_params",
  "get_masks",
  "find_dst_state",
  "summarize",
  "format_summary",
  "layer_sparsities",
  # Schedules.
  "is_mask_update_step",
  "drop_fraction_schedule",
  "gradual_sparsity",
  # Structures.
  "Structure",
  "Unstructured",
  "ConstantFanIn",
  "NM",
  "Block",
  "get_structure",
  # Criteria.
  "ScoreContext",
  "LayerInfo",
  "magnitude",
  "gradient_magnitude",
  "random_scores",
  "momentum_magnitude",
  "snip",
  "register_criterion",
  "get_criterion",
  "registered_criteria",
  # Distributions.
  "uniform",
  "erdos_renyi",
  "erk",
  # N:M and condensed entry points.
  "nm_compress",
  "nm_decompress",
  "nm_matmul",
  "condense",
  "condensed_matmul",
  # Utilities.
  "path_to_str",
  # Namespaces.
  *_NAMESPACES,
)

# Names that were at the top level in sparsejax 0.1 and now live in a namespace. They
# still resolve from the top level, with a DeprecationWarning naming the new place (the
# namespace is found from its ``__all__``, so only the old names are listed here).
_MOVED_IN_0_2 = frozenset(
  """
  CheckpointManager CheckpointMismatchError CorruptCheckpointError Condensed
  NotConstantFanInError condensed_nbytes select_condensed_method uncondense CondensedBuffer
  CondensedDense condense_params condensed_conv condensed_dense_apply JsonlWriter
  LoggingWriter MetricWriter MultiWriter ReportProgress TensorBoardWriter
  create_default_writer estimate_flops ever_active_fraction fan_in_stats init_ever_active
  mask_summary mask_turnover read_jsonl sparse_leaves to_scalars update_ever_active NMSparse
  index_bits is_nm_sparse make_nm_sparse nm_mask nm_nbytes nm_take pack_indices
  unpack_indices nm_matmul_dense_grad nm_matmul_reference NM_INDICES_COLLECTION NMDense
  NMDenseLinen NMIndices nm_dense_from_kernel nm_dense_linen_variables default_nm_filter
  mdgf_schedule nm_project nm_ste sdgf_patterns sdgf_schedule plot_curves
  plot_fan_in_heatmap plot_layer_sparsity plot_topology save_figure drop_and_grow
  grouped_drop_and_grow topk_mask active_neurons fan_in_counts neurons_to_ablate
  abstract_opt_state fsdp_param_specs named_shardings opt_state_shardings
  param_specs_from_rules shard_dst_init
  """.split()
)
_RENAMED_IN_0_2 = {"condensed_native_available": ("condensed", "native_available")}


def _moved_to(name: str) -> tuple[str, str] | None:
  """``(namespace, new name)`` of a name moved in 0.2, or None."""
  if name in _RENAMED_IN_0_2:
    return _RENAMED_IN_0_2[name]
  if name not in _MOVED_IN_0_2:
    return None
  for namespace in _NAMESPACES:
    if name in importlib.import_module(f"sparsejax.{namespace}").__all__:
      return namespace, name
  return None


def __getattr__(name: str) -> Any:
  """Loads namespaces on first use; resolves names moved in 0.2 with a warning."""
  if name in _NAMESPACES:
    module = importlib.import_module(f"sparsejax.{name}")
    globals()[name] = module
    return module
  moved = _moved_to(name)
  if moved is not None:
    namespace, new_name = moved
    warnings.warn(
      f"sparsejax.{name} moved to sparsejax.{namespace}.{new_name} in sparsejax 0.2; the "
      "top-level name will be removed in a future release.",
      DeprecationWarning,
      stacklevel=2,
    )
    return getattr(importlib.import_module(f"sparsejax.{namespace}"), new_name)
  raise AttributeError(f"module 'sparsejax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
