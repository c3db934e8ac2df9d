"""sparsejax: dynamic sparse training for JAX, as composable Optax transformations.

The public API is flat: ``import sparsejax as sj; tx = sj.rigl(optax.adam(1e-3), ...)``.
Implementation lives in private modules under ``sparsejax._src``; do not import from there.
"""

from sparsejax._src.base import ScoreContext as ScoreContext
from sparsejax._src.criteria import get_criterion as get_criterion
from sparsejax._src.criteria import gradient_magnitude as gradient_magnitude
from sparsejax._src.criteria import magnitude as magnitude
from sparsejax._src.criteria import momentum_magnitude as momentum_magnitude
from sparsejax._src.criteria import random as random_scores
from sparsejax._src.criteria import register_criterion as register_criterion
from sparsejax._src.criteria import registered_criteria as registered_criteria
from sparsejax._src.distributions import erdos_renyi as erdos_renyi
from sparsejax._src.distributions import erk as erk
from sparsejax._src.distributions import uniform as uniform
from sparsejax._src.dst import DynamicSparseState as DynamicSparseState
from sparsejax._src.dst import apply_masks as apply_masks
from sparsejax._src.dst import dynamic_sparse as dynamic_sparse
from sparsejax._src.dst import find_dst_state as find_dst_state
from sparsejax._src.dst import format_summary as format_summary
from sparsejax._src.dst import get_masks as get_masks
from sparsejax._src.dst import is_mask_update_step as is_mask_update_step
from sparsejax._src.dst import layer_sparsities as layer_sparsities
from sparsejax._src.dst import rigl as rigl
from sparsejax._src.dst import set_ as set_
from sparsejax._src.dst import static_sparse as static_sparse
from sparsejax._src.dst import summarize as summarize
from sparsejax._src.selection import drop_and_grow as drop_and_grow
from sparsejax._src.selection import grouped_drop_and_grow as grouped_drop_and_grow
from sparsejax._src.selection import topk_mask as topk_mask
from sparsejax._src.srigl import active_neurons as active_neurons
from sparsejax._src.srigl import fan_in_counts as fan_in_counts
from sparsejax._src.srigl import neurons_to_ablate as neurons_to_ablate
from sparsejax._src.srigl import srigl as srigl
from sparsejax._src.structures import NM as NM
from sparsejax._src.structures import ConstantFanIn as ConstantFanIn
from sparsejax._src.structures import Unstructured as Unstructured
from sparsejax._src.structures import get_structure as get_structure

__version__ = "0.1.0"
