"""Tests of the exact top-k selection and drop-and-grow primitives."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj


def _reference_topk(scores, k, candidates=None):
  """Stable numpy reference: highest scores first, ties by lowest flat index."""
  s = np.asarray(scores, np.float64).reshape(-1)
  c = np.ones_like(s, bool) if candidates is None else np.asarray(candidates).reshape(-1)
  order = [i for i in np.argsort(-s, kind="stable") if c[i]]
  out = np.zeros_like(s, bool)
  out[order[: max(int(k), 0)]] = True
  return out.reshape(np.shape(scores))


def test_topk_hand_worked_ties_by_index():
  scores = jnp.array([1.0, 3.0, 3.0, 0.0, 3.0])
  np.testing.assert_array_equal(
    sj.primitives.topk_mask(scores, 2), [False, True, True, False, False]
  )
  np.testing.assert_array_equal(sj.primitives.topk_mask(scores, 4), [True, True, True, False, True])
  np.testing.assert_array_equal(sj.primitives.topk_mask(scores, 0), [False] * 5)
  np.testing.assert_array_equal(sj.primitives.topk_mask(scores, 9), [True] * 5)


def test_topk_negative_zero_and_inf_scores():
  scores = jnp.array([-1.0, -jnp.inf, 0.0, -0.5, jnp.inf, -2.0])
  np.testing.assert_array_equal(
    sj.primitives.topk_mask(scores, 3), [False, False, True, True, True, False]
  )
  np.testing.assert_array_equal(
    sj.primitives.topk_mask(scores, 5), [True, False, True, True, True, True]
  )


@pytest.mark.parametrize("shape,k", [((7,), 3), ((4, 6), 10), ((3, 3, 5), 1), ((64, 33), 700)])
def test_topk_matches_reference_with_duplicates(shape, k):
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 5, size=shape).astype(np.float32)  # many ties
  candidates = rng.random(shape) < 0.7
  got = sj.primitives.topk_mask(jnp.asarray(scores), k, candidates=jnp.asarray(candidates))
  np.testing.assert_array_equal(got, _reference_topk(scores, k, candidates))


def test_topk_dynamic_k_under_jit_and_eager_agree():
  scores = jax.random.normal(jax.random.PRNGKey(1), (50, 20))
  f = jax.jit(lambda s, k: sj.primitives.topk_mask(s, k))
  for k in (0, 1, 17, 999, 1000, 1200):
    eager = sj.primitives.topk_mask(scores, k)
    np.testing.assert_array_equal(f(scores, jnp.int32(k)), eager)
    assert int(eager.sum()) == min(k, 1000)
    np.testing.assert_array_equal(eager, _reference_topk(scores, k))


def test_topk_along_axis_with_per_slice_counts():
  scores = jnp.array([[3.0, 1.0, 2.0], [2.0, 2.0, 0.0], [1.0, 3.0, 2.0], [0.0, 0.0, 1.0]])
  k = jnp.array([[2, 0, 1]])  # per column
  got = sj.primitives.topk_mask(scores, k, axis=0)
  expected = np.array(
    [[True, False, True], [True, False, False], [False, False, False], [False, False, False]]
  )
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
  "shape,density,drop_fraction",
  [(s, d, 0.3) for s in [(8,), (5, 7), (3, 4, 6), (2, 3, 3, 8)] for d in (0.1, 0.5, 0.9)]
  + [((5, 7), 0.5, 0.0), ((5, 7), 0.5, 1.0), ((2, 3, 3, 8), 0.1, 1.0)],
)
def test_drop_and_grow_invariants(shape, density, drop_fraction):
  key = jax.random.PRNGKey(hash((shape, density, drop_fraction)) % 2**31)
  k1, k2, k3 = jax.random.split(key, 3)
  size = int(np.prod(shape))
  nnz = max(1, int(size * density))
  mask = sj.primitives.topk_mask(jax.random.uniform(k1, shape), nnz)
  drop_scores = jnp.abs(jax.random.normal(k2, shape))
  grow_scores = jnp.abs(jax.random.normal(k3, shape))
  n_drop = int(np.floor(nnz * drop_fraction))
  new, kept = jax.jit(sj.primitives.drop_and_grow)(mask, drop_scores, grow_scores, n_drop)
  new, kept, mask = map(np.asarray, (new, kept, mask))
  grown = new & ~kept
  dropped = mask & ~kept
  assert new.sum() == nnz
  assert kept.sum() == nnz - n_drop
  assert not (kept & ~mask).any()  # kept ⊆ old
  assert not (kept & grown).any()
  assert grown.sum() == n_drop
  d, g = np.asarray(drop_scores), np.asarray(grow_scores)
  if dropped.any() and kept.any():
    assert d[dropped].max() <= d[kept].min()
  candidates = ~kept
  if grown.any() and (candidates & ~grown).any():
    assert g[grown].min() >= g[candidates & ~grown].max()


def _force_native(strategy, monkeypatch):
  """The XLA strategies run with the native kernel off; "native" needs it built."""
  from sparsejax._src.primitives import native_select, selection

  if strategy == "native" and not native_select.usable():
    pytest.skip(f"native selection unavailable: {native_select.unavailable_reason()}")
  monkeypatch.setattr(selection, "_NATIVE", strategy == "native")


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("strategy", ["rank", "histogram16", "bits", "native"])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_every_selection_strategy_matches_reference(strategy, axis, chunked, monkeypatch):
  from sparsejax._src.primitives import selection

  _force_native(strategy, monkeypatch)
  if chunked:  # large-array path on a small array: columns processed 2-3 at a time
    if strategy in ("rank", "native"):
      pytest.skip("short slices are ranked pairwise, never chunked; the native kernel streams")
    monkeypatch.setattr(selection, "_CHUNK_ABOVE", 0)
    monkeypatch.setattr(selection, "_CHUNK", 27)
    monkeypatch.setattr(selection, "_COUNT_CHUNK", 27)
    monkeypatch.setattr(selection, "_MIN_COUNT_COLS", 1)
  if strategy == "histogram16" and axis is not None:
    pytest.skip("per-slice selections always use counting passes")
  monkeypatch.setattr(selection, "_PAIRWISE_MAX", 10**9 if strategy == "rank" else 0)
  monkeypatch.setattr(selection, "_HISTOGRAM_ABOVE", 0 if strategy == "histogram16" else 10**9)
  rng = np.random.default_rng(3)
  scores = rng.integers(-3, 4, size=(12, 9)).astype(np.float32)  # ties and negatives
  scores[0, 0] = -np.inf
  candidates = rng.random((12, 9)) < 0.8
  if axis is None:
    for k in (0, 1, 40, 86, 200):
      got = sj.primitives.topk_mask(jnp.asarray(scores), k, candidates=jnp.asarray(candidates))
      np.testing.assert_array_equal(got, _reference_topk(scores, k, candidates), err_msg=f"k={k}")
    return
  n_slices = scores.shape[1 - axis]
  ks = rng.integers(-1, scores.shape[axis] + 2, size=n_slices)
  k_arr = jnp.asarray(ks).reshape((1, -1) if axis == 0 else (-1, 1))
  got = np.asarray(
    sj.primitives.topk_mask(
      jnp.asarray(scores), k_arr, axis=axis, candidates=jnp.asarray(candidates)
    )
  )
  for j in range(n_slices):
    sl = (slice(None), j) if axis == 0 else (j, slice(None))
    np.testing.assert_array_equal(got[sl], _reference_topk(scores[sl], ks[j], candidates[sl]))


@pytest.mark.parametrize("n", [1, 31, 32, 33, 70, 1000])
def test_row_cumsum_of_tie_ranks_matches_numpy(n):
  """The blocked cumsum (triangular products over 32-row blocks) that ranks tied entries."""
  from sparsejax._src.primitives import selection

  x = np.random.default_rng(n).random((n, 5)) < 0.4
  for fn in (selection._cumsum_rows, jax.jit(selection._cumsum_rows)):
    got = np.asarray(fn(jnp.asarray(x)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.cumsum(x, axis=0))


def test_per_column_ties_ranked_across_row_blocks():
  """Columns longer than one cumsum block, ties straddling the threshold in every column."""
  rng = np.random.default_rng(7)
  scores = rng.integers(0, 3, size=(70, 6)).astype(np.float32)  # many ties
  candidates = rng.random((70, 6)) < 0.9
  ks = np.array([0, 1, 17, 40, 63, 70])
  got = np.asarray(
    sj.primitives.topk_mask(
      jnp.asarray(scores), jnp.asarray(ks)[None], axis=0, candidates=jnp.asarray(candidates)
    )
  )
  for j in range(6):
    np.testing.assert_array_equal(
      got[:, j], _reference_topk(scores[:, j], ks[j], candidates[:, j]), err_msg=f"column {j}"
    )


@pytest.mark.parametrize("strategy", ["histogram16", "bits", "native"])
def test_write_takes_all_ties_or_ranks_them(strategy, monkeypatch):
  """Both mask writes, hand-worked: every tied entry taken (one comparison) or ranked."""
  from sparsejax._src.primitives import selection

  _force_native(strategy, monkeypatch)
  monkeypatch.setattr(selection, "_PAIRWISE_MAX", 0)
  monkeypatch.setattr(selection, "_HISTOGRAM_ABOVE", 0 if strategy == "histogram16" else 10**9)
  scores = jnp.array([[5.0, 2.0, 2.0], [2.0, 7.0, 1.0]])
  # k=4: 7, 5, then two of the three 2s tied at the threshold: ranked by flat index,
  # (0,1) and (0,2) win over (1,0).
  got = sj.primitives.topk_mask(scores, 4)
  np.testing.assert_array_equal(got, [[True, True, True], [False, True, False]])
  # k=5: all three tied 2s are taken (no ranking needed).
  got = sj.primitives.topk_mask(scores, 5)
  np.testing.assert_array_equal(got, [[True, True, True], [True, True, False]])
  if strategy == "histogram16":
    return
  cols = jnp.array([[1.0, 2.0, 3.0], [1.0, 7.0, 3.0], [0.0, 2.0, 3.0]])
  got = sj.primitives.topk_mask(cols, jnp.array([[2, 1, 2]]), axis=0)
  # Column 0: the tied 1s are both taken; column 1: the 7; column 2: three tied 3s, two
  # needed: the lowest rows win.
  np.testing.assert_array_equal(
    got, [[True, False, True], [True, True, True], [False, False, False]]
  )


@pytest.mark.parametrize("strategy", ["histogram16", "bits", "native"])
@pytest.mark.parametrize("axis", [None, 0])
def test_selection_under_x64_matches_reference(strategy, axis, monkeypatch):
  """jax_enable_x64 (float64 scores, int64 default ints): the int32 counts stay int32."""
  from sparsejax._src.primitives import selection

  _force_native(strategy, monkeypatch)
  monkeypatch.setattr(selection, "_CHUNK_ABOVE", 0)  # chunked: loops carry the counts
  monkeypatch.setattr(selection, "_CHUNK", 27)
  monkeypatch.setattr(selection, "_COUNT_CHUNK", 27)
  monkeypatch.setattr(selection, "_MIN_COUNT_COLS", 1)
  monkeypatch.setattr(selection, "_PAIRWISE_MAX", 0)
  monkeypatch.setattr(selection, "_HISTOGRAM_ABOVE", 0 if strategy == "histogram16" else 10**9)
  rng = np.random.default_rng(5)
  scores = rng.integers(-3, 4, size=(12, 9)).astype(np.float64)
  with jax.enable_x64(True):
    if axis is None:
      got = sj.primitives.topk_mask(jnp.asarray(scores), 40)
      np.testing.assert_array_equal(got, _reference_topk(scores.astype(np.float32), 40))
      mask = jnp.asarray(rng.random((12, 9)) < 0.5)
      new, _ = sj.primitives.drop_and_grow(mask, jnp.asarray(scores), -jnp.asarray(scores), 5)
      assert int(new.sum()) == int(mask.sum())
      return
    ks = rng.integers(0, 13, size=9)
    got = np.asarray(sj.primitives.topk_mask(jnp.asarray(scores), jnp.asarray(ks)[None], axis=0))
  for j in range(9):
    np.testing.assert_array_equal(
      got[:, j], _reference_topk(scores[:, j].astype(np.float32), ks[j])
    )


@pytest.mark.parametrize("shape", [(1,), (7,), (12, 9), (3, 3, 4, 5)])
def test_topk_mask_host_equals_topk_mask(shape):
  """The host twin selects the same entries: ties by flat index, -0.0 tying +0.0, ±inf."""
  from sparsejax._src.primitives import host_selection, selection

  rng = np.random.default_rng(11)
  n = int(np.prod(shape))
  scores = rng.integers(-3, 4, size=shape).astype(np.float32)  # many ties
  flat = scores.reshape(-1)
  flat[rng.random(n) < 0.2] = -0.0
  flat[0] = np.inf if n > 1 else flat[0]
  flat[-1] = -np.inf if n > 2 else flat[-1]
  for k in (-1, 0, 1, n // 3, n // 2, n - 1, n, n + 5):
    want = np.asarray(selection.topk_mask(jnp.asarray(scores), max(k, 0)))
    got = host_selection.topk_mask_host(scores, k)
    assert got.dtype == bool and got.shape == tuple(shape)
    np.testing.assert_array_equal(got, want, err_msg=f"k={k}")


def test_initial_masks_are_the_same_eager_and_under_jit():
  """tx.init draws and selects on the host when eager (unstructured, constant fan-in, N:M:
  no mask program is compiled) and in XLA under jit: the same masks."""
  import optax

  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {
    "a": {"kernel": jax.random.normal(keys[0], (64, 48)), "bias": jnp.zeros(48)},
    "b": {"kernel": jax.random.normal(keys[1], (3, 3, 8, 16))},
    "c": {"kernel": jax.random.normal(keys[2], (48, 10))},
    "a2": {"kernel": jax.random.normal(keys[2], (300, 700))},  # several draw chunks, blocks
  }
  from sparsejax._src.transforms import pruning

  def no_program(*args):
    raise AssertionError(f"an eager init compiled a mask program: {args}")

  for tx in (
    sj.rigl(optax.sgd(0.1), sparsity=0.9, end_step=10, update_every=5),
    sj.static_sparse(optax.sgd(0.1), sparsity=0.7, distribution="uniform"),
    sj.srigl(optax.sgd(0.1), sparsity=0.8, end_step=10, update_every=5, last_layer="^c/"),
    sj.static_sparse(optax.sgd(0.1), structure=sj.NM(2, 4)),
  ):
    with mock.patch.object(pruning, "_random_mask_program", no_program):
      eager = jax.tree.leaves(sj.get_masks(tx.init(params)))
    jitted = jax.tree.leaves(sj.get_masks(jax.jit(tx.init)(params)))
    assert len(eager) == len(jitted) >= 2  # ERK may keep a small layer dense
    for m, j in zip(eager, jitted, strict=True):
      assert m.dtype == j.dtype == bool and 0 < int(m.sum()) < m.size
      np.testing.assert_array_equal(np.asarray(m), np.asarray(j))


@pytest.mark.parametrize("per_column", [False, True], ids=["whole", "per_column"])
def test_native_selection_does_not_depend_on_threads(per_column):
  """Arrays above the kernel's one-thread limit (64K entries) split into per-thread parts;
  ties straddle the parts, and every thread count gives the XLA program's mask."""
  from sparsejax._src.primitives import native_select, selection

  if not native_select.available():
    pytest.skip(f"native selection unavailable: {native_select.unavailable_reason()}")
  rng = np.random.default_rng(11)
  scores = jnp.asarray(rng.integers(0, 5, size=(300, 257)).astype(np.float32))  # many ties
  candidates = jnp.asarray(rng.random((300, 257)) < 0.7)
  if per_column:
    k = jnp.asarray(rng.integers(-1, 302, size=(1, 257)), jnp.int32)
  else:
    k = jnp.asarray([[31_000]], jnp.int32)
  want = selection._select_2d_xla(scores, k, candidates, per_column=per_column)
  for threads in (1, 2, 3, 0):
    got = native_select.select_2d(scores, k, candidates, per_column=per_column, threads=threads)
    np.testing.assert_array_equal(got, want, err_msg=f"threads={threads}")


@pytest.mark.parametrize(
  "shape,axis", [((12, 9), 0), ((12, 9), 1), ((4, 6, 5), 1), ((5, 7), -1), ((300, 700), 0)]
)
def test_topk_mask_host_per_slice_equals_topk_mask(shape, axis):
  """Per-slice host selection (constant fan-in, N:M initial masks): the XLA program's mask
  (300x700: slices selected in several blocks)."""
  from sparsejax._src.primitives import host_selection, selection

  rng = np.random.default_rng(5)
  scores = rng.integers(-2, 3, size=shape).astype(np.float32)  # many ties in every slice
  scores[rng.random(shape) < 0.2] = -0.0
  n = shape[axis]
  for k in (-1, 0, 1, n // 2, n - 1, n, n + 3):
    want = np.asarray(selection.topk_mask(jnp.asarray(scores), max(k, 0), axis=axis))
    got = host_selection.topk_mask_host(scores, k, axis=axis)
    assert got.dtype == bool and got.shape == shape
    np.testing.assert_array_equal(got, want, err_msg=f"k={k}")


@pytest.mark.parametrize("shape", [(1,), (5,), (7, 11), (3, 3, 2, 8), (784, 64), (300, 700)])
def test_host_uniform_is_jax_uniform_bit_for_bit(shape):
  from sparsejax._src.primitives import host_random

  for seed in (0, 1, 2**31 + 5):
    key = jax.random.fold_in(jax.random.PRNGKey(seed % 2**31), seed)
    assert host_random.supported(key)
    got = host_random.uniform(key, shape)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, np.asarray(jax.random.uniform(key, shape)))
    ints = host_random.uniform_keys(key, shape)  # the floats' 23-bit integers
    assert ints.dtype == np.uint32 and int(ints.max()) < 2**23
    np.testing.assert_array_equal(ints.astype(np.float32) / np.float32(2**23), got)
    for data in (0, 7, 2**32 - 1):  # the initial masks' per-leaf keys
      folded = host_random.fold_in(key, data)
      assert folded.dtype == np.uint32 and host_random.supported(folded)
      np.testing.assert_array_equal(folded, np.asarray(jax.random.fold_in(key, data)))


def test_host_uniform_refuses_what_it_cannot_reproduce():
  from sparsejax._src.primitives import host_random

  assert not host_random.supported(jax.random.key(0))  # typed key
  assert not host_random.supported(jnp.zeros((4,), jnp.uint32))  # not a threefry key
  assert not host_random.supported(jax.jit(lambda k: k)(jax.random.PRNGKey(0)) + 1.0)
  with pytest.raises(ValueError, match="`key` must be a concrete raw threefry key"):
    host_random.uniform(jax.random.key(0), (3,))
  with pytest.raises(ValueError, match="`key` must be a concrete raw threefry key"):
    host_random.fold_in(jax.random.key(0), 3)
  with jax.threefry_partitionable(False):
    assert not host_random.supported(jax.random.PRNGKey(0))


@pytest.mark.parametrize("seed", [0, 3, 2**31 - 1])
def test_unrolled_threefry_is_jax_random_bit_for_bit(seed):
  """The loop-free key operations (mask-update keys, SET's hash words) equal jax.random's."""
  from sparsejax._src.primitives import threefry

  key = jax.random.PRNGKey(seed)
  assert threefry.supported(key) and not threefry.supported(jax.random.key(seed))
  for data in (0, 1, 77, 2**32 - 1):
    want = jax.random.fold_in(key, data)
    np.testing.assert_array_equal(threefry.fold_in(key, jnp.uint32(data)), want)
  keys = jax.random.split(key, 6)
  np.testing.assert_array_equal(threefry.split(keys), jax.vmap(jax.random.split)(keys))
  np.testing.assert_array_equal(
    threefry.fold_in(key, jnp.arange(5)), jnp.stack([jax.random.fold_in(key, i) for i in range(5)])
  )
  for n in (1, 2, 9):
    np.testing.assert_array_equal(threefry.bits(key, n), jax.random.bits(key, (n,), jnp.uint32))
  jitted = jax.jit(lambda k: threefry.split(threefry.fold_in(k, jnp.int32(300))))(key)
  np.testing.assert_array_equal(jitted, jax.random.split(jax.random.fold_in(key, 300)))


@pytest.mark.parametrize("shape", [(7,), (50, 40), (300, 257), (3, 3, 8, 16)])
def test_native_drop_and_grow_and_count_equal_the_xla_programs(shape, monkeypatch):
  """The fused native drop-and-grow (count + two selections) and the native count give the
  XLA programs' results, ties included, for every n_drop/n_grow edge."""
  from sparsejax._src.primitives import drop_grow, native_select, selection

  if not native_select.usable():
    pytest.skip(f"native selection unavailable: {native_select.unavailable_reason()}")
  rng = np.random.default_rng(sum(shape))
  mask = jnp.asarray(rng.random(shape) < 0.3)
  drop = jnp.asarray(rng.integers(0, 4, shape).astype(np.float32))  # many ties
  grow = jnp.asarray(rng.integers(0, 4, shape).astype(np.float32))
  nnz = int(mask.sum())
  for n_drop in (-2, 0, 3, nnz // 2, nnz, 10**6):
    for n_grow in (None, -1, 0, 5, 10**6):
      fn = jax.jit(lambda m, d, g: drop_grow.drop_and_grow(m, d, g, n_drop, n_grow))  # noqa: B023
      got = fn(mask, drop, grow)
      assert "sparsejax_drop_grow" in fn.lower(mask, drop, grow).as_text()
      want = drop_grow._drop_and_grow_xla(mask, drop, grow, n_drop, n_grow)
      for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w, err_msg=f"n_drop={n_drop} n_grow={n_grow}")
  big = jnp.asarray(rng.random((600, 500)) < 0.3)
  for axis in (None, 0):
    native = jax.jit(lambda m: selection.count_true(m, axis))(big)  # noqa: B023
    monkeypatch.setattr(selection, "_NATIVE", False)
    xla = jax.jit(lambda m: selection.count_true(m, axis))(big)  # noqa: B023
    monkeypatch.setattr(selection, "_NATIVE", True)
    np.testing.assert_array_equal(native, xla)
    np.testing.assert_array_equal(native, big.sum(axis=axis, keepdims=axis is not None))


@pytest.mark.parametrize("shape", [(40, 9), (300, 257), (17, 130)])
@pytest.mark.parametrize("cap", [False, True])
def test_native_grouped_drop_and_grow_equals_the_xla_program(shape, cap):
  """SRigL's update as one native call: the XLA program's (new, kept), ties included, with
  and without the cap of over-full columns, with ineligible (ablated) columns."""
  from sparsejax._src.primitives import drop_grow, native_select

  if not native_select.usable():
    pytest.skip(f"native selection unavailable: {native_select.unavailable_reason()}")
  rng = np.random.default_rng(shape[1])
  mask = jnp.asarray(rng.random(shape) < 0.3)
  drop = jnp.asarray(rng.integers(0, 4, shape).astype(np.float32))  # many ties
  grow = jnp.asarray(rng.integers(0, 4, shape).astype(np.float32))
  nnz, rows, cols = int(mask.sum()), shape[0], shape[1]
  eligible = jnp.asarray(rng.random((1, cols)) < 0.8)
  for per_group in (3, jnp.asarray(rng.integers(-1, rows + 2, (1, cols)), jnp.int32)):
    for n_drop in (-1, 0, nnz // 3, nnz, 10**6):
      for elig in (None, eligible):
        args = (mask, drop, grow, n_drop, per_group)
        kw = dict(axis=0, cap=cap, eligible=elig)
        fn = jax.jit(lambda *a, kw=kw: drop_grow.grouped_drop_and_grow(*a, **kw))
        got = fn(*args)
        assert "sparsejax_grouped_drop_grow" in fn.lower(*args).as_text()
        want = drop_grow._grouped_drop_and_grow_xla(*args, 0, cap, elig)
        for g, w in zip(got, want, strict=True):
          np.testing.assert_array_equal(g, w, err_msg=f"n_drop={n_drop} eligible={elig}")
