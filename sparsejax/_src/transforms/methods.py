"""SRigL: RigL with a constant fan-in constraint and dynamic neuron ablation.

Reference: Lasby, Golubeva, Evci, Nica, Ioannou, "Dynamic Sparse Training with Structured
Sparsity", ICLR 2024, https://arxiv.org/abs/2305.02299. Semantics follow the official code
(calgaryml/condensed-sparsity ``RigLConstFanScheduler``; ALGORITHMS.md §4.2–4.3):

* drop is layer-wise by magnitude; regrowth is per neuron by |dense gradient|, back to
  exactly ``k = floor(numel·(1-S)) // n_active`` incoming weights for every active neuron;
* neuron ablation, recomputed at every update (so neurons can revive): salient weights are
  the top ``n_keep`` |w| ∪ the top ``n_drop`` |grad| over the whole layer; a neuron with
  fewer than ``max(1, int(γ_sal · k0))`` salient weights is ablated (``k0`` = the sparse
  fan-in without ablation), but at least ``min_neurons + 1`` neurons stay active
  (``min_neurons = floor(numel·(1-S)) // dense_fan_in``); the freed budget is redistributed
  (``k`` grows);
* the output layer (the last sparse leaf) is never ablated by default.

Departures, documented: when ``k`` shrinks (a neuron revives), over-full neurons are cut by
|w| with index tie-breaking, not by the reference's unstable boolean sort. Ablated neurons
have all-zero incoming weights; their bias is not masked (as in the reference), so they
output ``act(bias)``; the condensed export keeps full output width, so it reproduces that
exactly. In Flax layout a neuron is a column of ``[in, out]`` / the last axis of a conv
kernel, and its fan-in counts all other axes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from sparsejax._src import base
from sparsejax._src.primitives import selection, structures
from sparsejax._src.transforms import dynamic_sparse as dst


def neurons_to_ablate(
  weights: jax.Array,
  grads: jax.Array,
  n_keep: jax.Array,
  n_drop: jax.Array,
  sparsity: float,
  gamma_sal: float,
) -> jax.Array:
  """SRigL's ablation rule for one layer in ``[fan_in, n_out]`` layout.

  Args:
    weights: ``[fan_in, n_out]`` current weights (pruned entries 0).
    grads: ``[fan_in, n_out]`` dense gradient.
    n_keep: number of weights kept by the magnitude drop.
    n_drop: number of weights dropped (= grown).
    sparsity: the layer's sparsity S.
    gamma_sal: γ_sal in [0, 1], relative to the sparse fan-in ``k0``.

  Returns:
    bool ``[n_out]``: True for neurons to ablate.
  """
  fan_in, n_out = weights.shape
  budget = base.floor_count(fan_in * n_out, 1.0 - sparsity)
  min_neurons = min(budget // fan_in, n_out - 1)
  k0 = budget // n_out
  threshold = max(1, int(gamma_sal * k0))
  salient = selection.topk_mask(jnp.abs(weights), n_keep) | selection.topk_mask(
    jnp.abs(grads), n_drop
  )
  counts = jnp.sum(salient, axis=0, dtype=jnp.int32)
  guard = jnp.sort(counts)[::-1][min_neurons]  # (min_neurons+1)-th largest count
  threshold = jnp.minimum(jnp.int32(threshold), guard)
  return counts < threshold


def srigl(
  inner: optax.GradientTransformation,
  *,
  sparsity: float | None = None,
  gamma_sal: float = 0.3,
  dynamic_ablation: bool = True,
  no_ablation: str | None = None,
  structure: str | structures.Structure | None = None,
  **kwargs,
) -> optax.GradientTransformationExtraArgs:
  """SRigL: constant fan-in RigL with neuron ablation (Lasby et al., ICLR 2024).

  Args:
    inner: the optimizer to wrap.
    sparsity: target fraction of zeros, in [0, 1).
    gamma_sal: γ_sal in [0, 1]: a neuron needs at least ``max(1, int(γ_sal·k0))`` salient
      weights to stay active (``k0`` = the sparse fan-in without ablation). Default 0.3
      (the paper's CNN setting; the authors use 0.95 for ViTs).
    dynamic_ablation: enable neuron ablation (False gives "SRigL w/o ablation").
    no_ablation: regex of layers that are never ablated; default ``None`` protects the
      last sparse leaf (the output layer) only. Pass ``"$^"`` to protect nothing.
    structure: ``ConstantFanIn()`` (default) or ``NM(n, m)`` (N:M groups are constant
      fan-in per group; ablation does not apply to N:M and is disabled).
    **kwargs: the keywords of :func:`sparsejax.dynamic_sparse` (``update_every``,
      ``end_step``, ``drop_fraction``, ``distribution``, ...).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`DynamicSparseState`.

  Raises:
    ValueError: ``gamma_sal`` outside [0, 1]; a layer whose constant fan-in would be < 1;
      an invalid ``no_ablation`` regex; and the errors of :func:`dynamic_sparse`.
  """
  gamma_sal = base.check_fraction("gamma_sal", gamma_sal)
  if not isinstance(dynamic_ablation, bool):
    raise TypeError(f"`dynamic_ablation` must be a bool, got {dynamic_ablation!r}.")
  structure = structures.get_structure(structure if structure is not None else "fan_in")
  if isinstance(structure, structures.Unstructured):
    raise ValueError(
      "srigl needs structure=ConstantFanIn() (default) or NM(n, m); for unstructured "
      "masks use sparsejax.rigl."
    )
  try:
    exempt_re = re.compile(no_ablation) if no_ablation is not None else None
  except (re.error, TypeError) as e:
    raise ValueError(f"`no_ablation` must be a valid regex, got {no_ablation!r}: {e}") from e
  kwargs.setdefault("drop", "magnitude")
  kwargs.setdefault("grow", "gradient")
  ablate = dynamic_ablation and isinstance(structure, structures.ConstantFanIn)

  def leaf_update(ctx, drop_scores, grow_scores, n_drop, layer_sparsity, structure_, sparse_paths):
    if not ablate:
      return structure_.drop_and_grow(ctx.mask, drop_scores, grow_scores, n_drop, layer_sparsity)
    exempt = (
      exempt_re.search(ctx.path) is not None
      if exempt_re is not None
      else ctx.path == sparse_paths[-1]
    )
    shape = ctx.mask.shape
    fan_in = base.shape_size(shape[:-1])
    n_out = shape[-1]
    flat = (fan_in, n_out)
    nnz = jnp.sum(ctx.mask, dtype=jnp.int32)
    budget = base.floor_count(fan_in * n_out, 1.0 - layer_sparsity)
    if exempt:
      ablated = jnp.zeros((n_out,), bool)
    else:
      ablated = neurons_to_ablate(
        ctx.param.reshape(flat),
        ctx.grad.reshape(flat),
        nnz - n_drop,
        n_drop,
        layer_sparsity,
        gamma_sal,
      )
    n_active = n_out - jnp.sum(ablated, dtype=jnp.int32)
    k = jnp.int32(budget) // n_active
    per_neuron = jnp.where(ablated, 0, k)[None, :]
    drop_flat = jnp.where(ablated[None, :], -jnp.inf, drop_scores.reshape(flat))
    new, kept = selection.grouped_drop_and_grow(
      ctx.mask.reshape(flat), drop_flat, grow_scores.reshape(flat), n_drop, per_neuron, axis=0
    )
    return new.reshape(shape), kept.reshape(shape)

  return dst.dynamic_sparse(
    inner, sparsity=sparsity, structure=structure, leaf_mask_update=leaf_update, **kwargs
  )


def active_neurons(mask: jax.Array) -> jax.Array:
  """bool ``[n_out]``: neurons (last axis) with at least one active incoming weight."""
  return jnp.any(mask.reshape(-1, mask.shape[-1]), axis=0)


def fan_in_counts(mask: jax.Array) -> jax.Array:
  """int32 ``[n_out]``: active incoming weights per neuron (Flax layout, neuron axis last)."""
  return jnp.sum(mask.reshape(-1, mask.shape[-1]), axis=0, dtype=jnp.int32)


__all__: Sequence[str] = ("srigl", "neurons_to_ablate", "active_neurons", "fan_in_counts")
