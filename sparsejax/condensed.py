"""Condensed constant-fan-in (SRigL) format: compression, matmul kernels and Flax layers.

``import sparsejax as sj; c = sj.condensed.condense(kernel)``. ``condense`` and
``condensed_matmul`` are also at the top level; Flax (for the layers) is imported when
first used.
"""

from typing import TYPE_CHECKING

from sparsejax._src.formats.condensed import Condensed as Condensed
from sparsejax._src.formats.condensed import NotConstantFanInError as NotConstantFanInError
from sparsejax._src.formats.condensed import condense as condense
from sparsejax._src.formats.condensed import condensed_matmul as condensed_matmul
from sparsejax._src.formats.condensed import condensed_nbytes as condensed_nbytes
from sparsejax._src.formats.condensed import select_condensed_method as select_condensed_method
from sparsejax._src.formats.condensed import uncondense as uncondense
from sparsejax._src.kernels.condensed_native import native_available as native_available
from sparsejax._src.kernels.condensed_native import native_cpu_isa as native_cpu_isa
from sparsejax._src.kernels.condensed_native import (
  native_unavailable_reason as native_unavailable_reason,
)

if TYPE_CHECKING:  # the Flax layers load lazily (see __getattr__ below)
  from sparsejax._src.integration.condensed_layers import CondensedBuffer as CondensedBuffer
  from sparsejax._src.integration.condensed_layers import CondensedDense as CondensedDense
  from sparsejax._src.integration.condensed_layers import condense_params as condense_params
  from sparsejax._src.integration.condensed_layers import condensed_conv as condensed_conv
  from sparsejax._src.integration.condensed_layers import (
    condensed_dense_apply as condensed_dense_apply,
  )

__all__ = (
  "Condensed",
  "CondensedBuffer",
  "CondensedDense",
  "NotConstantFanInError",
  "condense",
  "condense_params",
  "condensed_conv",
  "condensed_dense_apply",
  "condensed_matmul",
  "condensed_nbytes",
  "native_available",
  "native_cpu_isa",
  "native_unavailable_reason",
  "select_condensed_method",
  "uncondense",
)


# Flax layers: imported on first use, so that the format and kernels do not load Flax.
_FLAX_LAYERS = (
  "CondensedBuffer",
  "CondensedDense",
  "condense_params",
  "condensed_conv",
  "condensed_dense_apply",
)


def __getattr__(name: str):
  if name in _FLAX_LAYERS:
    import importlib  # pylint: disable=g-import-not-at-top

    value = getattr(importlib.import_module("sparsejax._src.integration.condensed_layers"), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
