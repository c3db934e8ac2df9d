"""SRigL's neuron ablation rule and per-neuron mask statistics (pure, per array).

Reference: Lasby, Golubeva, Evci, Nica, Ioannou, "Dynamic Sparse Training with Structured
Sparsity", ICLR 2024, https://arxiv.org/abs/2305.02299; semantics of the official code
(calgaryml/condensed-sparsity ``RigLConstFanScheduler``, ALGORITHMS.md §4.2–4.3).

Layout: a kernel is viewed as ``[fan_in, n_out]`` (Flax layout, neurons on the last axis;
a conv kernel's fan-in counts all other axes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax._src import base
from sparsejax._src.primitives import drop_grow, native_select, score_form, selection


def neurons_to_ablate(
  weights: jax.Array,
  grads: jax.Array,
  n_keep: jax.Array,
  n_drop: jax.Array,
  sparsity: float,
  gamma_sal: float,
  relative_to: str = "sparse",
) -> jax.Array:
  """SRigL's ablation rule for one layer in ``[fan_in, n_out]`` layout.

  Salient weights are the top ``n_keep`` ``|w|`` ∪ the top ``n_drop`` ``|grad|`` over the
  whole layer. A neuron with fewer than ``max(1, int(gamma_sal · f))`` salient weights is
  ablated, where ``f`` is the sparse fan-in without ablation ``k0 = floor(numel·(1-S)) //
  n_out`` (``relative_to="sparse"``, the reference's default
  ``use_sparse_const_fan_in_for_ablation=True``) or the dense fan-in
  (``relative_to="dense"``); at least ``min_neurons + 1`` neurons stay active
  (``min_neurons = floor(numel·(1-S)) // fan_in``).

  Args:
    weights: ``[fan_in, n_out]`` current weights (pruned entries 0).
    grads: ``[fan_in, n_out]`` dense gradient.
    n_keep: number of weights kept by the magnitude drop.
    n_drop: number of weights dropped (= grown).
    sparsity: the layer's sparsity S.
    gamma_sal: γ_sal in [0, 1].
    relative_to: ``"sparse"`` (default) or ``"dense"``: the fan-in γ_sal multiplies.

  Returns:
    bool ``[n_out]``: True for neurons to ablate.
  """
  _, min_neurons, threshold = _rule_constants(weights.shape, sparsity, gamma_sal, relative_to)
  counts = jnp.stack([jnp.asarray(n_keep, jnp.int32), jnp.asarray(n_drop, jnp.int32)])

  def xla():
    salient = selection.topk_mask(jnp.abs(weights), counts[0]) | selection.topk_mask(
      jnp.abs(grads), counts[1]
    )
    per_neuron = selection.count_true(salient, axis=0)[0]
    guard = jnp.sort(per_neuron)[::-1][min_neurons]  # (min_neurons+1)-th largest count
    return per_neuron < jnp.minimum(jnp.int32(threshold), guard)

  # Native: both selections, the per-neuron counts and the rule in one call, reading
  # |w| and |g| in place (no float copies, no bool temporaries).
  return selection.native_or_xla(
    lambda: native_select.ablate(weights, grads, counts, threshold, min_neurons), xla
  )


def _rule_constants(shape, sparsity, gamma_sal, relative_to) -> tuple[int, int, int]:
  """``(budget, min_neurons, threshold)`` of the ablation rule for a ``[fan_in, n_out]``
  layer (see :func:`neurons_to_ablate`)."""
  fan_in, n_out = shape
  budget = base.floor_count(fan_in * n_out, 1.0 - sparsity)
  if relative_to not in ("sparse", "dense"):
    raise ValueError(f"`relative_to` must be 'sparse' or 'dense', got {relative_to!r}.")
  reference = budget // n_out if relative_to == "sparse" else fan_in
  return budget, min(budget // fan_in, n_out - 1), max(1, int(gamma_sal * reference))


def ablated_drop_and_grow(
  mask: jax.Array,
  drop_scores: score_form.Scores,
  grow_scores: score_form.Scores,
  n_drop: jax.Array,
  weights: jax.Array,
  grads: jax.Array,
  sparsity: float,
  gamma_sal: float,
  relative_to: str = "sparse",
) -> tuple[jax.Array, jax.Array]:
  """SRigL's mask update of a layer that ablates neurons, in ``[fan_in, n_out]`` layout.

  The ablation rule (:func:`neurons_to_ablate`, with ``n_keep = nnz(mask) - n_drop``)
  picks the neurons to ablate; every other neuron's fan-in becomes ``budget // n_active``
  (``budget = floor(size · (1 - S))``) and an ablated neuron's 0; the grouped
  drop-and-grow (``drop_grow.grouped_drop_and_grow`` with the cap) keeps only weights of
  active neurons in its layer-wise drop. Reference: SRigL (Lasby et al. 2024), the
  official ``RigLConstFanScheduler``. On a one-device CPU process it is one native call
  (no per-neuron XLA glue around the ablation rule).

  Args:
    mask: bool ``[fan_in, n_out]``.
    drop_scores, grow_scores: ``[fan_in, n_out]`` scores (arrays or score forms).
    n_drop: int32 scalar, the weights dropped before regrowth.
    weights, grads: ``[fan_in, n_out]``, the ablation rule's inputs.
    sparsity, gamma_sal, relative_to: as in :func:`neurons_to_ablate`.

  Returns:
    ``(new_mask, kept)`` as in ``drop_grow.grouped_drop_and_grow``.
  """
  budget, min_neurons, threshold = _rule_constants(mask.shape, sparsity, gamma_sal, relative_to)

  def xla():
    nnz = selection.count_true(mask)
    ablated = neurons_to_ablate(
      weights, grads, nnz - n_drop, n_drop, sparsity, gamma_sal, relative_to
    )
    n_active = mask.shape[1] - jnp.sum(ablated, dtype=jnp.int32)
    per_neuron = jnp.where(ablated, 0, jnp.int32(budget) // n_active)[None, :]
    eligible = ~ablated[None, :]  # an ablated neuron's weights are dropped first
    return drop_grow.grouped_drop_and_grow(
      mask, drop_scores, grow_scores, n_drop, per_neuron, axis=0, cap=True, eligible=eligible
    )

  return selection.native_or_xla(
    lambda: native_select.ablated_drop_and_grow(
      mask, drop_scores, grow_scores, n_drop, weights, grads, threshold, min_neurons, budget
    ),
    xla,
  )


def active_neurons(mask: jax.Array) -> jax.Array:
  """bool ``[n_out]``: neurons (last axis) with at least one active incoming weight."""
  return jnp.any(mask.reshape(-1, mask.shape[-1]), axis=0)


def fan_in_counts(mask: jax.Array) -> jax.Array:
  """int32 ``[n_out]``: active incoming weights per neuron (Flax layout, neuron axis last)."""
  return jnp.sum(mask.reshape(-1, mask.shape[-1]), axis=0, dtype=jnp.int32)
