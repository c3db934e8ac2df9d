"""Property-based tests (hypothesis) of the mask-update invariants (ALGORITHMS.md §8).

Every property is checked against an independent NumPy reference of the documented
semantics (stable sort, ties broken by the lowest index) and against the structural
invariants: exact counts, kept ⊆ old, grown ∩ kept = ∅, dropped ≤ kept, grown ≥ not grown,
exact zeros after ``optax.apply_updates``, grown weights and moments reset, schedules and
budgets.

Speed: shapes, sparsities and methods are drawn from small fixed sets, and every jitted
function is cached per static configuration, so each compiles once per session; data vary
through traced arguments. Examples are derandomized (the same examples every run, as CI
needs); set ``SPARSEJAX_HYPOTHESIS_EXPLORE=1`` to draw 20x more random examples.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, example, given, note, reject, settings
from hypothesis import strategies as st

import sparsejax as sj
from sparsejax._src.criteria import schedules
from sparsejax._src.primitives import native_select, selection

_EXPLORE = os.environ.get("SPARSEJAX_HYPOTHESIS_EXPLORE", "") not in ("", "0")
F32 = np.float32


def _settings(max_examples: int):
  return settings(
    max_examples=max_examples * (20 if _EXPLORE else 1),
    deadline=None,
    derandomize=not _EXPLORE,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
  )


# ---------------------------------------------------------------------------------------
# Data and NumPy references.
# ---------------------------------------------------------------------------------------

# Signed zeros, the smallest subnormals, infinities and the extremes of float32.
_SPECIAL = np.array(
  [-np.inf, np.inf, 0.0, -0.0, 1e-45, -1e-45, 3.0e38, -3.0e38, 1.0, -1.0, 0.5], F32
)
STYLES = ("normal", "ties", "binary", "constant", "special", "magnitude")


def _scores(seed: int, shape, style: str) -> np.ndarray:
  """Float32 scores: Gaussian, integer-valued (many ties), two values, one value (index
  order decides everything), special values, or |Gaussian|."""
  rng = np.random.default_rng(seed)
  if style == "ties":
    return rng.integers(-3, 4, size=shape).astype(F32)
  if style == "binary":
    return rng.integers(0, 2, size=shape).astype(F32)
  if style == "constant":
    return np.full(shape, rng.choice(_SPECIAL[2:]), F32)
  if style == "special":
    return rng.choice(_SPECIAL, size=shape)
  if style == "magnitude":
    return np.abs(rng.standard_normal(shape)).astype(F32)
  return rng.standard_normal(shape).astype(F32)


def _random_mask(seed: int, shape, nnz: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  flat = np.zeros(int(np.prod(shape)), bool)
  flat[rng.permutation(flat.size)[:nnz]] = True
  return flat.reshape(shape)


def _ref_topk(scores, k, candidates=None) -> np.ndarray:
  """The documented selection: the k highest scores (all candidates if fewer), ties by the
  lowest flat index (numbers compare as numbers: -0.0 == 0.0)."""
  s = np.asarray(scores, np.float64).reshape(-1)
  c = np.ones(s.shape, bool) if candidates is None else np.asarray(candidates, bool).reshape(-1)
  order = np.argsort(-s, kind="stable")
  order = order[c[order]]
  out = np.zeros(s.shape, bool)
  out[order[: max(int(k), 0)]] = True
  return out.reshape(np.shape(scores))


def _ref_topk_axis(scores, k, axis, candidates=None) -> np.ndarray:
  """:func:`_ref_topk` independently in every 1-D slice along ``axis``."""
  scores = np.asarray(scores)
  candidates = np.ones(scores.shape, bool) if candidates is None else np.asarray(candidates)
  reduced = list(scores.shape)
  reduced[axis] = 1
  k = np.broadcast_to(np.asarray(k), reduced)
  s, c, kk = (np.moveaxis(x, axis, -1) for x in (scores, candidates, k))
  out = np.zeros(s.shape, bool)
  for idx in np.ndindex(*s.shape[:-1]):
    out[idx] = _ref_topk(s[idx], kk[idx][0], c[idx])
  return np.moveaxis(out, -1, axis)


def _ref_drop_and_grow(mask, drop_scores, grow_scores, n_drop):
  mask = np.asarray(mask, bool)
  nnz = int(mask.sum())
  n_drop = min(max(int(n_drop), 0), nnz)
  kept = _ref_topk(drop_scores, nnz - n_drop, mask)
  grown = _ref_topk(grow_scores, n_drop, ~kept)
  return kept | grown, kept


def _ref_grouped_drop_and_grow(mask, drop_scores, grow_scores, n_drop, per_group, axis, cap):
  mask = np.asarray(mask, bool)
  nnz = int(mask.sum())
  n_drop = min(max(int(n_drop), 0), nnz)
  kept = _ref_topk(drop_scores, nnz - n_drop, mask)
  if cap:
    kept = _ref_topk_axis(drop_scores, per_group, axis, kept)
  need = np.asarray(per_group) - kept.sum(axis=axis, keepdims=True)
  grown = _ref_topk_axis(grow_scores, need, axis, ~kept)
  return kept | grown, kept


def _budget(size: int, sparsity: float) -> int:
  """``floor(size·(1-S))`` with the library's float-noise guard (base.floor_count)."""
  return int(math.floor((1.0 - sparsity) * size + 1e-9))


def _ref_ablated(weights, grads, n_keep, n_drop, sparsity, gamma_sal, dense=False):
  """SRigL's ablation rule (ALGORITHMS.md §4.3) on a ``[fan_in, n_out]`` layer; γ_sal
  multiplies the sparse fan-in ``k0`` (or the dense fan-in with ``dense``)."""
  fan_in, n_out = weights.shape
  budget = _budget(fan_in * n_out, sparsity)
  min_neurons = min(budget // fan_in, n_out - 1)
  threshold = max(1, int(gamma_sal * (fan_in if dense else budget // n_out)))
  salient = _ref_topk(np.abs(weights), n_keep) | _ref_topk(np.abs(grads), n_drop)
  counts = salient.sum(axis=0)
  guard = np.sort(counts)[::-1][min_neurons]  # at least min_neurons + 1 neurons survive
  return counts < min(threshold, guard)


def _assert_selection_order(scores, selected, candidates):
  """Every selected score >= every unselected candidate's; at a tie, the lower index wins."""
  s = np.asarray(scores, np.float64).reshape(-1)
  sel, cand = np.asarray(selected).reshape(-1), np.asarray(candidates).reshape(-1)
  assert not (sel & ~cand).any(), "a non-candidate was selected"
  rest = cand & ~sel
  if sel.any() and rest.any():
    low, high = s[sel].min(), s[rest].max()
    assert low >= high, f"selected score {low} < unselected candidate score {high}"
    if low == high:  # ties at the threshold: selected ones come first in index order
      assert np.flatnonzero(sel & (s == low)).max() < np.flatnonzero(rest & (s == low)).min()


# ---------------------------------------------------------------------------------------
# topk_mask.
# ---------------------------------------------------------------------------------------


@functools.cache
def _topk_fn(shape, axis, strategy):
  """A jitted topk_mask for one static configuration; ``strategy`` forces the algorithm."""
  fn = jax.jit(lambda s, k, c: sj.primitives.topk_mask(s, k, axis=axis, candidates=c))
  if strategy == "default":
    return fn
  pairwise, histogram_above, native = {
    "rank": (10**9, 10**9, False),
    "histogram16": (0, 0, False),  # whole-array selections only; per-slice ones count
    "bits": (0, 10**9, False),
    "native": (0, 10**9, True),  # the FFI kernel (the default on a one-device CPU)
  }[strategy]

  def forced(*args):  # traced (once) with the strategy thresholds patched
    with (
      mock.patch.object(selection, "_PAIRWISE_MAX", pairwise),
      mock.patch.object(selection, "_HISTOGRAM_ABOVE", histogram_above),
      mock.patch.object(selection, "_NATIVE", native),
    ):
      return fn(*args)

  return forced


# (shape, axis): axis None selects over the flattened array (rank for <= 16 entries,
# counting passes above; "histogram16" forces the large-array histograms); an axis selects
# per slice with per-slice counts.
_TOPK_CASES = [((1,), None), ((7,), None), ((5, 6), None), ((3, 4, 5), None)]
_TOPK_CASES += [((6, 9), 0), ((6, 9), 1), ((2, 3, 20), 2)]


@st.composite
def _topk_inputs(draw, cases):
  shape, axis = draw(st.sampled_from(cases))
  seed = draw(st.integers(0, 2**32 - 1))
  scores = _scores(seed, shape, draw(st.sampled_from(STYLES)))
  density = draw(st.sampled_from([1.0, 0.7, 0.2, 0.0]))
  candidates = np.random.default_rng(seed + 1).random(shape) < density
  if axis is None:
    k = draw(st.integers(-2, scores.size + 2))
  else:
    reduced = list(shape)
    reduced[axis] = 1
    k = np.random.default_rng(seed + 2).integers(-1, shape[axis] + 2, size=reduced)
  return scores, k, axis, candidates


def _check_topk(scores, k, axis, candidates, got):
  got = np.asarray(got)
  assert got.dtype == bool and got.shape == scores.shape
  if axis is None:
    expected = _ref_topk(scores, k, candidates)
    assert got.sum() == min(max(int(k), 0), int(candidates.sum()))
    _assert_selection_order(scores, got, candidates)
  else:
    expected = _ref_topk_axis(scores, k, axis, candidates)
    counts = got.sum(axis=axis, keepdims=True)
    np.testing.assert_array_equal(counts, np.clip(k, 0, candidates.sum(axis, keepdims=True)))
  np.testing.assert_array_equal(got, expected)


@_settings(60)
@given(_topk_inputs(_TOPK_CASES))
def test_topk_selects_exactly_k_by_score_then_index(inputs):
  scores, k, axis, candidates = inputs
  fn = _topk_fn(scores.shape, axis, "default")
  got = fn(jnp.asarray(scores), jnp.asarray(k, jnp.int32), jnp.asarray(candidates))
  _check_topk(scores, k, axis, candidates, got)


_STRATEGY_CASES = [((6, 9), None), ((6, 9), 1)]


@_settings(40)
@given(
  _topk_inputs(_STRATEGY_CASES),
  st.sampled_from(["rank", "histogram16", "bits", "native"]),
)
def test_topk_every_selection_strategy(inputs, strategy):
  if strategy == "native" and not native_select.usable():
    return  # checked where the extension is built (CI builds it)
  scores, k, axis, candidates = inputs
  fn = _topk_fn(scores.shape, axis, strategy)
  got = fn(jnp.asarray(scores), jnp.asarray(k, jnp.int32), jnp.asarray(candidates))
  _check_topk(scores, k, axis, candidates, got)


@_settings(10)
@given(_topk_inputs([((5, 6), None), ((6, 9), 1)]))
def test_topk_jit_and_eager_agree(inputs):
  scores, k, axis, candidates = inputs
  eager_k = int(k) if axis is None else jnp.asarray(k, jnp.int32)
  eager = sj.primitives.topk_mask(
    jnp.asarray(scores), eager_k, axis=axis, candidates=jnp.asarray(candidates)
  )
  jitted = _topk_fn(scores.shape, axis, "default")(
    jnp.asarray(scores), jnp.asarray(k, jnp.int32), jnp.asarray(candidates)
  )
  np.testing.assert_array_equal(eager, jitted)
  _check_topk(scores, k, axis, candidates, eager)


def test_topk_signed_zeros_tie_by_index():
  # Regression (found by the properties above): -0.0 == +0.0, so they tie and the lower
  # index wins; the uint32 keys used to rank +0.0 above -0.0.
  scores = jnp.array([-0.0, 0.0, -0.0, 0.0, -1.0])
  np.testing.assert_array_equal(sj.primitives.topk_mask(scores, 2), [1, 1, 0, 0, 0])
  np.testing.assert_array_equal(
    sj.primitives.topk_mask(scores[None, :], jnp.array([[3]]), axis=1), [[1, 1, 1, 0, 0]]
  )


# ---------------------------------------------------------------------------------------
# drop_and_grow / grouped_drop_and_grow.
# ---------------------------------------------------------------------------------------

_jit_drop_and_grow = jax.jit(sj.primitives.drop_and_grow)


@_settings(50)
@given(
  shape=st.sampled_from([(7,), (5, 6), (2, 3, 4)]),
  seed=st.integers(0, 2**32 - 1),
  density=st.floats(0.0, 1.0),
  drop_style=st.sampled_from(STYLES),
  grow_style=st.sampled_from(STYLES),
  data=st.data(),
)
def test_drop_and_grow_invariants(shape, seed, density, drop_style, grow_style, data):
  size = int(np.prod(shape))
  nnz = int(round(density * size))
  mask = _random_mask(seed, shape, nnz)
  drop = _scores(seed + 1, shape, drop_style)
  grow = _scores(seed + 2, shape, grow_style)
  n_drop = data.draw(st.integers(-2, nnz + 3), label="n_drop")
  new, kept = _jit_drop_and_grow(jnp.asarray(mask), drop, grow, jnp.int32(n_drop))
  new, kept = np.asarray(new), np.asarray(kept)
  n = min(max(n_drop, 0), nnz)
  grown = new & ~kept
  assert new.sum() == nnz, "nnz not preserved"
  assert not (kept & ~mask).any(), "kept ⊄ old"
  assert kept.sum() == nnz - n and grown.sum() == n
  _assert_selection_order(drop, kept, mask)  # dropped scores <= surviving kept scores
  _assert_selection_order(grow, grown, ~kept)  # grown scores >= non-grown candidates
  ref_new, ref_kept = _ref_drop_and_grow(mask, drop, grow, n_drop)
  np.testing.assert_array_equal(kept, ref_kept)
  np.testing.assert_array_equal(new, ref_new)


@functools.cache
def _grouped_fn(axis, cap):
  return jax.jit(
    lambda m, d, g, n, k: sj.primitives.grouped_drop_and_grow(m, d, g, n, k, axis=axis, cap=cap)
  )


@_settings(50)
@given(
  axis=st.sampled_from([0, 1]),
  cap=st.booleans(),
  seed=st.integers(0, 2**32 - 1),
  drop_style=st.sampled_from(STYLES),
  grow_style=st.sampled_from(STYLES),
  data=st.data(),
)
def test_grouped_drop_and_grow_invariants(axis, cap, seed, drop_style, grow_style, data):
  shape = (12, 5)
  rng = np.random.default_rng(seed)
  group_len, n_groups = shape[axis], shape[1 - axis]
  reduced = (1, n_groups) if axis == 0 else (n_groups, 1)
  if cap:  # any mask; per-group targets, some 0 (an ablated neuron)
    mask = rng.random(shape) < data.draw(st.floats(0.0, 1.0), label="density")
    per_group = rng.integers(0, group_len + 1, size=reduced)
  else:  # cap=False needs no over-full group: every group holds exactly per_group
    per_group = np.full(reduced, data.draw(st.integers(0, group_len), label="per_group"))
    mask = _ref_topk_axis(rng.random(shape), per_group, axis)
  drop = _scores(seed + 1, shape, drop_style)
  grow = _scores(seed + 2, shape, grow_style)
  nnz = int(mask.sum())
  n_drop = data.draw(st.integers(-1, nnz + 2), label="n_drop")
  new, kept = _grouped_fn(axis, cap)(
    jnp.asarray(mask), drop, grow, jnp.int32(n_drop), jnp.asarray(per_group, jnp.int32)
  )
  new, kept = np.asarray(new), np.asarray(kept)
  grown = new & ~kept
  np.testing.assert_array_equal(new.sum(axis=axis, keepdims=True), per_group)  # exact counts
  assert not (kept & ~mask).any(), "kept ⊄ old"
  assert (kept.sum(axis=axis, keepdims=True) <= per_group).all()
  # Global drop: at least n_drop of the old entries are gone from the kept set.
  assert kept.sum() <= nnz - min(max(n_drop, 0), nnz)
  if not cap:  # kept = the globally highest drop scores among the old entries
    _assert_selection_order(drop, kept, mask)
  for j in range(n_groups):
    sl = (slice(None), j) if axis == 0 else (j, slice(None))
    _assert_selection_order(grow[sl], grown[sl], ~kept[sl])
  ref_new, ref_kept = _ref_grouped_drop_and_grow(mask, drop, grow, n_drop, per_group, axis, cap)
  np.testing.assert_array_equal(kept, ref_kept)
  np.testing.assert_array_equal(new, ref_new)


# ---------------------------------------------------------------------------------------
# Structures: Unstructured, ConstantFanIn (with SRigL's ablation), NM.
# ---------------------------------------------------------------------------------------


def _layer(path, shape, is_last):
  return sj.LayerInfo(path, tuple(shape), 0, 2, False, is_last)


@functools.cache
def _structure_fn(structure, shape, sparsity, is_last):
  """jit: one ``structure.drop_and_grow`` on a random (or given) mask of the structure.

  ``n_drop = floor(nnz · fraction)`` in float32, as the DST step computes it.
  """
  layer = _layer("layer/kernel", shape, is_last)

  def fn(key, mask, use_random, w, g, fraction):
    init = structure.random_mask(key, shape, sparsity)
    mask = jnp.where(use_random, init, mask)
    w = jnp.where(mask, w, 0.0)
    nnz = jnp.sum(mask, dtype=jnp.int32)
    n_drop = jnp.floor(nnz.astype(jnp.float32) * fraction).astype(jnp.int32)
    ctx = sj.ScoreContext(
      param=w,
      grad=g,
      mask=mask,
      key=key,
      step=jnp.int32(1),
      path="layer/kernel",
      inner_moments=(),
      sparsity=sparsity,
      layer=layer,
    )
    new = structure.drop_and_grow(ctx, jnp.abs(w), jnp.abs(g), n_drop)
    return init, mask, w, new, n_drop

  return jax.jit(fn)


def _run_structure(structure, shape, sparsity, seed, fraction, w_style, g_style, mask=None, **kw):
  """Returns ``(random mask, input mask, weights, new mask, grads, n_drop)`` as NumPy."""
  g = _scores(seed + 2, shape, g_style)
  fn = _structure_fn(structure, shape, sparsity, kw.get("is_last", False))
  use_random = mask is None
  mask = np.zeros(shape, bool) if mask is None else mask
  key = jax.random.PRNGKey(seed)
  out = fn(key, mask, use_random, _scores(seed + 1, shape, w_style), g, F32(fraction))
  init, mask, w, new, n_drop = (np.asarray(x) for x in out)
  return init, mask, w, new, g, int(n_drop)


_FRACTION = st.floats(0.0, 1.0)


@_settings(25)
@given(
  case=st.sampled_from([((12, 8), 0.5), ((3, 3, 2, 6), 0.9)]),
  seed=st.integers(0, 2**30),
  fraction=_FRACTION,
  w_style=st.sampled_from(STYLES),
  g_style=st.sampled_from(STYLES),
)
def test_unstructured_structure(case, seed, fraction, w_style, g_style):
  shape, sparsity = case
  structure = sj.Unstructured()
  size = int(np.prod(shape))
  target = structure.target_nnz(shape, sparsity)
  assert target == size - math.floor(sparsity * size + 1e-9)
  init, mask, w, new, g, n_drop = _run_structure(
    structure, shape, sparsity, seed, fraction, w_style, g_style
  )
  assert init.sum() == target and new.sum() == target
  ref_new, _ = _ref_drop_and_grow(mask, np.abs(w), np.abs(g), n_drop)
  np.testing.assert_array_equal(new, ref_new)


def _fan_in_view(x):
  return np.asarray(x).reshape(-1, np.shape(x)[-1])


@_settings(25)
@given(
  case=st.sampled_from([((12, 8), 0.75), ((3, 3, 2, 6), 0.6)]),
  seed=st.integers(0, 2**30),
  fraction=_FRACTION,
  w_style=st.sampled_from(STYLES),
  g_style=st.sampled_from(STYLES),
)
def test_constant_fan_in_structure(case, seed, fraction, w_style, g_style):
  shape, sparsity = case
  structure = sj.ConstantFanIn()
  fan_in, n_out = int(np.prod(shape[:-1])), shape[-1]
  k = _budget(fan_in * n_out, sparsity) // n_out  # conv fan-in counts (kh, kw, in)
  assert structure.target_nnz(shape, sparsity) == k * n_out
  init, mask, w, new, g, n_drop = _run_structure(
    structure, shape, sparsity, seed, fraction, w_style, g_style
  )
  np.testing.assert_array_equal(_fan_in_view(init).sum(0), k)
  np.testing.assert_array_equal(_fan_in_view(new).sum(0), k)
  ref_new, _ = _ref_grouped_drop_and_grow(
    _fan_in_view(mask), _fan_in_view(np.abs(w)), _fan_in_view(np.abs(g)), n_drop, k, 0, False
  )
  np.testing.assert_array_equal(_fan_in_view(new), ref_new)


def _ablated_mask(seed, shape, sparsity):
  """A reachable SRigL mask: some neurons ablated, the others at budget // n_active."""
  rng = np.random.default_rng(seed)
  fan_in, n_out = int(np.prod(shape[:-1])), shape[-1]
  budget = _budget(fan_in * n_out, sparsity)
  min_active = min(budget // fan_in, n_out - 1) + 1
  n_active = int(rng.integers(min_active, n_out + 1))
  active = rng.permutation(n_out) < n_active
  per = np.where(active, min(budget // n_active, fan_in), 0)[None, :]
  return _ref_topk_axis(rng.random((fan_in, n_out)), per, 0).reshape(shape)


@_settings(30)
@given(
  case=st.sampled_from(
    [((12, 8), 0.75, 0.3, False), ((3, 3, 2, 6), 0.5, 0.9, False), ((12, 8), 0.75, 0.3, True)]
  ),
  start_ablated=st.booleans(),
  seed=st.integers(0, 2**30),
  fraction=_FRACTION,
  w_style=st.sampled_from(STYLES),
  g_style=st.sampled_from(STYLES),
)
def test_constant_fan_in_ablation(case, start_ablated, seed, fraction, w_style, g_style):
  shape, sparsity, gamma_sal, is_last = case
  structure = sj.ConstantFanIn(gamma_sal=gamma_sal)
  fan_in, n_out = int(np.prod(shape[:-1])), shape[-1]
  budget = _budget(fan_in * n_out, sparsity)
  k0 = budget // n_out
  # A protected layer never has ablated neurons, so it starts from a plain fan-in mask.
  mask = _ablated_mask(seed, shape, sparsity) if start_ablated and not is_last else None
  _, mask, w, new, g, n_drop = _run_structure(
    structure, shape, sparsity, seed, fraction, w_style, g_style, mask=mask, is_last=is_last
  )
  counts = _fan_in_view(new).sum(0)
  np.testing.assert_array_equal(sj.primitives.fan_in_counts(new), counts)
  np.testing.assert_array_equal(sj.primitives.active_neurons(new), counts > 0)
  if is_last:  # the output layer is never ablated
    np.testing.assert_array_equal(counts, k0)
    return
  ablated = _ref_ablated(
    _fan_in_view(w), _fan_in_view(g), int(mask.sum()) - n_drop, n_drop, sparsity, gamma_sal
  )
  n_active = int((~ablated).sum())
  note(f"ablated {ablated.astype(int)}, counts {counts}")
  assert n_active >= min(budget // fan_in, n_out - 1) + 1
  np.testing.assert_array_equal(counts[ablated], 0)  # ablated neurons are empty
  np.testing.assert_array_equal(counts[~ablated], budget // n_active)  # k = budget // n_active
  drop = np.where(ablated[None, :], -np.inf, _fan_in_view(np.abs(w)))
  per = np.where(ablated, 0, budget // n_active)[None, :]
  ref_new, _ = _ref_grouped_drop_and_grow(
    _fan_in_view(mask), drop, _fan_in_view(np.abs(g)), n_drop, per, 0, True
  )
  np.testing.assert_array_equal(_fan_in_view(new), ref_new)


@functools.cache
def _ablate_fn(sparsity, gamma_sal, relative_to):
  kw = {} if relative_to is None else {"relative_to": relative_to}  # default: "sparse"
  return jax.jit(
    lambda w, g, n_keep, n_drop: sj.primitives.neurons_to_ablate(
      w, g, n_keep, n_drop, sparsity, gamma_sal, **kw
    )
  )


@_settings(25)
@given(
  case=st.sampled_from(
    [(0.75, 0.3, None), (0.5, 0.9, "dense"), (0.9, 1.0, "sparse"), (0.75, 0.0, None)]
  ),
  seed=st.integers(0, 2**30),
  w_style=st.sampled_from(STYLES),
  g_style=st.sampled_from(STYLES),
  data=st.data(),
)
def test_neurons_to_ablate_matches_reference(case, seed, w_style, g_style, data):
  sparsity, gamma_sal, relative_to = case
  w, g = _scores(seed, (12, 8), w_style), _scores(seed + 1, (12, 8), g_style)
  n_keep = data.draw(st.integers(0, 96), label="n_keep")
  n_drop = data.draw(st.integers(0, 96 - n_keep), label="n_drop")
  got = _ablate_fn(sparsity, gamma_sal, relative_to)(w, g, jnp.int32(n_keep), jnp.int32(n_drop))
  want = _ref_ablated(w, g, n_keep, n_drop, sparsity, gamma_sal, dense=relative_to == "dense")
  np.testing.assert_array_equal(got, want)


def _nm_counts(mask, m):
  flat = _fan_in_view(mask)
  return flat.reshape(flat.shape[0] // m, m, flat.shape[1]).sum(axis=1)


@_settings(25)
@given(
  case=st.sampled_from([((8, 6), 2, 4), ((3, 3, 3, 4), 1, 3)]),
  seed=st.integers(0, 2**30),
  fraction=_FRACTION,
  w_style=st.sampled_from(STYLES),
  g_style=st.sampled_from(STYLES),
)
def test_nm_structure(case, seed, fraction, w_style, g_style):
  shape, n, m = case
  structure = sj.NM(n, m)
  assert structure.sparsity == pytest.approx(1 - n / m)
  assert structure.target_nnz(shape, structure.sparsity) == int(np.prod(shape)) // m * n
  init, mask, w, new, g, n_drop = _run_structure(
    structure, shape, structure.sparsity, seed, fraction, w_style, g_style
  )
  np.testing.assert_array_equal(_nm_counts(init, m), n)
  np.testing.assert_array_equal(_nm_counts(new, m), n)  # exactly n per group of m
  grouped = (-1, m, shape[-1])
  ref_new, _ = _ref_grouped_drop_and_grow(
    mask.reshape(grouped),
    np.abs(w).reshape(grouped),
    np.abs(g).reshape(grouped),
    n_drop,
    n,
    1,
    False,
  )
  np.testing.assert_array_equal(new, ref_new.reshape(shape))


@functools.cache
def _block_means(shape, h, w):
  """jit: per-block mean of a kernel's [fan_in, n_out] view (the score pooling of Block)."""
  fan_in, n_out = int(np.prod(shape[:-1])), shape[-1]
  tiles = (fan_in // h, h, n_out // w, w)
  return jax.jit(lambda x: jnp.mean(x.reshape(tiles).astype(jnp.float32), axis=(1, 3)))


@_settings(25)
@given(
  case=st.sampled_from([((12, 8), 2, 4, 0.5), ((3, 3, 2, 6), 3, 2, 0.7)]),
  seed=st.integers(0, 2**30),
  fraction=_FRACTION,
  w_style=st.sampled_from(STYLES),
  g_style=st.sampled_from(STYLES),
)
def test_block_structure(case, seed, fraction, w_style, g_style):
  shape, h, w, sparsity = case  # grids 6x2 and 6x3: rows != cols
  structure = sj.Block(h, w)
  fan_in, n_out = int(np.prod(shape[:-1])), shape[-1]
  rows, cols = fan_in // h, n_out // w
  n_blocks = rows * cols - math.floor(sparsity * rows * cols + 1e-9)
  assert structure.target_nnz(shape, sparsity) == n_blocks * h * w
  init, mask, wts, new, g, n_drop = _run_structure(
    structure, shape, sparsity, seed, fraction, w_style, g_style
  )

  def blocks(m):  # [rows, cols] block mask; every block all-on or all-off
    t = _fan_in_view(m).reshape(rows, h, cols, w)
    assert (t.all(axis=(1, 3)) == t.any(axis=(1, 3))).all(), "a block is partly pruned"
    return t.all(axis=(1, 3))

  assert blocks(init).sum() == n_blocks and blocks(new).sum() == n_blocks
  means = _block_means(shape, h, w)
  chosen = np.asarray(structure.select(jnp.asarray(g), sparsity))  # the best block means
  np.testing.assert_array_equal(blocks(chosen), _ref_topk(np.asarray(means(g)), n_blocks))
  ref, _ = _ref_drop_and_grow(
    blocks(mask),
    np.asarray(means(np.abs(wts))),
    np.asarray(means(np.abs(g))),
    n_drop // (h * w),  # counts in blocks
  )
  np.testing.assert_array_equal(blocks(new), ref)


# ---------------------------------------------------------------------------------------
# Full transformation steps.
# ---------------------------------------------------------------------------------------

# A conv layer then the output layer (Flax layout; the numbers tell the layer order).
_SHAPES = {"layers_0": (3, 3, 2, 6), "layers_1": (12, 4)}
_SCHEDULE = dict(update_every=1, start_step=0, end_step=1000)
_SGDM = lambda: optax.sgd(0.05, momentum=0.9)  # noqa: E731
_ADAM = lambda: optax.adam(1e-2)  # noqa: E731

# name -> (method, inner optimizer, keywords); every dynamic method updates on every
# step t with start_step < t < end_step and (t - start_step) % update_every == 0.
_METHODS = {
  "rigl/sgd_momentum": (
    sj.rigl,
    _SGDM,
    dict(sparsity=0.7, drop_fraction=0.9, **_SCHEDULE),
  ),
  "rigl/adam": (
    sj.rigl,
    _ADAM,
    dict(sparsity=0.8, distribution="uniform", grow_init=0.25, drop_fraction=0.5, **_SCHEDULE),
  ),
  "set/adam": (
    sj.set_,
    _ADAM,
    dict(
      sparsity=0.6,
      update_every=3,
      start_step=2,
      end_step=900,
      drop_fraction=0.4,
      drop_fraction_decay="constant",
    ),
  ),
  "srigl/sgd_momentum": (
    sj.srigl,
    _SGDM,
    dict(sparsity=0.75, gamma_sal=0.5, distribution="uniform", drop_fraction=0.7, **_SCHEDULE),
  ),
  "static/adam": (sj.static_sparse, _ADAM, dict(sparsity=0.6)),
}


@functools.cache
def _method(name):
  """``(tx, inner, jitted tx.update, initial state, jitted inner.update)``, built once."""
  method, inner, kwargs = _METHODS[name]
  inner = inner()
  tx = method(inner, **kwargs)
  zeros = {
    n: {"kernel": np.zeros(s, F32), "bias": np.zeros(s[-1:], F32)} for n, s in _SHAPES.items()
  }
  return tx, inner, jax.jit(tx.update), tx.init(zeros), jax.jit(inner.update)


def _step_params(rng):
  params = {}
  for name, shape in _SHAPES.items():
    params[name] = {
      "kernel": rng.standard_normal(shape).astype(F32),
      "bias": rng.standard_normal(shape[-1:]).astype(F32),
    }
  return params


def _step_masks(rng, tx, params):
  """Random masks of the transformation's structure and per-leaf sparsity."""
  structure = tx.init.allocation.structure
  masks = {}
  for leaf in tx.plan(params).leaves:
    name, kind = leaf.path.split("/")
    if leaf.sparsity is None:
      masks.setdefault(name, {})[kind] = None
      continue
    shape, seed = leaf.shape, int(rng.integers(2**31))
    if isinstance(structure, sj.ConstantFanIn):
      if structure.ablates(leaf.path, leaf.layer) and rng.random() < 0.5:
        mask = _ablated_mask(seed, shape, leaf.sparsity)
      else:
        k = structure.fan_in(shape, leaf.sparsity)
        mask = _ref_topk_axis(rng.random(_fan_in_view(np.zeros(shape)).shape), k, 0)
    else:
      mask = _random_mask(seed, shape, structure.target_nnz(shape, leaf.sparsity))
    masks.setdefault(name, {})[kind] = mask.reshape(shape)
  return masks


def _leaves(tree, masks):
  return {
    f"{name}/{kind}": (tree[name][kind], masks[name][kind])
    for name in _SHAPES
    for kind in ("kernel", "bias")
  }


@functools.cache
def _fraction_fn(name):
  """jit: the method's drop fraction at step t, clipped to [0, 1] as the step clips it."""
  _, _, kwargs = _METHODS[name]
  schedule = sj.drop_fraction_schedule(
    kwargs["drop_fraction"], start_step=kwargs["start_step"], end_step=kwargs["end_step"]
  )
  return jax.jit(lambda t: jnp.clip(schedule(t), 0.0, 1.0))


def _expected_masks(name, tx, params, grads, masks, t):
  """RigL / SRigL: the new masks, computed with the NumPy references."""
  fraction = F32(_fraction_fn(name)(jnp.int32(t)))
  structure = tx.init.allocation.structure
  out = {}
  for leaf in tx.plan(params).leaves:
    name_, kind = leaf.path.split("/")
    mask = masks[name_][kind]
    if mask is None:
      continue
    w, g = np.abs(params[name_][kind]), np.abs(grads[name_][kind])
    n_drop = int(np.floor(F32(mask.sum()) * fraction))
    if isinstance(structure, sj.ConstantFanIn):
      fan = _fan_in_view
      budget = _budget(mask.size, leaf.sparsity)
      if structure.ablates(leaf.path, leaf.layer):
        ablated = _ref_ablated(
          fan(params[name_][kind]),
          fan(grads[name_][kind]),
          int(mask.sum()) - n_drop,
          n_drop,
          leaf.sparsity,
          structure.gamma_sal,
        )
        per = np.where(ablated, 0, budget // int((~ablated).sum()))[None, :]
        drop = np.where(ablated[None, :], -np.inf, fan(w))
        new, _ = _ref_grouped_drop_and_grow(fan(mask), drop, fan(g), n_drop, per, 0, True)
      else:
        k = structure.fan_in(leaf.shape, leaf.sparsity)
        new, _ = _ref_grouped_drop_and_grow(fan(mask), fan(w), fan(g), n_drop, k, 0, False)
      out[leaf.path] = new.reshape(mask.shape)
    else:
      out[leaf.path], _ = _ref_drop_and_grow(mask, w, g, n_drop)
  return out


@_settings(30)
@given(
  name=st.sampled_from(sorted(_METHODS)),
  t=st.one_of(st.integers(0, 1050), st.sampled_from([0, 1, 2, 3, 5, 899, 900, 999, 1000])),
  seed=st.integers(0, 2**32 - 1),
  grad_style=st.sampled_from(["normal", "ties"]),
)
def test_transformation_step_invariants(name, t, seed, grad_style):
  tx, inner, update, state, inner_update = _method(name)
  _, _, kwargs = _METHODS[name]
  rng = np.random.default_rng(seed)
  params = _step_params(rng)
  masks = _step_masks(rng, tx, params)
  params = {
    n: {k: v if masks[n][k] is None else np.where(masks[n][k], v, F32(0)) for k, v in p.items()}
    for n, p in params.items()
  }
  grads = {
    n: {k: _scores(int(rng.integers(2**31)), v.shape, grad_style) for k, v in p.items()}
    for n, p in params.items()
  }
  # Nonzero inner-optimizer moments everywhere (pruned positions too), to see the resets.
  moments = optax.tree_utils.tree_map_params(
    inner, lambda v: np.abs(rng.standard_normal(v.shape)).astype(F32) + F32(0.1), state.inner_state
  )
  state_masks = jax.tree.map(
    lambda m: optax.MaskedNode() if m is None else jnp.asarray(m),
    masks,
    is_leaf=lambda x: x is None,
  )
  state = state._replace(count=jnp.int32(t), masks=state_masks, inner_state=moments)

  updates, new_state = update(grads, state, params)
  new_params = optax.apply_updates(params, updates)
  new_masks = sj.get_masks(new_state)
  assert int(new_state.count) == t + 1 and int(new_state.skipped_updates) == 0

  every = kwargs.get("update_every")
  start, end = kwargs.get("start_step", 0), kwargs.get("end_step")
  updates_masks = every is not None and start < t < end and (t - start) % every == 0
  structure = tx.init.allocation.structure
  grow_init = kwargs.get("grow_init", 0.0)
  plan = {leaf.path: leaf for leaf in tx.plan(params).leaves}
  expected = {}
  if updates_masks and name.split("/")[0] in ("rigl", "srigl"):
    expected = _expected_masks(name, tx, params, grads, masks, t)

  grown_tree, dropped_tree, kept_tree = {}, {}, {}
  for path, (p_new, old) in _leaves(new_params, masks).items():
    n_, k_ = path.split("/")
    new = None if new_masks[n_][k_] is None else np.asarray(new_masks[n_][k_])
    p_new = np.asarray(p_new)
    if old is None:
      assert new is None
      grown_tree.setdefault(n_, {})[k_] = np.zeros(p_new.shape, bool)
      dropped_tree.setdefault(n_, {})[k_] = np.zeros(p_new.shape, bool)
      kept_tree.setdefault(n_, {})[k_] = np.ones(p_new.shape, bool)
      continue
    assert not p_new[~new].any(), f"{path}: a pruned weight is nonzero after apply_updates"
    if not updates_masks:
      np.testing.assert_array_equal(new, old, err_msg=f"{path}: mask changed off-schedule")
    if isinstance(structure, sj.ConstantFanIn) and structure.ablates(path, plan[path].layer):
      counts = _fan_in_view(new).sum(0)
      budget = _budget(new.size, plan[path].sparsity)
      n_active = int((counts > 0).sum())
      np.testing.assert_array_equal(counts[counts > 0], budget // n_active)
    else:
      assert new.sum() == old.sum(), f"{path}: nnz not preserved"
    if path in expected:
      np.testing.assert_array_equal(new, expected[path], err_msg=f"{path}: wrong new mask")
    if updates_masks and name.startswith("set"):  # magnitude drop, random regrowth
      n_drop = int(np.floor(F32(old.sum()) * F32(kwargs["drop_fraction"])))
      w = np.abs(np.asarray(params[n_][k_]))
      kept_ref = _ref_topk(w, int(old.sum()) - n_drop, old)
      assert not (kept_ref & ~new).any(), f"{path}: a surviving weight was dropped"
    grown = new & ~old
    np.testing.assert_array_equal(p_new[grown], F32(grow_init), err_msg=f"{path}: grown weight")
    grown_tree.setdefault(n_, {})[k_] = grown
    dropped_tree.setdefault(n_, {})[k_] = old & ~new
    kept_tree.setdefault(n_, {})[k_] = new & old

  # Reference: the inner optimizer on gradients masked to kept weights, its state reset
  # to 0 at grown positions first.
  reset = optax.tree_utils.tree_map_params(
    inner, lambda v, gm: np.where(gm, F32(0), v), state.inner_state, grown_tree
  )
  masked_grads = jax.tree.map(lambda g, k: np.where(k, g, F32(0)), grads, kept_tree)
  ref_updates, ref_state = inner_update(masked_grads, reset, params)
  for path, (p_new, kept) in _leaves(new_params, kept_tree).items():
    n_, k_ = path.split("/")
    want = np.asarray(params[n_][k_] + ref_updates[n_][k_])
    np.testing.assert_allclose(
      np.asarray(p_new)[kept], want[kept], rtol=1e-5, atol=1e-6, err_msg=f"{path}: kept update"
    )

  # Inner state: the reference everywhere, exactly 0 at grown positions; at dropped
  # positions (pruned, their moments never read again before a regrowth resets them)
  # either the reference or 0.
  def per_position(tree):
    return jax.tree.leaves(
      optax.tree_utils.tree_map_params(
        inner,
        lambda v, m: m,
        new_state.inner_state,
        tree,
        transform_non_params=lambda v: np.zeros(np.shape(v), bool),
      )
    )

  got_state, want_state = jax.tree.leaves(new_state.inner_state), jax.tree.leaves(ref_state)
  assert len(got_state) == len(want_state)
  for got, want, grown, dropped in zip(
    got_state, want_state, per_position(grown_tree), per_position(dropped_tree), strict=True
  ):
    got, want = np.asarray(got), np.asarray(want)
    assert not np.any(got[grown]), "an inner-optimizer moment is nonzero at a grown position"
    ok = np.isclose(got, want, rtol=1e-5, atol=1e-6) | (dropped & (got == 0))
    assert ok.all(), f"inner state differs from the reference: {got[~ok]} vs {want[~ok]}"


# ---------------------------------------------------------------------------------------
# Distributions.
# ---------------------------------------------------------------------------------------

_DIM = st.integers(1, 48)
_SHAPE = st.one_of(
  st.tuples(_DIM),  # a 1-D leaf (a bias made sparse with `include=`)
  st.tuples(_DIM, _DIM),
  st.tuples(st.sampled_from([1, 3]), st.sampled_from([1, 3]), st.integers(1, 16), _DIM),
)


def _raw_density(distribution, shape, power_scale):
  if distribution == "erk":
    return (sum(shape) / math.prod(shape)) ** power_scale
  if len(shape) < 2:
    return 1.0
  n_in, n_out = shape[-2], shape[-1]
  return (n_in + n_out) / (n_in * n_out)


@_settings(150)
@given(
  shapes=st.lists(_SHAPE, min_size=1, max_size=5),
  sparsity=st.floats(0.0, 0.99),
  distribution=st.sampled_from(["uniform", "erk", "erdos_renyi"]),
  power_scale=st.sampled_from([1.0, 0.5]),
  override=st.one_of(st.none(), st.tuples(st.integers(0, 4), st.floats(0.0, 0.99))),
)
def test_distribution_values_and_budget(shapes, sparsity, distribution, power_scale, override):
  shapes_by_path = {f"layers_{i}/kernel": s for i, s in enumerate(shapes)}
  overrides = {}
  if override is not None and override[0] < len(shapes):
    overrides[f"layers_{override[0]}/kernel"] = override[1]
  fn = getattr(sj, distribution)
  kwargs = dict(overrides=overrides)
  if distribution == "erk":
    kwargs["power_scale"] = power_scale
  sizes = {p: math.prod(shapes_by_path[p]) for p in shapes_by_path}
  distributed = [p for p in shapes_by_path if p not in overrides]
  prunes_nothing = all(math.floor(sparsity * sizes[p] + 1e-9) == 0 for p in distributed)
  try:
    out = fn(shapes_by_path, sparsity, **kwargs)
  except ValueError as e:
    assert not prunes_nothing, f"raised although no layer is to lose a weight: {e}"
    assert distribution != "uniform" and f"distribution={distribution!r} cannot reach" in str(e)
    reject()
  assert list(out) == list(shapes_by_path)
  for path, value in out.items():
    assert 0.0 <= value < 1.0, f"{path}: sparsity {value}"
  for path, value in overrides.items():
    assert out[path] == value, "an override was not applied exactly"
  if distribution == "uniform":
    assert all(out[p] == sparsity for p in distributed)
    return
  # Budget: the distributed layers hold exactly sum_l (N_l - floor(N_l S)) nonzeros.
  target = sum(sizes[p] - math.floor(sparsity * sizes[p] + 1e-9) for p in distributed)
  realised = sum(sizes[p] * (1.0 - out[p]) for p in distributed)
  assert realised == pytest.approx(target, rel=1e-9, abs=1e-6)
  # Density proportional to the raw density among non-dense layers; dense ones (overflow)
  # have the largest raw densities.
  raw = {p: _raw_density(distribution, shapes_by_path[p], power_scale) for p in distributed}
  free = [p for p in distributed if out[p] > 0.0]
  dense = [p for p in distributed if out[p] == 0.0]
  if free:
    eps = [(1.0 - out[p]) / raw[p] for p in free]
    assert max(eps) == pytest.approx(min(eps), rel=1e-9)
    for p in dense:
      assert raw[p] * eps[0] >= 1.0 - 1e-9, f"{p} is dense but its density fits under 1"


# ---------------------------------------------------------------------------------------
# Schedules.
# ---------------------------------------------------------------------------------------


_MAX_COUNT = 200


@st.composite
def _schedule(draw):
  start = draw(st.integers(0, 30))
  every = draw(st.integers(1, 20))
  end = draw(st.integers(start + 1, start + 120))
  return every, start, end


@_settings(100)
@given(_schedule())
def test_is_mask_update_step_matches_python_reference(schedule):
  every, start, end = schedule
  counts = np.arange(0, _MAX_COUNT)  # one length: the eager ops compile once
  got = np.asarray(
    sj.is_mask_update_step(jnp.asarray(counts), update_every=every, start_step=start, end_step=end)
  )
  want = np.array([start < t < end and (t - start) % every == 0 for t in counts])
  np.testing.assert_array_equal(got, want)
  steps = [int(t) for t in counts[want]]
  schedule = schedules.UpdateSchedule(every, start, end)
  got_steps = schedule.update_steps()
  assert got_steps.dtype.kind == "i" and got_steps.tolist() == steps
  assert schedule.first_update == (steps[0] if steps else None)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    sj.rigl(optax.sgd(0.1), sparsity=0.5, update_every=every, start_step=start, end_step=end)
  never = [w for w in caught if "no mask update ever happens" in str(w.message)]
  assert bool(never) == (not steps), "warns iff the schedule never updates the masks"


@_settings(100)
@given(
  schedule=_schedule(),
  fraction=st.floats(0.0, 1.0),
  decay=st.sampled_from(["cosine", "constant"]),
)
def test_drop_fraction_schedule_matches_formula(schedule, fraction, decay):
  _, start, end = schedule
  fn = sj.drop_fraction_schedule(fraction, decay=decay, start_step=start, end_step=end)
  counts = np.arange(0, _MAX_COUNT)
  got = np.asarray(fn(jnp.asarray(counts)))
  if decay == "constant":
    want = np.full(counts.shape, fraction)
  else:
    progress = np.clip(counts - start, 0, end - start) / (end - start)
    want = fraction * 0.5 * (1.0 + np.cos(np.pi * progress))
  after_start = counts >= start  # no update happens before start_step
  np.testing.assert_allclose(got[after_start], want[after_start], rtol=1e-5, atol=1e-6)
  assert got.dtype == np.float32


@_settings(100)
@given(
  schedule=_schedule(),
  final=st.floats(0.0, 0.99),
  initial=st.floats(0.0, 0.99),
  power=st.sampled_from([1.0, 2.0, 3.0, 0.5]),
  regrow=st.integers(0, 40),
)
def test_gradual_schedule_matches_python_reference(schedule, final, initial, power, regrow):
  every, start, end = schedule
  initial = min(initial, final)
  counts = np.arange(0, _MAX_COUNT)
  # Zhu & Gupta: s_i at start_step, s_f from end_step on, (1 - p)^power in between.
  p = np.clip((counts - start) / (end - start), 0.0, 1.0)
  want = final + (initial - final) * (1.0 - p) ** power
  got = sj.gradual_sparsity(
    counts, sparsity=final, initial_sparsity=initial, start_step=start, end_step=end, power=power
  )
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  got32 = sj.gradual_sparsity(  # float32 steps: still computed (and returned) in float64
    counts.astype(np.float32), sparsity=final, initial_sparsity=initial, start_step=start,
    end_step=end, power=power,
  )  # fmt: skip
  assert got32.dtype == np.float64
  np.testing.assert_allclose(got32, want, rtol=1e-12, atol=1e-12)
  assert sj.gradual_sparsity(end + 7, sparsity=final, end_step=end, start_step=start) == final
  # Pruning steps: start, every `every` after it, and end_step itself; regrowth until
  # regrow_end_step on the same grid.
  last = end + regrow
  gs = schedules.GradualSchedule(start, end, every, initial, power, last if regrow else None)
  want_steps = [t for t in range(start, last + 1) if (t - start) % every == 0 or t == end]
  assert gs.update_steps().tolist() == want_steps
  assert gs.pruning_steps().tolist() == [t for t in want_steps if t <= end]
  np.testing.assert_array_equal(
    np.asarray(gs.is_update(jnp.asarray(counts))), np.isin(counts, want_steps)
  )


@_settings(30)
@given(
  schedule=_schedule(),
  step=st.integers(0, 160),
  value=st.sampled_from([30.0, -0.1, 1.5, np.nan, 0.0, 1.0]),
)
@example(schedule=(5, 0, 8), step=5, value=1.5)  # the only update step is the bad one
@example(schedule=(5, 0, 8), step=5, value=1.0)
def test_drop_fraction_callable_is_checked_on_update_steps(schedule, step, value):
  every, start, end = schedule
  is_update = start < step < end and (step - start) % every == 0
  bad_step = step if not 0.0 <= value <= 1.0 else -1  # NaN compares False: bad
  fn = lambda t: jnp.where(t == step, value, 0.25)  # noqa: E731
  kw = dict(sparsity=0.5, update_every=every, start_step=start, end_step=end, drop_fraction=fn)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    if is_update and bad_step >= 0:
      with pytest.raises(ValueError, match=f"update step {bad_step};"):
        sj.rigl(optax.sgd(0.1), **kw)
    else:
      sj.rigl(optax.sgd(0.1), **kw)


# ---------------------------------------------------------------------------------------
# Allocation: which leaves are sparse, in which layer order.
# ---------------------------------------------------------------------------------------


@_settings(60)
@given(
  indices=st.lists(st.integers(0, 120), min_size=1, max_size=6, unique=True),
  keep_first=st.booleans(),
  keep_last=st.booleans(),
  sparsity=st.sampled_from([0.0, 0.5, 0.9]),
  nested=st.booleans(),
)
def test_layer_order_is_numeric_and_first_last_kept_dense(
  indices, keep_first, keep_last, sparsity, nested
):
  sds = jax.ShapeDtypeStruct
  params = {}
  for i in indices:  # insertion order is irrelevant: JAX sorts dict keys
    layer = {"kernel": sds((4, 3), jnp.float32), "bias": sds((3,), jnp.float32)}
    if nested:
      params.setdefault("layers", {})[str(i)] = layer
    else:
      params[f"Dense_{i}"] = layer
  path = (lambda i: f"layers/{i}/kernel") if nested else (lambda i: f"Dense_{i}/kernel")
  first, last = min(indices), max(indices)
  dense = ({first} if keep_first else set()) | ({last} if keep_last else set())
  kw = dict(
    sparsity=sparsity, distribution="uniform", keep_first_dense=keep_first,
    keep_last_dense=keep_last,
  )  # fmt: skip
  if len(dense) == len(indices):
    with pytest.raises(ValueError, match="nothing to sparsify"):
      sj.layer_sparsities(params, **kw)
    return
  out = sj.layer_sparsities(params, **kw)
  for i in indices:
    want = None if i in dense or sparsity == 0.0 else sparsity
    assert out[path(i)] == want, f"{path(i)}: {out[path(i)]} != {want}"
    assert out[path(i).replace("kernel", "bias")] is None
  plan = sj.dynamic_sparse(optax.sgd(0.1), sparsity=0.5, update_every=None).plan(params)
  infos = {leaf.path: leaf.layer for leaf in plan.leaves if leaf.layer is not None}
  ranked = sorted(indices)
  for i in indices:
    info = infos[path(i)]
    assert info.index == ranked.index(i) and info.num_layers == len(indices)
    assert info.is_first == (i == first) and info.is_last == (i == last)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(
  name=st.sampled_from(sorted(_METHODS)),
  t=st.integers(0, 1050),
  seed=st.integers(0, 2**32 - 1),
  grad_style=st.sampled_from(["normal", "ties"]),
)
def test_transformation_step_invariants_many_examples(name, t, seed, grad_style):
  test_transformation_step_invariants.hypothesis.inner_test(name, t, seed, grad_style)
