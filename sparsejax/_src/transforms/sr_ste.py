"""N:M sparsity from scratch: SR-STE and progressive gradient flow (MDGF/SDGF).

These methods keep **dense** weights and re-derive the N:M mask from their
magnitudes at every step (``docs/ALGORITHMS.md`` §5–§6):

* **STE / SR-STE** (Zhou et al., "Learning N:M Fine-grained Structured Sparse
  Neural Networks From Scratch", ICLR 2021, https://arxiv.org/abs/2102.04010):
  the forward uses ``W ⊙ M`` (M = N:M magnitude mask of W); the backward
  passes the gradient straight through to the dense ``W`` and SR-STE adds
  the sparse-refined term ``λ_W (1 - M) ⊙ W`` (a weight decay on the pruned
  weights only, applied through the gradient so it flows through momentum /
  Adam). Reference code: aojunzz/NM-sparsity ``devkit/sparse_ops``
  (``decay = 2e-4``).
* **MDGF** (mask decay, Bambhaniya et al., "Progressive Gradient Flow for
  Robust N:M Sparsity Training in Transformers", 2024,
  https://arxiv.org/abs/2402.04744): the forward uses
  ``W ⊙ (M + (1 - M) β(t))`` with ``β = max(0, 1 - c t)`` (linear) or
  ``β = exp(-c t)`` (exponential); plain straight-through backward.
* **SDGF** (structure decay, same paper): the pattern goes
  ``(M-1):M -> M/2:M -> ... -> N:M`` over ``log2(M/N)`` equal frames.

In sparsejax the forward part is :func:`nm_ste` (one line on a params pytree
inside the loss) and the gradient part is the Optax wrapper
:func:`nm_sr_ste`, whose state also carries the current ``β`` and ``n`` for
the schedules:

    tx = nm_sr_ste(optax.adamw(1e-3), n=2, m=4)
    def loss_fn(params, batch):
        return loss(model.apply(nm_ste(params, 2, 4), batch))

Mask convention: groups of m consecutive entries along the contraction axis
(axis 0 of a Flax ``Dense`` kernel; the flattened ``kh*kw*in`` axis of a conv
kernel), see :func:`~sparsejax._src.nm_format.nm_mask`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sparsejax._src import tree
from sparsejax._src.allocation import plan as plan_lib
from sparsejax._src.primitives import structures
from sparsejax._src.primitives.nm_mask import _as_int, _check_nm, nm_mask
from sparsejax._src.transforms.dynamic_sparse import SparseTransformation
from sparsejax._src.transforms.state import DynamicSparseState

__all__ = [
  "NMSRSTEState",
  "default_nm_filter",
  "mdgf_schedule",
  "nm_project",
  "nm_sr_ste",
  "nm_ste",
  "sdgf_patterns",
  "sdgf_schedule",
]

#: ``filter(path, leaf) -> bool``: whether a leaf is N:M sparsified. ``path`` is
#: a tuple of str keys (dict keys, attribute names, sequence indices as str).
Filter = Callable[[tuple[str, ...], Any], bool]


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  return tuple(tree.path_to_str(path).split("/"))


def default_nm_filter(m: int) -> Filter:
  """The default leaf filter: kernels whose contraction size is divisible by m.

  A leaf is sparsified when ``ndim > 1`` and ``prod(shape[:-1]) % m == 0``
  (Flax Dense ``[in, out]`` and conv ``[kh, kw, in, out]`` kernels); biases,
  norm scales and kernels with a non-divisible fan-in stay dense.

  Args:
    m: group size.

  Returns:
    A ``filter(path, leaf) -> bool`` function.
  """
  m = _as_int(m, "m")

  def filter_fn(path: tuple[str, ...], leaf: Any) -> bool:
    del path
    shape = getattr(leaf, "shape", ())
    return len(shape) > 1 and math.prod(shape[:-1]) % m == 0

  return filter_fn


def _selected(filter: Filter | None, m: int, path: tuple[Any, ...], leaf: Any) -> bool:
  names = _path_names(path)
  if filter is None:
    return default_nm_filter(m)(names, leaf)
  chosen = bool(filter(names, leaf))
  if chosen:
    shape = tuple(getattr(leaf, "shape", ()))
    if len(shape) < 2 or math.prod(shape[:-1]) % m:
      raise ValueError(
        f"filter selected leaf {'/'.join(names)!r} with shape {shape}, but N:M needs "
        f"ndim >= 2 and a contraction size (product of all but the last axis) "
        f"divisible by m={m}."
      )
  return chosen


def _check_n(n: Any, m: int) -> Any:
  """Validates a static n, passes a traced/array n through."""
  if isinstance(n, jax.Array) or isinstance(n, jax.core.Tracer):
    return n
  n, _ = _check_nm(n, m)
  return n


def nm_project(params: Any, n: int | jax.Array, m: int, *, filter: Filter | None = None) -> Any:
  """Projects every selected leaf to N:M by magnitude (``W ⊙ M``).

  Args:
    params: a pytree of arrays.
    n: kept entries per group (a Python int, or a traced int32 scalar).
    m: group size.
    filter: ``filter(path, leaf) -> bool``; default :func:`default_nm_filter`.

  Returns:
    A pytree like ``params``; selected leaves have exactly n non-zero-mask
    entries per group of m (pruned entries set to 0), others are unchanged.

  Raises:
    ValueError: for an invalid N:M pair or a filter selecting a leaf that
      cannot be grouped.
  """
  m = _as_int(m, "m")
  n = _check_n(n, m)

  def project(path, w):
    if not _selected(filter, m, path, w):
      return w
    return jnp.where(nm_mask(w, n, m), w, jnp.zeros((), w.dtype))

  return jax.tree_util.tree_map_with_path(project, params)


def nm_ste(
  params: Any,
  n: int | jax.Array,
  m: int,
  *,
  beta: float | jax.Array = 0.0,
  filter: Filter | None = None,
) -> Any:
  """Straight-through N:M forward: apply inside the loss, ``model.apply(nm_ste(p, 2, 4), x)``.

  Forward value of a selected leaf: ``W ⊙ (M + (1 - M) β)``, i.e. the N:M
  projection for ``β = 0`` (STE / SR-STE) and the MDGF decayed mask for
  ``0 < β <= 1``. Backward: the identity (the gradient reaches the dense W
  unchanged at every position). Add SR-STE's refinement term with
  :func:`nm_sr_ste`.

  Args:
    params: a pytree of dense arrays.
    n: kept entries per group (a Python int, or a traced int32 scalar, e.g.
      ``state.n_active`` of :func:`nm_sr_ste` for SDGF).
    m: group size.
    beta: MDGF mask-decay factor in [0, 1] (scalar, may be traced).
    filter: ``filter(path, leaf) -> bool``; default :func:`default_nm_filter`.

  Returns:
    A pytree like ``params``.
  """
  m = _as_int(m, "m")
  n = _check_n(n, m)

  def ste(path, w):
    if not _selected(filter, m, path, w):
      return w
    mask = nm_mask(lax.stop_gradient(w), n, m)
    b = jnp.asarray(beta, w.dtype)
    scale = jnp.where(mask, jnp.ones((), w.dtype), b)
    return w + lax.stop_gradient(w * scale - w)

  return jax.tree_util.tree_map_with_path(ste, params)


# ---------------------------------------------------------------------------
# Progressive-gradient-flow schedules
# ---------------------------------------------------------------------------


def mdgf_schedule(kind: str, coef: float, *, start_step: int = 0) -> Callable[[Any], jax.Array]:
  """MDGF mask-decay factor ``β(t)`` (Bambhaniya et al., 2024).

  ``β = 1`` before ``start_step`` (dense phase); afterwards, with
  ``s = t - start_step``: ``max(0, 1 - coef*s)`` (``"linear"``) or
  ``exp(-coef*s)`` (``"exponential"``).

  Args:
    kind: ``"linear"`` or ``"exponential"``.
    coef: decay coefficient c >= 0.
    start_step: first step of the decaying phase.

  Returns:
    ``schedule(step) -> float32 scalar``.

  Raises:
    ValueError: for an unknown ``kind`` or a negative ``coef``.
  """
  if kind not in ("linear", "exponential"):
    raise ValueError(f"kind must be 'linear' or 'exponential'; got kind={kind!r}.")
  if not coef >= 0:
    raise ValueError(f"coef must be >= 0; got coef={coef}.")
  start_step = _as_int(start_step, "start_step")

  def schedule(step: Any) -> jax.Array:
    s = jnp.asarray(step, jnp.float32) - start_step
    if kind == "linear":
      beta = jnp.maximum(0.0, 1.0 - coef * s)
    else:
      beta = jnp.exp(-coef * s)
    return jnp.where(s < 0, 1.0, beta).astype(jnp.float32)

  return schedule


def sdgf_patterns(n: int, m: int) -> list[int]:
  """The N of each SDGF frame, then the target: ``[M-1, M/2, M/4, ..., N]``.

  Frame 0 uses ``(M-1):M`` and frame ``i >= 1`` uses ``(M/2^i):M``, for
  ``F = floor(log2(M/N))`` frames; the final entry is the target N (the
  fine-tune phase). E.g. 1:16 -> ``[15, 8, 4, 2, 1]``, 2:4 -> ``[3, 2]``,
  2:8 -> ``[7, 4, 2]``.

  Args:
    n: target kept entries per group.
    m: group size.

  Returns:
    ``F + 1`` values of n.
  """
  n, m = _check_nm(n, m)
  frames = int(math.floor(math.log2(m / n)))
  pats = [m - 1 if i == 0 else max(n, m // 2**i) for i in range(frames)]
  return pats + [n]


def sdgf_schedule(n: int, m: int, start_step: int, end_step: int) -> Callable[[Any], jax.Array]:
  """SDGF structure-decay schedule ``n(t)`` (Bambhaniya et al., 2024).

  Before ``start_step``: ``m`` (dense). The ``F`` frames of
  :func:`sdgf_patterns` split ``[start_step, end_step)`` equally (frame i
  starts at ``start_step + floor(i * (end_step - start_step) / F)``); from
  ``end_step`` on: the target ``n``. When ``m / n < 2`` (e.g. 3:4) there are
  no frames and the weights stay dense until ``end_step``.

  Args:
    n: target kept entries per group.
    m: group size.
    start_step: first step of the first frame.
    end_step: first step of the final N:M phase, ``>= start_step``.

  Returns:
    ``schedule(step) -> int32 scalar n``.

  Raises:
    ValueError: for an invalid N:M pair or ``end_step < start_step``.
  """
  pats = sdgf_patterns(n, m)
  start_step = _as_int(start_step, "start_step")
  end_step = _as_int(end_step, "end_step")
  if end_step < start_step:
    raise ValueError(
      f"end_step must be >= start_step; got start_step={start_step}, end_step={end_step}."
    )
  frames = len(pats) - 1
  bounds = [start_step + (i * (end_step - start_step)) // max(frames, 1) for i in range(frames)]
  bounds.append(end_step)

  def schedule(step: Any) -> jax.Array:
    step = jnp.asarray(step, jnp.int32)
    out = jnp.asarray(m, jnp.int32)
    for b, p in zip(bounds, pats, strict=True):
      out = jnp.where(step >= b, jnp.int32(p), out)
    return out

  return schedule


# ---------------------------------------------------------------------------
# The Optax wrapper
# ---------------------------------------------------------------------------


class NMSRSTEState(NamedTuple):
  """State of :func:`nm_sr_ste`: the shared :class:`DynamicSparseState` plus schedules.

  Attributes:
    sparse: the :class:`DynamicSparseState` every sparsejax method keeps: its ``masks``
      are the N:M masks of the current weights (what the next forward uses), so
      ``get_masks``, ``summarize`` and the metrics read SR-STE like any other method.
    beta: float32 ``[]``, MDGF factor ``β(count)`` for the next forward (0 without
      ``decay``).
    n_active: int32 ``[]``, N for the next forward and the SR mask (``n`` without
      ``structure_decay``).
  """

  sparse: DynamicSparseState
  beta: jax.Array
  n_active: jax.Array

  @property
  def count(self) -> jax.Array:
    """int32 ``[]``, number of updates applied so far (the step t)."""
    return self.sparse.count

  @property
  def inner_state(self) -> optax.OptState:
    """The inner optimizer's state."""
    return self.sparse.inner_state

  @property
  def masks(self) -> Any:
    """The N:M masks of the current weights (``optax.MaskedNode()`` for dense leaves)."""
    return self.sparse.masks


def _resolve_nm(n: Any, m: Any, structure: Any) -> tuple[int, int]:
  if structure is not None:
    s = structures.get_structure(structure)
    if not isinstance(s, structures.NM):
      raise ValueError(f"nm_sr_ste needs an N:M structure (e.g. 'nm:2:4'), got {structure!r}.")
    if (n is not None and n != s.n) or (m is not None and m != s.m):
      raise ValueError(f"nm_sr_ste: n={n}, m={m} conflict with structure={structure!r}.")
    return _check_nm(s.n, s.m)
  if n is None or m is None:
    raise TypeError("nm_sr_ste needs `n` and `m` (or structure='nm:N:M').")
  return _check_nm(n, m)


@dataclasses.dataclass(frozen=True, eq=False)
class _WithAllocation:
  """An ``init`` function that also carries its allocation (read by ``tx.plan``)."""

  fn: Callable[[Any], Any]
  allocation: plan_lib.Allocation

  def __call__(self, params: Any) -> Any:
    return self.fn(params)


def nm_sr_ste(
  inner: optax.GradientTransformation,
  n: int | None = None,
  m: int | None = None,
  lambda_w: float = 2e-4,
  *,
  decay: Callable[[Any], jax.Array] | None = None,
  structure_decay: Callable[[Any], jax.Array] | None = None,
  filter: Filter | None = None,
  structure: Any = None,
  **allocation: Any,
) -> SparseTransformation:
  """SR-STE (Zhou et al., ICLR 2021) as an Optax wrapper, with MDGF/SDGF options.

  For every N:M leaf the gradient becomes ``g + lambda_w (1 - M) ⊙ W``, M being the N:M
  magnitude mask of the current ``params`` (n = the state's ``n_active``), before
  ``inner`` runs. Use it with :func:`nm_ste` in the forward (or
  :func:`sparsejax.forward_params`). ``lambda_w = 0`` gives plain STE; the
  progressive-gradient-flow recipes (Bambhaniya et al., 2024,
  https://arxiv.org/abs/2402.04744) use plain STE, so pass ``lambda_w=0.0`` with
  ``decay``/``structure_decay`` to reproduce them.

  Which leaves are N:M is decided by the same allocation planner as every other method,
  with structure ``NM(n, m)``: by default every floating kernel (``ndim > 1``); a kernel
  whose contraction size is not divisible by ``m`` is an error (keep it dense with
  ``exclude=``, ``keep_first_dense=True`` or ``include=``). The state
  (:class:`NMSRSTEState`) holds a :class:`DynamicSparseState` whose masks are the N:M
  masks of the weights after each update, plus the schedule values for the *next*
  forward: ``beta = decay(count)`` and ``n_active = structure_decay(count)``.

  Args:
    inner: the optimizer to wrap.
    n: target kept entries per group (or give ``structure``).
    m: group size (along the contraction axis).
    lambda_w: SR-STE refinement strength λ_W (2e-4 in the paper's code).
    decay: MDGF schedule ``step -> β`` (:func:`mdgf_schedule`), or None (β = 0).
    structure_decay: SDGF schedule ``step -> n`` (:func:`sdgf_schedule`), or None.
    filter: deprecated spelling of ``include``: ``filter(path_names, leaf) -> bool`` on
      the tuple of path names.
    structure: ``"nm:N:M"`` or ``NM(n, m)``, instead of ``n`` and ``m``.
    **allocation: the allocation keywords of :func:`sparsejax.dynamic_sparse`
      (``include``, ``exclude``, ``keep_first_dense``, ``keep_last_dense``,
      ``first_layer``, ``last_layer``, ``sparsity`` (must be ``1 - n/m`` or None)).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` requires ``params``.

  Raises:
    ValueError: for an invalid N:M pair, a negative ``lambda_w``, a kernel that cannot be
      grouped, or an invalid allocation keyword; at update time if ``params`` is missing.
  """
  n, m = _resolve_nm(n, m, structure)
  if not lambda_w >= 0:
    raise ValueError(f"lambda_w must be >= 0; got lambda_w={lambda_w}.")
  if filter is not None:
    if allocation.get("include") is not None:
      raise ValueError("nm_sr_ste: pass `include=` or the deprecated `filter=`, not both.")
    allocation["include"] = lambda path, leaf: bool(filter(tuple(path.split("/")), leaf))
  alloc = plan_lib.Allocation(structure=structures.NM(n, m), **allocation)
  inner = optax.with_extra_args_support(inner)

  def schedules(count: jax.Array) -> tuple[jax.Array, jax.Array]:
    beta = jnp.zeros((), jnp.float32) if decay is None else jnp.asarray(decay(count))
    n_t = n if structure_decay is None else jnp.asarray(structure_decay(count), jnp.int32)
    return beta.astype(jnp.float32), jnp.asarray(n_t, jnp.int32)

  def nm_masks(params: Any, n_t: Any) -> Any:
    plan = alloc.plan(params)
    _, leaves, treedef = plan_lib.flatten_params(params)
    masks = [
      optax.MaskedNode() if leaf_plan.sparsity is None else nm_mask(leaf, n_t, m)
      for leaf, leaf_plan in zip(leaves, plan.leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, masks)

  def init_fn(params: Any) -> NMSRSTEState:
    count = jnp.zeros((), jnp.int32)
    beta, n_t = schedules(count)
    if tree.is_leafless_node(params):  # optax.tree_utils.tree_map_params' placeholder
      masks = params
    else:
      masks = nm_masks(params, n if structure_decay is None else n_t)
    sparse = DynamicSparseState(
      count=count,
      key=jax.random.PRNGKey(0),
      masks=masks,
      inner_state=inner.init(params),
      skipped_updates=jnp.zeros([], jnp.int32),
    )
    return NMSRSTEState(sparse, beta, n_t)

  def update_fn(updates, state: NMSRSTEState, params=None, **extra_args):
    if params is None:
      raise ValueError(
        "nm_sr_ste needs the current params to compute the N:M mask: "
        "call tx.update(grads, state, params)."
      )
    n_mask = n if structure_decay is None else state.n_active
    if lambda_w:
      sparse = [leaf.sparsity is not None for leaf in alloc.plan(params).leaves]
      _, grads, treedef = tree.flatten_with_paths(updates)
      refined = []
      for g, w, is_sparse in zip(grads, treedef.flatten_up_to(params), sparse, strict=True):
        if is_sparse:
          term = jnp.where(nm_mask(w, n_mask, m), jnp.zeros((), w.dtype), w)
          g = g + (term * jnp.asarray(lambda_w, w.dtype)).astype(g.dtype)
        refined.append(g)
      updates = jax.tree.unflatten(treedef, refined)
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    count = optax.safe_increment(state.count)
    beta, n_t = schedules(count)
    masks = nm_masks(optax.apply_updates(params, updates), n if structure_decay is None else n_t)
    sparse_state = state.sparse._replace(count=count, masks=masks, inner_state=inner_state)
    return updates, NMSRSTEState(sparse_state, beta, n_t)

  return SparseTransformation(_WithAllocation(init_fn, alloc), update_fn)
