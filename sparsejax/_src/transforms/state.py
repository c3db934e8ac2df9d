"""The state every sparsejax method keeps inside the optimizer state."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from sparsejax._src import base


class DynamicSparseState(NamedTuple):
  """State of a sparsejax transformation (every method: DST, static, SR-STE, pruning).

  Attributes:
    count: int32 scalar, number of ``update`` calls so far (the step index ``t``).
    key: uint32 ``[2]`` PRNG key; update ``t`` of leaf ``i`` uses
      ``fold_in(fold_in(key, t), i)``, so draws do not depend on device count.
    masks: params-structured pytree: a bool mask (shaped like the param) for each sparse
      leaf, ``optax.MaskedNode()`` for dense leaves.
    inner_state: the inner optimizer's state.
    skipped_updates: int32 scalar, number of scheduled mask updates skipped because a
      gradient, weight or score was NaN/inf (masks are left unchanged then).
  """

  count: jax.Array
  key: jax.Array
  masks: base.Masks
  inner_state: optax.OptState
  skipped_updates: jax.Array
