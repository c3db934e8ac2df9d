"""Mask primitives (layer 1): exact top-k selection, drop-and-grow, SRigL's ablation rule.

Pure functions on one array, jit-safe, no pytrees: the building blocks every method and
every structure uses, public so that custom structures and rules can use them too.
"""

from sparsejax._src.primitives.ablation import active_neurons as active_neurons
from sparsejax._src.primitives.ablation import fan_in_counts as fan_in_counts
from sparsejax._src.primitives.ablation import neurons_to_ablate as neurons_to_ablate
from sparsejax._src.primitives.drop_grow import drop_and_grow as drop_and_grow
from sparsejax._src.primitives.drop_grow import grouped_drop_and_grow as grouped_drop_and_grow
from sparsejax._src.primitives.nm_mask import is_nm_sparse as is_nm_sparse
from sparsejax._src.primitives.nm_mask import nm_mask as nm_mask
from sparsejax._src.primitives.selection import topk_mask as topk_mask

__all__ = (
  "active_neurons",
  "drop_and_grow",
  "fan_in_counts",
  "grouped_drop_and_grow",
  "is_nm_sparse",
  "neurons_to_ablate",
  "nm_mask",
  "topk_mask",
)
