"""Per-layer sparsity distributions: uniform, Erdős–Rényi (ER) and ERK.

All functions are pure Python/NumPy on shapes, so they run on ``jax.ShapeDtypeStruct``
params and under ``jax.eval_shape``.

Budget convention (ALGORITHMS.md §1.2; we follow google-research/rigl):
  * Layers listed in ``overrides`` get their given sparsity and are *outside* the ERK
    budget (GR ``custom_sparsity_map``).
  * Layers pushed to density 1 because ERK would give them a density above 1 are
    "dense but counted": the other layers become sparser so that the total number of
    nonzeros over the distributed layers matches the target. All layers that tie for the
    largest raw density are moved together (GR/jaxpruner; calgaryml/condensed-sparsity and
    sparsimony move one at a time, which differs only in rare ties).
  * Leaves that are not sparse at all (biases, filtered-out layers, first/last layer kept
    dense) are outside everything: the target sparsity applies to the sparse layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from sparsejax._src import base

Shapes = Mapping[str, Sequence[int]]
Distribution = Callable[..., dict[str, float]]


def uniform(
  shapes: Shapes, sparsity: float, *, overrides: Mapping[str, float] | None = None
) -> dict[str, float]:
  """Every layer gets ``sparsity``, except those in ``overrides``.

  Args:
    shapes: ``{path: shape}`` of the sparse layers.
    sparsity: fraction of zeros, in [0, 1).
    overrides: ``{path: sparsity}`` for layers with an explicit value.

  Returns:
    ``{path: sparsity}`` for every path in ``shapes``.
  """
  overrides = dict(overrides or {})
  return {p: overrides.get(p, sparsity) for p in shapes}


def _erdos_renyi_family(
  shapes: Shapes,
  sparsity: float,
  raw_density: Callable[[Sequence[int]], float],
  overrides: Mapping[str, float] | None,
  name: str,
) -> dict[str, float]:
  overrides = dict(overrides or {})
  # A zero-size layer has nothing to prune: dense, outside the budget (its raw density
  # sum/prod would be inf/nan).
  empty = {p for p in shapes if base.shape_size(shapes[p]) == 0}
  distributed = [p for p in shapes if p not in overrides and p not in empty]
  sizes = {p: base.shape_size(shapes[p]) for p in distributed}
  raw = {p: raw_density(shapes[p]) for p in distributed}
  dense: set[str] = set()
  while True:
    rhs = 0.0
    divisor = 0.0
    for p in distributed:
      n_zeros = base.floor_count(sizes[p], sparsity)
      if p in dense:
        rhs -= n_zeros
      else:
        rhs += sizes[p] - n_zeros
        divisor += raw[p] * sizes[p]
    if divisor == 0.0:
      # Every layer dense: that is the target exactly when no layer was to lose a weight
      # (floor(N·S) == 0 for all, e.g. a tiny sparsity), and unreachable otherwise.
      if rhs < 0:
        raise ValueError(
          f"distribution={name!r} cannot reach sparsity={sparsity}: every distributed "
          f"layer would have to be dense ({sorted(dense)}). Lower `sparsity`, use "
          "distribution='uniform', or change `overrides`."
        )
      break
    eps = rhs / divisor
    free = {p: raw[p] for p in distributed if p not in dense}
    max_raw = max(free.values())
    if max_raw * eps > 1.0:
      dense.update(p for p, r in free.items() if r == max_raw)
      continue
    break
  out: dict[str, float] = {}
  for p in shapes:
    if p in overrides:
      out[p] = overrides[p]
    elif p in dense or p in empty:
      out[p] = 0.0
    else:
      out[p] = float(1.0 - eps * raw[p])
      if out[p] >= 1.0:
        raise ValueError(
          f"distribution={name!r} cannot reach sparsity={sparsity}: layer {p!r} would "
          f"need sparsity {out[p]:.4f} >= 1 (the dense layers take the whole budget)."
        )
  return out


def erdos_renyi(
  shapes: Shapes, sparsity: float, *, overrides: Mapping[str, float] | None = None
) -> dict[str, float]:
  """Erdős–Rényi distribution: density ∝ (n_in + n_out) / (n_in · n_out).

  Kernel (spatial) dimensions are ignored: ``n_in, n_out = shape[-2], shape[-1]`` (Flax
  layout). Reference: Mocanu et al. 2018, https://arxiv.org/abs/1707.04780; the budget
  algorithm of Evci et al. 2020 (``get_sparsities_erdos_renyi``, ``include_kernel=False``).

  Args:
    shapes: ``{path: shape}`` of the sparse layers.
    sparsity: target fraction of zeros over the distributed layers, in [0, 1).
    overrides: ``{path: sparsity}``, outside the budget.

  Returns:
    ``{path: sparsity}``.

  Raises:
    ValueError: if the target cannot be reached.
  """

  def raw(shape):
    if len(shape) < 2:
      return 1.0
    n_in, n_out = shape[-2], shape[-1]
    return (n_in + n_out) / (n_in * n_out)

  return _erdos_renyi_family(shapes, sparsity, raw, overrides, "erdos_renyi")


def erk(
  shapes: Shapes,
  sparsity: float,
  *,
  overrides: Mapping[str, float] | None = None,
  power_scale: float = 1.0,
) -> dict[str, float]:
  """Erdős–Rényi-Kernel: density ∝ (sum(shape) / prod(shape)) ** power_scale.

  Reference: Evci et al. 2020, "Rigging the Lottery", https://arxiv.org/abs/1911.11134
  (google-research/rigl ``sparse_utils.get_sparsities_erdos_renyi``). The axis order does
  not matter, so Flax and PyTorch shapes give the same numbers, e.g. LeNet-300-100 at 0.9:
  0.9204, 0.7698, 0.0 (ALGORITHMS.md §1.2).

  Args:
    shapes: ``{path: shape}`` of the sparse layers.
    sparsity: target fraction of zeros over the distributed layers, in [0, 1).
    overrides: ``{path: sparsity}``, outside the budget.
    power_scale: softens ERK; 0 gives uniform.

  Returns:
    ``{path: sparsity}``.

  Raises:
    ValueError: if the target cannot be reached.
  """

  def raw(shape):
    return float((np.sum(shape) / base.shape_size(shape)) ** power_scale)

  return _erdos_renyi_family(shapes, sparsity, raw, overrides, "erk")


def global_(
  shapes: Shapes, sparsity: float, *, overrides: Mapping[str, float] | None = None
) -> dict[str, float]:
  """``distribution="global"``: one ranking across all sparse layers.

  The per-layer budgets are not fixed in advance: whenever a budget is set (one-shot
  pruning with :func:`sparsejax.prune`, every pruning step of :func:`sparsejax.gmp` and
  :func:`sparsejax.granet`, and the initial masks of the other methods), the scores of all
  pooled layers are ranked together and the top ``N·(1 - S)`` weights are kept, so each
  layer ends at whatever sparsity the single threshold gives it (jaxpruner's global
  magnitude without per-layer normalisation; GraNet's global pruning). Layers in
  ``overrides`` are pruned on their own at their given sparsity, outside the pool. As a
  plan (before any scores exist) every pooled layer is listed at ``sparsity``.

  Caveat (SynFlow, Tanaka et al. 2020): with data-free scores at high sparsity a whole
  layer can be pruned away; sparsejax keeps at least one weight per layer.
  """
  return uniform(shapes, sparsity, overrides=overrides)


DISTRIBUTIONS: dict[str, Distribution] = {
  "global": global_,
  "uniform": uniform,
  "erdos_renyi": erdos_renyi,
  "er": erdos_renyi,
  "erk": erk,
}


def get_distribution(distribution: str | Distribution) -> Distribution:
  """Resolves a distribution given by name or as a function."""
  if callable(distribution):
    return distribution
  if distribution not in DISTRIBUTIONS:
    raise ValueError(
      f"Unknown `distribution` {distribution!r}; allowed: {sorted(DISTRIBUTIONS)} or a "
      "function (shapes, sparsity, *, overrides) -> {path: sparsity}."
    )
  return DISTRIBUTIONS[distribution]
