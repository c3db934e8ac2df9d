"""Sparsity structures: which masks are allowed, and how a mask update respects them.

A structure is a small frozen record with five hooks, used by every method:

* ``layer_sparsity(layer, requested)``: the sparsity this leaf will actually have, given
  its :class:`~sparsejax.LayerInfo` (validates the shape, e.g. N:M divisibility, constant
  fan-in ≥ 1);
* ``target_nnz(shape, sparsity)``: the exact number of nonzeros of a mask;
* ``random_mask(key, shape, sparsity)``: a random initial mask satisfying the structure;
* ``select(scores, sparsity)``: the best mask of the structure for ``scores`` (one-shot
  pruning, pruning at initialization);
* ``drop_and_grow(ctx, drop_scores, grow_scores, n_drop)``: one mask update of the leaf
  described by ``ctx`` (a :class:`~sparsejax.ScoreContext`: mask, weights, gradient,
  target sparsity, position in the model) that keeps the structure exactly; returns the
  new bool mask.

A user-defined structure is any object with these five methods.

Axes follow the Flax layout: the neuron (output) axis is the **last** axis, and the
contraction ("fan-in") axis is the product of all other axes (Dense ``[in, out]``: axis 0;
Conv ``[kh, kw, in, out]``: ``kh·kw·in``, with ``in`` fastest). N:M groups run along that
contraction axis, so a conv's groups are M consecutive input channels at one tap (the
NVIDIA 2:4 convention) when ``in % M == 0``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from sparsejax._src import base
from sparsejax._src.primitives import ablation, drop_grow, score_form, selection


@runtime_checkable
class Structure(Protocol):
  """What a sparsity structure provides (see the module docstring)."""

  def layer_sparsity(self, layer: base.LayerInfo, requested: float) -> float: ...

  def target_nnz(self, shape: Sequence[int], sparsity: float) -> int: ...

  def random_mask(self, key: jax.Array, shape: Sequence[int], sparsity: float) -> jax.Array: ...

  def select(self, scores: jax.Array, sparsity: float) -> jax.Array: ...

  def drop_and_grow(
    self, ctx: base.ScoreContext, drop_scores: jax.Array, grow_scores: jax.Array, n_drop: Any
  ) -> jax.Array: ...


def uniform_scores(key: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Uniform float32 scores of ``shape``, drawn on its ``[rows, last axis]`` view.

  The bits are those of ``uniform(key, shape)`` (threefry counts the flat index), and a
  sharding given to the view (``pruning.sharded_mask_program``) reaches the draw.
  """
  shape = tuple(shape)
  if len(shape) < 2:
    return jax.random.uniform(key, shape, jnp.float32)
  return jax.random.uniform(key, base.fan_in_shape(shape), jnp.float32).reshape(shape)


def _needs_kernel(name: str, layer: base.LayerInfo) -> None:
  if len(layer.shape) < 2:
    raise ValueError(
      f"structure={name} needs leaves with ndim >= 2; {layer.path!r} has shape "
      f"{tuple(layer.shape)}. Keep it dense with `exclude=`."
    )


@dataclasses.dataclass(frozen=True)
class Unstructured:
  """Any mask with the right number of nonzeros (SET, RigL)."""

  def layer_sparsity(self, layer: base.LayerInfo, requested: float) -> float:
    del layer
    return requested

  def target_nnz(self, shape: Sequence[int], sparsity: float) -> int:
    return base.nnz_for_sparsity(base.shape_size(shape), sparsity)

  def select(self, scores: jax.Array, sparsity: float) -> jax.Array:
    """The ``target_nnz`` highest scores (index tie-break)."""
    return selection.topk_mask(scores, self.target_nnz(scores.shape, sparsity))

  def random_mask(self, key: jax.Array, shape: Sequence[int], sparsity: float) -> jax.Array:
    return self.select(uniform_scores(key, shape), sparsity)

  def drop_and_grow(self, ctx, drop_scores, grow_scores, n_drop):
    """Layer-wise drop of the lowest ``drop_scores``, growth of the highest ``grow_scores``.

    Under a sparsity schedule (``ctx.target_nnz``) the mask ends with exactly that many
    nonzeros: ``nnz - target + n_drop`` are dropped and ``n_drop`` grown.
    """
    return _unstructured_update(ctx.mask, drop_scores, grow_scores, n_drop, ctx.target_nnz)


def _unstructured_update(mask, drop_scores, grow_scores, n_swap, target):
  if target is None:
    new, _ = drop_grow.drop_and_grow(mask, drop_scores, grow_scores, n_swap)
    return new
  nnz = selection.count_true(mask)
  target = jnp.asarray(target, jnp.int32)
  n_drop = jnp.clip(nnz - target + n_swap, 0, nnz)
  new, _ = drop_grow.drop_and_grow(mask, drop_scores, grow_scores, n_drop, target - (nnz - n_drop))
  return new


@dataclasses.dataclass(frozen=True)
class ConstantFanIn:
  """Every neuron has exactly ``k`` nonzero incoming weights (SRigL's constraint).

  ``k = floor(size·(1-S)) // n_out`` (calgaryml/condensed-sparsity
  ``get_fan_in_after_ablation``), so the realised sparsity is at or slightly above the
  requested one. Drop is layer-wise by score; regrowth is per neuron back to ``k``.

  With ``gamma_sal`` set, the structure also ablates neurons, as SRigL does (recomputed at
  every update, so neurons can revive): a neuron with fewer than ``max(1, int(γ_sal·k0))``
  salient weights is ablated (see :func:`sparsejax.neurons_to_ablate`) and the freed budget
  is redistributed (``k = floor(size·(1-S)) // n_active``). Over-full neurons (when ``k``
  shrinks) are cut by score with index tie-breaking. Layers whose path matches
  ``no_ablation`` are never ablated; by default (``None``) that is the model's output layer
  (``LayerInfo.is_last``), which must then be known (``last_layer=``).

  Reference: Lasby et al. 2024, https://arxiv.org/abs/2305.02299.

  Attributes:
    gamma_sal: γ_sal in [0, 1], or ``None`` for no ablation (plain constant fan-in).
    no_ablation: regex of layers never ablated; ``None`` protects the output layer only;
      ``"$^"`` protects nothing.
    ablation_fan_in: the fan-in γ_sal is relative to: ``"sparse"`` (``k0``, the reference
      code's default) or ``"dense"`` (calgaryml/condensed-sparsity's
      ``use_sparse_const_fan_in_for_ablation=False``).
  """

  gamma_sal: float | None = None
  no_ablation: str | None = None
  ablation_fan_in: str = "sparse"

  def __post_init__(self):
    if self.ablation_fan_in not in ("sparse", "dense"):
      raise ValueError(
        f"`ablation_fan_in` must be 'sparse' or 'dense', got {self.ablation_fan_in!r}."
      )
    if self.gamma_sal is not None:
      base.check_fraction("gamma_sal", self.gamma_sal)
    if self.no_ablation is not None:
      try:
        re.compile(self.no_ablation)
      except (re.error, TypeError) as e:
        raise ValueError(
          f"`no_ablation` must be a valid regex, got {self.no_ablation!r}: {e}"
        ) from e

  def fan_in(self, shape: Sequence[int], sparsity: float, n_active: int | None = None) -> int:
    """``k = floor(size·(1-S)) // n_active`` (``n_active`` defaults to every neuron)."""
    fan_in, n_out = base.fan_in_shape(shape)
    budget = base.floor_count(fan_in * n_out, 1.0 - sparsity)
    return budget // (n_out if n_active is None else n_active)

  def ablates(self, path: str, layer: base.LayerInfo | None) -> bool:
    """Whether neurons of the leaf at ``path`` may be ablated (static).

    Without ``no_ablation``, every layer but the output layer (``layer.is_last``) may be;
    a context without layer information (``layer=None``) is not protected.
    """
    if self.gamma_sal is None:
      return False
    if self.no_ablation is not None:
      return re.search(self.no_ablation, path) is None
    return layer is None or not layer.is_last

  def layer_sparsity(self, layer: base.LayerInfo, requested: float) -> float:
    _needs_kernel("ConstantFanIn()", layer)
    k = self.fan_in(layer.shape, requested)
    if k < 1:
      fan_in, n_out = base.fan_in_shape(layer.shape)
      raise ValueError(
        f"structure=ConstantFanIn() cannot reach sparsity={requested:.4f} on {layer.path!r} "
        f"(shape {tuple(layer.shape)}, fan-in {fan_in}): the constant fan-in would be "
        f"floor({fan_in * n_out}·{1 - requested:.4f}) // {n_out} = {k} < 1. Lower the "
        "sparsity of this layer (`overrides=`) or keep it dense (`exclude=`)."
      )
    if self.gamma_sal is not None and self.no_ablation is None and layer.is_last is None:
      raise ValueError(
        "SRigL protects the model's output layer from neuron ablation, but the layer order "
        f"is decided by names only here ({layer.path!r} among {layer.num_layers} sparse "
        "candidates; JAX and NNX sort dict keys, so 'head' sorts before 'hidden'). Pass "
        "`last_layer=` (a regex matching the output kernel, e.g. last_layer='head'), or "
        "`no_ablation=` (a regex of the layers never ablated; '$^' for none)."
      )
    return requested

  def target_nnz(self, shape: Sequence[int], sparsity: float) -> int:
    return self.fan_in(shape, sparsity) * tuple(shape)[-1]

  def select(self, scores: jax.Array, sparsity: float) -> jax.Array:
    """The ``k`` highest scores of every neuron."""
    shape = scores.shape
    flat = scores.reshape(base.fan_in_shape(shape))
    return selection.topk_mask(flat, self.fan_in(shape, sparsity), axis=0).reshape(shape)

  def random_mask(self, key: jax.Array, shape: Sequence[int], sparsity: float) -> jax.Array:
    scores = uniform_scores(key, base.fan_in_shape(shape))
    return self.select(scores.reshape(tuple(shape)), sparsity)

  def drop_and_grow(self, ctx, drop_scores, grow_scores, n_drop):
    """Layer-wise drop, per-neuron regrowth back to the fan-in (ablation if enabled)."""
    shape = ctx.mask.shape
    flat = base.fan_in_shape(shape)
    mask = ctx.mask.reshape(flat)
    drop_scores = score_form.reshape(drop_scores, flat)
    grow_scores = score_form.reshape(grow_scores, flat)
    if self.ablates(ctx.path, ctx.layer):
      new, _ = ablation.ablated_drop_and_grow(
        mask,
        drop_scores,
        grow_scores,
        n_drop,
        ctx.param.reshape(flat),
        ctx.grad.reshape(flat),
        ctx.sparsity,
        self.gamma_sal,
        self.ablation_fan_in,
      )
      return new.reshape(shape)
    if ctx.target_nnz is not None:  # a sparsity schedule: k shrinks, cut over-full neurons
      per_neuron, eligible = jnp.asarray(ctx.target_nnz, jnp.int32) // flat[1], None
      cap = True
    else:
      per_neuron, eligible = self.fan_in(shape, ctx.sparsity), None
      cap = False  # every neuron holds exactly k before the update: none can be over-full
    new, _ = drop_grow.grouped_drop_and_grow(
      mask, drop_scores, grow_scores, n_drop, per_neuron, axis=0, cap=cap, eligible=eligible
    )
    return new.reshape(shape)


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

  def layer_sparsity(self, layer: base.LayerInfo, requested: float) -> float:
    del requested
    _needs_kernel(f"NM({self.n}, {self.m})", layer)
    fan_in, _ = base.fan_in_shape(layer.shape)
    if fan_in % self.m:
      raise ValueError(
        f"structure=NM({self.n}, {self.m}): the contraction size of {layer.path!r} (shape "
        f"{tuple(layer.shape)}, product of all but the last axis = {fan_in}) is not "
        f"divisible by m={self.m}. Keep this layer dense with `exclude=` or "
        "`keep_first_dense=True`."
      )
    return self.sparsity

  def grouped_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
    """``[fan_in // m, m, n_out]``: the groups of ``m`` along the contraction axis."""
    fan_in, n_out = base.fan_in_shape(shape)
    return fan_in // self.m, self.m, n_out

  def target_nnz(self, shape: Sequence[int], sparsity: float) -> int:
    del sparsity
    return base.shape_size(shape) // self.m * self.n

  def select(self, scores: jax.Array, sparsity: float) -> jax.Array:
    """The ``n`` highest scores of every group of ``m``."""
    del sparsity
    grouped = scores.reshape(self.grouped_shape(scores.shape))
    return selection.topk_mask(grouped, self.n, axis=1).reshape(scores.shape)

  def random_mask(self, key: jax.Array, shape: Sequence[int], sparsity: float) -> jax.Array:
    scores = uniform_scores(key, self.grouped_shape(shape))
    return self.select(scores.reshape(tuple(shape)), sparsity)

  def drop_and_grow(self, ctx, drop_scores, grow_scores, n_drop):
    """Layer-wise drop, per-group regrowth back to exactly ``n`` per group."""
    shape = ctx.mask.shape
    grouped = self.grouped_shape(shape)
    new, _ = drop_grow.grouped_drop_and_grow(
      ctx.mask.reshape(grouped),
      score_form.reshape(drop_scores, grouped),
      score_form.reshape(grow_scores, grouped),
      n_drop,
      self.n,
      axis=1,
      cap=False,  # every group holds exactly n before the update: none can be over-full
    )
    return new.reshape(shape)


@dataclasses.dataclass(frozen=True)
class Block:
  """Block sparsity: ``h × w`` blocks of the kernel's 2-D view, all kept or all pruned.

  The 2-D view is ``[fan_in, n_out]`` (contraction × output; a conv kernel's contraction
  is ``kh·kw·in``), so ``h`` runs along the contraction axis and ``w`` along the outputs
  (a PyTorch ``Linear`` block ``(r over out, c over in)`` is ``Block(c, r)`` here). nnz is
  a whole number of blocks, ``n_blocks - floor(S·n_blocks)``; drop and grow scores are
  averaged per block (jaxpruner's and TF model-optimization's average pooling), and the
  update runs on the block grid with the unstructured rule. Blocks must tile the kernel
  exactly. Reference: Gray, Radford, Kingma 2017 (block-sparse GPU kernels); jaxpruner
  ``sparsity_types.Block``.

  Attributes:
    h: block height, along the contraction (fan-in) axis.
    w: block width, along the output axis.
  """

  h: int
  w: int

  def __post_init__(self):
    base.check_int("h", self.h, minimum=1)
    base.check_int("w", self.w, minimum=1)

  def _grid(self, shape: Sequence[int]) -> tuple[int, int]:
    fan_in, n_out = base.fan_in_shape(shape)
    return fan_in // self.h, n_out // self.w

  def layer_sparsity(self, layer: base.LayerInfo, requested: float) -> float:
    _needs_kernel(f"Block({self.h}, {self.w})", layer)
    fan_in, n_out = base.fan_in_shape(layer.shape)
    if fan_in % self.h or n_out % self.w:
      raise ValueError(
        f"structure=Block({self.h}, {self.w}): the block shape does not divide the kernel "
        f"{layer.path!r} (2-D view [fan_in, n_out] = [{fan_in}, {n_out}]; fan_in must be a "
        f"multiple of h={self.h} and n_out of w={self.w}). Keep it dense with `exclude=` "
        "or choose a block shape that tiles it."
      )
    if self.target_nnz(layer.shape, requested) == 0:
      raise ValueError(
        f"structure=Block({self.h}, {self.w}) at sparsity={requested:.4f} keeps no block "
        f"of {layer.path!r} ({self._grid(layer.shape)} blocks). Lower its sparsity."
      )
    return requested

  def target_nnz(self, shape: Sequence[int], sparsity: float) -> int:
    rows, cols = self._grid(shape)
    return base.nnz_for_sparsity(rows * cols, sparsity) * self.h * self.w

  def to_blocks(self, x: jax.Array, reduce: str = "mean") -> jax.Array:
    """``[.., fan_in, n_out]``-shaped ``x`` → ``[rows, cols]`` per-block mean (or all)."""
    rows, cols = self._grid(x.shape)
    tiles = x.reshape(rows, self.h, cols, self.w)
    if reduce == "all":
      return jnp.all(tiles, axis=(1, 3))
    return jnp.mean(tiles.astype(jnp.float32), axis=(1, 3))

  def from_blocks(self, blocks: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Expands a ``[rows, cols]`` block mask to the kernel's shape."""
    rows, cols = blocks.shape
    tiles = jnp.broadcast_to(blocks[:, None, :, None], (rows, self.h, cols, self.w))
    return tiles.reshape(tuple(shape))

  def select(self, scores: jax.Array, sparsity: float) -> jax.Array:
    """The blocks with the highest mean score."""
    rows, cols = self._grid(scores.shape)
    k = base.nnz_for_sparsity(rows * cols, sparsity)
    return self.from_blocks(selection.topk_mask(self.to_blocks(scores), k), scores.shape)

  def random_mask(self, key: jax.Array, shape: Sequence[int], sparsity: float) -> jax.Array:
    grid = self._grid(shape)
    k = base.nnz_for_sparsity(grid[0] * grid[1], sparsity)
    return self.from_blocks(selection.topk_mask(uniform_scores(key, grid), k), shape)

  def drop_and_grow(self, ctx, drop_scores, grow_scores, n_drop):
    """The unstructured update on the block grid (block-mean scores, counts in blocks)."""
    size = self.h * self.w
    target = None if ctx.target_nnz is None else jnp.asarray(ctx.target_nnz, jnp.int32) // size
    new = _unstructured_update(
      self.to_blocks(ctx.mask, "all"),
      self.to_blocks(score_form.as_array(drop_scores)),
      self.to_blocks(score_form.as_array(grow_scores)),
      jnp.asarray(n_drop, jnp.int32) // size,
      target,
    )
    return self.from_blocks(new, ctx.mask.shape)


_BUILTIN = (Unstructured, ConstantFanIn, NM, Block)


def reads_score_forms(structure: Structure) -> bool:
  """Whether ``structure.drop_and_grow`` takes ``score_form.ScoreForm`` scores: the
  built-in structures (exactly these classes; a user's structure, or a subclass that may
  override ``drop_and_grow``, gets arrays as the protocol says)."""
  return type(structure) in _BUILTIN


def get_structure(structure: str | Structure | None) -> Structure:
  """Resolves ``None``/``"unstructured"``, ``"fan_in"``, ``"nm:2:4"`` or a structure object.

  Raises:
    ValueError: for an unknown name or an object that does not implement
      :class:`Structure` (the five methods of the module docstring).
  """
  if structure is None:
    return Unstructured()
  if isinstance(structure, _BUILTIN):
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
    if s.startswith("block:"):
      dims = s[len("block:") :].split("x")
      if len(dims) == 2 and dims[0].isdigit() and dims[1].isdigit():
        return Block(int(dims[0]), int(dims[1]))
  elif isinstance(structure, Structure) and not isinstance(structure, type):
    return structure
  raise ValueError(
    f"Unknown `structure` {structure!r}; allowed: None, 'unstructured', 'fan_in', "
    "'nm:N:M' (e.g. 'nm:2:4'), 'block:HxW' (e.g. 'block:4x4'), sparsejax.Unstructured(), "
    "sparsejax.ConstantFanIn(), sparsejax.NM(n, m), sparsejax.Block(h, w), or an object with layer_sparsity, target_nnz, random_mask, "
    "select and drop_and_grow methods."
  )
