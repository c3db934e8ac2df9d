"""sparsejax: dynamic sparse training for JAX, as composable Optax transformations.

The public API is flat: ``import sparsejax as sj; tx = sj.rigl(optax.adam(1e-3), ...)``.
Implementation lives in private modules under ``sparsejax._src``; do not import from there.
"""

from sparsejax._src.base import ScoreContext as ScoreContext
from sparsejax._src.tree import path_to_str as path_to_str
from sparsejax._src.integration.checkpointing import CheckpointManager as CheckpointManager
from sparsejax._src.integration.checkpointing import (
  CheckpointMismatchError as CheckpointMismatchError,
)
from sparsejax._src.integration.checkpointing import (
  CorruptCheckpointError as CorruptCheckpointError,
)
from sparsejax._src.formats.condensed import Condensed as Condensed
from sparsejax._src.formats.condensed import NotConstantFanInError as NotConstantFanInError
from sparsejax._src.formats.condensed import condense as condense
from sparsejax._src.formats.condensed import condensed_matmul as condensed_matmul
from sparsejax._src.formats.condensed import condensed_nbytes as condensed_nbytes
from sparsejax._src.formats.condensed import select_condensed_method as select_condensed_method
from sparsejax._src.formats.condensed import uncondense as uncondense
from sparsejax._src.integration.condensed_layers import CondensedBuffer as CondensedBuffer
from sparsejax._src.integration.condensed_layers import CondensedDense as CondensedDense
from sparsejax._src.integration.condensed_layers import condense_params as condense_params
from sparsejax._src.integration.condensed_layers import condensed_conv as condensed_conv
from sparsejax._src.integration.condensed_layers import (
  condensed_dense_apply as condensed_dense_apply,
)
from sparsejax._src.kernels.condensed_native import (  # noqa: F401
  native_available as condensed_native_available,
)
from sparsejax._src.criteria.scores import get_criterion as get_criterion
from sparsejax._src.criteria.scores import gradient_magnitude as gradient_magnitude
from sparsejax._src.criteria.scores import magnitude as magnitude
from sparsejax._src.criteria.scores import momentum_magnitude as momentum_magnitude
from sparsejax._src.criteria.scores import random_scores as random_scores
from sparsejax._src.criteria.scores import register_criterion as register_criterion
from sparsejax._src.criteria.scores import registered_criteria as registered_criteria
from sparsejax._src.allocation.distributions import erdos_renyi as erdos_renyi
from sparsejax._src.allocation.distributions import erk as erk
from sparsejax._src.allocation.distributions import uniform as uniform
from sparsejax._src.transforms.dynamic_sparse import DynamicSparseState as DynamicSparseState
from sparsejax._src.transforms.dynamic_sparse import apply_masks as apply_masks
from sparsejax._src.transforms.dynamic_sparse import dynamic_sparse as dynamic_sparse
from sparsejax._src.transforms.dynamic_sparse import find_dst_state as find_dst_state
from sparsejax._src.transforms.dynamic_sparse import format_summary as format_summary
from sparsejax._src.transforms.dynamic_sparse import get_masks as get_masks
from sparsejax._src.transforms.dynamic_sparse import is_mask_update_step as is_mask_update_step
from sparsejax._src.transforms.dynamic_sparse import layer_sparsities as layer_sparsities
from sparsejax._src.transforms.dynamic_sparse import rigl as rigl
from sparsejax._src.transforms.dynamic_sparse import set_ as set_
from sparsejax._src.transforms.dynamic_sparse import static_sparse as static_sparse
from sparsejax._src.transforms.dynamic_sparse import summarize as summarize
from sparsejax._src.metrics.topology import JsonlWriter as JsonlWriter
from sparsejax._src.metrics.topology import LoggingWriter as LoggingWriter
from sparsejax._src.metrics.topology import MetricWriter as MetricWriter
from sparsejax._src.metrics.topology import MultiWriter as MultiWriter
from sparsejax._src.metrics.topology import ReportProgress as ReportProgress
from sparsejax._src.metrics.topology import TensorBoardWriter as TensorBoardWriter
from sparsejax._src.metrics.topology import create_default_writer as create_default_writer
from sparsejax._src.metrics.topology import estimate_flops as estimate_flops
from sparsejax._src.metrics.topology import ever_active_fraction as ever_active_fraction
from sparsejax._src.metrics.topology import fan_in_stats as fan_in_stats
from sparsejax._src.metrics.topology import init_ever_active as init_ever_active
from sparsejax._src.metrics.topology import mask_summary as mask_summary
from sparsejax._src.metrics.topology import mask_turnover as mask_turnover
from sparsejax._src.metrics.topology import read_jsonl as read_jsonl
from sparsejax._src.metrics.topology import sparse_leaves as sparse_leaves
from sparsejax._src.metrics.topology import to_scalars as to_scalars
from sparsejax._src.metrics.topology import update_ever_active as update_ever_active
from sparsejax._src.formats.nm_format import NMSparse as NMSparse
from sparsejax._src.formats.nm_format import index_bits as index_bits
from sparsejax._src.formats.nm_format import is_nm_sparse as is_nm_sparse
from sparsejax._src.formats.nm_format import make_nm_sparse as make_nm_sparse
from sparsejax._src.formats.nm_format import nm_compress as nm_compress
from sparsejax._src.formats.nm_format import nm_decompress as nm_decompress
from sparsejax._src.formats.nm_format import nm_mask as nm_mask
from sparsejax._src.formats.nm_format import nm_nbytes as nm_nbytes
from sparsejax._src.formats.nm_format import nm_take as nm_take
from sparsejax._src.formats.nm_format import pack_indices as pack_indices
from sparsejax._src.formats.nm_format import unpack_indices as unpack_indices
from sparsejax._src.kernels.nm_pallas import nm_matmul as nm_matmul
from sparsejax._src.kernels.nm_pallas import nm_matmul_dense_grad as nm_matmul_dense_grad
from sparsejax._src.kernels.nm_pallas import nm_matmul_reference as nm_matmul_reference
from sparsejax._src.integration.nm_layers import NM_INDICES_COLLECTION as NM_INDICES_COLLECTION
from sparsejax._src.integration.nm_layers import NMDense as NMDense
from sparsejax._src.integration.nm_layers import NMDenseLinen as NMDenseLinen
from sparsejax._src.integration.nm_layers import NMIndices as NMIndices
from sparsejax._src.integration.nm_layers import nm_dense_from_kernel as nm_dense_from_kernel
from sparsejax._src.integration.nm_layers import (
  nm_dense_linen_variables as nm_dense_linen_variables,
)
from sparsejax._src.integration.plotting import plot_curves as plot_curves
from sparsejax._src.integration.plotting import plot_fan_in_heatmap as plot_fan_in_heatmap
from sparsejax._src.integration.plotting import plot_layer_sparsity as plot_layer_sparsity
from sparsejax._src.integration.plotting import plot_topology as plot_topology
from sparsejax._src.integration.plotting import save_figure as save_figure
from sparsejax._src.primitives.selection import drop_and_grow as drop_and_grow
from sparsejax._src.primitives.selection import grouped_drop_and_grow as grouped_drop_and_grow
from sparsejax._src.primitives.selection import topk_mask as topk_mask
from sparsejax._src.integration.sharding import abstract_opt_state as abstract_opt_state
from sparsejax._src.integration.sharding import fsdp_param_specs as fsdp_param_specs
from sparsejax._src.integration.sharding import named_shardings as named_shardings
from sparsejax._src.integration.sharding import opt_state_shardings as opt_state_shardings
from sparsejax._src.integration.sharding import param_specs_from_rules as param_specs_from_rules
from sparsejax._src.integration.sharding import shard_dst_init as shard_dst_init
from sparsejax._src.transforms.sr_ste import NMSRSTEState as NMSRSTEState
from sparsejax._src.transforms.sr_ste import default_nm_filter as default_nm_filter
from sparsejax._src.transforms.sr_ste import mdgf_schedule as mdgf_schedule
from sparsejax._src.transforms.sr_ste import nm_project as nm_project
from sparsejax._src.transforms.sr_ste import nm_sr_ste as nm_sr_ste
from sparsejax._src.transforms.sr_ste import nm_ste as nm_ste
from sparsejax._src.transforms.sr_ste import sdgf_patterns as sdgf_patterns
from sparsejax._src.transforms.sr_ste import sdgf_schedule as sdgf_schedule
from sparsejax._src.transforms.methods import active_neurons as active_neurons
from sparsejax._src.transforms.methods import fan_in_counts as fan_in_counts
from sparsejax._src.transforms.methods import neurons_to_ablate as neurons_to_ablate
from sparsejax._src.transforms.methods import srigl as srigl
from sparsejax._src.primitives.structures import NM as NM
from sparsejax._src.primitives.structures import ConstantFanIn as ConstantFanIn
from sparsejax._src.primitives.structures import Unstructured as Unstructured
from sparsejax._src.primitives.structures import get_structure as get_structure

__version__ = "0.1.0"
