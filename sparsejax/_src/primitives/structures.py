"""Sparsity structures: which masks are allowed, and how drop-and-grow respects them.

A structure is a small frozen record with four hooks used by every DST method:

* ``layer_sparsity(path, shape, requested)``: the sparsity this leaf will actually have
  (validates the shape, e.g. N:M divisibility, constant fan-in ≥ 1);
* ``target_nnz(shape, sparsity)``: the exact number of nonzeros of a mask;
* ``random_mask(key, shape, sparsity)``: a random initial mask satisfying the structure;
* ``drop_and_grow(mask, drop_scores, grow_scores, n_drop, sparsity)``: one mask update
  that keeps nnz (and the structure) exactly.

Axes follow the Flax layout: the neuron (output) axis is the **last** axis, and the
contraction ("fan-in") axis is the product of all other axes (Dense ``[in, out]``: axis 0;
Conv ``[kh, kw, in, out]``: ``kh·kw·in``, with ``in`` fastest). N:M groups run along that
contraction axis, so a conv's groups are M consecutive input channels at one tap (the
NVIDIA 2:4 convention) when ``in % M == 0``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from sparsejax._src import base
from sparsejax._src.primitives import selection


def _uniform_scores(key: jax.Array, shape: Sequence[int]) -> jax.Array:
  return jax.random.uniform(key, tuple(shape), jnp.float32)


def _fan_in_shape(shape: Sequence[int]) -> tuple[int, int]:
  shape = tuple(shape)
  return base.shape_size(shape[:-1]), shape[-1]


@dataclasses.dataclass(frozen=True)
class Unstructured:
  """Any mask with the right number of nonzeros (SET, RigL)."""

  def layer_sparsity(self, path: str, shape: Sequence[int], requested: float) -> float:
    del path, shape
    return requested

  def target_nnz(self, shape: Sequence[int], sparsity: float) -> int:
    return base.nnz_for_sparsity(base.shape_size(shape), sparsity)

  def random_mask(self, key: jax.Array, shape: Sequence[int], sparsity: float) -> jax.Array:
    return selection.topk_mask(_uniform_scores(key, shape), self.target_nnz(shape, sparsity))

  def drop_and_grow(self, mask, drop_scores, grow_scores, n_drop, sparsity):
    del sparsity
    return selection.drop_and_grow(mask, drop_scores, grow_scores, n_drop)


@dataclasses.dataclass(frozen=True)
class ConstantFanIn:
  """Every neuron has exactly ``k`` nonzero incoming weights (SRigL's constraint).

  ``k = floor(size·(1-S)) // n_out`` (calgaryml/condensed-sparsity
  ``get_fan_in_after_ablation``), so the realised sparsity is at or slightly above the
  requested one. Drop is layer-wise by score; regrowth is per neuron back to ``k``.
  Reference: Lasby et al. 2024, https://arxiv.org/abs/2305.02299.
  """

  def fan_in(self, shape: Sequence[int], sparsity: float, n_active: int | None = None) -> int:
    fan_in, n_out = _fan_in_shape(shape)
    budget = base.floor_count(fan_in * n_out, 1.0 - sparsity)
    return budget // (n_out if n_active is None else n_active)

  def layer_sparsity(self, path: str, shape: Sequence[int], requested: float) -> float:
    if len(shape) < 2:
      raise ValueError(
        f"structure=ConstantFanIn() needs leaves with ndim >= 2; {path!r} has shape "
        f"{tuple(shape)}. Exclude it with `exclude=`."
      )
    k = self.fan_in(shape, requested)
    if k < 1:
      fan_in, n_out = _fan_in_shape(shape)
      raise ValueError(
        f"structure=ConstantFanIn() cannot reach sparsity={requested:.4f} on {path!r} "
        f"(shape {tuple(shape)}, fan-in {fan_in}): the constant fan-in would be "
        f"floor({fan_in * n_out}·{1 - requested:.4f}) // {n_out} = {k} < 1. Lower the "
        "sparsity of this layer (`overrides=`) or keep it dense (`exclude=`)."
      )
    return requested

  def target_nnz(self, shape: Sequence[int], sparsity: float) -> int:
    return self.fan_in(shape, sparsity) * tuple(shape)[-1]

  def random_mask(self, key: jax.Array, shape: Sequence[int], sparsity: float) -> jax.Array:
    fan_in, n_out = _fan_in_shape(shape)
    scores = _uniform_scores(key, (fan_in, n_out))
    return selection.topk_mask(scores, self.fan_in(shape, sparsity), axis=0).reshape(shape)

  def drop_and_grow(self, mask, drop_scores, grow_scores, n_drop, sparsity):
    """Layer-wise drop, per-neuron regrowth back to the fan-in k."""
    shape = mask.shape
    flat = _fan_in_shape(shape)
    new, kept = selection.grouped_drop_and_grow(
      mask.reshape(flat),
      drop_scores.reshape(flat),
      grow_scores.reshape(flat),
      n_drop,
      self.fan_in(shape, sparsity),
      axis=0,
      cap=False,  # every neuron holds exactly k before the update: none can be over-full
    )
    return new.reshape(shape), kept.reshape(shape)


@dataclasses.dataclass(frozen=True)
class NM:
  """N:M sparsity: every group of ``m`` consecutive weights along the contraction axis
  keeps exactly ``n`` nonzeros (e.g. ``NM(2, 4)`` for 2:4).

  The layer sparsity is ``1 - n/m``. Reference: Zhou et al. 2021 (SR-STE),
  https://arxiv.org/abs/2102.04010; NVIDIA Ampere 2:4 sparsity.
  """

  n: int
  m: int

  def __post_init__(self):
    n = base.check_int("n", self.n, minimum=1)
    m = base.check_int("m", self.m, minimum=1)
    if n > m:
      raise ValueError(f"NM(n, m) needs 1 <= n <= m, got n={n} > m={m}.")

  @property
  def sparsity(self) -> float:
    return 1.0 - self.n / self.m

  def layer_sparsity(self, path: str, shape: Sequence[int], requested: float) -> float:
    if len(shape) < 2:
      raise ValueError(
        f"structure=NM({self.n}, {self.m}) needs leaves with ndim >= 2; {path!r} has "
        f"shape {tuple(shape)}."
      )
    fan_in, _ = _fan_in_shape(shape)
    if fan_in % self.m:
      raise ValueError(
        f"structure=NM({self.n}, {self.m}): the contraction size of {path!r} (shape "
        f"{tuple(shape)}, product of all but the last axis = {fan_in}) is not divisible "
        f"by m={self.m}. Keep this layer dense with `exclude=` or `keep_first_dense=True`."
      )
    return self.sparsity

  def _grouped(self, shape: Sequence[int]) -> tuple[int, int, int]:
    fan_in, n_out = _fan_in_shape(shape)
    return fan_in // self.m, self.m, n_out

  def target_nnz(self, shape: Sequence[int], sparsity: float) -> int:
    del sparsity
    return base.shape_size(shape) // self.m * self.n

  def random_mask(self, key: jax.Array, shape: Sequence[int], sparsity: float) -> jax.Array:
    del sparsity
    scores = _uniform_scores(key, self._grouped(shape))
    return selection.topk_mask(scores, self.n, axis=1).reshape(shape)

  def drop_and_grow(self, mask, drop_scores, grow_scores, n_drop, sparsity):
    del sparsity
    shape = mask.shape
    grouped = self._grouped(shape)
    new, kept = selection.grouped_drop_and_grow(
      mask.reshape(grouped),
      drop_scores.reshape(grouped),
      grow_scores.reshape(grouped),
      n_drop,
      self.n,
      axis=1,
      cap=False,  # every group holds exactly n before the update: none can be over-full
    )
    return new.reshape(shape), kept.reshape(shape)


Structure = Unstructured | ConstantFanIn | NM


def get_structure(structure: str | Structure | None) -> Structure:
  """Resolves ``None``/``"unstructured"``, ``"fan_in"``, ``"nm:2:4"`` or a structure."""
  if structure is None:
    return Unstructured()
  if isinstance(structure, Unstructured | ConstantFanIn | NM):
    return structure
  if isinstance(structure, str):
    s = structure.strip().lower()
    if s == "unstructured":
      return Unstructured()
    if s in ("fan_in", "constant_fan_in"):
      return ConstantFanIn()
    if s.startswith("nm:"):
      parts = s.split(":")
      if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return NM(int(parts[1]), int(parts[2]))
  raise ValueError(
    f"Unknown `structure` {structure!r}; allowed: None, 'unstructured', 'fan_in', "
    "'nm:N:M' (e.g. 'nm:2:4'), sparsejax.Unstructured(), sparsejax.ConstantFanIn(), "
    "sparsejax.NM(n, m)."
  )
