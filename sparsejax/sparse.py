"""Truly sparse training: layers that store and compute only their active weights.

``import sparsejax as sj``; a masked DST method becomes truly sparse with one call::

  tx = sj.sparse.truly_sparse(sj.rigl(optax.adam(1e-3), sparsity=0.9, end_step=7500))
  model = sj.sparse.sparsify(dense_model, tx)       # nnx.Linear/Conv -> SparseLinear/Conv
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  train_step = sj.sparse.SparseTrainStep(loss_fn)   # regular / topology step by schedule
  loss = train_step(model, optimizer, x, y)

The format (:class:`SparseCSR`: values + :class:`CSRTopology`), the kernels
(:func:`sparse_matmul`: native C++ on the CPU, pure XLA elsewhere) and the transformation
(:class:`SparseDST`, :func:`update_topology`) load without Flax; the Flax layers and
training steps load on first use.
"""

from typing import TYPE_CHECKING

from sparsejax._src.formats.condensed import NotConstantFanInError as NotConstantFanInError
from sparsejax._src.formats.sparse_csr import SparseCSR as SparseCSR
from sparsejax._src.formats.sparse_csr import random_mask as random_mask
from sparsejax._src.formats.sparse_csr import training_nbytes as training_nbytes
from sparsejax._src.formats.sparse_csr import tree_nbytes as tree_nbytes
from sparsejax._src.kernels.sparse_native import native_available as native_available
from sparsejax._src.kernels.sparse_native import native_cpu_isa as native_cpu_isa
from sparsejax._src.kernels.sparse_native import (
  native_unavailable_reason as native_unavailable_reason,
)
from sparsejax._src.kernels.sparse_native import topology_ops as topology_ops
from sparsejax._src.kernels.sparse_train import select_method as select_method
from sparsejax._src.kernels.sparse_train import sparse_matmul as sparse_matmul
from sparsejax._src.kernels.sparse_train import sparse_matmul_reference as sparse_matmul_reference
from sparsejax._src.kernels.sparse_train import update_topology as update_topology
from sparsejax._src.transforms.sparse_dst import SlotMasks as SlotMasks
from sparsejax._src.transforms.sparse_dst import SparseDST as SparseDST
from sparsejax._src.transforms.sparse_dst import SparseDSTState as SparseDSTState
from sparsejax._src.transforms.sparse_dst import TopologyUpdate as TopologyUpdate
from sparsejax._src.transforms.sparse_dst import layer_capacity as layer_capacity
from sparsejax._src.transforms.sparse_dst import truly_sparse as truly_sparse
from sparsejax._src.transforms.sparse_methods import dynamic_sparse as dynamic_sparse
from sparsejax._src.transforms.sparse_methods import rigl as rigl
from sparsejax._src.transforms.sparse_methods import set_ as set_
from sparsejax._src.transforms.sparse_methods import srigl as srigl
from sparsejax._src.transforms.sparse_methods import static_sparse as static_sparse
from sparsejax._src.transforms.sparse_topology import XLA_OPS as XLA_OPS
from sparsejax._src.transforms.sparse_topology import CSRTopology as CSRTopology
from sparsejax._src.transforms.sparse_topology import TopologyOps as TopologyOps
from sparsejax._src.transforms.sparse_topology import topology_from_mask as topology_from_mask

if TYPE_CHECKING:  # the Flax layers and steps load lazily (see __getattr__ below)
  from sparsejax._src.integration.sparse_layers import TOPOLOGY_COLLECTION as TOPOLOGY_COLLECTION
  from sparsejax._src.integration.sparse_layers import SparseConv as SparseConv
  from sparsejax._src.integration.sparse_layers import SparseDenseLinen as SparseDenseLinen
  from sparsejax._src.integration.sparse_layers import SparseLinear as SparseLinear
  from sparsejax._src.integration.sparse_layers import SparseTopologyVar as SparseTopologyVar
  from sparsejax._src.integration.sparse_layers import probing as probing
  from sparsejax._src.integration.sparse_layers import sparse_modules as sparse_modules
  from sparsejax._src.integration.sparse_layers import sparsify as sparsify
  from sparsejax._src.integration.sparse_trainer import SparseTrainStep as SparseTrainStep
  from sparsejax._src.integration.sparse_trainer import dense_kernels as dense_kernels
  from sparsejax._src.integration.sparse_trainer import dense_view as dense_view
  from sparsejax._src.integration.sparse_trainer import layer_topologies as layer_topologies
  from sparsejax._src.integration.sparse_trainer import linen_topologies as linen_topologies
  from sparsejax._src.integration.sparse_trainer import linen_update as linen_update
  from sparsejax._src.integration.sparse_trainer import regular_update as regular_update
  from sparsejax._src.integration.sparse_trainer import step_count as step_count
  from sparsejax._src.integration.sparse_trainer import topology_update as topology_update

_FLAX = {
  "TOPOLOGY_COLLECTION": "sparse_layers",
  "SparseConv": "sparse_layers",
  "SparseDenseLinen": "sparse_layers",
  "SparseLinear": "sparse_layers",
  "SparseTopologyVar": "sparse_layers",
  "probing": "sparse_layers",
  "sparse_modules": "sparse_layers",
  "sparsify": "sparse_layers",
  "SparseTrainStep": "sparse_trainer",
  "dense_kernels": "sparse_trainer",
  "dense_view": "sparse_trainer",
  "layer_topologies": "sparse_trainer",
  "linen_topologies": "sparse_trainer",
  "linen_update": "sparse_trainer",
  "regular_update": "sparse_trainer",
  "step_count": "sparse_trainer",
  "topology_update": "sparse_trainer",
}

__all__ = (
  "CSRTopology",
  "NotConstantFanInError",
  "SlotMasks",
  "SparseCSR",
  "SparseDST",
  "SparseDSTState",
  "TopologyOps",
  "TopologyUpdate",
  "XLA_OPS",
  "dynamic_sparse",
  "layer_capacity",
  "native_available",
  "native_cpu_isa",
  "native_unavailable_reason",
  "random_mask",
  "rigl",
  "select_method",
  "set_",
  "sparse_matmul",
  "sparse_matmul_reference",
  "srigl",
  "static_sparse",
  "topology_from_mask",
  "topology_ops",
  "training_nbytes",
  "tree_nbytes",
  "truly_sparse",
  "update_topology",
  *_FLAX,
)


def __getattr__(name: str):
  if name in _FLAX:
    import importlib  # pylint: disable=g-import-not-at-top

    module = importlib.import_module(f"sparsejax._src.integration.{_FLAX[name]}")
    value = getattr(module, name)
    globals()[name] = value
    return value
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
