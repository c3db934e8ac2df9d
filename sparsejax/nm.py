"""N:M sparsity: the compressed format, the matmul kernels, Flax layers and SR-STE.

``import sparsejax as sj; sj.nm.nm_compress(w, 2, 4)``. The most used entry points
(``NM``, ``nm_compress``, ``nm_decompress``, ``nm_matmul``, ``nm_sr_ste``) are also at the
top level. Flax (for the layers) and Pallas (for the GPU/TPU kernels) are imported when
first used.
"""

from typing import TYPE_CHECKING

from sparsejax._src.formats.nm_format import NMSparse as NMSparse
from sparsejax._src.formats.nm_format import make_nm_sparse as make_nm_sparse
from sparsejax._src.formats.nm_format import nm_compress as nm_compress
from sparsejax._src.formats.nm_format import nm_decompress as nm_decompress
from sparsejax._src.formats.nm_format import nm_nbytes as nm_nbytes
from sparsejax._src.formats.nm_format import nm_take as nm_take
from sparsejax._src.formats.nm_packing import index_bits as index_bits
from sparsejax._src.formats.nm_packing import pack_indices as pack_indices
from sparsejax._src.formats.nm_packing import unpack_indices as unpack_indices
from sparsejax._src.kernels.nm_matmul import nm_matmul as nm_matmul
from sparsejax._src.kernels.nm_matmul import nm_matmul_dense_grad as nm_matmul_dense_grad
from sparsejax._src.kernels.nm_matmul import nm_matmul_reference as nm_matmul_reference
from sparsejax._src.primitives.nm_mask import is_nm_sparse as is_nm_sparse
from sparsejax._src.primitives.nm_mask import nm_mask as nm_mask
from sparsejax._src.primitives.structures import NM as NM
from sparsejax._src.transforms.sr_ste import NMSRSTEState as NMSRSTEState
from sparsejax._src.transforms.sr_ste import default_nm_filter as default_nm_filter
from sparsejax._src.transforms.sr_ste import mdgf_schedule as mdgf_schedule
from sparsejax._src.transforms.sr_ste import nm_project as nm_project
from sparsejax._src.transforms.sr_ste import nm_sr_ste as nm_sr_ste
from sparsejax._src.transforms.sr_ste import nm_ste as nm_ste
from sparsejax._src.transforms.sr_ste import sdgf_patterns as sdgf_patterns
from sparsejax._src.transforms.sr_ste import sdgf_schedule as sdgf_schedule

if TYPE_CHECKING:  # the Flax layers load lazily (see __getattr__ below)
  from sparsejax._src.integration.nm_layers import NM_INDICES_COLLECTION as NM_INDICES_COLLECTION
  from sparsejax._src.integration.nm_layers import NMDense as NMDense
  from sparsejax._src.integration.nm_layers import NMDenseLinen as NMDenseLinen
  from sparsejax._src.integration.nm_layers import NMIndices as NMIndices
  from sparsejax._src.integration.nm_layers import nm_dense_from_kernel as nm_dense_from_kernel
  from sparsejax._src.integration.nm_layers import (
    nm_dense_linen_variables as nm_dense_linen_variables,
  )

__all__ = (
  "NM",
  "NMSparse",
  "NMDense",
  "NMDenseLinen",
  "NMIndices",
  "NM_INDICES_COLLECTION",
  "NMSRSTEState",
  "default_nm_filter",
  "index_bits",
  "is_nm_sparse",
  "make_nm_sparse",
  "mdgf_schedule",
  "nm_compress",
  "nm_decompress",
  "nm_dense_from_kernel",
  "nm_dense_linen_variables",
  "nm_mask",
  "nm_matmul",
  "nm_matmul_dense_grad",
  "nm_matmul_reference",
  "nm_nbytes",
  "nm_project",
  "nm_sr_ste",
  "nm_ste",
  "nm_take",
  "pack_indices",
  "sdgf_patterns",
  "sdgf_schedule",
  "unpack_indices",
)


# Flax layers: imported on first use, so that the format and kernels do not load Flax.
_FLAX_LAYERS = (
  "NM_INDICES_COLLECTION",
  "NMDense",
  "NMDenseLinen",
  "NMIndices",
  "nm_dense_from_kernel",
  "nm_dense_linen_variables",
)


def __getattr__(name: str):
  if name in _FLAX_LAYERS:
    import importlib  # pylint: disable=g-import-not-at-top

    value = getattr(importlib.import_module("sparsejax._src.integration.nm_layers"), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
